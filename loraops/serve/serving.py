"""Load a registered adapter (or a local folder) on its base model and generate, offline.

A model is named as MLflow names it (``models:/NAME@champion``, ``models:/NAME/3``) or by a local
folder: an adapter saved by training, or a merged export. The base model comes from the version's
``loraops.base_model`` tag and is resolved as training resolved it (the PyPI GGUF default is the
converted folder under ``paths.base_model_dir``); the 4-bit settings come from the training run's
parameters, so a QLoRA adapter runs on the base it was trained on. Prompts go through the same chat
template as training: one user message, ``apply_chat_template(add_generation_prompt=True)``.

Several adapters can share one base model (``AdapterSwitcher``): each request names the adapter to
use, or none for the base model itself. Weights are read from safetensors only, never from pickles.

Imports only the ML stack and MLflow's client: no prefect.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from loraops.config import ConfigError, LoraopsConfig, ModelConfig, QuantConfig
from loraops.results import BaseModelRef

if TYPE_CHECKING:
    from mlflow import MlflowClient

logger = logging.getLogger(__name__)

_MODEL_URI = re.compile(r"^models:/(?P<name>[^/@]+)(?:@(?P<alias>[\w-]+)|/(?P<version>\d+))$")
_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".ckpt")


class UnsafeArtifactError(ValueError):
    """Weights that would have to be unpickled to load; loraops reads safetensors only."""


@dataclass(frozen=True)
class SampleAnswer:
    prompt: str
    base_answer: str
    adapter_answer: str


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


# --- finding the adapter and its base ---------------------------------------------------------


def parse_model_uri(uri: str) -> tuple[str, str] | None:
    """``models:/NAME@alias`` -> (NAME, alias); ``models:/NAME/3`` -> (NAME, "3"); anything else None."""
    match = _MODEL_URI.match(uri)
    if match is None:
        if uri.startswith("models:/"):
            raise ConfigError(f"{uri!r}: expected models:/NAME@ALIAS or models:/NAME/VERSION")
        return None
    return match["name"], match["alias"] or match["version"]


def fetch_adapter(
    cfg: LoraopsConfig, root: Path, model: str, destination: Path, client: MlflowClient | None = None
) -> AdapterSource:
    """Resolve ``model`` (a models:/ URI or a local adapter folder) into an adapter on local disk."""
    parsed = parse_model_uri(model)
    from loraops.registry import integrity

    if parsed is None:
        folder = Path(model)
        require_safetensors_adapter(folder)
        integrity.check_readable(folder, str(folder))
        return AdapterSource(label=model, adapter_dir=folder, base=project_base(cfg, root), quant=cfg.quant)
    from loraops.registry import runs as registry

    client = client or registry.client_for(cfg.registry, root)
    version = registry.get_version(client, *parsed)
    adapter_dir = integrity.download_verified(client, version, destination / f"{version.name}-v{version.version}")
    require_safetensors_adapter(adapter_dir)
    return AdapterSource(
        label=model,
        adapter_dir=adapter_dir,
        base=base_for_version(cfg, root, version.tags),
        quant=quant_of_run(client, version.run_id, cfg.quant),
        model_name=version.name,
        version=str(version.version),
        run_id=version.run_id,
    )


def project_base(cfg: LoraopsConfig, root: Path) -> BaseModelRef:
    """The base model this project trains on, as the prepare-base-model stage recorded it."""
    from loraops.train import base_model as modeling

    return modeling.read_base_model_ref(Path(root) / cfg.paths.base_model_dir)


def base_for_version(cfg: LoraopsConfig, root: Path, tags: Mapping[str, str]) -> BaseModelRef:
    """The base model named by a version's lineage tags, resolved the way training resolved it."""
    from loraops.names import BASE_MODEL_TAG, BASE_REVISION_TAG
    from loraops.train import base_model as modeling

    source = tags.get(BASE_MODEL_TAG)
    if not source:
        raise ConfigError(f"the version has no {BASE_MODEL_TAG} tag: its base model is unknown")
    revision = tags.get(BASE_REVISION_TAG) or None
    base_dir = Path(root) / cfg.paths.base_model_dir
    prepared = _prepared_base(base_dir)
    if prepared is not None and prepared.source == source:
        return prepared
    if source.startswith("pypi:"):
        if prepared is not None:
            raise ConfigError(
                f"the version was trained on {source} but {base_dir} holds {prepared.source}: set model.base to "
                f"{source} and run `loraops stage prepare-base-model`, or use another project folder"
            )
        return modeling.prepare_base_model(cfg.model.model_copy(update={"base": source}), base_dir)
    local = Path(source) if Path(source).is_absolute() else Path(root) / source
    if local.is_dir():
        return BaseModelRef(source=source, path=str(local), revision=revision)
    return BaseModelRef(source=source, path=source, revision=revision)  # a hub id: from_pretrained resolves it


