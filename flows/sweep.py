"""The sweep flow: contract and baseline once, a trial per setting, then the winner through gate and registration."""

from __future__ import annotations

from pathlib import Path

from prefect import flow
from pydantic import BaseModel

from loraops import stages
from loraops.config import LoraopsConfig
from loraops.project.params_file import params_restored_on_failure
from loraops.registry import tracking
from loraops.results import EvalMetrics, GateDecision, Registration
from loraops.sweep import plan
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

    Trials run in the given order, each a child MLflow run of one sweep run; the winner (lowest validation
    loss; within ``stop_when_gain_below`` of it, the smaller lora.r) is gated against base and champion,
    versioned and registered as a retrain's adapter is; the others are not registered.

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
        results: list[plan.TrialResult] = []
        for trial in plan.trial_order(swept):
            skipped = plan.skip_reason(trial, swept, results, stop_when_gain_below)
            if skipped:  # the stop rule: raising this setting stopped paying
                results.append(plan.TrialResult(trial=trial, status="skipped", note=skipped))
                continue
            results.append(_run_trial(cfg, root, trial, parent))
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


def _run_trial(cfg: LoraopsConfig, root: Path, trial: plan.Trial, parent: str) -> plan.TrialResult:
    """Train in the trial's own folders (a child run of ``parent``), then evaluate and version it as a retrain."""
    trial_cfg = plan.config_for(cfg, trial)
    pipeline.check_memory(trial_cfg, root)
    trained, measured = trials.train_trial(cfg, root, trial, parent)
    trials.adopt_trial(cfg, root, trial, trained)  # its adapter at paths.adapter_dir, where the stages look
    candidate = pipeline.evaluate_adapter(trial_cfg, root)
    pipeline.record_run_config(trial_cfg, root)
    lineage = pipeline.version_outputs(trial_cfg, root)
    lineage = trials.save_trial_experiment(trial_cfg, root, lineage, trial)  # `dvc exp show` lists every trial
    return trials.finish_trial(cfg, root, trial, trained, measured, candidate, lineage)
