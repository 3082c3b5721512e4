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
import re
import tempfile
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit, urlunsplit

from mlflow.entities import Metric, Param, Run, RunStatus, RunTag
from mlflow.entities.model_registry import ModelVersion
from mlflow.exceptions import MlflowException

from loraops.config import LoraopsConfig, RegistryConfig
from loraops.lineage.versioning import file_md5
from loraops.names import (
    ADAPTER_ARTIFACT_PATH,
    ADAPTER_KEY_TAG,
    BASE_MODEL_TAG,
    BASELINE_LOSS_TAG,
    DATA_MD5_TAG,
    DVC_LOCK_FILE,
    EVAL_TAG_PREFIX,
    GATE_DECISION,
    GATE_REASONS_TAG,
    GATE_TAG,
    LINEAGE_ARTIFACTS,
    LOSS_PLOT_ARTIFACT,
    MODEL_CARD_ARTIFACT,
    PARAMS_FILE,
    REPORTS_ARTIFACTS,
    RUN_KEY_TAG,
    SAMPLES_ARTIFACT,
    TRAINING_ARTIFACTS,
    VAL_LOSS_TAG,
    VAL_TOKENS_TAG,
)
from loraops.registry import tracking
from loraops.registry.adapter_hash import adapter_key
from loraops.registry.integrity import digest_tags
from loraops.results import ChampionRef, EvalMetrics, GateDecision, Lineage, Registration, TrainResult
from mlflow import MlflowClient

if TYPE_CHECKING:
    from loraops.serve.serving import SampleAnswer

logger = logging.getLogger(__name__)

CHAMPION = "champion"
CHALLENGER = "challenger"
_DESCRIPTION_LIMIT = 4500  # SQL stores cap a version description at 5000 characters
_CARD_PARAM_SECTIONS = ("model", "data", "lora", "quant", "train", "gate")
_SECRET_WORDS = ("password", "secret", "token", "api_key")
_STORE_LOCK_TIMEOUT_S = 300  # creating and migrating a fresh SQLite store takes seconds
_BATCH = 100  # MLflow accepts at most 100 params and 1000 metrics per log_batch call


@dataclass(frozen=True)
class RunRecord:
    """What one pipeline run produced, bundled so the logging helpers take one argument."""

    train: TrainResult
    baseline: EvalMetrics
    candidate: EvalMetrics
    decision: GateDecision
    lineage: Lineage
    samples: tuple[SampleAnswer, ...] = ()  # greedy answers of base and adapter for the model card
    adapter_key: str = ""  # loraops.registry.adapter_hash: what a version is keyed on


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
    if not database:
        return MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)
    database.parent.mkdir(parents=True, exist_ok=True)
    # MLflow creates and migrates a SQLite store on its first open in a process; two processes doing
    # that at once break it for good ("table _alembic_tmp_... already exists"). One opens it at a time.
    from filelock import FileLock, Timeout

    try:
        with FileLock(f"{database}.lock", timeout=_STORE_LOCK_TIMEOUT_S):
            client = MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)
            client.search_experiments(max_results=1)  # the tracking store: created and migrated here
            client.search_registered_models(max_results=1)  # the registry store
    except Timeout:
        raise MlflowException(
            f"the MLflow store {database} stayed locked by another process for {_STORE_LOCK_TIMEOUT_S} s "
            f"(lock file {database}.lock): let that process finish, then rerun"
        ) from None
    return client


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
    samples: Sequence[SampleAnswer] = (),
) -> Registration:
    """Log the run; register the adapter only if the gate passed. Safe to retry.

    Relative paths are relative to ``root``. ``extra_files`` are logged under ``lineage/``
    (params.yaml, dvc.lock, ``*.dvc``) or ``reports/`` (anything else; a folder keeps its name and
    tree, e.g. ``reports/data_docs/``). ``run_key`` defaults to
    a hash of everything logged (lineage, metrics, gate decision, adapter bytes): a retry, or a
    rerun that reproduces the same adapter and evidence, reuses the finished run and its version.
    ``samples`` (prompt, base and adapter answers) go into the run's samples table and model card.
    """
    record = RunRecord(trained, baseline, candidate, decision, lineage, tuple(samples))
    record = _with_paths_under(record, Path(root))
    extra = _artifact_folders([_under(root, path) for path in extra_files])
    _check_inputs(record, extra)
    record = replace(record, adapter_key=adapter_key(record.train.adapter_dir))
    tracking_uri = resolve_tracking_uri(cfg.registry, root)
    client = client or make_client(tracking_uri)
    experiment_id = ensure_experiment(client, cfg.registry.experiment, artifact_root_for(tracking_uri))
    live = _live_run(client, trained.mlflow_run_id)
    if live is not None:  # the run training opened: fill it, register, and end it (FAILED if anything raises)
        with tracking.ended(client, live.info.run_id):
            run = fill_live_run(client, cfg, record, live, extra)
            return _register_and_publish(client, cfg, record, run)
    run = log_training_run(client, experiment_id, cfg, record, run_key or derive_run_key(record), extra)
    return _register_and_publish(client, cfg, record, run)


