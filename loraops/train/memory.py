"""The memory estimate: the peak memory of a LoRA/QLoRA training step, computed before loading anything.

The estimate is physical, not a lookup: it counts the bytes each tensor takes in the loraops training
path (transformers + peft + TRL on a Llama-style decoder, SDPA attention, AdamW):

- **weights**: linear layers in the model dtype or 4-bit (NF4/FP4: half a byte per parameter plus
  block scales); for QLoRA with ``quant.upcast_non_quantized`` (the seed recipe),
  ``prepare_model_for_kbit_training`` upcasts embeddings, head and norms to float32, so the residual
  stream is float32 too; without it they stay in the model dtype;
- **adapter training state**: peft keeps the adapter in float32 (4 bytes), plus its gradients (4) and
  AdamW's two moments (8): 16 bytes per adapter parameter; TRL >= 1.16 casts a 4-bit base's adapter to
  bf16, and so its gradients and moments: 8 bytes;
- **activations** saved for backward, per token and layer: the float32 RMSNorm upcasts, each adapted
  linear's dropout mask and input copy, q/k/v and the attention output kept by SDPA, the SwiGLU inputs
  and output. With gradient checkpointing only each layer's input is kept, and one layer is recomputed
  at a time; checkpointing every n-th layer only (layers 0, n, 2n, ...), the others keep all of theirs;
- **loss**, one of three ways: ``logits`` (transformers' own loss, the seed recipe as measured):
  float32 logits, the log-softmax kept for backward, its gradient and the logits' gradient make 12
  bytes per vocabulary entry per token; ``liger``: Liger's fused linear cross-entropy, one chunk at a
  time; ``chunked``: TRL >= 1.16's own fused LM head, which every SFTTrainer run now uses (it switches
  Liger's off): tiles of 4,096 tokens x 32,768 vocabulary entries, recomputed in backward, plus the
  final hidden states it keeps and their float32 gradient.

The peak is at the start of backward: everything saved plus the loss's working set (or, with
checkpointing, the larger of that and one recomputed layer). Calibration against measured H200 peaks
is in BENCHMARKS.md. Pure Python: no torch, prefect or mlflow needed.
"""

from __future__ import annotations

import math
from typing import Literal

from pydantic import BaseModel

from loraops.config import LoraConfig, LoraopsConfig, QuantConfig
from loraops.train.shape import GIB, ModelShape

CUDA_CONTEXT_BYTES = GIB // 2  # CUDA context, kernels and cuBLAS handles, outside torch's allocator
CPU_RUNTIME_BYTES = GIB  # Python with torch, transformers, peft and TRL imported
LOSS_BYTES_PER_LOGIT = 12  # float32 log-softmax saved for backward + its gradient + the logits' gradient
TRL_TILE_TOKENS, TRL_TILE_VOCAB = 4096, 32768  # trl.kernels.chunked_logprob: one projection tile at a time
NF4_BLOCK = 64  # parameters per 4-bit block (one absmax each)
DOUBLE_QUANT_BLOCK = 256  # 8-bit absmax values per float32 second-level scale

Device = Literal["cuda", "cpu"]
DType = Literal["bfloat16", "float16", "float32"]
LossMode = Literal["logits", "liger", "chunked"]


class MemoryEstimate(BaseModel):
    """Estimated peak memory of one training step, by component (bytes)."""

    weights: int
    weights_detail: str
    adapter_params: int
    adapter_dtype: str = "fp32"
    adapter: int  # adapter weights
    gradients: int
    optimizer: int  # AdamW moments, float32
    activations: int  # saved for backward (all layers, or checkpoints + unchecked layers + one recomputed layer)
    logits: int  # the loss's working set
    compute_copies: int  # bf16 copies of float32 weights made by autocast and kept for backward
    runtime: int  # CUDA context, or the Python process on CPU
    total: int

    def rows(self) -> list[tuple[str, int]]:
        return [
            (f"base weights ({self.weights_detail})", self.weights),
            (f"adapter weights ({self.adapter_params / 1e6:.1f} M params, {self.adapter_dtype})", self.adapter),
            (f"adapter gradients ({self.adapter_dtype})", self.gradients),
            (f"AdamW states (2 x {self.adapter_dtype})", self.optimizer),
            ("activations", self.activations),
            ("logits and loss", self.logits),
            ("bf16 copies of fp32 weights", self.compute_copies),
            ("runtime (CUDA context / process)", self.runtime),
        ]