def _prepared_base(base_dir: Path) -> BaseModelRef | None:
    from loraops.train import base_model as modeling

    try:
        return modeling.read_base_model_ref(base_dir)
    except FileNotFoundError:
        return None


def quant_of_run(client: MlflowClient, run_id: str | None, fallback: QuantConfig) -> QuantConfig:
    """The 4-bit settings the adapter was trained with (the run's ``quant.*`` params)."""
    if not run_id:
        return fallback
    params = client.get_run(run_id).data.params
    logged = {field: params[f"quant.{field}"] for field in QuantConfig.model_fields if f"quant.{field}" in params}
    return QuantConfig.model_validate({**fallback.model_dump(), **logged}) if logged else fallback


# --- safetensors only -------------------------------------------------------------------------


def require_safetensors_adapter(folder: Path) -> None:
    from loraops.train.base_model import ADAPTER_WEIGHTS

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


# --- loading and generating -------------------------------------------------------------------


def load_adapter(source: AdapterSource, model_cfg: ModelConfig, device: str):
    """(model, tokenizer): the base as trained (4-bit for QLoRA) with the adapter applied."""
    from loraops.train import base_model as modeling

    model = modeling.load_adapter_model(source.base, source.adapter_dir, model_cfg, source.quant, device)
    return model, modeling.load_tokenizer(source.base, model_cfg)


def load_merged(folder: Path, model_cfg: ModelConfig, device: str):
    """(model, tokenizer) from a merged export (safetensors only)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from loraops.train.base_model import resolve_dtype

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


def chat_inputs(tokenizer, prompt: str | Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Token ids of a user prompt (or earlier turns) as training saw prompts: template plus generation prompt."""
    import torch

    if getattr(tokenizer, "chat_template", None):
        messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
        encoded = tokenizer.apply_chat_template(messages, tokenize=True, add_generation_prompt=True, return_dict=True)
        ids = list(encoded["input_ids"])
    else:  # plain-text training data: the prompt is a text prefix
        ids = list(tokenizer(prompt, add_special_tokens=True)["input_ids"])
    return {"input_ids": torch.tensor([ids]), "attention_mask": torch.ones((1, len(ids)), dtype=torch.long)}


def generate_ids(
    model, tokenizer, prompt: str | Sequence[Mapping[str, Any]], max_new_tokens: int, temperature: float = 0.0
) -> list[int]:
    """The new token ids the model produces for ``prompt``; greedy unless ``temperature`` > 0."""
    import torch

    device = next(model.parameters()).device
    inputs = {key: value.to(device) for key, value in chat_inputs(tokenizer, prompt).items()}
    sampling = {"do_sample": True, "temperature": temperature} if temperature > 0 else {"do_sample": False}
    with torch.no_grad():
        output = model.generate(
            **inputs, max_new_tokens=max_new_tokens, pad_token_id=tokenizer.pad_token_id, **sampling
        )
    return output[0, inputs["input_ids"].shape[1] :].tolist()


def generate_text(
    model, tokenizer, prompt: str | Sequence[Mapping[str, Any]], max_new_tokens: int, temperature: float = 0.0
) -> str:
    ids = generate_ids(model, tokenizer, prompt, max_new_tokens, temperature)
    return tokenizer.decode(ids, skip_special_tokens=True).strip()