def _register_and_publish(client: MlflowClient, cfg: LoraopsConfig, record: RunRecord, run: Run) -> Registration:
    decision = record.decision
    if decision.passed:
        registration = register_adapter(
            client, cfg.registry.model_name, run, record, cfg.registry.auto_promote, cfg=cfg
        )
    else:
        logger.info("gate failed: run %s logged, nothing registered", run.info.run_id)
        registration = Registration(run_id=run.info.run_id, model_name=cfg.registry.model_name, version=None)
    publish_model_card(client, cfg, record, registration)
    return registration


def _artifact_folders(paths: list[Path]) -> dict[str, list[Path]]:
    folders: dict[str, list[Path]] = {}
    for path in paths:
        lineage = path.name in (PARAMS_FILE, DVC_LOCK_FILE) or path.suffix == ".dvc"
        folders.setdefault(LINEAGE_ARTIFACTS if lineage else REPORTS_ARTIFACTS, []).append(path)
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


def _live_run(client: MlflowClient, run_id: str | None) -> Run | None:
    """The run training opened, when it is still in the store (not deleted)."""
    if not run_id:
        return None
    try:
        run = client.get_run(run_id)
    except MlflowException as error:
        if error.error_code != "RESOURCE_DOES_NOT_EXIST":
            raise
        run = None
    if run is None or run.info.lifecycle_stage != "active":
        logger.warning("MLflow run %s of the training is gone: logging a new run", run_id)
        return None
    return run


def fill_live_run(
    client: MlflowClient, cfg: LoraopsConfig, record: RunRecord, run: Run, extra_files: Mapping[str, list[Path]]
) -> Run:
    """Add evaluation, gate, lineage and artifacts to the run training opened (its step metrics are there)."""
    run_id = run.info.run_id
    if run.info.status != RunStatus.to_string(RunStatus.RUNNING):
        client.update_run(run_id, status=RunStatus.to_string(RunStatus.RUNNING))
    tags = {key: value for key, value in _run_tags(record, "").items() if key != RUN_KEY_TAG}
    client.log_batch(
        run_id, tags=[RunTag(key, value) for key, value in {**tags, **tracking.link_tags(run.data.tags)}.items()]
    )
    log_new_params(client, run_id, cfg)
    metrics = _summary_metrics(record)
    if "loss" not in run.data.metrics:  # trained without the live callback: the history holds the steps
        metrics = history_metrics(Path(record.train.history_path)) + metrics
    for start in range(0, len(metrics), _BATCH * 10):
        client.log_batch(run_id, metrics=metrics[start : start + _BATCH * 10])
    _log_files(client, run_id, record, extra_files)
    return client.get_run(run_id)


def log_new_params(client: MlflowClient, run_id: str, cfg: LoraopsConfig) -> None:
    """The config as params, except keys the run already holds (MLflow refuses to change a param)."""
    existing = client.get_run(run_id).data.params
    flat = flatten_params(cfg.model_dump(mode="json"))
    params = [Param(key, value) for key, value in flat.items() if key not in existing]
    for start in range(0, len(params), _BATCH):
        client.log_batch(run_id, params=params[start : start + _BATCH])


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
    missing = [str(path) for paths in extra.values() for path in paths if not (path.is_file() or path.is_dir())]
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
        ADAPTER_KEY_TAG: record.adapter_key,
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
    leaf = name.rsplit(".", 1)[-1].lower()  # hf_token or api_key, not max_tokens or tokenizes
    if leaf in _SECRET_WORDS or any(word in leaf.split("_") for word in _SECRET_WORDS) or "api_key" in leaf:
        return "***"
    value = redact_secret_values(value)
    try:
        parts = urlsplit(value)
        has_password = bool(parts.password)
    except ValueError:  # not a URL (e.g. an unbalanced '[')
        return value
    if has_password:
        host = parts.netloc.rsplit("@", 1)[-1]
        return urlunsplit(parts._replace(netloc=f"***@{host}"))
    return value


