"""Where runs and models live: the tracking URI, the artifact root, the client (one SQLite store opener at a time)."""

from __future__ import annotations

import os
from pathlib import Path

from mlflow.exceptions import MlflowException

from loraops.config import RegistryConfig
from mlflow import MlflowClient

_STORE_LOCK_TIMEOUT_S = 300  # creating and migrating a fresh SQLite store takes seconds


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


def client_for(cfg: RegistryConfig, root: str | Path) -> MlflowClient:
    return make_client(resolve_tracking_uri(cfg, root))


def store_exists(cfg: RegistryConfig, root: str | Path) -> bool:
    """False only for a local SQLite store not created yet (no earlier run); a tracking server always exists."""
    database = _sqlite_path(resolve_tracking_uri(cfg, root))
    return database is None or database.exists()
