"""The live MLflow run of a pipeline run: opened when training starts, filled as it goes, always ended.

Training opens it (``start_run``) and logs every trainer log line to it at its step and time
(``metrics_callback``); evaluation and the gate add their numbers (``log_to_training_run``), and
registration logs the rest and ends it (``loraops.registry.runs.log_and_register``). A run that fails
ends FAILED (``ended_failed_on_error``); a run left RUNNING by a process that died (SIGKILL, power
loss) is marked FAILED by the next run in the same workspace or with the same adapter
(``fail_orphans``). The run carries the Prefect flow run's id and UI address as tags, and
``run_markdown`` gives the Prefect run a link back.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import urlsplit, urlunsplit

from loraops.config import LoraopsConfig
from loraops.names import (
    ADAPTER_KEY_TAG,
    PREFECT_FLOW_RUN_ID_TAG,
    PREFECT_FLOW_RUN_URL_TAG,
    PREFECT_TRAIN_FLOW_RUN_ID_TAG,
    PREFECT_TRAIN_FLOW_RUN_URL_TAG,
    WORKSPACE_TAG,
)
from loraops.registry.adapter_hash import adapter_key
from loraops.registry.limits import TrackingServerLostError, server_lost
from loraops.registry.store import (
    artifact_root_for,
    client_for,
    ensure_experiment,
    make_client,
    resolve_tracking_uri,
    store_exists,
)
from loraops.registry.values import is_number, log_new_params

if TYPE_CHECKING:
    from loraops.results import GateDecision, Registration
    from mlflow import MlflowClient

logger = logging.getLogger(__name__)

RUNNING, FINISHED, FAILED = "RUNNING", "FINISHED", "FAILED"


@dataclass(frozen=True)
class LiveRun:
    client: MlflowClient
    experiment_id: str
    run_id: str


# --- opening and ending ---------------------------------------------------------------------


def start_run(cfg: LoraopsConfig, root: Path, tags: dict[str, str] | None = None) -> LiveRun | None:
    """Open the pipeline's MLflow run as training starts (None on other ranks of a multi-process run).

    A retried training task of the same Prefect flow run continues in that flow run's run. ``tags`` are
    added to a new run (a sweep trial's: its parent run and name, ``mlflow.runName`` included).
    """
    if int(os.environ.get("RANK", "0")) != 0:
        return None
    client = client_for(cfg.registry, root)
    experiment_id = ensure_experiment(client, cfg.registry.experiment, artifact_root_for(client.tracking_uri))
    links = prefect_links()
    earlier = _run_of_flow_run(client, experiment_id, links.get(PREFECT_FLOW_RUN_ID_TAG))
    if earlier is not None:
        client.update_run(earlier, status=RUNNING)
        logger.info("MLflow run %s continues (a retry in Prefect flow run %s)", earlier, links[PREFECT_FLOW_RUN_ID_TAG])
        return LiveRun(client, experiment_id, earlier)
    workspace = workspace_key(root)
    fail_orphans(client, experiment_id, WORKSPACE_TAG, workspace)
    tags = {**links, WORKSPACE_TAG: workspace, **(tags or {})}
    run_name = tags.get("mlflow.runName") or f"{cfg.lora.variant}-r{cfg.lora.r}-{time.strftime('%Y%m%d-%H%M%S')}"
    run = client.create_run(experiment_id, run_name=run_name, tags=tags)
    live = LiveRun(client, experiment_id, run.info.run_id)
    with ended_failed_on_error(live):
        log_new_params(client, run.info.run_id, cfg)
    where = describe_run(client.tracking_uri, experiment_id, live.run_id)
    logger.info("MLflow run %s (%s) open: %s", live.run_id, run_name, where)
    return live


def training_done(live: LiveRun) -> None:
    """Outside a flow run (``dvc repro``, ``loraops stage train-adapter``) nothing else ends the run: FINISHED now.

    Inside one, evaluation, gate and registration continue in it and the flow ends it.
    """
    if not prefect_links():
        live.client.set_terminated(live.run_id, FINISHED)


def _run_of_flow_run(client: MlflowClient, experiment_id: str, flow_run_id: str | None) -> str | None:
    if not flow_run_id:
        return None
    runs = client.search_runs(
        [experiment_id], filter_string=f"tags.`{PREFECT_FLOW_RUN_ID_TAG}` = '{flow_run_id}'", max_results=1
    )
    return runs[0].info.run_id if runs else None


def workspace_key(root: Path) -> str:
    return f"{socket.gethostname()}:{Path(root).resolve()}"


def fail_orphans(client: MlflowClient, experiment_id: str, tag: str, value: str, keep: str | None = None) -> list[str]:
    """Mark FAILED the RUNNING runs whose ``tag`` is ``value`` (but ``keep``): their process is gone.

    Callers hold the project (one pipeline run per workspace at a time), so a RUNNING run with the
    same workspace or adapter was left by an earlier attempt that was killed.
    """
    running = client.search_runs([experiment_id], filter_string=f"attributes.status = '{RUNNING}'")
    orphans = [run.info.run_id for run in running if run.data.tags.get(tag) == value and run.info.run_id != keep]
    for run_id in orphans:
        logger.warning("MLflow run %s was left RUNNING by an earlier attempt that died: marked FAILED", run_id)
        client.set_terminated(run_id, FAILED)
    return orphans


@contextmanager
def ended_failed_on_error(live: LiveRun | None) -> Iterator[None]:
    """Any exception (a training crash, an upload that raises, SIGTERM's SystemExit) ends the run FAILED."""
    try:
        yield
    except BaseException:
        if live is not None:
            _terminate_quietly(live.client, live.run_id, FAILED)
        raise


@contextmanager
def ended(client: MlflowClient, run_id: str) -> Iterator[None]:
    """FINISHED when the block completes, FAILED when it raises."""
    try:
        yield
    except BaseException:
        _terminate_quietly(client, run_id, FAILED)
        raise
    client.set_terminated(run_id, FINISHED)


def _terminate_quietly(client: MlflowClient, run_id: str, status: str) -> None:
    if server_lost(client.tracking_uri):  # don't wait on it again: the next run's orphan sweep ends the run
        logger.warning("MLflow run %s left RUNNING: its tracking server does not answer", run_id)
        return
    try:
        client.set_terminated(run_id, status)
        logger.warning("MLflow run %s ended %s", run_id, status)
    except Exception as error:  # the store itself failing: the next run's orphan sweep ends it
        logger.warning("could not mark MLflow run %s %s (%s); the next run marks it", run_id, status, error)


@contextmanager
def flow_runs_failed_on_error(cfg: LoraopsConfig, root: Path) -> Iterator[None]:
    """Around a flow: a failure ends FAILED the MLflow runs this Prefect flow run left RUNNING."""
    try:
        yield
    except BaseException as error:
        flow_run_id = prefect_links().get(PREFECT_FLOW_RUN_ID_TAG)
        if flow_run_id and not isinstance(error, TrackingServerLostError):  # a lost server: the next run ends it
            try:
                _fail_runs_of_flow_run(cfg, root, flow_run_id)
            except Exception as error:
                logger.warning("could not end this flow run's MLflow run FAILED: %s", error)
        raise


def _fail_runs_of_flow_run(cfg: LoraopsConfig, root: Path, flow_run_id: str) -> None:
    if not store_exists(cfg.registry, root):
        return  # nothing was tracked yet (e.g. bad data): don't create a store now
    client = make_client(resolve_tracking_uri(cfg.registry, root))
    found = client.get_experiment_by_name(cfg.registry.experiment)
    if found is not None:
        fail_orphans(client, found.experiment_id, PREFECT_FLOW_RUN_ID_TAG, flow_run_id)


# --- logging as it happens ------------------------------------------------------------------


def metrics_callback(live: LiveRun):
    """A TrainerCallback sending each log line (loss, lr, eval loss…) to the run at its step, as it happens."""
    from mlflow.entities import Metric
    from transformers import TrainerCallback

    class MlflowMetrics(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):
            if not state.is_world_process_zero:
                return
            stamp = int(time.time() * 1000)
            step = state.global_step
            metrics = [
                Metric(key, float(value), stamp, step) for key, value in (logs or {}).items() if is_number(value)
            ]
            if metrics:
                live.client.log_batch(live.run_id, metrics=metrics)

    return MlflowMetrics()


def tag_adapter(live: LiveRun, adapter_dir: Path) -> str:
    """Tag the run with the adapter it produced, so a rerun that registers the same adapter finds it."""
    key = adapter_key(adapter_dir)
    live.client.set_tag(live.run_id, ADAPTER_KEY_TAG, key)
    return key


def log_to_training_run(
    cfg: LoraopsConfig,
    root: Path,
    adapter_dir: Path,
    metrics: dict[str, float | None],
    tags: dict[str, str] | None = None,
    step: int = 0,
) -> str | None:
    """Add a later stage's numbers to the run that trained ``adapter_dir`` (found by its content key); None without one.

    Found by the adapter's key, not by a run id in a file: metrics files hold numbers only, and a later
    process (``dvc repro``'s next stage) finds the run all the same.
    """
    from mlflow.entities import Metric, RunTag
    from mlflow.exceptions import MlflowException

    if not adapter_dir.is_dir():
        return None
    client = client_for(cfg.registry, root)
    experiment = client.get_experiment_by_name(cfg.registry.experiment)
    if experiment is None:
        return None
    found = client.search_runs(
        [experiment.experiment_id],
        filter_string=f"tags.`{ADAPTER_KEY_TAG}` = '{adapter_key(adapter_dir)}'",
        order_by=["attributes.start_time DESC"],
        max_results=1,
    )
    if not found:
        return None
    run = found[0]
    stamp = int(time.time() * 1000)
    values = {key: value for key, value in metrics.items() if is_number(value)}
    try:
        client.log_batch(
            run.info.run_id,
            metrics=[Metric(key, float(value), stamp, step) for key, value in values.items()],
            tags=[RunTag(key, value) for key, value in (tags or {}).items()],
        )
    except MlflowException as error:  # e.g. the run was deleted; registration logs these numbers again
        logger.warning("could not log to MLflow run %s of %s: %s", run.info.run_id, adapter_dir, error)
        return None
    return run.info.run_id


# --- links between Prefect and MLflow -------------------------------------------------------


def prefect_links() -> dict[str, str]:
    """The current Prefect flow run's id and UI address as tags (empty outside a flow run)."""
    try:
        from prefect.runtime import flow_run
        from prefect.settings import PREFECT_UI_URL
    except ImportError:
        return {}
    flow_run_id = flow_run.get_id()
    if not flow_run_id:
        return {}
    links = {PREFECT_FLOW_RUN_ID_TAG: str(flow_run_id)}
    ui = PREFECT_UI_URL.value()
    if ui:
        links[PREFECT_FLOW_RUN_URL_TAG] = f"{ui.rstrip('/')}/runs/flow-run/{flow_run_id}"
    return links


def link_tags(existing: dict[str, str]) -> dict[str, str]:
    """This flow run's link tags; a run opened by another flow run (a hand-off worker) keeps that one as train_*."""
    links = prefect_links()
    earlier = existing.get(PREFECT_FLOW_RUN_ID_TAG)
    if earlier and links and earlier != links[PREFECT_FLOW_RUN_ID_TAG]:
        links[PREFECT_TRAIN_FLOW_RUN_ID_TAG] = earlier
        if existing.get(PREFECT_FLOW_RUN_URL_TAG):
            links[PREFECT_TRAIN_FLOW_RUN_URL_TAG] = existing[PREFECT_FLOW_RUN_URL_TAG]
    return links


def run_url(tracking_uri: str, experiment_id: str, run_id: str) -> str | None:
    """The run's page in the MLflow UI of a tracking server; None for a file or SQLite store."""
    if not tracking_uri.startswith(("http://", "https://")):
        return None
    return f"{without_credentials(tracking_uri).rstrip('/')}/#/experiments/{experiment_id}/runs/{run_id}"


def without_credentials(uri: str) -> str:
    parts = urlsplit(uri)
    if parts.username is None and parts.password is None:
        return uri
    return urlunsplit(parts._replace(netloc=parts.netloc.rsplit("@", 1)[-1]))


def describe_run(tracking_uri: str, experiment_id: str, run_id: str) -> str:
    url = run_url(tracking_uri, experiment_id, run_id)
    if url:
        return url
    store = without_credentials(tracking_uri)
    return f"run `{run_id}` in {store} (`mlflow ui --backend-store-uri {store}`)"


def run_markdown(
    cfg: LoraopsConfig,
    root: Path,
    run_id: str,
    registration: Registration | None = None,
    decision: GateDecision | None = None,
) -> str:
    """The Prefect artifact linking to the MLflow run: where it is, what came of it, and the gate's reasons."""
    client = client_for(cfg.registry, root)
    run = client.get_run(run_id)
    where = describe_run(client.tracking_uri, run.info.experiment_id, run_id)
    link = f"[{run_id}]({where})" if where.startswith("http") else where
    lines = ["# MLflow run", f"MLflow {link} — status {run.info.status}."]
    if registration is not None:
        if registration.version is None:
            lines.append("Nothing registered.")
        else:
            lines.append(f"Registered `{registration.model_name}` version {registration.version}.")
    if decision is not None:
        verdict = "passed" if decision.passed else "refused"
        lines += ["", f"Gate {verdict}:", *[f"- {reason}" for reason in decision.reasons]]
    return "\n".join(lines)
