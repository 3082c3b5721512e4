"""Promotion tasks. The work lives in loraops.registry.promotion; tasks add names, retries and artifacts."""

from __future__ import annotations

from pathlib import Path

from prefect import task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE

from loraops.config import LoraopsConfig
from loraops.registry import promotion
from loraops.registry.promotion import AliasState, PromotionCheck, PromotionRefused

# The registry is the state: caching a result would hide a changed alias.
_registry_step = dict(cache_policy=NO_CACHE, persist_result=False)


def _unless_refused(task, task_run, state) -> bool:
    """Retry what may pass next time (the tracking server went away), never a refusal or unknown version."""
    return not isinstance(state.data, PromotionRefused | LookupError)


@task(name="check-promotion", **_registry_step)
def check_promotion(cfg: LoraopsConfig, root: Path, model_name: str, version: str, force: bool) -> PromotionCheck:
    """Never retried: a failed gate or merge check stays failed."""
    return promotion.check_promotion(cfg, root, model_name, version, force)


@task(
    name="apply-promotion", retries=2, retry_delay_seconds=[5, 30], retry_condition_fn=_unless_refused, **_registry_step
)
def apply_promotion(
    cfg: LoraopsConfig, root: Path, check: PromotionCheck, force: bool, reason: str | None
) -> AliasState:
    """Retry-safe: a retry finds the champion already moved and changes nothing."""
    state = promotion.apply_promotion(cfg, root, check, force, reason)
    create_markdown_artifact(_aliases_markdown(state, check), key="promotion")
    return state


@task(name="rollback-champion", **_registry_step)
def rollback_champion(cfg: LoraopsConfig, root: Path, model_name: str, reason: str | None) -> AliasState:
    """Not retried: a rollback swaps aliases, so a blind retry would undo it."""
    state = promotion.rollback(cfg, root, model_name, reason)
    create_markdown_artifact(_aliases_markdown(state), key="promotion")
    return state


def _aliases_markdown(state: AliasState, check: PromotionCheck | None = None) -> str:
    lines = [
        f"# {state.model_name}",
        f"- champion: version {state.champion}",
        f"- previous: version {state.previous}",
        f"- challenger: version {state.challenger}",
    ]
    if check is not None and check.equivalence is not None:
        lines.append(f"- {check.equivalence.summary()}")
    if check is not None and check.refusals:
        lines += ["", "Promoted with --force despite:", *[f"- {refusal}" for refusal in check.refusals]]
    return "\n".join(lines)
