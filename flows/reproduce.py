"""The reproduce flow: rebuild a registered adapter from its lineage and compare it with the registry."""

from __future__ import annotations

from pathlib import Path

from prefect import flow

from loraops.names import PARAMS_FILE
from loraops.project.params_file import load_config
from loraops.reproduce.report import ReproductionReport
from tasks import reproduce as tasks


@flow(name="reproduce")
def reproduce(
    version: str,
    project_dir: str = ".",
    allow_dirty: bool = False,
    loss_tolerance: float = 1e-4,
    weight_tolerance: float | None = None,
) -> ReproductionReport:
    """Rebuild ``version`` (NAME/VERSION or NAME@ALIAS) in a temporary git worktree; fail when it differs."""
    root = Path(project_dir).resolve()
    cfg = load_config(root / PARAMS_FILE)
    return tasks.reproduce_version(cfg.registry, root, version, allow_dirty, loss_tolerance, weight_tolerance)