def redact_secret_values(text: str) -> str:
    """Replace whatever the data contract's secret patterns match (API keys, tokens, key blocks) by ``***``."""
    from loraops.contract import SECRET_PATTERNS

    for pattern in SECRET_PATTERNS.values():
        text = re.sub(pattern, "***", text)
    return text


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
        if key != "step" and is_number(value)
    ]


def is_number(value: Any) -> bool:
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
    values |= {f"gate_{key}": value for key, value in record.decision.evidence.items()}  # as the gate stage logs them
    now = int(time.time() * 1000)
    return [Metric(key, float(value), now, record.train.steps) for key, value in values.items() if is_number(value)]


def _log_files(client: MlflowClient, run_id: str, record: RunRecord, extra_files: Mapping[str, list[Path]]) -> None:
    client.log_artifacts(run_id, record.train.adapter_dir, ADAPTER_ARTIFACT_PATH)
    client.log_artifact(run_id, record.train.history_path, TRAINING_ARTIFACTS)
    if record.samples:
        client.log_table(run_id, data=samples_table(record.samples), artifact_file=SAMPLES_ARTIFACT)
    for folder, paths in extra_files.items():
        for path in paths:
            if path.is_dir():  # e.g. the contract's Data Docs site: kept whole, under its own name
                client.log_artifacts(run_id, str(path), f"{folder}/{path.name}")
            else:
                client.log_artifact(run_id, str(path), folder)
    with tempfile.TemporaryDirectory() as scratch:
        client.log_artifact(run_id, str(record.decision.write_json(Path(scratch) / GATE_DECISION)))
        plot = loss_curves_png(Path(record.train.history_path), Path(scratch) / Path(LOSS_PLOT_ARTIFACT).name)
        if plot is not None:
            client.log_artifact(run_id, str(plot), str(Path(LOSS_PLOT_ARTIFACT).parent))


def samples_table(samples: Sequence[SampleAnswer]) -> dict[str, list[str]]:
    return {
        "prompt": [sample.prompt for sample in samples],
        "base_answer": [sample.base_answer for sample in samples],
        "adapter_answer": [sample.adapter_answer for sample in samples],
    }


def loss_curves_png(history_path: Path, target: Path) -> Path | None:
    """Training and validation loss by step; None (logged) when matplotlib is missing or nothing was logged."""
    try:
        from matplotlib.figure import Figure
    except ImportError:
        logger.info("matplotlib is not installed: no loss-curve image for this run")
        return None
    history = json.loads(history_path.read_text())
    axes = Figure(figsize=(6, 4)).subplots()
    for key, label in (("loss", "training loss"), ("eval_loss", "validation loss")):
        points = [(row["step"], row[key]) for row in history if is_number(row.get(key)) and "step" in row]
        if points:
            axes.plot(*zip(*points), marker="o", label=label)
    if not axes.lines:
        return None
    axes.set_xlabel("step")
    axes.set_ylabel("loss (nats per target token)")
    axes.legend()
    axes.figure.savefig(target, dpi=100, bbox_inches="tight")
    return target


# --- registering the adapter ----------------------------------------------------------------


def register_adapter(
    client: MlflowClient, model_name: str, run: Run, record: RunRecord, auto_promote: bool, *, cfg: LoraopsConfig
) -> Registration:
    """Register the run's adapter (once per adapter) and point ``challenger`` (and maybe ``champion``) at it.

    A version holding the same adapter (an earlier attempt killed before its aliases and card) is
    finished instead of registering the adapter again; runs that attempt left RUNNING end FAILED.
    """
    if record.adapter_key:
        experiment_id, run_id = run.info.experiment_id, run.info.run_id
        tracking.fail_orphans(client, experiment_id, ADAPTER_KEY_TAG, record.adapter_key, keep=run_id)
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
    same = sorted((v for v in versions if v.tags.get(ADAPTER_KEY_TAG) == key), key=lambda v: int(v.version))
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
        GATE_TAG: "passed" if record.decision.passed else "failed",
        ADAPTER_KEY_TAG: record.adapter_key,
        VAL_LOSS_TAG: repr(record.candidate.loss),
        BASELINE_LOSS_TAG: repr(record.baseline.loss),
        VAL_TOKENS_TAG: str(record.candidate.tokens),
        GATE_REASONS_TAG: "; ".join(record.decision.reasons),
        **{f"{EVAL_TAG_PREFIX}{key}": repr(value) for key, value in record.decision.evidence.items()},
        **digest_tags(record.train.adapter_dir),  # loraops.adapter_sha256: every load path checks it
    }


