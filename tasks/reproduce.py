"""The reproduce task. The work lives in loraops.reproduce.run; the task adds a name and the comparison artifact."""

from __future__ import annotations

from pathlib import Path

from prefect import task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE

from loraops.config import RegistryConfig
from loraops.reproduce import run
from loraops.reproduce.report import ReproductionMismatch, ReproductionReport, format_report


@task(name="reproduce-version", cache_policy=NO_CACHE, persist_result=False)
def reproduce_version(
    registry_cfg: RegistryConfig,
    root: Path,
    ref: str,
    allow_dirty: bool,
    loss_tolerance: float,
    weight_tolerance: float | None,
) -> ReproductionReport:
    """Never retried: a rebuild that differs, or cannot run, does the same next time. A mismatch fails the task."""
    report = run.reproduce_version(
        root,
        registry_cfg,
        ref,
        allow_dirty=allow_dirty,
        loss_tolerance=loss_tolerance,
        weight_tolerance=weight_tolerance,
    )
    create_markdown_artifact(f"```\n{format_report(report)}\n```", key="reproduction")
    if not report.matched:
        raise ReproductionMismatch(report)
    return report