class AdapterSwitcher:
    """One base model with several named adapters; each request picks one, or none for the base."""

    def __init__(self, model, tokenizer, names: Sequence[str]):
        self.model = model
        self.tokenizer = tokenizer
        self.names = list(names)

    @contextmanager
    def using(self, adapter: str | None) -> Iterator[Any]:
        """The model with ``adapter`` active, or with every adapter disabled for None."""
        if adapter is None:
            with self.model.disable_adapter():
                yield self.model
            return
        if adapter not in self.names:
            raise KeyError(f"no adapter named {adapter!r}; loaded: {', '.join(self.names)}")
        self.model.set_adapter(adapter)
        yield self.model

    def generate(self, prompt: str, adapter: str | None, max_new_tokens: int, temperature: float = 0.0) -> str:
        with self.using(adapter) as model:
            return generate_text(model, self.tokenizer, prompt, max_new_tokens, temperature)


def adapter_name(label: str) -> str:
    """A peft adapter name for ``label`` (module names cannot contain '.')."""
    return re.sub(r"[^\w-]+", "_", label).strip("_") or "adapter"


def load_adapters(sources: Mapping[str, AdapterSource], model_cfg: ModelConfig, device: str) -> AdapterSwitcher:
    """Load the shared base once and every adapter on it under its name in ``sources``."""
    from peft import PeftModel

    from loraops.train import base_model as modeling

    first = next(iter(sources.values()))
    for source in sources.values():
        same_base = (source.base.path, source.base.revision) == (first.base.path, first.base.revision)
        if not same_base or source.quant != first.quant:
            raise ConfigError(
                f"{source.label} was trained on {source.base.source} ({source.quant.mode}) but {first.label} on "
                f"{first.base.source} ({first.quant.mode}): adapters share one base model only when it is the same"
            )
        require_safetensors_adapter(source.adapter_dir)
    base = modeling.load_base_model(first.base, model_cfg, first.quant, device)
    model = None
    for name, source in sources.items():
        if model is None:
            model = PeftModel.from_pretrained(base, source.adapter_dir, adapter_name=name, is_trainable=False)
        else:
            model.load_adapter(source.adapter_dir, adapter_name=name, is_trainable=False)
        logger.info("adapter %s loaded from %s", name, source.label)
    return AdapterSwitcher(model.eval(), modeling.load_tokenizer(first.base, model_cfg), list(sources))


# --- model-card samples -----------------------------------------------------------------------


def distinct_prompts(conversations: list[list[dict[str, Any]]], limit: int) -> list[list[dict[str, Any]]]:
    """The first ``limit`` conversations whose last prompt differs from every earlier one (in file order).

    Validation splits repeat questions with different reference answers; a card should show different prompts.
    """
    seen: set[str] = set()
    chosen = []
    for turns in conversations:
        prompt = " ".join(str(turns[-1].get("content", "")).split()).casefold() if turns else ""
        if prompt in seen:
            continue
        seen.add(prompt)
        chosen.append(turns)
        if len(chosen) == limit:
            break
    return chosen


def validation_samples(cfg: LoraopsConfig, root: Path, adapter_dir: str | Path) -> list[SampleAnswer]:
    """Greedy answers of the base model and the adapter to the first validation prompts."""
    if cfg.registry.card_samples == 0:
        return []
    from loraops.data.reader import load_split
    from loraops.train.base_model import resolve_device

    root = Path(root)
    split = load_split(root / cfg.data.validation_file, cfg.data.format)
    conversations = distinct_prompts(
        [example["messages"][:-1] for example in split.examples if "messages" in example], cfg.registry.card_samples
    )
    if not conversations:
        logger.info("no chat examples in the validation split: the model card has no samples")
        return []
    adapter_dir = Path(adapter_dir) if Path(adapter_dir).is_absolute() else root / adapter_dir
    source = AdapterSource(str(adapter_dir), adapter_dir, base=project_base(cfg, root), quant=cfg.quant)
    model, tokenizer = load_adapter(source, cfg.model, resolve_device(cfg.train))
    answer = lambda turns: generate_text(model, tokenizer, turns, cfg.registry.card_max_new_tokens)  # noqa: E731
    samples = []
    for turns in conversations:
        with model.disable_adapter():
            base_answer = answer(turns)
        samples.append(SampleAnswer(str(turns[-1]["content"]), base_answer=base_answer, adapter_answer=answer(turns)))
    return samples
