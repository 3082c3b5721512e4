"""The sweep's stages: the parent MLflow run, each trial's training as a child run and its adoption by the project.

The sweep flow runs contract and baseline once (loraops.stages), then for each trial ``train_trial`` (its own
checkpoint folder ``<train.output_dir>/sweep/<trial>`` and adapter folder ``adapters/sweep/<trial>``, a
child MLflow run of the sweep run). ``adopt_trial`` copies its adapter and history to the project's paths,
so the project's stages evaluate and version it (``save_trial_experiment``: one DVC experiment per trial)
and, for the winner, gate and register it as they do a retrain's adapter. ``finish_trial`` ends the child
run with the trial's numbers; ``record_failed_trial`` ends a failed trial's child run FAILED with its error,
and the sweep goes on. Trials on a train deployment (GPU pool) are loraops.sweep.remote's. The choices
(order, stop rule, winner) are loraops.sweep.plan's.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from pathlib import Path

from loraops import stages
from loraops.config import LoraopsConfig
from loraops.results import EvalMetrics, Lineage, Registration, TrainResult
from loraops.sweep.plan import (
    SweptParam,
    Trial,
    TrialResult,
    config_for,
    failure_summary,
    plot_losses,
    table_markdown,
)
from loraops.train import datasets
from loraops.train.peak_memory import peak_memory, reset_peak_memory

log = logging.getLogger(__name__)

PARENT_RUN_TAG = "mlflow.parentRunId"  # MLflow's own tag: the UI nests the trials under the sweep run
SWEEP_TAG = "loraops.sweep"  # on the sweep run: the swept settings; on a trial's run: its trial name
SWEEP_ERROR_TAG = "loraops.sweep_error"  # on a failed trial's run: the error it failed with
SWEEP_FOLDER = "sweep"
TABLE_FILE, PLOT_FILE, RESULTS_FILE = "sweep.md", "val_loss.png", "sweep.json"


def trial_paths(cfg: LoraopsConfig, root: Path, trial: Trial) -> tuple[Path, Path, Path]:
    """(checkpoint folder, adapter folder, training history) of one trial, under the project root."""
    adapters = Path(root) / Path(cfg.paths.adapter_dir).parent / SWEEP_FOLDER
    checkpoints = Path(root) / cfg.train.output_dir / SWEEP_FOLDER / trial.name
    return checkpoints, adapters / trial.name, adapters / f"{trial.name}.train_history.json"


def open_sweep_run(cfg: LoraopsConfig, root: Path, params: list[SweptParam], min_gain: float | None) -> str:
    """The parent MLflow run (linked to the Prefect flow run); returns its id."""
    from loraops.registry import runs as registry
    from loraops.registry import store, tracking

    client = store.client_for(cfg.registry, root)
    experiment_id = registry.ensure_experiment(
        client, cfg.registry.experiment, registry.artifact_root_for(client.tracking_uri)
    )
    workspace = tracking.workspace_key(root)
    tracking.fail_orphans(client, experiment_id, tracking.WORKSPACE_TAG, workspace)
    swept = "; ".join(f"{param.key}={','.join(map(str, param.values))}" for param in params)
    tags = {**tracking.prefect_links(), tracking.WORKSPACE_TAG: workspace, SWEEP_TAG: swept}
    run = client.create_run(experiment_id, run_name=f"sweep-{time.strftime('%Y%m%d-%H%M%S')}", tags=tags)
    for param in params:
        client.log_param(run.info.run_id, f"sweep.{param.key}", ",".join(map(str, param.values)))
    client.log_param(run.info.run_id, "sweep.stop_when_gain_below", str(min_gain))
    log.info("MLflow sweep run %s open: %s", run.info.run_id, swept)
    return run.info.run_id


def train_trial(
    cfg: LoraopsConfig, root: Path, trial: Trial, parent_run_id: str
) -> tuple[TrainResult, tuple[float, int]]:
    """Train one trial in its own folders as a child run of the sweep run; (result, (seconds, peak memory bytes))."""
    from loraops.registry import store, tracking
    from loraops.registry.values import log_new_params
    from loraops.train import base_model as modeling
    from loraops.train import trainer as training

    checkpoints, adapter_dir, history = trial_paths(cfg, root, trial)
    fresh_sweep_folder(adapter_dir)
    local = config_for(cfg, trial)
    local = local.model_copy(update={"train": local.train.model_copy(update={"output_dir": str(checkpoints)})})
    base = modeling.read_base_model_ref(Path(root) / cfg.paths.base_model_dir)
    train_dataset, validation_dataset = datasets.tokenized_splits(local, root)
    client = store.client_for(cfg.registry, root)
    parent = client.get_run(parent_run_id)
    tags = {**tracking.prefect_links(), **trial_tags(parent_run_id, trial)}
    run = client.create_run(parent.info.experiment_id, run_name=trial.name, tags=tags)
    live = tracking.LiveRun(client, parent.info.experiment_id, run.info.run_id)
    with tracking.ended_failed_on_error(live):
        log_new_params(client, live.run_id, local)
        device = modeling.resolve_device(local.train)
        reset_peak_memory(device)
        started = time.monotonic()
        result = training.train_adapter(
            local,
            base,
            train_dataset,
            validation_dataset,
            adapter_dir,
            history_path=history,
            extra_callbacks=(tracking.metrics_callback(live),),
        )
        seconds, peak = time.monotonic() - started, peak_memory(device)
        tracking.tag_adapter(live, adapter_dir)
    result.mlflow_run_id = live.run_id
    return result, (seconds, peak)


def fresh_sweep_folder(adapter_dir: Path) -> None:
    """An empty trial folder; the sweep folder ignored by git so trials do not make the checkout dirty."""
    adapter_dir.parent.mkdir(parents=True, exist_ok=True)
    (adapter_dir.parent / ".gitignore").write_text("*\n")
    if adapter_dir.exists():
        shutil.rmtree(adapter_dir)


def adopt_trial(cfg: LoraopsConfig, root: Path, trial: Trial, trained: TrainResult) -> TrainResult:
    """The trial's adapter and history at the project's paths, as a retrain leaves them (train.json and plots too).

    The project's stages (evaluate_adapter, version_outputs, the gate, registration) then take it as they take
    a retrain's adapter.
    """
    adapter_dir = Path(root) / cfg.paths.adapter_dir
    metrics_dir = Path(root) / cfg.paths.metrics_dir
    history = metrics_dir / stages.TRAIN_HISTORY
    if adapter_dir.exists():
        shutil.rmtree(adapter_dir)
    shutil.copytree(trained.adapter_dir, adapter_dir)
    history.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(trained.history_path, history)
    adopted = trained.model_copy(update={"adapter_dir": str(adapter_dir), "history_path": str(history)})
    stages.record_training(adopted, metrics_dir)
    log.info("trial %s: its adapter is now %s", trial.name, cfg.paths.adapter_dir)
    return adopted


def save_trial_experiment(cfg: LoraopsConfig, root: Path, lineage: Lineage, name: str) -> Lineage:
    """The trial as DVC experiment ``name``; a trial is not gated, so its experiment holds no metrics/gate.json."""
    (Path(root) / cfg.paths.metrics_dir / stages.GATE_DECISION).unlink(missing_ok=True)
    return stages.save_experiment(cfg, root, lineage, name)


def trial_tags(parent_run_id: str, trial: Trial) -> dict[str, str]:
    """The tags that make a trial's MLflow run a child of the sweep run, named after the trial."""
    return {PARENT_RUN_TAG: parent_run_id, SWEEP_TAG: trial.name, "mlflow.runName": trial.name}


