"""Nothing new, nothing trained: has an earlier run already trained on exactly these inputs?

A run's inputs are the data md5, the params hash, the code commit and the base model (id and
revision), all recorded as lineage tags on MLflow runs and registered versions. When the champion
or the last finished run recorded the same four, training again would spend the GPU time on the same
adapter the gate then refuses, so ``retrain`` ends early instead (``force`` trains anyway).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from pydantic import BaseModel

from loraops.config import LoraopsConfig
from loraops.names import (
    BASE_MARKER_FILE,
    BASE_MODEL_TAG,
    BASE_REVISION_TAG,
    DATA_MD5_TAG,
    GIT_COMMIT_TAG,
    GIT_DIRTY_TAG,
    LINEAGE_FILES,
    PARAMS_HASH_TAG,
)
from mlflow import MlflowClient

log = logging.getLogger(__name__)

# Lineage tags (Lineage.as_tags) that decide whether a run's inputs are the same.
INPUT_TAGS = (DATA_MD5_TAG, PARAMS_HASH_TAG, GIT_COMMIT_TAG, BASE_MODEL_TAG, BASE_REVISION_TAG)


class Freshness(BaseModel):
    """Whether this run's inputs equal an earlier run's, and which one."""

    unchanged: bool
    message: str
    version: str | None = None  # the registered version trained on the same inputs
    run_id: str | None = None  # the MLflow run trained on the same inputs


def current_inputs(cfg: LoraopsConfig, root: Path) -> dict[str, str] | None:
    """This run's inputs as lineage tags, or None when they cannot be named (uncommitted code, data
    edited since data.dvc recorded it): such a run always trains."""
    from loraops.lineage.versioning import UNKNOWN_COMMIT, data_md5, git_state, tracked_data_problem

    commit, dirty = git_state(root, ignore=LINEAGE_FILES)
    if dirty or commit == UNKNOWN_COMMIT:
        log.info("freshness: the code has uncommitted changes, so this run trains")
        return None
    if tracked_data_problem(root) is not None:
        log.info("freshness: data/ differs from data.dvc, so this run trains")
        return None
    source, revision = _base_model(cfg, root)
    return {
        DATA_MD5_TAG: data_md5(root),
        PARAMS_HASH_TAG: cfg.params_hash(),
        GIT_COMMIT_TAG: commit,
        BASE_MODEL_TAG: source,
        BASE_REVISION_TAG: revision or "",
    }


def _base_model(cfg: LoraopsConfig, root: Path) -> tuple[str, str | None]:
    """The base model as prepare_base_model recorded it (read from its marker file, nothing loaded)."""
    marker = Path(root) / cfg.paths.base_model_dir / BASE_MARKER_FILE
    if marker.is_file():
        recorded = json.loads(marker.read_text())
        if recorded.get("source") == cfg.model.base:
            return cfg.model.base, recorded.get("revision")
    return cfg.model.base, cfg.model.revision


def check_freshness(cfg: LoraopsConfig, root: Path, client: MlflowClient, force: bool = False) -> Freshness:
    """Compare this run's inputs with the champion's and the last finished run's."""
    if force:
        return Freshness(unchanged=False, message="forced: training whether or not anything changed")
    inputs = current_inputs(cfg, root)
    if inputs is None:
        return Freshness(unchanged=False, message="inputs not all committed: training")
    for tags, version, run_id in _earlier_runs(cfg, client):
        if tags.get(GIT_DIRTY_TAG) == "False" and all(tags.get(key) == value for key, value in inputs.items()):
            since = f"version {version}" if version else f"MLflow run {run_id}"
            message = (
                f"nothing changed since {since} (data {inputs[DATA_MD5_TAG][:12]}, params "
                f"{inputs[PARAMS_HASH_TAG]}, code {inputs[GIT_COMMIT_TAG][:12]}, base model "
                f"{inputs[BASE_MODEL_TAG]}): nothing trained or registered; add data or pass --force to train anyway"
            )
            log.info(message)
            return Freshness(unchanged=True, message=message, version=version, run_id=run_id)
    return Freshness(unchanged=False, message="new inputs since the champion and the last finished run: training")


def _earlier_runs(cfg: LoraopsConfig, client: MlflowClient):
    """(lineage tags, version or None, run id) of the champion, then of the last finished run."""
    from loraops.registry.versions import CHAMPION

    name = cfg.registry.model_name
    try:
        champion = client.get_model_version_by_alias(name, CHAMPION)
    except Exception:  # no registered model or no champion yet
        champion = None
    if champion is not None:
        yield champion.tags, str(champion.version), champion.run_id
    experiment = client.get_experiment_by_name(cfg.registry.experiment)
    if experiment is None:
        return
    runs = client.search_runs(
        [experiment.experiment_id],
        filter_string="attributes.status = 'FINISHED'",
        order_by=["attributes.start_time DESC"],
        max_results=1,
    )
    for run in runs:
        versions = client.search_model_versions(f"name='{name}' and run_id='{run.info.run_id}'")
        yield run.data.tags, (str(versions[0].version) if versions else None), run.info.run_id