def adapter_targets(shape: ModelShape, lora: LoraConfig) -> dict[str, tuple[int, int]]:
    """The linear layers (per decoder layer) that get an adapter; ``all-linear`` excludes the output head."""
    linears = shape.linear_shapes()
    if lora.target_modules == "all-linear":
        return linears
    names = [lora.target_modules] if isinstance(lora.target_modules, str) else lora.target_modules
    return {name: linears[name] for name in names if name in linears}


def _weight_bytes(shape: ModelShape, quant: QuantConfig, dtype: DType, upcast: bool) -> tuple[int, str]:
    layer_params = shape.layers * shape.layer_linear_params
    other_params = shape.parameters - layer_params
    size = 4 if dtype == "float32" else 2
    if not quant.enabled:
        return shape.parameters * size, f"{_SHORT_DTYPE[dtype]}, {shape.parameters / 1e9:.2f} B params"
    scales = 1 / NF4_BLOCK if quant.double_quant else 4 / NF4_BLOCK  # 8-bit vs float32 absmax per block
    if quant.double_quant:
        scales += 4 / (NF4_BLOCK * DOUBLE_QUANT_BLOCK)
    quantised = layer_params * (0.5 + scales)
    rest = 4 if upcast else size  # prepare_model_for_kbit_training upcasts the rest to float32
    rest_dtype = "fp32" if rest == 4 else _SHORT_DTYPE[dtype]
    detail = f"{quant.mode}{' + double quant' if quant.double_quant else ''}; embeddings, head, norms {rest_dtype}"
    return int(quantised + other_params * rest), detail


_SHORT_DTYPE = {"bfloat16": "bf16", "float16": "fp16", "float32": "fp32"}


def _layer_activation_bytes(shape: ModelShape, lora: LoraConfig, act: int, residual: int, liger: bool) -> float:
    """Bytes saved for backward per token in one decoder layer."""
    h, i = shape.hidden, shape.intermediate
    mask = 1 if lora.dropout > 0 else 0
    norms = 2 * (residual if liger else 4) * h  # Liger keeps its input; transformers keeps a float32 upcast
    adapters = sum((act + mask) * d_in for d_in, _ in adapter_targets(shape, lora).values())
    attention = act * (2 * shape.q_dim + 2 * shape.kv_dim) + 4 * shape.heads  # q, k, v, output, logsumexp
    mlp = (2 if liger else 3) * act * i  # SwiGLU: gate, up (and SiLU output unless fused)
    return norms + adapters + attention + mlp


def _loss_bytes(shape: ModelShape, tokens: int, mode: LossMode, residual: int, compute: int) -> int:
    if mode == "logits":
        return LOSS_BYTES_PER_LOGIT * shape.vocab * tokens
    if mode == "liger":
        # Liger's fused linear cross-entropy: float32 logits and gradient of one chunk, plus the input's gradient.
        chunk = 2 ** math.ceil(math.log2(max(1, math.ceil(tokens / math.ceil(shape.vocab / shape.hidden)))))
        return 8 * shape.vocab * min(chunk, tokens) + 4 * shape.hidden * tokens
    # TRL's chunked LM head: one tile in the compute dtype; the masked copy of the final hidden states it keeps,
    # their float32 gradient accumulator and its cast back; a few float32 numbers per token.
    tile = compute * min(tokens, TRL_TILE_TOKENS) * min(shape.vocab, TRL_TILE_VOCAB)
    return tile + (2 * residual + 4) * shape.hidden * tokens + 40 * tokens


