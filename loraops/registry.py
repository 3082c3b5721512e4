"""MLflow tracking and model registry: log every training run, register only adapters that pass the gate.

Everything goes through an explicit ``MlflowClient`` (no ``mlflow.set_tracking_uri``), so nothing
global changes in the calling process. A run is keyed by a ``loraops.run_key`` tag: a task
retried after a crash finds its finished run and its model version instead of duplicating them.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import tempfile
import time
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import mlflow.artifacts
from mlflow import MlflowClient
from mlflow.entities import Metric, Param, Run, RunStatus
from mlflow.entities.model_registry import ModelVersion
from mlflow.exceptions import MlflowException

from loraops.config import LoraopsConfig, RegistryConfig
from loraops.results import ChampionRef, EvalMetrics, GateDecision, Lineage, Registration, TrainResult
from loraops.versioning import file_md5

logger = logging.getLogger(__name__)

CHAMPION = "champion"
CHALLENGER = "challenger"
RUN_KEY_TAG = "loraops.run_key"
GATE_TAG = "loraops.gate"
GATE_REASONS_TAG = "loraops.gate.reasons"
VAL_LOSS_TAG = "loraops.val_loss"
BASELINE_LOSS_TAG = "loraops.baseline_val_loss"
DATA_MD5_TAG = "loraops.data_md5"
BASE_MODEL_TAG = "loraops.base_model"
ADAPTER_ARTIFACT_PATH = "adapter"
_SECRET_WORDS = ("password", "secret", "token", "api_key")
_BATCH = 100  # MLflow accepts at most 100 params and 1000 metrics per log_batch call


@dataclass(frozen=True)
class RunRecord:
    """What one pipeline run produced, bundled so the logging helpers take one argument."""

    train: TrainResult
    baseline: EvalMetrics
    candidate: EvalMetrics
    decision: GateDecision
    lineage: Lineage


# --- where runs and models live -------------------------------------------------------------


def resolve_tracking_uri(cfg: RegistryConfig, repo_root: str | Path) -> str:
    """``registry.tracking_uri``, else ``MLFLOW_TRACKING_URI``, else SQLite under ``<repo_root>/mlflow``."""
    if cfg.tracking_uri:
        return cfg.tracking_uri
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    return f"sqlite:///{Path(repo_root).resolve() / 'mlflow' / 'mlflow.db'}"


def _sqlite_path(tracking_uri: str) -> Path | None:
    prefix = "sqlite:///"
    if not tracking_uri.startswith(prefix) or ":memory:" in tracking_uri:
        return None
    return Path(tracking_uri.removeprefix(prefix)).resolve()


def artifact_root_for(tracking_uri: str) -> str | None:
    """For a SQLite store, ``artifacts/`` next to the database (else MLflow would write ./mlruns).

    Other stores (a tracking server) decide their artifact location themselves: ``None``.
    """
    database = _sqlite_path(tracking_uri)
    return (database.parent / "artifacts").as_uri() if database else None


def make_client(tracking_uri: str) -> MlflowClient:
    database = _sqlite_path(tracking_uri)
    if database:
        database.parent.mkdir(parents=True, exist_ok=True)
    return MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)


def ensure_experiment(client: MlflowClient, name: str, artifact_root: str | None) -> str:
    """Id of experiment ``name``, created with ``artifact_root`` as its artifact location if new."""
    existing = client.get_experiment_by_name(name)
    if existing is None:
        try:
            return client.create_experiment(name, artifact_location=artifact_root)
        except MlflowException as error:
            if error.error_code != "RESOURCE_ALREADY_EXISTS":  # created concurrently: use it
                raise
            existing = client.get_experiment_by_name(name)
    if existing.lifecycle_stage == "deleted":
        raise MlflowException(
            f"MLflow experiment '{name}' is deleted: restore it (`mlflow experiments restore "
            f"--experiment-id {existing.experiment_id}`) or set registry.experiment to another name"
        )
    return existing.experiment_id


# --- champion -------------------------------------------------------------------------------


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


def download_adapter(client: MlflowClient, champion: ChampionRef, destination: Path) -> Path:
    """Fetch the champion's adapter files (e.g. to re-evaluate it on new data); returns their folder."""
    if not champion.adapter_uri:
        raise ValueError(f"champion version {champion.version} records no adapter source to download")
    local = mlflow.artifacts.download_artifacts(
        artifact_uri=champion.adapter_uri, dst_path=str(destination), tracking_uri=client.tracking_uri
    )
    return Path(local)


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


