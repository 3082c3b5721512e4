"""Model versions and aliases: the champion, a version by number or alias, promotion, registering an adapter."""

from __future__ import annotations

import logging
from pathlib import Path

from mlflow.entities import Run
from mlflow.entities.model_registry import ModelVersion
from mlflow.exceptions import MlflowException

from loraops.config import LoraopsConfig, RegistryConfig
from loraops.names import (
    BASE_MODEL_TAG,
    BASELINE_LOSS_TAG,
    DATA_MD5_TAG,
    GATE_REASONS_TAG,
    GATE_TAG,
    VAL_LOSS_TAG,
)
from loraops.registry import tracking
from loraops.registry.integrity import digest_tags
from loraops.registry.record import RunRecord, init_from_tags, summarize
from loraops.registry.store import resolve_tracking_uri
from loraops.results import ChampionRef, Registration
from mlflow import MlflowClient

logger = logging.getLogger(__name__)

CHAMPION = "champion"
CHALLENGER = "challenger"


def find_champion(client: MlflowClient, model_name: str, alias: str = CHAMPION) -> ChampionRef | None:
    """The version holding ``alias``, with the loss, data and base model recorded at registration."""
    try:
        model = client.get_registered_model(model_name)
    except MlflowException as error:
        if error.error_code == "RESOURCE_DOES_NOT_EXIST":
            return None
        raise
    version_number = model.aliases.get(alias)
    if version_number is None:
        return None
    version = client.get_model_version(model_name, str(version_number))
    return ChampionRef(
        version=str(version.version),
        loss=_float_or_none(version.tags.get(VAL_LOSS_TAG)),
        data_md5=version.tags.get(DATA_MD5_TAG),
        base_model=version.tags.get(BASE_MODEL_TAG),
        adapter_uri=version.source,
    )


def get_version(client: MlflowClient, model_name: str, version_or_alias: str) -> ModelVersion:
    """Version ``"3"``, or the version holding alias ``"champion"``; LookupError when neither exists."""
    try:
        if version_or_alias.isdigit():
            return client.get_model_version(model_name, version_or_alias)
        return client.get_model_version_by_alias(model_name, version_or_alias)
    except MlflowException as error:
        if error.error_code not in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE", "NOT_FOUND"):
            raise
        what = "version" if version_or_alias.isdigit() else "alias"
        raise LookupError(
            f"registered model {model_name!r} has no {what} {version_or_alias!r} in {client.tracking_uri}"
        ) from None


def download_adapter(client: MlflowClient, model_name: str, champion: ChampionRef, destination: Path) -> Path:
    """Fetch the champion's adapter files (e.g. to re-evaluate it on new data), verified; returns their folder."""
    from loraops.registry.integrity import download_verified

    return download_verified(client, get_version(client, model_name, champion.version), destination)


def version_url(cfg: RegistryConfig, root: str | Path, registration: Registration) -> str | None:
    """Where to look at the result: the MLflow UI for a tracking server, else a models:/ or runs:/ URI."""
    tracking_uri = resolve_tracking_uri(cfg, root)
    if tracking_uri.startswith(("http://", "https://")):
        base = tracking_uri.rstrip("/")
        if registration.version is None:
            return f"{base}/#/runs/{registration.run_id}"
        return f"{base}/#/models/{registration.model_name}/versions/{registration.version}"
    if registration.version is None:
        return f"runs:/{registration.run_id}"
    return f"models:/{registration.model_name}/{registration.version}"


def promote_version(client: MlflowClient, model_name: str, version: str, alias: str = CHAMPION) -> None:
    """Point ``alias`` at ``version`` (``models:/NAME@champion`` then loads it)."""
    client.set_registered_model_alias(model_name, alias, str(version))
    logger.info("%s@%s -> version %s", model_name, alias, version)


def _float_or_none(text: str | None) -> float | None:
    try:
        return float(text) if text not in (None, "") else None
    except ValueError:
        return None


