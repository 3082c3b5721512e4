"""The sweep flow: contract and baseline once, a trial per setting, then the winner through gate and registration."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from prefect import flow
from pydantic import BaseModel

from loraops import stages
from loraops.config import LoraopsConfig
from loraops.project.params_file import params_restored_on_failure
from loraops.registry import tracking
from loraops.results import EvalMetrics, GateDecision, Registration, TrainResult
from loraops.sweep import plan, remote
from loraops.sweep import trials as sweep_stages
from tasks import pipeline, run_context
from tasks import sweep as trials


class SweepResult(BaseModel):
    trials: list[plan.TrialResult]
    winner: plan.TrialResult
    baseline: EvalMetrics
    candidate: EvalMetrics
    decision: GateDecision
    registration: Registration


@flow(name="sweep")  # loraops logs through logging; captured prints would include dill's dis output
@run_context.with_loraops_logs
def sweep(
    param: list[str],
    config: LoraopsConfig | None = None,
    project_dir: str = ".",
    stop_when_gain_below: float | None = None,
) -> SweepResult:
    """Train one adapter per combination of the swept settings and register the best if it passes the gate.

    Trials run in the given order, each a child MLflow run of one sweep run; with
    orchestration.train_deployment set they are runs of that deployment (the GPU pool), side by side as its
    pool's concurrency limit allows. A trial that fails is recorded and the others go on. The winner (lowest
    validation loss; within ``stop_when_gain_below`` of it, the smaller lora.r) is gated against base and
    champion, versioned and registered as a retrain's adapter is; the others are not registered.

    Args:
        param: the swept settings, e.g. ["lora.r=4,8,16", "train.learning_rate=2e-4,1e-3"].
        config: settings that differ from params.yaml for every trial.
        project_dir: the project checkout the run works in.
        stop_when_gain_below: stop raising a setting once validation loss improves by less than this (nats).
    """
    root = Path(project_dir).resolve()
    cfg = run_context.run_config(config, root)
    swept = plan.parse_params(param, cfg)  # a bad value fails here, before anything is locked or written
    with (
        stages.guarded_run(cfg, root, "sweep flow"),
        params_restored_on_failure(root),
        tracking.flow_runs_failed_on_error(cfg, root),
    ):
        pipeline.check_servers(cfg, root)
        pipeline.record_run_config(cfg, root)
        pipeline.resolve_init_adapter(cfg, root)  # train.init_from: refused before the baseline, not at a trial
        pipeline.prepare_base_model(cfg, root)
        pipeline.validate_dataset(cfg, root)
        if cfg.train.sanity_check:
            pipeline.sanity_check(cfg, root)
        baseline = pipeline.evaluate_baseline(cfg, root)
        parent = trials.open_sweep_run(cfg, root, swept, stop_when_gain_below)
        if cfg.orchestration.train_deployment:  # trials train on the GPU pool, side by side, a wave at a time
            results = _trials_on_deployment(cfg, root, swept, parent, stop_when_gain_below)
        else:
            results = _trials_here(cfg, root, swept, parent, stop_when_gain_below)
        if not plan.finished(results):  # every trial failed or was skipped: nothing to gate or register
            trials.fail_sweep_run(cfg, root, parent, swept, results)
        winner = plan.pick_winner(results, margin=stop_when_gain_below or 0.0)
        winner_cfg = plan.config_for(cfg, winner.trial)
        trained = trials.adopt_trial(cfg, root, winner.trial, winner.trained)  # the winner's adapter back in place
        pipeline.record_run_config(winner_cfg, root)  # params.yaml and dvc.lock describe the winner
        candidate = pipeline.evaluate_adapter(winner_cfg, root)
        decision = pipeline.gate_candidate(winner_cfg, root, baseline, candidate)
        lineage = pipeline.version_outputs(winner_cfg, root)
        lineage = pipeline.save_experiment(winner_cfg, root, lineage)
        registration = pipeline.register_adapter(winner_cfg, root, trained, baseline, candidate, decision, lineage)
        trials.close_sweep_run(cfg, root, parent, swept, results, winner, registration)
    result = SweepResult(
        trials=results,
        winner=winner,
        baseline=baseline,
        candidate=candidate,
        decision=decision,
        registration=registration,
    )
    return run_context.final_state(result, decision, registration)


def _trials_here(
    cfg: LoraopsConfig, root: Path, swept: list[plan.SweptParam], parent: str, min_gain: float | None
) -> list[plan.TrialResult]:
    """One trial after another, in the given order, in this run."""
    results: list[plan.TrialResult] = []
    for trial in plan.trial_order(swept):
        skipped = plan.skip_reason(trial, swept, results, min_gain)
        if skipped:  # the stop rule: raising this setting stopped paying
            results.append(plan.TrialResult(trial=trial, status="skipped", note=skipped))
            continue
        results.append(_guarded(_train_and_evaluate, cfg, root, trial, parent))
    return results


def _trials_on_deployment(
    cfg: LoraopsConfig, root: Path, swept: list[plan.SweptParam], parent: str, min_gain: float | None
) -> list[plan.TrialResult]:
    """Waves of train-adapter runs: every trial whose stop rule can be decided goes out at once (all of them
    without a stop rule); once the wave has ended, each is fetched and evaluated here, in order."""
    order = plan.trial_order(swept)
    results: list[plan.TrialResult] = []
    while wave := plan.next_wave(order, swept, results, min_gain):
        to_train = []
        for trial in wave:
            skipped = plan.skip_reason(trial, swept, results, min_gain)
            if skipped:
                results.append(plan.TrialResult(trial=trial, status="skipped", note=skipped))
            else:
                to_train.append(trial)
        if to_train:
            for sent in trials.train_trials_on_deployment(cfg, root, to_train, parent):
                results.append(_fetched(cfg, root, sent, parent))
    return sorted(results, key=lambda result: result.trial.index)


def _fetched(cfg: LoraopsConfig, root: Path, sent: remote.RemoteTrial, parent: str) -> plan.TrialResult:
    if sent.error:  # its training run failed, crashed or timed out
        return trials.record_failed_trial(cfg, root, sent.trial, parent, sent.error)
    return _guarded(_fetch_and_evaluate, cfg, root, sent.trial, parent, sent)


def _guarded(
    step: Callable[..., plan.TrialResult], cfg: LoraopsConfig, root: Path, trial: plan.Trial, parent: str, *more
) -> plan.TrialResult:
    """``step(cfg, root, trial, parent, *more)``; a trial that fails is recorded (its child run FAILED with the
    error, a row of the table) and the sweep goes on."""
    try:
        return step(cfg, root, trial, parent, *more)
    except Exception as error:
        reason = sweep_stages.failure_reason(error)
        if reason is None:  # not the trial's own (the tracking server is gone): the sweep fails
            raise
        return trials.record_failed_trial(cfg, root, trial, parent, reason)


def _fetch_and_evaluate(
    cfg: LoraopsConfig, root: Path, trial: plan.Trial, parent: str, sent: remote.RemoteTrial
) -> plan.TrialResult:
    trained, measured = trials.fetch_trial(cfg, root, sent)
    return _evaluate(cfg, root, trial, trained, measured)


def _train_and_evaluate(cfg: LoraopsConfig, root: Path, trial: plan.Trial, parent: str) -> plan.TrialResult:
    """Train in the trial's own folders (a child run of ``parent``), then evaluate and version it."""
    pipeline.check_memory(plan.config_for(cfg, trial), root)
    trained, measured = trials.train_trial(cfg, root, trial, parent)
    return _evaluate(cfg, root, trial, trained, measured)


def _evaluate(
    cfg: LoraopsConfig, root: Path, trial: plan.Trial, trained: TrainResult, measured: tuple[float | None, int | None]
) -> plan.TrialResult:
    """The trial's adapter at paths.adapter_dir, evaluated and versioned as a retrain's; its child run ends."""
    trial_cfg = plan.config_for(cfg, trial)
    trials.adopt_trial(cfg, root, trial, trained)  # its adapter at paths.adapter_dir, where the stages look
    candidate = pipeline.evaluate_adapter(trial_cfg, root)
    pipeline.record_run_config(trial_cfg, root)
    lineage = pipeline.version_outputs(trial_cfg, root)
    lineage = trials.save_trial_experiment(trial_cfg, root, lineage, trial)  # `dvc exp show` lists every trial
    return trials.finish_trial(cfg, root, trial, trained, measured, candidate, lineage)
