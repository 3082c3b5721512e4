"""The retrain flow: data contract, baseline, training, evaluation, gate, versioning, registration."""

from __future__ import annotations

from pathlib import Path

from prefect import flow
from pydantic import BaseModel

from loraops import stages
from loraops.config import LoraopsConfig
from loraops.inputs.freshness import Freshness
from loraops.project.params_file import params_restored_on_failure
from loraops.registry import tracking
from loraops.results import EvalMetrics, GateDecision, Registration
from tasks import pipeline, run_context


class RetrainResult(BaseModel):
    baseline: EvalMetrics
    candidate: EvalMetrics
    decision: GateDecision
    registration: Registration


@flow(name="retrain")  # loraops logs through logging; captured prints would include dill's dis output
@run_context.with_loraops_logs  # stage, training and gate lines in the run's logs
def retrain(
    config: LoraopsConfig | None = None, project_dir: str = ".", force: bool = False, data_rev: str | None = None
) -> RetrainResult | Freshness:
    """Specialise the base model on the dataset and register the adapter if it beats base and champion.

    ``config`` empty runs the project's params.yaml as it is. Otherwise the fields it changes (the
    Prefect form: those that differ from what the form pre-filled; ``loraops retrain -S``) are applied to
    params.yaml and recorded there, so dvc.lock and lineage describe this run. The final state says
    whether a version was registered ("Completed") or the gate refused it ("Refused"), and so does a tag.
    A run whose data, params, code and base model equal an earlier run's ends early, Completed with
    "nothing changed since version N" and tagged "unchanged": no model loaded, nothing registered.

    Args:
        config: settings that differ from params.yaml for this run.
        project_dir: the project checkout the run works in.
        force: train even when nothing changed since the champion or the last finished run.
        data_rev: the data registry revision (branch, tag, commit) to train on, for data.dvc made by `dvc import`; empty: its latest.
    """
    root = Path(project_dir).resolve()
    cfg = run_context.run_config(config, root)  # params.yaml with the values this run chose
    # One run per checkout; a failed run's overrides don't stay in params.yaml; its MLflow run ends FAILED, not RUNNING.
    with (
        stages.guarded_run(cfg, root, "retrain flow"),
        params_restored_on_failure(root),
        tracking.flow_runs_failed_on_error(cfg, root),
    ):
        pipeline.check_servers(cfg, root)  # before anything is written: an unreachable server changes nothing
        pipeline.refresh_data(cfg, root, data_rev)  # `dvc update data.dvc` for a data-registry import
        freshness = pipeline.check_freshness(cfg, root, force)
        if freshness.unchanged:
            return run_context.unchanged_state(freshness)  # nothing new: no model loaded, nothing registered
        pipeline.resolve_init_adapter(cfg, root)  # train.init_from: a champion that does not fit stops the run here
        pipeline.diff_data(cfg, root)  # rows added, removed, changed since the champion's data
        pipeline.record_run_config(cfg, root)
        pipeline.prepare_base_model(cfg, root)
        pipeline.validate_dataset(cfg, root)
        pipeline.check_memory(cfg, root)
        if cfg.train.sanity_check:  # a setup that cannot overfit a few examples stops here, before the full run
            pipeline.sanity_check(cfg, root)
        baseline = pipeline.evaluate_baseline(cfg, root)
        # With a train deployment, training is its own run on the GPU pool; inputs and adapter travel via DVC and MLflow.
        if cfg.orchestration.train_deployment:
            trained = pipeline.train_on_deployment(cfg, root)
        else:
            trained = pipeline.train_adapter(cfg, root)
        candidate = pipeline.evaluate_adapter(cfg, root)
        decision = pipeline.gate_candidate(cfg, root, baseline, candidate)
        lineage = pipeline.version_outputs(cfg, root)
        lineage = pipeline.save_experiment(cfg, root, lineage)  # `dvc exp show` lists the run, gate failed or not
        registration = pipeline.register_adapter(cfg, root, trained, baseline, candidate, decision, lineage)
    result = RetrainResult(baseline=baseline, candidate=candidate, decision=decision, registration=registration)
    return run_context.final_state(result, decision, registration)  # "Completed" (registered) or "Refused"
