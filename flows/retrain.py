"""The retrain flow: data contract, baseline, training, evaluation, gate, versioning, registration."""

from __future__ import annotations

from pathlib import Path

from prefect import flow
from pydantic import BaseModel

from loraops import stages, tracking
from loraops.config import LoraopsConfig, load_config
from loraops.results import EvalMetrics, GateDecision, Registration
from tasks import pipeline


class RetrainResult(BaseModel):
    baseline: EvalMetrics
    candidate: EvalMetrics
    decision: GateDecision
    registration: Registration


@flow(name="retrain")  # loraops logs through logging; captured prints would include dill's dis output
def retrain(config: LoraopsConfig | None = None, project_dir: str = ".") -> RetrainResult:
    """Specialise the base model on the dataset and register the adapter if it beats base and champion.

    ``config`` defaults to the project's params.yaml; a config given here (CLI overrides, the
    Prefect UI form) is written to params.yaml first, so dvc.lock and lineage describe this run.
    """
    root = Path(project_dir).resolve()
    cfg = config or load_config(root / "params.yaml")
    pipeline.check_servers(cfg, root)  # before anything is written: an unreachable server changes nothing
    # A failed run's overrides don't stay in params.yaml; its MLflow run ends FAILED, not RUNNING.
    with stages.params_restored_on_failure(root), tracking.flow_runs_failed_on_error(cfg, root):
        pipeline.record_run_config(cfg, root)
        pipeline.prepare_base_model(cfg, root)
        pipeline.validate_dataset(cfg, root)
        pipeline.check_memory(cfg, root)
        baseline = pipeline.evaluate_baseline(cfg, root)
        if cfg.orchestration.train_deployment:  # its own run on the GPU pool; inputs and adapter travel via DVC and MLflow
            trained = pipeline.train_on_deployment(cfg, root)
        else:
            trained = pipeline.train_adapter(cfg, root)
        candidate = pipeline.evaluate_adapter(cfg, root)
        decision = pipeline.gate_candidate(cfg, root, baseline, candidate)
        lineage = pipeline.version_outputs(cfg, root)
        registration = pipeline.register_adapter(cfg, root, trained, baseline, candidate, decision, lineage)
    return RetrainResult(baseline=baseline, candidate=candidate, decision=decision, registration=registration)