# --- the one call a pipeline makes ----------------------------------------------------------


def client_for(cfg: RegistryConfig, root: str | Path) -> MlflowClient:
    return make_client(resolve_tracking_uri(cfg, root))


def log_and_register(
    cfg: LoraopsConfig,
    *,
    root: str | Path,
    trained: TrainResult,
    baseline: EvalMetrics,
    candidate: EvalMetrics,
    decision: GateDecision,
    lineage: Lineage,
    extra_files: Iterable[str | Path] = (),
    run_key: str | None = None,
    client: MlflowClient | None = None,
) -> Registration:
    """Log the run; register the adapter only if the gate passed. Safe to retry.

    Relative paths are relative to ``root``. ``extra_files`` are logged under ``lineage/``
    (params.yaml, dvc.lock, ``*.dvc``) or ``reports/`` (anything else). ``run_key`` defaults to
    a hash of everything logged (lineage, metrics, gate decision, adapter bytes): a retry, or a
    rerun that reproduces the same adapter and evidence, reuses the finished run and its version.
    """
    record = RunRecord(trained, baseline, candidate, decision, lineage)
    record = _with_paths_under(record, Path(root))
    extra = _artifact_folders([_under(root, path) for path in extra_files])
    _check_inputs(record, extra)
    tracking_uri = resolve_tracking_uri(cfg.registry, root)
    client = client or make_client(tracking_uri)
    experiment_id = ensure_experiment(client, cfg.registry.experiment, artifact_root_for(tracking_uri))
    run = log_training_run(client, experiment_id, cfg, record, run_key or derive_run_key(record), extra)
    if not decision.passed:
        logger.info("gate failed: run %s logged, nothing registered", run.info.run_id)
        return Registration(run_id=run.info.run_id, model_name=cfg.registry.model_name, version=None)
    return register_adapter(client, cfg.registry.model_name, run, record, cfg.registry.auto_promote)


def _artifact_folders(paths: list[Path]) -> dict[str, list[Path]]:
    folders: dict[str, list[Path]] = {}
    for path in paths:
        lineage = path.name in ("params.yaml", "dvc.lock") or path.suffix == ".dvc"
        folders.setdefault("lineage" if lineage else "reports", []).append(path)
    return folders


def _under(root: str | Path, path: str | Path) -> Path:
    """Stage results hold paths relative to the project root (as params.yaml does)."""
    return Path(path) if Path(path).is_absolute() else Path(root) / path


def _with_paths_under(record: RunRecord, root: Path) -> RunRecord:
    train = record.train.model_copy(
        update={
            "adapter_dir": str(_under(root, record.train.adapter_dir)),
            "history_path": str(_under(root, record.train.history_path)),
        }
    )
    return replace(record, train=train)


def derive_run_key(record: RunRecord) -> str:
    digest = hashlib.sha256()
    for part in (record.lineage, record.baseline, record.candidate, record.decision):
        digest.update(part.model_dump_json().encode())
    for path in sorted(_files_under(Path(record.train.adapter_dir))):
        digest.update(str(path.relative_to(record.train.adapter_dir)).encode())
        digest.update(file_md5(path).encode())
    return digest.hexdigest()[:32]


def _files_under(directory: Path) -> Iterator[Path]:
    return (path for path in directory.rglob("*") if path.is_file())


def _check_inputs(record: RunRecord, extra: Mapping[str, list[Path]]) -> None:
    """Fail before anything is logged, so a bad call leaves no half-filled run behind."""
    adapter = Path(record.train.adapter_dir)
    if not adapter.is_dir() or not any(_files_under(adapter)):
        raise FileNotFoundError(f"adapter folder {adapter} is missing or empty: nothing to log or register")
    missing = [str(path) for paths in extra.values() for path in paths if not path.is_file()]
    if not Path(record.train.history_path).is_file():
        missing.append(record.train.history_path)
    if missing:
        raise FileNotFoundError(f"files to log as run artifacts do not exist: {', '.join(missing)}")


