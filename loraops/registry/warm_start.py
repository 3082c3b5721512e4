"""Warm start (``train.init_from: champion``): the champion's adapter, checked against this run, downloaded verified.

Training continues from the champion's LoRA weights only when they have this run's shape: the same
``lora.r``, ``lora.alpha``, ``lora.variant`` and ``lora.target_modules`` (read from the adapter's own
``adapter_config.json``, else the champion's run params) on the same ``model.base``. Without a champion, or
with another shape, the run is refused before training, naming the setting and what to change. The files
come through ``integrity.download_verified``, like every other load of a registered adapter.
``check_init_adapter`` runs the same checks as a pre-flight, before the baseline spends any time, and says which
version and files training would start from (reports/init_adapter.json, the train stage's DVC dep).
"""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from loraops.config import ConfigError, LoraopsConfig
from loraops.names import BASE_MODEL_TAG
from loraops.registry.integrity import adapter_digests, download_verified
from loraops.registry.store import client_for, resolve_tracking_uri, store_exists
from loraops.registry.values import flatten_params
from loraops.registry.versions import CHAMPION, get_version
from loraops.results import InitAdapterRecord

if TYPE_CHECKING:
    from mlflow.entities.model_registry import ModelVersion

    from mlflow import MlflowClient

logger = logging.getLogger(__name__)

SHAPE = ("lora.r", "lora.alpha", "lora.variant", "lora.target_modules")  # what must match to load the weights


@dataclass(frozen=True)
class InitAdapter:
    """The adapter training starts from, and the version it is (``NAME/VERSION``: the loraops.init_from tag)."""

    adapter_dir: Path
    label: str
    record: InitAdapterRecord  # the version and its files' sha256, for reports/init_adapter.json


def fetch_init_adapter(cfg: LoraopsConfig, root: Path, destination: Path) -> InitAdapter | None:
    """The champion's adapter in ``destination`` (emptied first) for ``train.init_from: champion``; None when unset."""
    if cfg.train.init_from is None:
        return None
    name = cfg.registry.model_name
    version = _champion(cfg, root, name)
    label = f"{name}/{version.version}"
    _check_base(cfg, version, label)
    client = client_for(cfg.registry, root)
    shutil.rmtree(destination, ignore_errors=True)
    adapter_dir = download_verified(client, version, destination)
    _check_shape(cfg, champion_shape(client, version, adapter_dir), label)
    logger.info("train.init_from: champion: training continues from %s (%s)", label, adapter_dir)
    record = InitAdapterRecord(
        init_from=cfg.train.init_from,
        model_name=name,
        version=str(version.version),
        adapter_sha256=adapter_digests(adapter_dir),
    )
    return InitAdapter(adapter_dir=adapter_dir, label=label, record=record)


def check_init_adapter(cfg: LoraopsConfig, root: Path) -> InitAdapterRecord:
    """Pre-flight: the adapter ``train.init_from`` names exists, is intact and fits this run (else ConfigError)."""
    if cfg.train.init_from is None:
        return InitAdapterRecord()
    with tempfile.TemporaryDirectory(prefix="loraops-init-") as scratch:
        return fetch_init_adapter(cfg, root, Path(scratch) / "adapter").record


def _champion(cfg: LoraopsConfig, root: Path, name: str) -> ModelVersion:
    where = resolve_tracking_uri(cfg.registry, root)
    refusal = (
        f"train.init_from: champion, but registered model {name!r} has no champion in {where}, so there is no adapter "
        "to continue from. Train from a fresh adapter with train.init_from=null (e.g. `-S train.init_from=null`), "
        f"or point the alias at a version first (`loraops promote {name} VERSION`)"
    )
    if not store_exists(cfg.registry, root):
        raise ConfigError(refusal)
    try:
        return get_version(client_for(cfg.registry, root), name, CHAMPION)
    except LookupError:
        raise ConfigError(refusal) from None


def _check_base(cfg: LoraopsConfig, version: ModelVersion, label: str) -> None:
    champion_base = version.tags.get(BASE_MODEL_TAG)
    if champion_base != cfg.model.base:
        raise ConfigError(
            f"train.init_from: champion ({label}) has model.base {champion_base or '(not recorded)'}, this run "
            f"{cfg.model.base}: set model.base={champion_base} or train.init_from=null"
            if champion_base
            else f"train.init_from: champion ({label}) has no {BASE_MODEL_TAG} tag, so its base model is unknown: "
            "set train.init_from=null"
        )


def champion_shape(client: MlflowClient, version: ModelVersion, adapter_dir: Path) -> dict[str, str]:
    """The champion's ``lora.*`` shape as params strings: its adapter_config.json, else its training run's params."""
    from mlflow.exceptions import MlflowException

    try:
        params = client.get_run(version.run_id).data.params if version.run_id else {}
    except MlflowException:  # the run was deleted: the adapter's own config still says its shape
        params = {}
    shape = {key: params[key] for key in SHAPE if key in params}
    config = json.loads((adapter_dir / "adapter_config.json").read_text())
    if "r" in config:
        shape["lora.r"] = str(config["r"])
    if "lora_alpha" in config:
        shape["lora.alpha"] = str(config["lora_alpha"])
    shape["lora.variant"] = "dora" if config.get("use_dora") else "rslora" if config.get("use_rslora") else "lora"
    targets = config.get("target_modules")
    if isinstance(targets, list) and not shape.get("lora.target_modules"):
        shape["lora.target_modules"] = json.dumps(sorted(targets))
    return shape


def _check_shape(cfg: LoraopsConfig, shape: dict[str, str], label: str) -> None:
    ours = flatten_params(cfg.model_dump(mode="json"))
    differ = [key for key in SHAPE if key in shape and _same(shape[key]) != _same(ours[key])]
    if differ:
        has = ", ".join(f"{key} {shape[key]}" for key in differ)
        this = ", ".join(ours[key] for key in differ)
        settings = " ".join(f"{key}={shape[key]}" for key in differ)
        raise ConfigError(
            f"train.init_from: champion ({label}) has {has}, this run {this}: set {settings} or train.init_from=null"
        )


def _same(value: str) -> str:
    """Module lists compare as sets (peft writes them in any order)."""
    if value.startswith("["):
        return json.dumps(sorted(json.loads(value)))
    return value
