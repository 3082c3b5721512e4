"""The sweep's tasks. The work lives in loraops.sweep_stages; tasks add names, retries and artifacts."""

from __future__ import annotations

from pathlib import Path

from prefect import task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE

from loraops import sweep_stages
from loraops.config import LoraopsConfig
from loraops.evaluate.sweep import SweptParam, Trial, TrialResult
from loraops.results import Registration, TrainResult

_stage = dict(cache_policy=NO_CACHE, persist_result=False)


@task(name="open-sweep-run", retries=2, retry_delay_seconds=[5, 30], **_stage)
def open_sweep_run(cfg: LoraopsConfig, root: Path, params: list[SweptParam], min_gain: float | None) -> str:
    return sweep_stages.open_sweep_run(cfg, root, params, min_gain)


@task(name="train-trial", task_run_name="train-trial-{trial.name}", **_stage)
def train_trial(cfg: LoraopsConfig, root: Path, trial: Trial, parent_run_id: str) -> tuple[TrainResult, float, int]:
    """Not retried: a rerun of the sweep trains the trial afresh in a new child run."""
    return sweep_stages.train_trial(cfg, root, trial, parent_run_id)


@task(name="evaluate-trial", task_run_name="evaluate-trial-{trial.name}", **_stage)
def evaluate_trial(
    cfg: LoraopsConfig, root: Path, trial: Trial, trained: tuple[TrainResult, float, int]
) -> TrialResult:
    return sweep_stages.evaluate_trial(cfg, root, trial, *trained)


@task(name="adopt-winner", **_stage)
def adopt_winner(cfg: LoraopsConfig, root: Path, winner: TrialResult) -> tuple[LoraopsConfig, TrainResult]:
    return sweep_stages.adopt_winner(cfg, root, winner)


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
