"""Memory pre-flight: estimate the peak memory of a LoRA/QLoRA training step before loading anything.

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

import json
import logging
import math
import os
import re
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, ValidationError

from loraops.config import ConfigError, LoraConfig, LoraopsConfig, QuantConfig

log = logging.getLogger(__name__)

GIB = 1 << 30
DEFAULT_HEADROOM = 0.10
MAX_BATCH_SIZE = 128
CUDA_CONTEXT_BYTES = GIB // 2  # CUDA context, kernels and cuBLAS handles, outside torch's allocator
CPU_RUNTIME_BYTES = GIB  # Python with torch, transformers, peft and TRL imported
LOSS_BYTES_PER_LOGIT = 12  # float32 log-softmax saved for backward + its gradient + the logits' gradient
TRL_TILE_TOKENS, TRL_TILE_VOCAB = 4096, 32768  # trl.kernels.chunked_logprob: one projection tile at a time
NF4_BLOCK = 64  # parameters per 4-bit block (one absmax each)
DOUBLE_QUANT_BLOCK = 256  # 8-bit absmax values per float32 second-level scale

Device = Literal["cuda", "cpu"]
DType = Literal["bfloat16", "float16", "float32"]
LossMode = Literal["logits", "liger", "chunked"]


class MemoryPlanError(ConfigError):
    """The configured training cannot fit in the memory available; the message says what to change."""


# --------------------------------------------------------------------------------------------------
# Model shapes


class ModelShape(BaseModel):
    """The sizes of a Llama-style decoder that decide its memory."""

    model_config = ConfigDict(frozen=True)

    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    vocab: int
    tied_embeddings: bool
    head_dim: int | None = None

    @property
    def q_dim(self) -> int:
        return self.heads * (self.head_dim or self.hidden // self.heads)

    @property
    def kv_dim(self) -> int:
        return self.kv_heads * (self.head_dim or self.hidden // self.heads)

    def linear_shapes(self) -> dict[str, tuple[int, int]]:
        """(in, out) of each linear layer in one decoder layer, by its usual module name."""
        h, i = self.hidden, self.intermediate
        return {
            "q_proj": (h, self.q_dim),
            "k_proj": (h, self.kv_dim),
            "v_proj": (h, self.kv_dim),
            "o_proj": (self.q_dim, h),
            "gate_proj": (h, i),
            "up_proj": (h, i),
            "down_proj": (i, h),
        }

    @property
    def layer_linear_params(self) -> int:
        return sum(d_in * d_out for d_in, d_out in self.linear_shapes().values())

    @property
    def embedding_params(self) -> int:
        """Input embedding and output head (one matrix when tied)."""
        return self.vocab * self.hidden * (1 if self.tied_embeddings else 2)

    @property
    def parameters(self) -> int:
        norms = (2 * self.layers + 1) * self.hidden
        return self.layers * self.layer_linear_params + self.embedding_params + norms


def _shape(hidden, intermediate, layers, heads, kv_heads, vocab, tied, head_dim=None) -> ModelShape:
    return ModelShape(
        hidden=hidden,
        intermediate=intermediate,
        layers=layers,
        heads=heads,
        kv_heads=kv_heads,
        vocab=vocab,
        tied_embeddings=tied,
        head_dim=head_dim,
    )


_LLAMA_31_8B = _shape(4096, 14336, 32, 32, 8, 128256, False)
_LLAMA_31_70B = _shape(8192, 28672, 80, 64, 8, 128256, False)
_LLAMA_32_1B = _shape(2048, 8192, 16, 32, 8, 128256, True, 64)
_LLAMA_32_3B = _shape(3072, 8192, 28, 24, 8, 128256, True, 128)
_MISTRAL_7B_V03 = _shape(4096, 14336, 32, 32, 8, 32768, False)
_QWEN25_05B = _shape(896, 4864, 24, 14, 2, 151936, True)
_QWEN25_15B = _shape(1536, 8960, 28, 12, 2, 151936, True)
_QWEN25_7B = _shape(3584, 18944, 28, 28, 4, 152064, False)
_SMOLLM2_135M = _shape(576, 1536, 30, 9, 3, 49152, True, 64)
_SMOLLM2_360M = _shape(960, 2560, 32, 15, 5, 49152, True, 64)
_SMOLLM2_17B = _shape(2048, 8192, 24, 32, 32, 49152, True, 64)

# The hub is unreachable offline: well-known ids resolve from their published config.json values.
KNOWN_MODELS: dict[str, ModelShape] = {
    "meta-llama/Llama-3.1-8B": _LLAMA_31_8B,
    "meta-llama/Llama-3.1-8B-Instruct": _LLAMA_31_8B,
    "meta-llama/Llama-3.1-70B": _LLAMA_31_70B,
    "meta-llama/Llama-3.1-70B-Instruct": _LLAMA_31_70B,
    "meta-llama/Llama-3.2-1B": _LLAMA_32_1B,
    "meta-llama/Llama-3.2-1B-Instruct": _LLAMA_32_1B,
    "meta-llama/Llama-3.2-3B": _LLAMA_32_3B,
    "meta-llama/Llama-3.2-3B-Instruct": _LLAMA_32_3B,
    "mistralai/Mistral-7B-v0.3": _MISTRAL_7B_V03,
    "mistralai/Mistral-7B-Instruct-v0.3": _MISTRAL_7B_V03,
    "Qwen/Qwen2.5-0.5B": _QWEN25_05B,
    "Qwen/Qwen2.5-0.5B-Instruct": _QWEN25_05B,
    "Qwen/Qwen2.5-1.5B": _QWEN25_15B,
    "Qwen/Qwen2.5-1.5B-Instruct": _QWEN25_15B,
    "Qwen/Qwen2.5-7B": _QWEN25_7B,
    "Qwen/Qwen2.5-7B-Instruct": _QWEN25_7B,
    "HuggingFaceTB/SmolLM2-135M": _SMOLLM2_135M,
    "HuggingFaceTB/SmolLM2-135M-Instruct": _SMOLLM2_135M,
    "HuggingFaceTB/SmolLM2-360M": _SMOLLM2_360M,
    "HuggingFaceTB/SmolLM2-360M-Instruct": _SMOLLM2_360M,
    "HuggingFaceTB/SmolLM2-1.7B": _SMOLLM2_17B,
    "HuggingFaceTB/SmolLM2-1.7B-Instruct": _SMOLLM2_17B,
}


def shape_from_config(config: dict) -> ModelShape:
    """A ModelShape from a transformers config (the dict of config.json, or ``PretrainedConfig.to_dict()``)."""
    config = config.get("text_config") or config  # multimodal wrappers keep the decoder here
    try:
        heads = config["num_attention_heads"]
        return ModelShape(
            hidden=config["hidden_size"],
            intermediate=config["intermediate_size"],
            layers=config["num_hidden_layers"],
            heads=heads,
            kv_heads=config.get("num_key_value_heads") or heads,
            vocab=config["vocab_size"],
            tied_embeddings=bool(config.get("tie_word_embeddings", True)),
            head_dim=config.get("head_dim"),
        )
    except KeyError as missing:
        raise ConfigError(
            f"model config has no {missing}: the memory estimate needs a Llama-style decoder config "
            "(hidden_size, intermediate_size, num_hidden_layers, num_attention_heads, vocab_size)"
        ) from None


def resolve_model_shape(
    source: str, base_model_dir: str | Path | None = None, revision: str | None = None
) -> ModelShape:
    """The shape of ``model.base``: a local folder, a built-in hub id, the pypi GGUF default, or the hub.

    ``base_model_dir`` (``paths.base_model_dir``) is used when it already holds the converted ``source``.
    """
    local = Path(source).expanduser()
    if (local / "config.json").is_file():
        return shape_from_config(json.loads((local / "config.json").read_text()))
    if local.exists():
        raise ConfigError(f"{source}: no config.json in this folder; pass a folder saved with save_pretrained")
    if source in KNOWN_MODELS:
        return KNOWN_MODELS[source]
    if source.startswith("pypi:"):
        return _gguf_shape(source, base_model_dir)
    return _hub_shape(source, revision)


def _gguf_shape(source: str, base_model_dir: str | Path | None) -> ModelShape:
    from loraops.names import BASE_MARKER_FILE
    from loraops.train.base_model import locate_pypi_file

    if base_model_dir is not None:
        converted = Path(base_model_dir)
        marker = converted / BASE_MARKER_FILE
        if marker.is_file() and json.loads(marker.read_text()).get("source") == source:
            if (converted / "config.json").is_file():
                return shape_from_config(json.loads((converted / "config.json").read_text()))
    from transformers import AutoConfig

    gguf_path = locate_pypi_file(source)
    return shape_from_config(AutoConfig.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name).to_dict())


def _hub_shape(source: str, revision: str | None) -> ModelShape:
    families = sorted({name.split("/")[1].replace("-Instruct", "") for name in KNOWN_MODELS})
    hint = (
        f"unknown model {source!r}: not a folder with config.json, nor one of the ids known offline "
        f"({', '.join(families)}, and their -Instruct versions); pass a local folder with config.json"
    )
    if "/" not in source:
        raise ConfigError(hint)
    try:
        from transformers import AutoConfig

        return shape_from_config(AutoConfig.from_pretrained(source, revision=revision).to_dict())
    except (OSError, ValueError) as error:  # offline, unknown id, gated repo
        raise ConfigError(f"{hint} (the hub could not provide its config: {str(error).splitlines()[0]})") from None


# --------------------------------------------------------------------------------------------------
# Sizes


_UNITS = {
    "b": 1,
    "kb": 10**3,
    "mb": 10**6,
    "gb": 10**9,
    "tb": 10**12,
    "k": 1 << 10,
    "m": 1 << 20,
    "g": 1 << 30,
    "t": 1 << 40,
    "kib": 1 << 10,
    "mib": 1 << 20,
    "gib": 1 << 30,
    "tib": 1 << 40,
}
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]+)\s*$")


def parse_memory_size(text: str) -> int:
    """Bytes in ``24GiB``, ``24576MiB``, ``80G`` (binary, as in ``free -g``) or ``24GB`` (decimal, 10^9)."""
    match = _SIZE.match(text)
    if not match:
        raise ConfigError(
            f"memory size {text!r}: expected a positive number and a unit, e.g. 24GiB, 24576MiB, 80G or 24GB"
        )
    number, unit = float(match.group(1)), match.group(2).lower()
    if unit not in _UNITS:
        raise ConfigError(f"memory size {text!r}: unknown unit {match.group(2)!r}; use GiB, MiB, TiB, G, M, GB or MB")
    size = int(number * _UNITS[unit])
    if size <= 0:
        raise ConfigError(f"memory size {text!r} must be larger than zero")
    return size


def format_gib(size: float) -> str:
    return f"{size / GIB:.1f} GiB"


# --------------------------------------------------------------------------------------------------
# The estimate


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


# --------------------------------------------------------------------------------------------------
# The plan


Mode = Literal["lora", "qlora"]


class PlanOption(BaseModel):
    """One way of training considered by the plan."""

    mode: Mode
    gradient_checkpointing: bool
    batch_size: int | None  # the largest that fits; None when not even batch 1 fits
    estimate: MemoryEstimate  # at batch_size, or at batch 1 when nothing fits
    note: str = ""

    @property
    def label(self) -> str:
        name = "LoRA (bf16 base)" if self.mode == "lora" else "QLoRA (4-bit base)"
        return f"{name}, checkpointing {'on' if self.gradient_checkpointing else 'off'}"


class Plan(BaseModel):
    """What to train with: the fastest option that fits, at the largest batch that fits."""

    memory: int
    usable: int
    headroom: float
    seq_len: int
    device: Device
    mode: Mode
    quant_mode: str
    gradient_checkpointing: bool
    batch_size: int
    gradient_accumulation_steps: int
    estimate: MemoryEstimate
    alternatives: list[PlanOption]
    overrides: list[str]  # section.key=value, for -S


def _qlora_mode(cfg: LoraopsConfig) -> str:
    return cfg.quant.mode if cfg.quant.enabled else "nf4"


def _variant(cfg: LoraopsConfig, quant_mode: str, checkpointing: bool, batch: int | None = None) -> LoraopsConfig:
    """``cfg`` with other quantisation, checkpointing (of every layer) and batch size (not validated: see ``_refusal``)."""
    train = {"gradient_checkpointing": checkpointing, "checkpoint_every_n_layers": 1}
    train.update({"batch_size": batch} if batch else {})
    return cfg.model_copy(
        update={
            "quant": cfg.quant.model_copy(update={"mode": quant_mode}),
            "train": cfg.train.model_copy(update=train),
        }
    )


def _refusal(cfg: LoraopsConfig) -> str:
    """Why the config refuses this combination (e.g. DoRA on a 4-bit base), or an empty string."""
    try:
        LoraopsConfig.model_validate(cfg.model_dump(mode="json"))
    except ValidationError as error:
        return "; ".join(item["msg"].removeprefix("Value error, ") for item in error.errors())
    return ""


def _largest_batch(fits, limit: int) -> int | None:
    """The largest b in [1, limit] with fits(b), given fits is monotone (True up to some b)."""
    if not fits(1):
        return None
    low, high = 1, limit
    while low < high:
        middle = (low + high + 1) // 2
        low, high = (middle, high) if fits(middle) else (low, middle - 1)
    return low


def plan(
    shape: ModelShape,
    memory_bytes: int,
    base_cfg: LoraopsConfig,
    seq_len: int,
    *,
    device: Device = "cuda",
    headroom: float = DEFAULT_HEADROOM,
    max_batch_size: int = MAX_BATCH_SIZE,
) -> Plan:
    """Choose LoRA or QLoRA, checkpointing and the largest batch (≤ ``max_batch_size``) that fit.

    Options are tried fastest first (measured on the H200: LoRA without checkpointing, LoRA with it,
    then QLoRA); the first that fits at batch 1 wins. ``headroom`` of the memory is kept free for
    allocator fragmentation and the estimate's error. Raises MemoryPlanError, naming what to change,
    when not even QLoRA with checkpointing at batch 1 fits.
    """
    usable = int(memory_bytes * (1 - headroom))
    options = [
        _consider(shape, _variant(base_cfg, quant_mode, checkpointing), mode, usable, seq_len, device, max_batch_size)
        for mode, quant_mode in (("lora", "none"), ("qlora", _qlora_mode(base_cfg)))
        for checkpointing in (False, True)
    ]
    chosen = next((option for option in options if option.batch_size), None)
    if chosen is None:
        raise MemoryPlanError(_nothing_fits(shape, base_cfg, memory_bytes, usable, seq_len, device, headroom))
    return _make_plan(base_cfg, chosen, options, memory_bytes, usable, headroom, seq_len, device)


def _consider(
    shape: ModelShape, cfg: LoraopsConfig, mode: Mode, usable: int, seq_len: int, device: Device, max_batch_size: int
) -> PlanOption:
    """The largest batch at which ``cfg`` fits in ``usable`` bytes (None when not even batch 1 fits)."""

    def at(batch: int) -> MemoryEstimate:
        return estimate_for_config(
            shape, _variant(cfg, cfg.quant.mode, cfg.train.gradient_checkpointing, batch), device, seq_len
        )

    refusal = _refusal(cfg)
    batch = None if refusal else _largest_batch(lambda b: at(b).total <= usable, max_batch_size)
    return PlanOption(
        mode=mode,
        gradient_checkpointing=cfg.train.gradient_checkpointing,
        batch_size=batch,
        estimate=at(batch or 1),
        note=refusal,
    )


def _make_plan(
    base_cfg: LoraopsConfig,
    chosen: PlanOption,
    options: list[PlanOption],
    memory_bytes: int,
    usable: int,
    headroom: float,
    seq_len: int,
    device: Device,
) -> Plan:
    quant_mode = "none" if chosen.mode == "lora" else _qlora_mode(base_cfg)
    effective = base_cfg.train.batch_size * base_cfg.train.gradient_accumulation_steps
    accumulation = max(1, math.ceil(effective / chosen.batch_size))  # keep the configured examples per update
    overrides = [
        f"quant.mode={quant_mode}",
        f"train.gradient_checkpointing={'true' if chosen.gradient_checkpointing else 'false'}",
        f"train.batch_size={chosen.batch_size}",
        f"train.gradient_accumulation_steps={accumulation}",
    ]
    if base_cfg.train.checkpoint_every_n_layers != 1:  # the plan checkpoints all layers or none
        overrides.append("train.checkpoint_every_n_layers=1")
    if seq_len != base_cfg.data.max_length:
        overrides.append(f"data.max_length={seq_len}")
    return Plan(
        memory=memory_bytes,
        usable=usable,
        headroom=headroom,
        seq_len=seq_len,
        device=device,
        mode=chosen.mode,
        quant_mode=quant_mode,
        gradient_checkpointing=chosen.gradient_checkpointing,
        batch_size=chosen.batch_size,
        gradient_accumulation_steps=accumulation,
        estimate=chosen.estimate,
        alternatives=options,
        overrides=overrides,
    )


def _nothing_fits(
    shape: ModelShape, cfg: LoraopsConfig, memory_bytes: int, usable: int, seq_len: int, device: Device, headroom: float
) -> str:
    """Why nothing fits, and the three ways out: a shorter sequence, more memory, a smaller model."""
    smallest = _variant(cfg, _qlora_mode(cfg), checkpointing=True, batch=1)
    needed = estimate_for_config(shape, smallest, device, seq_len).total
    where = "GPU memory" if device == "cuda" else "RAM"
    ways = [
        f"more {where}: QLoRA with gradient checkpointing at batch 1 needs about {format_gib(needed / (1 - headroom))} "
        f"({format_gib(needed)} estimated + {headroom:.0%} headroom)"
    ]
    longest = _largest_batch(lambda n: estimate_for_config(shape, smallest, device, n).total <= usable, seq_len)
    if longest:
        ways.insert(0, f"a shorter sequence: data.max_length={longest} or less fits (QLoRA, checkpointing, batch 1)")
    ways.append("a smaller model (model.base)")
    lines = [
        f"no training setting fits in {format_gib(memory_bytes)} of {where} at sequence length {seq_len} "
        f"(usable {format_gib(usable)} after {headroom:.0%} headroom); even QLoRA with gradient checkpointing "
        f"at batch 1 needs {format_gib(needed)}. Change one of:"
    ]
    return "\n".join(lines + [f"  - {way}" for way in ways])


# --------------------------------------------------------------------------------------------------
# The pre-flight check


class MemoryCheck(BaseModel):
    """The pre-flight's verdict on the configured settings."""

    device: Device
    available: int  # GPU memory (total) or system RAM
    seq_len: int
    batch_size: int
    estimate: MemoryEstimate
    fits: bool

    def summary(self) -> str:
        where = "GPU memory" if self.device == "cuda" else "RAM"
        return (
            f"estimated peak {format_gib(self.estimate.total)} of {format_gib(self.available)} {where} "
            f"(batch {self.batch_size} x {self.seq_len} tokens)"
        )


