"""An adapter on disk and the base it was trained on: safetensors-only checks, loading it, loading a merged export.

Weights are read from safetensors only, never from pickles. Imports only the ML stack: no MLflow, no prefect.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from loraops.config import LoraopsConfig, ModelConfig, QuantConfig
from loraops.results import BaseModelRef
from loraops.train import base_model as modeling
from loraops.train.base_model import ADAPTER_WEIGHTS, resolve_dtype

_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".ckpt")


class UnsafeArtifactError(ValueError):
    """Weights that would have to be unpickled to load; loraops reads safetensors only."""


@dataclass(frozen=True)
class AdapterSource:
    """An adapter on disk, with the base model and quantisation it was trained with."""

    label: str  # what was asked for: models:/NAME@alias, models:/NAME/3 or a folder
    adapter_dir: Path
    base: BaseModelRef
    quant: QuantConfig
    model_name: str | None = None
    version: str | None = None
    run_id: str | None = None


def project_base(cfg: LoraopsConfig, root: Path) -> BaseModelRef:
    """The base model this project trains on, as the prepare-base-model stage recorded it."""
    return modeling.read_base_model_ref(Path(root) / cfg.paths.base_model_dir)


def require_safetensors_adapter(folder: Path) -> None:
    if (folder / ADAPTER_WEIGHTS).is_file() and (folder / "adapter_config.json").is_file():
        return
    _refuse_pickles(folder, f"an adapter ({ADAPTER_WEIGHTS})", "PeftModel.save_pretrained(dir)")
    raise FileNotFoundError(f"{folder} is not a PEFT adapter: it needs adapter_config.json and {ADAPTER_WEIGHTS}")


def require_safetensors_model(folder: Path) -> None:
    if (folder / "config.json").is_file() and any(folder.glob("*.safetensors")):
        return
    _refuse_pickles(folder, "a model (*.safetensors)", "model.save_pretrained(dir, safe_serialization=True)")
    raise FileNotFoundError(f"{folder} is not a saved model: it needs config.json and *.safetensors weights")


def _refuse_pickles(folder: Path, wanted: str, fix: str) -> None:
    pickles = sorted(path.name for path in folder.glob("*") if path.suffix in _PICKLE_SUFFIXES)
    if pickles:
        raise UnsafeArtifactError(
            f"{folder} holds pickled weights ({', '.join(pickles)}) and no safetensors: loading a pickle can run "
            f"arbitrary code, so loraops loads {wanted} from safetensors only. Re-save it with {fix}"
        )


def is_adapter_dir(folder: Path) -> bool:
    return (folder / "adapter_config.json").is_file()


def load_adapter(source: AdapterSource, model_cfg: ModelConfig, device: str):
    """(model, tokenizer): the base as trained (4-bit for QLoRA) with the adapter applied."""
    model = modeling.load_adapter_model(source.base, source.adapter_dir, model_cfg, source.quant, device)
    return model, modeling.load_tokenizer(source.base, model_cfg)


def load_merged(folder: Path, model_cfg: ModelConfig, device: str):
    """(model, tokenizer) from a merged export (safetensors only)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    require_safetensors_model(folder)
    model = AutoModelForCausalLM.from_pretrained(
        folder,
        use_safetensors=True,
        trust_remote_code=model_cfg.trust_remote_code,
        dtype=resolve_dtype(model_cfg, device),
        device_map={"": device},
    )
    tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=model_cfg.trust_remote_code)
    return model.eval(), tokenizer
