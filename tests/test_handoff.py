"""Training on another worker's checkout: the dataset travels through the DVC remote, the adapter through MLflow.

Two real checkouts of one tiny project (the worker's is a git clone, so it has no data until it
pulls from the DVC remote), one real MLflow store, real DVC. Prefect is not involved here; the
deployment round trip is in test_deployments.py.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
import yaml

from loraops import names, stages
from loraops.lineage import versioning
from loraops.project.params_file import load_config
from loraops.registry import handoff
from loraops.results import TrainResult


def _worker_checkout(project: Path, target: Path) -> Path:
    subprocess.run(["git", "clone", "-q", str(project), str(target)], check=True)
    return target


@pytest.fixture
def parent_and_worker(tiny_project, tmp_path):
    worker = _worker_checkout(tiny_project, tmp_path / "gpu-worker-checkout")
    assert not (worker / "data").exists()  # the data lives in the DVC remote, not in git
    return tiny_project, worker


def test_the_worker_trains_on_the_pushed_dataset_and_the_adapter_comes_back(parent_and_worker):
    parent, worker = parent_and_worker
    cfg = load_config(parent / "params.yaml")
    outgoing = handoff.prepare_handoff(cfg, parent)
    assert outgoing.config.registry.tracking_uri == f"sqlite:///{parent / 'mlflow' / 'mlflow.db'}"
    assert outgoing.config.orchestration.train_deployment is None  # the worker trains itself

    # On the worker: the dataset arrives from the DVC remote, byte for byte.
    md5 = handoff.receive_inputs(worker, outgoing.data_dvc)
    assert md5 == versioning.data_md5(parent)
    for split in ("train.jsonl", "validation.jsonl"):
        assert (worker / "data" / split).read_bytes() == (parent / "data" / split).read_bytes()
    worker_cfg = outgoing.config
    stages.prepare_base_model(worker_cfg, worker)
    trained = stages.train_adapter(worker_cfg, worker)
    run_id = handoff.publish_training(worker_cfg, worker, trained, outgoing.train_key)

    # Back in the retrain run's project: the same adapter bytes, metrics with local paths.
    assert not (parent / cfg.paths.adapter_dir).exists()
    fetched = handoff.fetch_training(cfg, parent, outgoing.train_key)
    worker_adapter, parent_adapter = Path(trained.adapter_dir), parent / cfg.paths.adapter_dir
    assert sorted(p.name for p in parent_adapter.iterdir()) == sorted(p.name for p in worker_adapter.iterdir())
    for file in worker_adapter.iterdir():
        assert (parent_adapter / file.name).read_bytes() == file.read_bytes(), file.name
    assert fetched.adapter_dir == str(parent_adapter) and fetched.steps == trained.steps
    assert fetched.best_eval_loss == pytest.approx(trained.best_eval_loss)
    recorded = stages.read_training(cfg, parent)
    assert recorded == fetched.model_copy(update={"mlflow_run_id": None})  # metrics/train.json: numbers only
    assert Path(recorded.history_path).parent == parent / cfg.paths.metrics_dir
    record = parent / cfg.paths.reports_dir / names.INIT_ADAPTER_RECORD  # what the worker's training started from
    assert record.read_bytes() == (worker / cfg.paths.reports_dir / names.INIT_ADAPTER_RECORD).read_bytes()
    plots = json.loads((parent / cfg.paths.metrics_dir / "plots" / "train_loss.json").read_text())
    assert [row["step"] for row in plots] == list(range(1, trained.steps + 1))

    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=outgoing.config.registry.tracking_uri)
    run = client.get_run(run_id)
    assert run.data.tags[names.TRAIN_KEY_TAG] == outgoing.train_key and run.info.status == "FINISHED"
    # the adapter travels in the run the worker trained in (step metrics live), which the retrain run continues
    assert run_id == trained.mlflow_run_id == fetched.mlflow_run_id
    assert [point.step for point in client.get_metric_history(run_id, "loss")] == list(range(1, trained.steps + 1))


def test_a_dataset_missing_from_the_remote_is_named_and_nothing_is_trained(parent_and_worker):
    parent, worker = parent_and_worker
    data_dvc = yaml.safe_load((parent / "data.dvc").read_text())
    data_dvc["outs"][0]["md5"] = "0" * 32 + ".dir"
    with pytest.raises(versioning.VersioningError, match=r"dvc pull data.dvc .*gpu-worker-checkout"):
        handoff.receive_inputs(worker, yaml.safe_dump(data_dvc))
    assert not (worker / "data").exists()


def test_fetching_a_training_that_never_published_says_so(tiny_project):
    cfg = load_config(tiny_project / "params.yaml")
    with pytest.raises(handoff.HandoffError, match="no finished MLflow run tagged loraops.train_key=missing-key"):
        handoff.fetch_training(cfg, tiny_project, "missing-key")
    assert not (tiny_project / cfg.paths.adapter_dir).exists()


def test_unfinished_training_runs_say_what_to_start_or_rerun():
    waiting = handoff.describe_unfinished("train-adapter/train-adapter", "Scheduled", None, 60)
    assert "no worker took it" in waiting and "make worker-gpu" in waiting
    crashed = handoff.describe_unfinished("train-adapter/train-adapter", "Crashed", "worker process died", 60)
    assert "ended Crashed: worker process died" in crashed and "resume from the last checkpoint" in crashed


def test_a_training_deployment_missing_from_the_server_is_named(tiny_project, prefect_harness):
    from tasks import pipeline

    cfg = load_config(tiny_project / "params.yaml", {"orchestration.train_deployment": "train-adapter/nowhere"})
    with pytest.raises(
        handoff.HandoffError, match=r"deployment 'train-adapter/nowhere' .* is not on the Prefect server"
    ):
        pipeline.train_on_deployment.fn(cfg, tiny_project)
    assert not (tiny_project / cfg.paths.adapter_dir).exists()


def test_the_training_artifact_says_whether_the_run_resumed():
    from loraops.cli.reporting import training_markdown

    trained = TrainResult(
        adapter_dir="a",
        trainable_params=16_384,
        total_params=100_000,
        steps=8,
        best_step=6,
        best_eval_loss=1.23456,
        stopped_early=False,
        history_path="h",
        resumed_from_step=4,
    )
    text = training_markdown(trained, "MLflow run `abc`")
    assert "| 8 | no | 1.2346 at step 6 | 16,384 / 100,000 | resumed from the checkpoint at step 4 |" in text
    assert text.endswith("Adapter: MLflow run `abc`")
    fresh = training_markdown(trained.model_copy(update={"resumed_from_step": None, "best_eval_loss": None}))
    assert "started afresh" in fresh and "| n/a |" in fresh