def system_memory_bytes() -> int:
    """Physical RAM, from sysconf (no extra dependency)."""
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def device_memory_bytes(device: Device) -> int:
    """The budget of the pre-flight: the GPU's total memory, or the system RAM."""
    if device == "cpu":
        return system_memory_bytes()
    import torch

    free, total = torch.cuda.mem_get_info()
    if free < total * (1 - DEFAULT_HEADROOM):
        log.warning(
            "memory pre-flight: only %s of %s GPU memory is free (other processes?)",
            format_gib(free),
            format_gib(total),
        )
    return total


def check_memory(shape: ModelShape, cfg: LoraopsConfig, device: Device, available: int) -> MemoryCheck:
    """Refuse settings whose estimated peak exceeds ``available`` bytes, naming what to change.

    On CUDA the plan's headroom applies. On CPU nothing is refused: the estimate assumes every
    sequence at data.max_length (padding-free batches of real data are usually far shorter) and the
    operating system can page, so an estimate above the RAM is a warning with the same advice.
    """
    estimate = estimate_for_config(shape, cfg, device)
    limit = available if device == "cpu" else int(available * (1 - DEFAULT_HEADROOM))
    check = MemoryCheck(
        device=device,
        available=available,
        seq_len=cfg.data.max_length,
        batch_size=cfg.train.batch_size,
        estimate=estimate,
        fits=estimate.total <= limit,
    )
    if check.fits:
        log.info("memory pre-flight: %s", check.summary())
        return check
    every_n = cfg.train.checkpoint_every_n_layers
    current = (
        f"quant.mode={cfg.quant.mode}, train.batch_size={cfg.train.batch_size}, "
        f"train.gradient_checkpointing={str(cfg.train.gradient_checkpointing).lower()}, "
        f"{f'train.checkpoint_every_n_layers={every_n}, ' if every_n > 1 else ''}"
        f"data.max_length={cfg.data.max_length}"
    )
    problem = f"memory pre-flight: {check.summary()} does not fit with {current}"
    try:
        better = plan(
            shape,
            available,
            cfg,
            cfg.data.max_length,
            device=device,
            headroom=0.0 if device == "cpu" else DEFAULT_HEADROOM,
        )
    except MemoryPlanError as error:
        refusal = MemoryPlanError(f"{problem}.\n{error}")
    else:
        refusal = MemoryPlanError(
            f"{problem}; set {' '.join('-S ' + item for item in better.overrides)} "
            f"(estimated {format_gib(better.estimate.total)}; `loraops plan` explains)"
        )
    if device == "cpu":
        log.warning("%s (worst case: every sequence at data.max_length; continuing on CPU)", refusal)
        return check
    raise refusal
