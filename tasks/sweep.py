"""The sweep's tasks. The work lives in loraops.sweep (trials, remote); tasks add names, retries, artifacts, and
submit trials to the train deployment and wait for them."""

from __future__ import annotations

import time
from pathlib import Path

from prefect import task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE

from loraops.config import LoraopsConfig
from loraops.registry import handoff
from loraops.results import EvalMetrics, Lineage, Registration, TrainResult
from loraops.sweep import remote
from loraops.sweep import trials as sweep_stages
from loraops.sweep.plan import SweepError, SweptParam, Trial, TrialResult, failure_summary
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
    measured: tuple[float | None, int | None],
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


@task(name="fetch-trial", task_run_name="fetch-trial-{sent.trial.name}", **_network, **_stage)
def fetch_trial(
    cfg: LoraopsConfig, root: Path, sent: remote.RemoteTrial
) -> tuple[TrainResult, tuple[float | None, int | None]]:
    return remote.fetch_trial(cfg, root, sent)


@task(name="record-failed-trial", task_run_name="record-failed-trial-{trial.name}", **_network, **_stage)
def record_failed_trial(cfg: LoraopsConfig, root: Path, trial: Trial, parent_run_id: str, reason: str) -> TrialResult:
    return sweep_stages.record_failed_trial(cfg, root, trial, parent_run_id, reason)


@task(name="fail-sweep-run", **_stage)
def fail_sweep_run(
    cfg: LoraopsConfig, root: Path, parent_run_id: str, params: list[SweptParam], results: list[TrialResult]
) -> None:
    """Every trial failed or was skipped: the table as an artifact, then SweepError fails the flow run."""
    create_markdown_artifact(sweep_stages.fail_sweep_run(cfg, root, parent_run_id, params, results), key="sweep")
    raise SweepError(failure_summary(results))


@task(name="train-trials-on-deployment", **_stage)
def train_trials_on_deployment(
    cfg: LoraopsConfig, root: Path, trials: list[Trial], parent_run_id: str
) -> list[remote.RemoteTrial]:
    """Submit every trial to orchestration.train_deployment at once, then wait for all of them.

    The work pool's and the deployment's concurrency limits decide how many train side by side (one per GPU
    worker). Each waits up to orchestration.train_timeout_s times the number of trials (on one worker they
    train one after another); one still unfinished then is cancelled and reported failed. Not retried here:
    each training run retries itself.
    """
    from prefect.deployments import run_deployment
    from prefect.exceptions import ObjectNotFound

    deployment = cfg.orchestration.train_deployment
    outgoing = handoff.prepare_handoff(cfg, root)  # the dataset goes out once, for every trial
    submitted = []
    for trial in trials:
        trial_handoff = remote.trial_handoff(outgoing, trial, parent_run_id)
        try:
            run = run_deployment(
                deployment,
                parameters=handoff.handoff_parameters(trial_handoff),
                flow_run_name=f"sweep-{trial.name}",
                timeout=0,  # don't wait here: the next trial goes out at once
            )
        except ObjectNotFound:
            raise handoff.HandoffError(
                f"deployment '{deployment}' (orchestration.train_deployment) is not on the Prefect server: deploy "
                "it with `make deploy`, or empty orchestration.train_deployment to train the trials inside this run"
            ) from None
        submitted.append(remote.RemoteTrial(trial=trial, train_key=trial_handoff.train_key, flow_run_id=str(run.id)))
    return _wait_for_trials(deployment, submitted, cfg.orchestration.train_timeout_s)


def _wait_for_trials(deployment: str, submitted: list[remote.RemoteTrial], timeout_s: int) -> list[remote.RemoteTrial]:
    """Poll the trials' flow runs until all are final or the deadline passes; those left are cancelled."""
    from prefect.client.orchestration import get_client
    from prefect.states import Cancelled, Cancelling

    waited = timeout_s * len(submitted)
    deadline = time.monotonic() + waited
    with get_client(sync_client=True) as client:
        runs = {trial.flow_run_id: client.read_flow_run(trial.flow_run_id) for trial in submitted}
        while not all(run.state.is_final() for run in runs.values()) and time.monotonic() < deadline:
            time.sleep(5)
            runs = {run_id: client.read_flow_run(run_id) for run_id in runs}
        ended = []
        for trial in submitted:
            run = runs[trial.flow_run_id]
            if run.state.is_completed():
                ended.append(trial)
                continue
            if run.state.is_final():
                error = f"its run {run.name} of deployment '{deployment}' ended {run.state.name}: {run.state.message}"
            else:  # the deadline passed: stop it (a worker ends a running one)
                client.set_flow_run_state(trial.flow_run_id, Cancelling() if run.state.is_running() else Cancelled())
                error = handoff.describe_unfinished(deployment, run.state.name, run.state.message, waited)
            ended.append(trial.model_copy(update={"error": error}))
    return ended