def _ensure_registered_model(client: MlflowClient, model_name: str) -> None:
    try:
        client.create_registered_model(model_name, description="LoRA adapters that passed the loraops gate")
    except MlflowException as error:
        if error.error_code != "RESOURCE_ALREADY_EXISTS":
            raise


# --- the model card -------------------------------------------------------------------------


def publish_model_card(client: MlflowClient, cfg: LoraopsConfig, record: RunRecord, registration: Registration) -> str:
    """Log ``model_card.md`` to the run and, for a registered version, use it as the description.

    Rewriting both is idempotent, so a retried registration leaves one card that names its version.
    """
    card = render_model_card(cfg, record, registration)
    client.log_text(registration.run_id, card, MODEL_CARD_ARTIFACT)
    if registration.version is not None:
        client.update_model_version(registration.model_name, registration.version, description=card_description(card))
    return card


def card_description(card: str) -> str:
    """The card's leading sections that fit a version description; the full card stays an artifact."""
    if len(card) <= _DESCRIPTION_LIMIT:
        return card
    head, *sections = card.split("\n## ")
    kept = [head]
    for section in sections:
        if sum(map(len, kept)) + len(section) > _DESCRIPTION_LIMIT:
            break
        kept.append(section)
    return "\n## ".join(kept) + f"\nThe full model card is the run artifact `{MODEL_CARD_ARTIFACT}`.\n"


def render_model_card(cfg: LoraopsConfig, record: RunRecord, registration: Registration) -> str:
    version = registration.version
    title = f"{registration.model_name} version {version}" if version else f"{registration.model_name} (not registered)"
    parts = [
        f"# {title}\n\n{summarize(record)}\n",
        _card_how_to_load(registration, record.lineage),
        _card_evaluation(record),
        _card_gate(record.decision),
        _card_base_and_data(record.lineage),
        _card_reproduce(registration, record.lineage),
        _card_samples(record.samples, cfg.registry.card_max_new_tokens),
        _card_training(record.train),
        _card_table("Parameters", _card_params(cfg)),
        _card_table("Lineage tags", {**record.lineage.as_tags(), "mlflow run id": registration.run_id}),
    ]
    return "\n".join(part for part in parts if part)


def _card_params(cfg: LoraopsConfig) -> dict[str, str]:
    """``section.key`` settings of the sections that shape the adapter (nested policies stay in the run)."""
    dumped = cfg.model_dump(mode="json")
    flat = flatten_params({section: dumped[section] for section in _CARD_PARAM_SECTIONS})
    return {key: value for key, value in flat.items() if key.count(".") == 1}


def _card_how_to_load(registration: Registration, lineage: Lineage) -> str:
    if registration.version is None:
        return "## How to load\n\nNot registered: the gate failed, so no `models:/` URI points at this adapter.\n"
    uri = f"models:/{registration.model_name}/{registration.version}"
    base = lineage.base_model
    base_path = "models/base" if base.startswith("pypi:") else base
    where = f"`loraops stage prepare-base-model` converts {base} here" if base_path != base else "the base model"
    revision = f", revision={lineage.base_revision!r}" if lineage.base_revision else ""
    return f"""## How to load

```bash
loraops generate --model {uri} "Hello, who are you?"
loraops generate --model models:/{registration.model_name}@champion "Hello"   # once promoted
mlflow models serve -m {uri} --env-manager local   # POST /invocations {{"inputs": [{{"messages": [...]}}]}}
```

```python
import mlflow  # MLFLOW_TRACKING_URI must point at this registry; no loraops needed
model = mlflow.pyfunc.load_model("{uri}")
print(model.predict([{{"messages": [{{"role": "user", "content": "Hello"}}]}}], params={{"max_new_tokens": 64}}))
```

Or by hand with peft (the adapter folder is inside the MLflow model, under `artifacts/`):

```python
from pathlib import Path

import mlflow
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer

model_dir = mlflow.artifacts.download_artifacts("{uri}")
adapter_dir = next(path for path in Path(model_dir, "artifacts").iterdir() if path.is_dir())
base_path = "{base_path}"  # {where}
tokenizer = AutoTokenizer.from_pretrained(base_path{revision})
base = AutoModelForCausalLM.from_pretrained(base_path{revision}, use_safetensors=True)
model = PeftModel.from_pretrained(base, adapter_dir).eval()
inputs = tokenizer.apply_chat_template(
    [{{"role": "user", "content": "Hello"}}], add_generation_prompt=True, return_tensors="pt", return_dict=True
)
output = model.generate(**inputs, max_new_tokens=64, do_sample=False)
print(tokenizer.decode(output[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True))
```
"""


