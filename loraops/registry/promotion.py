"""Champion/challenger promotion and rollback with MLflow aliases (no deprecated stages).

``promote`` points ``champion`` at a version and keeps the version it replaces under ``previous``.
``rollback`` swaps the two: ``champion`` goes back to ``previous`` and ``previous`` becomes the version
just rolled back from. So ``previous`` always names the champion before the current one, and a second
rollback undoes the first.

A version is promoted only if its gate passed (its ``loraops.gate`` tag) and, when
``export.check_before_promote`` is on, its merge into the base model reproduces its logits.
Promote and rollback first check the version's files against the hashes recorded at registration
(loraops/registry/integrity.py); changed or unreadable files raise, and ``force`` does not override that.
``force`` overrides a refusal, and needs a reason, which is recorded on the version with the
refusals it overrode. Every step is safe to repeat: promoting the champion again changes nothing.
"""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path

from mlflow.entities.model_registry import ModelVersion
from mlflow.exceptions import MlflowException
from pydantic import BaseModel

from loraops.config import LoraopsConfig
from loraops.names import (
    EXPORT_CHECK_TAG,
    GATE_REASONS_TAG,
    GATE_TAG,
    PROMOTION_FORCED_TAG,
    PROMOTION_OVERRIDDEN_TAG,
    PROMOTION_REASON_TAG,
    ROLLBACK_TAG,
)
from loraops.registry import integrity, versions
from loraops.registry.export import EquivalenceReport
from loraops.registry.store import client_for
from mlflow import MlflowClient

logger = logging.getLogger(__name__)

PREVIOUS = "previous"


class PromotionRefused(Exception):
    """The version may not become champion (gate failed, no gate record, merge check failed...)."""


class PromotionCheck(BaseModel):
    """What stands between a version and the champion alias."""

    model_name: str
    version: str
    refusals: list[str]
    equivalence: EquivalenceReport | None = None


class AliasState(BaseModel):
    model_name: str
    champion: str | None
    previous: str | None
    challenger: str | None


def alias_state(client: MlflowClient, model_name: str) -> AliasState:
    try:
        model = client.get_registered_model(model_name)
    except MlflowException as error:
        if error.error_code != "RESOURCE_DOES_NOT_EXIST":
            raise
        raise LookupError(f"no registered model {model_name!r} in {client.tracking_uri}") from None
    aliases = {alias: str(version) for alias, version in model.aliases.items()}
    return AliasState(
        model_name=model_name,
        champion=aliases.get(versions.CHAMPION),
        previous=aliases.get(PREVIOUS),
        challenger=aliases.get(versions.CHALLENGER),
    )


def gate_refusals(version: ModelVersion) -> list[str]:
    gate = version.tags.get(GATE_TAG)
    if gate == "passed":
        return []
    if gate is None:
        return [f"version {version.version} has no {GATE_TAG} tag: there is no record that it passed the gate"]
    reasons = version.tags.get(GATE_REASONS_TAG, "no reasons recorded")
    return [f"version {version.version} failed the gate ({reasons})"]


def check_promotion(
    cfg: LoraopsConfig,
    root: Path,
    model_name: str,
    version: str,
    force: bool = False,
    client: MlflowClient | None = None,
) -> PromotionCheck:
    """Gate record, then (if configured) the merge equivalence check; a refused gate skips the costly check."""
    client = client or client_for(cfg.registry, root)
    found = versions.get_version(client, model_name, version)
    integrity.verify_version(client, found)  # changed files raise: no --force promotes them
    refusals = gate_refusals(found)
    equivalence = None
    if cfg.export.check_before_promote and (force or not refusals):
        equivalence = check_equivalence(cfg, root, client, found)
        if not equivalence.passed:
            refusals.append(f"merge check failed: {equivalence.summary()}")
    return PromotionCheck(model_name=model_name, version=str(found.version), refusals=refusals, equivalence=equivalence)


def check_equivalence(cfg: LoraopsConfig, root: Path, client: MlflowClient, version: ModelVersion) -> EquivalenceReport:
    from loraops.registry import export
    from loraops.registry.fetch import fetch_adapter
    from loraops.train.base_model import resolve_device

    with tempfile.TemporaryDirectory() as scratch:
        uri = f"models:/{version.name}/{version.version}"
        source = fetch_adapter(cfg, root, uri, Path(scratch), client=client)
        return export.check_merge(source, cfg.model, cfg.export, resolve_device(cfg.train))


def apply_promotion(
    cfg: LoraopsConfig,
    root: Path,
    check: PromotionCheck,
    force: bool = False,
    reason: str | None = None,
    client: MlflowClient | None = None,
) -> AliasState:
    """Move ``champion`` to the checked version (``previous`` keeps the old one), or refuse."""
    require_reason(force, reason)
    if check.refusals and not force:
        raise PromotionRefused(
            f"{check.model_name} version {check.version} not promoted: {'; '.join(check.refusals)}. "
            'Pass --force --reason "..." to promote it anyway'
        )
    client = client or client_for(cfg.registry, root)
    _record_promotion(client, check, force, reason)
    state = alias_state(client, check.model_name)
    if state.champion == check.version:
        logger.info("%s version %s is already the champion", check.model_name, check.version)
        return state
    if state.champion is not None:  # first: a crash between the two calls then loses nothing
        versions.promote_version(client, check.model_name, state.champion, PREVIOUS)
    versions.promote_version(client, check.model_name, check.version, versions.CHAMPION)
    return alias_state(client, check.model_name)


def require_reason(force: bool, reason: str | None) -> None:
    if force and not (reason and reason.strip()):
        raise PromotionRefused('--force needs --reason "why": the reason is recorded on the version')


def _record_promotion(client: MlflowClient, check: PromotionCheck, force: bool, reason: str | None) -> None:
    tags = {}
    if reason:
        tags[PROMOTION_REASON_TAG] = reason
    if force:
        tags[PROMOTION_FORCED_TAG] = "true"
        tags[PROMOTION_OVERRIDDEN_TAG] = "; ".join(check.refusals) or "nothing was refused"
    if check.equivalence is not None:
        tags[EXPORT_CHECK_TAG] = check.equivalence.summary()
    for key, value in tags.items():
        client.set_model_version_tag(check.model_name, check.version, key, value)


def rollback(
    cfg: LoraopsConfig, root: Path, model_name: str, reason: str | None = None, client: MlflowClient | None = None
) -> AliasState:
    """``champion`` <- ``previous``; ``previous`` <- the version rolled back from (a second rollback undoes it)."""
    client = client or client_for(cfg.registry, root)
    state = alias_state(client, model_name)
    if state.previous is None or state.previous == state.champion:
        raise PromotionRefused(
            f"{model_name} has no previous champion to roll back to (champion: {state.champion or 'none'}); "
            "promote a version explicitly with `loraops promote NAME VERSION`"
        )
    integrity.verify_version(client, client.get_model_version(model_name, state.previous))
    versions.promote_version(client, model_name, state.previous, versions.CHAMPION)
    if state.champion is None:
        _delete_alias(client, model_name, PREVIOUS)
    else:
        versions.promote_version(client, model_name, state.champion, PREVIOUS)
        client.set_model_version_tag(model_name, state.champion, ROLLBACK_TAG, reason or "rolled back")
    logger.info("%s rolled back: champion %s -> %s", model_name, state.champion, state.previous)
    return alias_state(client, model_name)


def _delete_alias(client: MlflowClient, model_name: str, alias: str) -> None:
    try:
        client.delete_registered_model_alias(model_name, alias)
    except MlflowException as error:
        if error.error_code != "RESOURCE_DOES_NOT_EXIST":
            raise