# --- logging the run ------------------------------------------------------------------------


def log_training_run(
    client: MlflowClient,
    experiment_id: str,
    cfg: LoraopsConfig,
    record: RunRecord,
    run_key: str,
    extra_files: Mapping[str, list[Path]],
) -> Run:
    """Create and fill the run, or return the finished run already logged under ``run_key``."""
    if "'" in run_key:
        raise ValueError(f"run key {run_key!r} contains a quote; use letters, digits, '-' or '_'")
    finished = _finished_run(client, experiment_id, run_key)
    if finished is not None:
        logger.info("run key %s already logged as run %s: reusing it", run_key, finished.info.run_id)
        return finished
    run_name = f"{cfg.lora.variant}-r{cfg.lora.r}-{run_key[:8]}"
    run = client.create_run(experiment_id, run_name=run_name, tags=_run_tags(record, run_key))
    run_id = run.info.run_id
    try:
        _log_values(client, run_id, cfg, record)
        _log_files(client, run_id, record, extra_files)
    except BaseException:
        client.set_terminated(run_id, RunStatus.to_string(RunStatus.FAILED))
        raise
    client.set_terminated(run_id, RunStatus.to_string(RunStatus.FINISHED))
    logger.info("logged run %s (%s) in experiment %s", run_id, run_name, experiment_id)
    return client.get_run(run_id)


def _finished_run(client: MlflowClient, experiment_id: str, run_key: str) -> Run | None:
    """A finished run with this key; unfinished ones are leftovers of a crash and are deleted."""
    runs = client.search_runs([experiment_id], filter_string=f"tags.`{RUN_KEY_TAG}` = '{run_key}'")
    done = RunStatus.to_string(RunStatus.FINISHED)
    for run in runs:
        if run.info.status != done:
            logger.warning("deleting partial run %s (%s) left by an earlier attempt", run.info.run_id, run.info.status)
            client.delete_run(run.info.run_id)
    return next((run for run in runs if run.info.status == done), None)


def _run_tags(record: RunRecord, run_key: str) -> dict[str, str]:
    return {
        **record.lineage.as_tags(),
        RUN_KEY_TAG: run_key,
        GATE_TAG: "passed" if record.decision.passed else "failed",
        GATE_REASONS_TAG: "; ".join(record.decision.reasons),
        "mlflow.note.content": summarize(record),
    }


def summarize(record: RunRecord) -> str:
    """One-line human summary, used as run note and model version description."""
    lineage = record.lineage
    return (
        f"LoRA adapter on {lineage.base_model}: validation loss {record.candidate.loss:.3f} "
        f"(base {record.baseline.loss:.3f}) over {record.candidate.tokens} tokens; gate "
        f"{'passed' if record.decision.passed else 'failed'}; data {lineage.data_md5[:12]}, "
        f"git {lineage.git_commit[:12]}{' (dirty)' if lineage.git_dirty else ''}, params {lineage.params_hash}"
    )


def _log_values(client: MlflowClient, run_id: str, cfg: LoraopsConfig, record: RunRecord) -> None:
    params = [Param(key, value) for key, value in flatten_params(cfg.model_dump(mode="json")).items()]
    metrics = history_metrics(Path(record.train.history_path)) + _summary_metrics(record)
    for start in range(0, len(params), _BATCH):
        client.log_batch(run_id, params=params[start : start + _BATCH])
    for start in range(0, len(metrics), _BATCH * 10):
        client.log_batch(run_id, metrics=metrics[start : start + _BATCH * 10])