def finish_trial(
    cfg: LoraopsConfig,
    root: Path,
    trial: Trial,
    trained: TrainResult,
    measured: tuple[float | None, int | None],
    candidate: EvalMetrics,
    lineage: Lineage | None = None,
) -> TrialResult:
    """The trial's numbers on its child run, which then ends; its row of the sweep table."""
    from loraops.names import DVC_EXPERIMENT_TAG
    from loraops.registry import store, tracking

    seconds, peak = measured
    client = store.client_for(cfg.registry, root)
    numbers = {
        "adapter_val_loss": candidate.loss,
        "trainable_params": trained.trainable_params,
        "train_time_s": seconds,
        "peak_memory_bytes": peak,
    }
    with tracking.ended(client, trained.mlflow_run_id):
        for key, value in numbers.items():
            if value is None:  # not measured (the peak memory of a trial trained on a train deployment)
                continue
            client.log_metric(trained.mlflow_run_id, key, float(value), step=trained.steps)
        if lineage is not None and lineage.dvc_experiment:
            client.set_tag(trained.mlflow_run_id, DVC_EXPERIMENT_TAG, lineage.dvc_experiment)
    log.info("trial %s: validation loss %.4f", trial.name, candidate.loss)
    return TrialResult(
        trial=trial,
        status="done",
        val_loss=candidate.loss,
        trainable_params=trained.trainable_params,
        train_time_s=seconds,
        peak_memory_bytes=peak,
        run_id=trained.mlflow_run_id,
        trained=trained,
        experiment=lineage.dvc_experiment if lineage is not None else None,
    )


def failure_reason(error: BaseException) -> str | None:
    """What a failed trial reports, or None for an error that is not the trial's own and fails the sweep:
    the tracking server stopped answering, or the process is being stopped."""
    from loraops.registry.limits import TrackingServerLostError

    if not isinstance(error, Exception) or isinstance(error, TrackingServerLostError):
        return None
    return f"{type(error).__name__}: {error}"