def estimate_peak_memory(
    shape: ModelShape,
    lora: LoraConfig,
    quant: QuantConfig,
    *,
    batch_size: int,
    seq_len: int,
    gradient_checkpointing: bool = False,
    checkpoint_every_n_layers: int = 1,
    liger_kernel: bool = False,
    device: Device = "cuda",
    dtype: DType | None = None,
    upcast_non_quantized: bool = True,
    loss: LossMode | None = None,
    bf16_adapter: bool = False,
) -> MemoryEstimate:
    """Peak memory of a training step at ``batch_size`` sequences of ``seq_len`` tokens.

    ``dtype`` is the base model's dtype (``model.dtype``; default bf16 on CUDA, fp32 on CPU). On CUDA
    the forward runs under bf16 autocast, as the trainer sets it up. The defaults describe the seed
    recipe as measured on the H200 (float32 upcasts for QLoRA, full logits, or Liger's fused loss with
    ``liger_kernel``); ``estimate_for_config`` describes the loraops path.
    """
    dtype = dtype or ("bfloat16" if device == "cuda" else "float32")
    dtype_bytes = 4 if dtype == "float32" else 2
    fp32_rest = (quant.enabled and upcast_non_quantized) or dtype_bytes == 4  # embeddings/head, residual stream
    act = 2 if device == "cuda" else (4 if quant.enabled else dtype_bytes)
    residual = 4 if fp32_rest else 2
    liger = liger_kernel and device == "cuda"
    loss_mode = loss or ("liger" if liger else "logits")
    tokens = batch_size * seq_len

    weights, detail = _weight_bytes(shape, quant, dtype, upcast_non_quantized)
    adapter_params = shape.layers * sum(
        (d_in + d_out) * lora.r + (d_out if lora.variant == "dora" else 0)
        for d_in, d_out in adapter_targets(shape, lora).values()
    )
    layer = _layer_activation_bytes(shape, lora, act, residual, liger) * tokens
    # Under autocast a frozen float32 weight is cast to bf16 for each matmul and kept for backward
    # (TRL's chunked head casts one vocabulary chunk of the head at a time).
    autocast_fp32 = device == "cuda" and fp32_rest
    head_rows = min(shape.vocab, TRL_TILE_VOCAB) if loss_mode == "chunked" else shape.vocab
    head_copy = 2 * head_rows * shape.hidden if autocast_fp32 else 0
    layer_copy = 2 * shape.layer_linear_params if autocast_fp32 and not quant.enabled else 0
    final_norm = (residual if liger else 4) * shape.hidden * tokens
    loss = _loss_bytes(shape, tokens, loss_mode, residual, 2 if device == "cuda" else residual) + final_norm

    if gradient_checkpointing:
        # A checkpointed layer keeps its input, the others all their activations. The peak is at the loss, or
        # when the last checkpointed layer is recomputed (the unchecked layers after it are freed by then).
        n = checkpoint_every_n_layers
        checked = math.ceil(shape.layers / n)  # layers 0, n, 2n, ...
        unchecked, unchecked_before_last = shape.layers - checked, (checked - 1) * (n - 1)
        checkpoints = checked * residual * shape.hidden * tokens
        recompute = layer + 3 * residual * shape.hidden * tokens  # + the hidden-state gradients in flight
        at_loss = (checkpoints + unchecked * layer, loss, head_copy + unchecked * layer_copy)
        at_recompute = (
            checkpoints + unchecked_before_last * layer + recompute,
            0,
            (unchecked_before_last + 1) * layer_copy,
        )
        activations, logits, copies = at_loss if sum(at_loss) >= sum(at_recompute) else at_recompute
    else:
        activations = shape.layers * layer
        logits, copies = loss, head_copy + shape.layers * layer_copy
    runtime = CUDA_CONTEXT_BYTES if device == "cuda" else CPU_RUNTIME_BYTES
    per_param = 2 if bf16_adapter else 4
    parts = dict(
        weights=weights,
        adapter=per_param * adapter_params,
        gradients=per_param * adapter_params,
        optimizer=2 * per_param * adapter_params,
        activations=int(activations),
        logits=int(logits),
        compute_copies=copies,
        runtime=runtime,
    )
    return MemoryEstimate(
        weights_detail=detail,
        adapter_params=adapter_params,
        adapter_dtype="bf16" if bf16_adapter else "fp32",
        total=sum(parts.values()),
        **parts,
    )


def estimate_for_config(
    shape: ModelShape, cfg: LoraopsConfig, device: Device, seq_len: int | None = None
) -> MemoryEstimate:
    """The estimate of the loraops training path for the configured settings (``data.max_length`` unless given).

    TRL's chunked LM head computes the loss (Liger, when on, contributes its layer kernels only); a
    4-bit base keeps its other weights in the model dtype unless ``quant.upcast_non_quantized``.
    """
    auto_dtype = cfg.quant.compute_dtype if cfg.quant.enabled and device == "cuda" else None
    return estimate_peak_memory(
        shape,
        cfg.lora,
        cfg.quant,
        batch_size=cfg.train.batch_size,
        seq_len=seq_len or cfg.data.max_length,
        gradient_checkpointing=cfg.train.gradient_checkpointing,
        checkpoint_every_n_layers=cfg.train.checkpoint_every_n_layers,
        liger_kernel=cfg.train.use_liger_kernel,
        device=device,
        dtype=auto_dtype if cfg.model.dtype == "auto" else cfg.model.dtype,
        upcast_non_quantized=cfg.quant.upcast_non_quantized,
        loss="chunked",
        bf16_adapter=cfg.quant.enabled,
    )