def register_adapter(
    client: MlflowClient, model_name: str, run: Run, record: RunRecord, auto_promote: bool, *, cfg: LoraopsConfig
) -> Registration:
    """Register the run's adapter (once per adapter) and point ``challenger`` (and maybe ``champion``) at it.

    A version holding the same adapter (an earlier attempt killed before its aliases and card) is
    finished instead of registering the adapter again; runs that attempt left RUNNING end FAILED.
    """
    if record.adapter_key:
        experiment_id, run_id = run.info.experiment_id, run.info.run_id
        tracking.fail_orphans(client, experiment_id, tracking.ADAPTER_KEY_TAG, record.adapter_key, keep=run_id)
    version = _version_of_adapter(client, model_name, record.adapter_key) or _version_of_run(
        client, model_name, run.info.run_id
    )
    if version is None:
        version = _create_version(client, cfg, model_name, run, record)
    else:  # finish it: tags (and below the aliases and card) describe this, the latest, evaluation
        for key, value in version_tags(record).items():
            client.set_model_version_tag(model_name, str(version.version), key, value)
    aliases = [CHALLENGER, CHAMPION] if auto_promote else [CHALLENGER]
    for alias in aliases:
        promote_version(client, model_name, str(version.version), alias)
    return Registration(run_id=run.info.run_id, model_name=model_name, version=str(version.version), aliases=aliases)


def _version_of_adapter(client: MlflowClient, model_name: str, key: str) -> ModelVersion | None:
    """The version registered from this adapter (``loraops.adapter_key``), oldest first if several."""
    if not key:
        return None
    try:
        versions = client.search_model_versions(f"name = '{model_name}'")
    except MlflowException as error:
        if error.error_code == "RESOURCE_DOES_NOT_EXIST":
            return None
        raise
    same = sorted((v for v in versions if v.tags.get(tracking.ADAPTER_KEY_TAG) == key), key=lambda v: int(v.version))
    if same:
        logger.info(
            "adapter %s is already %s version %s: finishing that version", key[:12], model_name, same[0].version
        )
    return same[0] if same else None


def _version_of_run(client: MlflowClient, model_name: str, run_id: str) -> ModelVersion | None:
    versions = client.search_model_versions(f"name = '{model_name}' and run_id = '{run_id}'")
    if versions:
        logger.info("run %s is already registered as %s version %s", run_id, model_name, versions[0].version)
    return versions[0] if versions else None


def _create_version(
    client: MlflowClient, cfg: LoraopsConfig, model_name: str, run: Run, record: RunRecord
) -> ModelVersion:
    from loraops.registry import mlflow_model

    _ensure_registered_model(client, model_name)
    # An MLflow Model (LoggedModel models:/m-…): mlflow.pyfunc.load_model and `mlflow models serve` load it
    info = mlflow_model.log_adapter_model(
        client, run.info.run_id, cfg, record.train.adapter_dir, record.lineage, step=record.train.steps
    )
    version = mlflow_model.register_model_version(
        client,
        model_name,
        info,
        run.info.run_id,
        version_tags(record),
        description=summarize(record),  # replaced by the model card once the version number is known
    )
    logger.info("registered %s version %s from run %s", model_name, version.version, run.info.run_id)
    return version


def version_tags(record: RunRecord) -> dict[str, str]:
    # Lineage tags already carry loraops.data_md5 and loraops.base_model, which find_champion reads.
    return {
        **record.lineage.as_tags(),
        **init_from_tags(record),
        GATE_TAG: "passed" if record.decision.passed else "failed",
        tracking.ADAPTER_KEY_TAG: record.adapter_key,
        VAL_LOSS_TAG: repr(record.candidate.loss),
        BASELINE_LOSS_TAG: repr(record.baseline.loss),
        "loraops.val_tokens": str(record.candidate.tokens),
        GATE_REASONS_TAG: "; ".join(record.decision.reasons),
        **{f"loraops.eval.{key}": repr(value) for key, value in record.decision.evidence.items()},
        **digest_tags(record.train.adapter_dir),  # loraops.adapter_sha256: every load path checks it
    }


def _ensure_registered_model(client: MlflowClient, model_name: str) -> None:
    try:
        client.create_registered_model(model_name, description="LoRA adapters that passed the loraops gate")
    except MlflowException as error:
        if error.error_code != "RESOURCE_ALREADY_EXISTS":
            raise
