"""Promotion flows: move the champion alias to a checked version, or roll it back."""

from __future__ import annotations

from pathlib import Path

from prefect import flow

from loraops.config import LoraopsConfig
from loraops.names import PARAMS_FILE
from loraops.project.params_file import load_config
from loraops.registry.promotion import AliasState
from tasks import promotion


@flow(name="promote")
def promote(
    model_name: str,
    version: str,
    force: bool = False,
    reason: str | None = None,
    config: LoraopsConfig | None = None,
    project_dir: str = ".",
) -> AliasState:
    """Make ``version`` (a number or an alias such as challenger) the champion; the old one becomes previous.

    Refused when the version's gate failed or was never recorded, or when its merge check fails,
    unless ``force`` is set with a ``reason`` (recorded on the version).
    """
    root = Path(project_dir).resolve()
    cfg = config or load_config(root / PARAMS_FILE)
    check = promotion.check_promotion(cfg, root, model_name, version, force)
    return promotion.apply_promotion(cfg, root, check, force, reason)


@flow(name="rollback")
def rollback(
    model_name: str, reason: str | None = None, config: LoraopsConfig | None = None, project_dir: str = "."
) -> AliasState:
    """Point the champion back at the previous champion; previous becomes the version rolled back from."""
    root = Path(project_dir).resolve()
    cfg = config or load_config(root / PARAMS_FILE)
    return promotion.rollback_champion(cfg, root, model_name, reason)