def record_failed_trial(cfg: LoraopsConfig, root: Path, trial: Trial, parent_run_id: str, reason: str) -> TrialResult:
    """The trial's child run ends FAILED, tagged with ``reason`` (a run is made for a trial that failed before
    opening one); its row of the sweep table. The sweep goes on with the other trials."""
    from loraops.registry import store, tracking

    client = store.client_for(cfg.registry, root)
    run_id = _trial_run(client, parent_run_id, trial)
    if run_id is None:
        experiment_id = client.get_run(parent_run_id).info.experiment_id
        tags = {**tracking.prefect_links(), **trial_tags(parent_run_id, trial)}
        run_id = client.create_run(experiment_id, run_name=trial.name, tags=tags).info.run_id
    client.set_tag(run_id, SWEEP_ERROR_TAG, reason[:5000])  # MLflow tag values hold 8,000 characters at most
    client.set_terminated(run_id, tracking.FAILED)
    log.warning("trial %s failed, the sweep goes on: %s", trial.name, reason)
    return TrialResult(trial=trial, status="failed", run_id=run_id, note=reason)


def _trial_run(client, parent_run_id: str, trial: Trial) -> str | None:
    """The newest child run of ``parent_run_id`` for ``trial``, here or on a train deployment's worker."""
    experiment_id = client.get_run(parent_run_id).info.experiment_id
    found = client.search_runs(
        [experiment_id],
        filter_string=f"tags.`{PARENT_RUN_TAG}` = '{parent_run_id}' and tags.`{SWEEP_TAG}` = '{trial.name}'",
        order_by=["attributes.start_time DESC"],
        max_results=1,
    )
    return found[0].info.run_id if found else None


def close_sweep_run(
    cfg: LoraopsConfig,
    root: Path,
    parent_run_id: str,
    params: list[SweptParam],
    results: list[TrialResult],
    winner: TrialResult,
    registration: Registration,
) -> str:
    """Table, results and plot into reports/sweep/ and the sweep run's artifacts; the run ends. Returns the table."""
    from loraops.registry import store, tracking

    table = _write_report(cfg, root, params, results, winner, _outcome(winner, registration))
    client = store.client_for(cfg.registry, root)
    with tracking.ended(client, parent_run_id):
        client.log_artifacts(parent_run_id, str(Path(root) / cfg.paths.reports_dir / SWEEP_FOLDER), SWEEP_FOLDER)
        client.log_metric(parent_run_id, "best_val_loss", float(winner.val_loss))
        client.set_tag(parent_run_id, "loraops.sweep_winner", winner.trial.name)
        client.set_tag(parent_run_id, "loraops.sweep_winner_run_id", winner.run_id or "")
        if registration.version is not None:
            client.set_tag(parent_run_id, "loraops.sweep_registered_version", registration.version)
    return table


def fail_sweep_run(
    cfg: LoraopsConfig, root: Path, parent_run_id: str, params: list[SweptParam], results: list[TrialResult]
) -> str:
    """No trial finished: the table goes out as ``close_sweep_run``'s does and the sweep run ends FAILED, tagged
    with how each trial ended (``plan.failure_summary``, the SweepError the flow then raises). Returns the table."""
    from loraops.registry import store, tracking

    summary = failure_summary(results)
    table = _write_report(cfg, root, params, results, None, summary[0].upper() + summary[1:] + ".")
    client = store.client_for(cfg.registry, root)
    client.log_artifacts(parent_run_id, str(Path(root) / cfg.paths.reports_dir / SWEEP_FOLDER), SWEEP_FOLDER)
    client.set_tag(parent_run_id, SWEEP_ERROR_TAG, summary[:5000])
    client.set_terminated(parent_run_id, tracking.FAILED)
    return table


def _write_report(
    cfg: LoraopsConfig,
    root: Path,
    params: list[SweptParam],
    results: list[TrialResult],
    winner: TrialResult | None,
    outcome: str,
) -> str:
    """reports/sweep/: the table (sweep.md), every trial's result (sweep.json) and the loss plot."""
    folder = Path(root) / cfg.paths.reports_dir / SWEEP_FOLDER
    folder.mkdir(parents=True, exist_ok=True)
    table = f"# Sweep\n\n{table_markdown(params, results, winner)}\n\n{outcome}\n"
    (folder / TABLE_FILE).write_text(table)
    rows = [result.model_dump(mode="json", exclude={"trained"}) for result in results]
    (folder / RESULTS_FILE).write_text(json.dumps(rows, indent=1) + "\n")
    plot_losses(params, results, folder / PLOT_FILE)
    return table


def _outcome(winner: TrialResult, registration: Registration) -> str:
    if registration.version is None:
        return f"Winner {winner.trial.name}: the gate refused it; nothing registered."
    return f"Winner {winner.trial.name}: registered {registration.model_name} version {registration.version}."
