"""Fetch a registered adapter (or take a local folder) with the base model and 4-bit settings it was trained with.

A model is named as MLflow names it (``models:/NAME@champion``, ``models:/NAME/3``) or by a local
adapter folder. The base model comes from the version's ``loraops.base_model`` tag and is resolved
as training resolved it (the PyPI GGUF default is the converted folder under ``paths.base_model_dir``);
the 4-bit settings come from the training run's parameters, so a QLoRA adapter runs on the base it
was trained on.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING

from loraops.config import ConfigError, LoraopsConfig, QuantConfig
from loraops.registry import integrity
from loraops.registry.store import client_for
from loraops.registry.versions import BASE_MODEL_TAG, get_version
from loraops.results import BaseModelRef
from loraops.train import base_model as modeling
from loraops.train.adapters import AdapterSource, project_base, require_safetensors_adapter

if TYPE_CHECKING:
    from mlflow import MlflowClient

_MODEL_URI = re.compile(r"^models:/(?P<name>[^/@]+)(?:@(?P<alias>[\w-]+)|/(?P<version>\d+))$")


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
    if parsed is None:
        folder = Path(model)
        require_safetensors_adapter(folder)
        integrity.check_readable(folder, str(folder))
        return AdapterSource(label=model, adapter_dir=folder, base=project_base(cfg, root), quant=cfg.quant)
    client = client or client_for(cfg.registry, root)
    version = get_version(client, *parsed)
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


def base_for_version(cfg: LoraopsConfig, root: Path, tags: Mapping[str, str]) -> BaseModelRef:
    """The base model named by a version's lineage tags, resolved the way training resolved it."""
    source = tags.get(BASE_MODEL_TAG)
    if not source:
        raise ConfigError(f"the version has no {BASE_MODEL_TAG} tag: its base model is unknown")
    revision = tags.get("loraops.base_revision") or None
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