def flatten_params(values: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """``{"lora": {"r": 16}}`` -> ``{"lora.r": "16"}``; secrets and URL credentials redacted."""
    flat: dict[str, str] = {}
    for key, value in values.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(flatten_params(value, prefix=f"{name}."))
        else:
            flat[name] = _redact(name, json.dumps(value) if isinstance(value, list) else str(value))
    return flat


def _redact(name: str, value: str) -> str:
    if any(word in name.lower() for word in _SECRET_WORDS):
        return "***"
    try:
        parts = urlsplit(value)
        has_password = bool(parts.password)
    except ValueError:  # not a URL (e.g. an unbalanced '[')
        return value
    if has_password:
        host = parts.netloc.rsplit("@", 1)[-1]
        return urlunsplit(parts._replace(netloc=f"***@{host}"))
    return value


def history_metrics(path: Path) -> list[Metric]:
    """Every numeric value of the trainer's log history at its step (loss, eval_loss, learning_rate…)."""
    history = json.loads(path.read_text())
    if not isinstance(history, list):
        raise ValueError(f"{path}: expected the trainer's log history (a JSON list of entries with 'step')")
    now = int(time.time() * 1000)
    return [
        Metric(key, float(value), now, int(entry.get("step", 0)))
        for entry in history
        for key, value in entry.items()
        if key != "step" and _is_number(value)
    ]


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _summary_metrics(record: RunRecord) -> list[Metric]:
    values = {
        "baseline_val_loss": record.baseline.loss,
        "baseline_val_perplexity": record.baseline.perplexity,
        "adapter_val_loss": record.candidate.loss,
        "adapter_val_perplexity": record.candidate.perplexity,
        "val_tokens": record.candidate.tokens,
        "trainable_params": record.train.trainable_params,
        "total_params": record.train.total_params,
        "trainable_fraction": record.train.trainable_params / max(record.train.total_params, 1),
    }
    if record.decision.champion_loss is not None:
        values["champion_val_loss"] = record.decision.champion_loss
    now = int(time.time() * 1000)
    return [Metric(key, float(value), now, record.train.steps) for key, value in values.items() if _is_number(value)]


def _log_files(
    client: MlflowClient, run_id: str, record: RunRecord, extra_files: Mapping[str, list[Path]]
) -> None:
    client.log_artifacts(run_id, record.train.adapter_dir, ADAPTER_ARTIFACT_PATH)
    client.log_artifact(run_id, record.train.history_path, "training")
    for folder, paths in extra_files.items():
        for path in paths:
            client.log_artifact(run_id, str(path), folder)
    with tempfile.TemporaryDirectory() as scratch:
        client.log_artifact(run_id, str(record.decision.write_json(Path(scratch) / "gate.json")))


# --- registering the adapter ----------------------------------------------------------------


def register_adapter(
    client: MlflowClient, model_name: str, run: Run, record: RunRecord, auto_promote: bool
) -> Registration:
    """Register the run's adapter (once per run) and point ``challenger`` (and maybe ``champion``) at it."""
    version = _version_of_run(client, model_name, run.info.run_id) or _create_version(client, model_name, run, record)
    aliases = [CHALLENGER, CHAMPION] if auto_promote else [CHALLENGER]
    for alias in aliases:
        promote_version(client, model_name, str(version.version), alias)
    return Registration(run_id=run.info.run_id, model_name=model_name, version=str(version.version), aliases=aliases)


def _version_of_run(client: MlflowClient, model_name: str, run_id: str) -> ModelVersion | None:
    versions = client.search_model_versions(f"name = '{model_name}' and run_id = '{run_id}'")
    if versions:
        logger.info("run %s is already registered as %s version %s", run_id, model_name, versions[0].version)
    return versions[0] if versions else None


def _create_version(client: MlflowClient, model_name: str, run: Run, record: RunRecord) -> ModelVersion:
    _ensure_registered_model(client, model_name)
    version = client.create_model_version(
        model_name,
        source=f"{run.info.artifact_uri}/{ADAPTER_ARTIFACT_PATH}",
        run_id=run.info.run_id,
        tags=version_tags(record),
        description=summarize(record),
    )
    logger.info("registered %s version %s from run %s", model_name, version.version, run.info.run_id)
    return version


def version_tags(record: RunRecord) -> dict[str, str]:
    # Lineage tags already carry loraops.data_md5 and loraops.base_model, which find_champion reads.
    return {
        **record.lineage.as_tags(),
        VAL_LOSS_TAG: repr(record.candidate.loss),
        BASELINE_LOSS_TAG: repr(record.baseline.loss),
        "loraops.val_tokens": str(record.candidate.tokens),
        GATE_REASONS_TAG: "; ".join(record.decision.reasons),
    }


def _ensure_registered_model(client: MlflowClient, model_name: str) -> None:
    try:
        client.create_registered_model(model_name, description="LoRA adapters that passed the loraops gate")
    except MlflowException as error:
        if error.error_code != "RESOURCE_ALREADY_EXISTS":
            raise