def _card_evaluation(record: RunRecord) -> str:
    rows = [("base model", record.baseline), ("adapter", record.candidate)]
    lines = [
        "## Evaluation (validation split, target tokens only)\n",
        "| model | loss | perplexity | target tokens | examples |",
        "|---|---|---|---|---|",
        *[f"| {name} | {m.loss:.4f} | {m.perplexity:.2f} | {m.tokens} | {m.examples} |" for name, m in rows],
    ]
    decision = record.decision
    if decision.champion_loss is not None:
        lines.append(f"| champion v{decision.champion_version} | {decision.champion_loss:.4f} | | | |")
    return "\n".join(lines) + "\n"


def _card_gate(decision: GateDecision) -> str:
    from loraops.evaluate.score_table import score_table

    reasons = "\n".join(f"- {reason}" for reason in decision.reasons)
    table = "\n".join(score_table(decision))
    return f"## Gate: {'passed' if decision.passed else 'FAILED'}\n\n{table}\n\n{reasons}\n"


def _card_base_and_data(lineage: Lineage) -> str:
    dirty = " (uncommitted changes)" if lineage.git_dirty else ""
    return (
        "## Base model and data\n\n"
        f"- base model: `{lineage.base_model}` (revision `{lineage.base_revision or 'default'}`)\n"
        f"- data version (DVC md5 of data/): `{lineage.data_md5}`\n"
        f"- dvc.lock md5: `{lineage.dvc_lock_md5}`; params hash `{lineage.params_hash}`\n"
        f"- git commit: `{lineage.git_commit}`{dirty}\n"
    )


def _card_reproduce(registration: Registration, lineage: Lineage) -> str:
    from loraops.lineage.experiments import reproduce_commands

    rebuild = f"loraops reproduce {registration.model_name}/{registration.version}" if registration.version else ""
    if not lineage.dvc_experiment:
        return f"## How to reproduce\n\n`{rebuild}` (from the run's MLflow lineage artifacts)\n" if rebuild else ""
    name, rev = lineage.dvc_experiment, lineage.dvc_experiment_rev or ""
    compare = (
        f"\n{rebuild}   # rebuilds it in a temporary worktree and compares it with this version" if rebuild else ""
    )
    return (
        f"## How to reproduce\n\nThe run is DVC experiment `{name}` (commit `{rev[:12]}`); with DVC alone:\n\n"
        f"```bash\ndvc exp pull origin {name}   # in another clone: fetch the experiment first\n"
        f"{reproduce_commands(name)}\ndvc repro --force   # rebuild every stage; `dvc metrics diff {name}` then shows no change"
        f"{compare}\n```\n"
    )


def _card_samples(samples: Sequence[SampleAnswer], max_new_tokens: int) -> str:
    if not samples:
        return ""
    cell = lambda text: " ".join(text.split()).replace("|", "\\|") or "(empty)"  # noqa: E731
    rows = [f"| {cell(s.prompt)} | {cell(s.base_answer)} | {cell(s.adapter_answer)} |" for s in samples]
    return (
        f"## Samples (validation prompts, greedy, at most {max_new_tokens} new tokens)\n\n"
        "| prompt | base model | adapter |\n|---|---|---|\n" + "\n".join(rows) + "\n"
    )


def _card_training(train: TrainResult) -> str:
    fraction = train.trainable_params / max(train.total_params, 1)
    best = f"{train.best_eval_loss:.4f} at step {train.best_step}" if train.best_eval_loss is not None else "n/a"
    return (
        "## Training\n\n"
        f"- steps: {train.steps}{' (stopped early)' if train.stopped_early else ''}; best validation loss {best} (per completion token, as in Evaluation)\n"
        f"- trainable parameters: {train.trainable_params:,} of {train.total_params:,} ({fraction:.2%})\n"
        f"- loss curves: `{LOSS_PLOT_ARTIFACT}`; trainer history: `training/`\n"
    )


def _card_table(title: str, values: Mapping[str, str]) -> str:
    rows = "\n".join(f"| `{key}` | `{value}` |" for key, value in values.items())
    return f"## {title}\n\n| key | value |\n|---|---|\n{rows}\n"
