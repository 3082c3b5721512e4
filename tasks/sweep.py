"""The sweep's tasks. The work lives in loraops.sweep.trials; tasks add names, retries and artifacts."""

from __future__ import annotations

from pathlib import Path

from prefect import task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE

from loraops.config import LoraopsConfig
from loraops.results import EvalMetrics, Lineage, Registration, TrainResult
from loraops.sweep import trials as sweep_stages
from loraops.sweep.plan import SweptParam, Trial, TrialResult
from tasks.pipeline import _network

_stage = dict(cache_policy=NO_CACHE, persist_result=False)


@task(name="open-sweep-run", retries=2, retry_delay_seconds=[5, 30], **_stage)
def open_sweep_run(cfg: LoraopsConfig, root: Path, params: list[SweptParam], min_gain: float | None) -> str:
    return sweep_stages.open_sweep_run(cfg, root, params, min_gain)


@task(name="train-trial", task_run_name="train-trial-{trial.name}", **_stage)
def train_trial(
    cfg: LoraopsConfig, root: Path, trial: Trial, parent_run_id: str
) -> tuple[TrainResult, tuple[float, int]]:
    """Not retried: a rerun of the sweep trains the trial afresh in a new child run."""
    return sweep_stages.train_trial(cfg, root, trial, parent_run_id)


@task(name="adopt-trial", task_run_name="adopt-trial-{trial.name}", **_stage)
def adopt_trial(cfg: LoraopsConfig, root: Path, trial: Trial, trained: TrainResult) -> TrainResult:
    return sweep_stages.adopt_trial(cfg, root, trial, trained)


@task(name="save-trial-experiment", **_network, **_stage)
def save_trial_experiment(cfg: LoraopsConfig, root: Path, lineage: Lineage, trial: Trial) -> Lineage:
    """Named after the trial and the flow run's scheduled start, so a retry finds the experiment it saved."""
    from prefect.runtime import flow_run

    from loraops.lineage.experiments import experiment_name

    name = experiment_name(f"sweep-{trial.name}", flow_run.scheduled_start_time)
    return sweep_stages.save_trial_experiment(cfg, root, lineage, name)


@task(name="finish-trial", task_run_name="finish-trial-{trial.name}", **_network, **_stage)
def finish_trial(
    cfg: LoraopsConfig,
    root: Path,
    trial: Trial,
    trained: TrainResult,
    measured: tuple[float, int],
    candidate: EvalMetrics,
    lineage: Lineage | None = None,
) -> TrialResult:
    return sweep_stages.finish_trial(cfg, root, trial, trained, measured, candidate, lineage)


@task(name="close-sweep-run", retries=2, retry_delay_seconds=[5, 30], **_stage)
def close_sweep_run(
    cfg: LoraopsConfig,
    root: Path,
    parent_run_id: str,
    params: list[SweptParam],
    results: list[TrialResult],
    winner: TrialResult,
    registration: Registration,
) -> str:
    table = sweep_stages.close_sweep_run(cfg, root, parent_run_id, params, results, winner, registration)
    create_markdown_artifact(table, key="sweep")
    return table
