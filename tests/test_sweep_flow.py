"""The sweep flow on the tiny model, with real Prefect, MLflow (SQLite), DVC and GX."""

from __future__ import annotations

import pytest
import yaml

from loraops.project.params_file import load_config


def _client(project):
    from mlflow import MlflowClient

    uri = f"sqlite:///{project}/mlflow/mlflow.db"
    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def _prefect_artifacts(flow_run_id: str, key: str) -> list[str]:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId, ArtifactFilterKey

    with get_client(sync_client=True) as client:
        found = client.read_artifacts(
            artifact_filter=ArtifactFilter(
                flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id]), key=ArtifactFilterKey(any_=[key])
            )
        )
    return [artifact.data for artifact in found]


@pytest.mark.slow  # about 80 s on 2 busy cores: two trainings, each evaluated and versioned, then the gate
def test_rank_sweep_logs_child_runs_stops_raising_and_registers_the_winner_only(tiny_project, prefect_harness):
    from flows.sweep import sweep

    cfg = load_config(tiny_project / "params.yaml")
    # r=4 -> 8 cannot gain 100 nats: r=16 is never trained, and within that margin the smaller rank wins.
    result = sweep(param=["lora.r=4,8,16"], config=cfg, project_dir=str(tiny_project), stop_when_gain_below=100.0)

    assert [trial.status for trial in result.trials] == ["done", "done", "skipped"]
    assert "lora.r not raised past 8" in result.trials[2].note
    assert result.winner.trial.values == {"lora.r": 4}
    assert result.trials[0].trainable_params < result.trials[1].trainable_params  # twice the rank
    assert result.decision.passed, result.decision.reasons
    assert result.registration.version == "1"

    client = _client(tiny_project)
    version = client.get_model_version("tiny-adapter", "1")
    assert version.run_id == result.winner.run_id
    assert len(client.search_model_versions("name='tiny-adapter'")) == 1  # the other trial is not registered
    assert yaml.safe_load((tiny_project / "params.yaml").read_text())["lora"]["r"] == 4  # dvc.lock: the winner's

    from loraops.lineage.experiments import find_experiment

    experiments = [trial.experiment for trial in result.trials[:2]]  # one DVC experiment per trial
    assert all(experiments) and len(set(experiments)) == 2
    assert all(find_experiment(tiny_project, name) for name in experiments)

    children = [client.get_run(trial.run_id) for trial in result.trials[:2]]
    parent_id = children[0].data.tags["mlflow.parentRunId"]
    assert children[1].data.tags["mlflow.parentRunId"] == parent_id != children[0].info.run_id
    assert children[1].data.tags["loraops.dvc_experiment"] == experiments[1]
    gated = children[0].data.tags["loraops.dvc_experiment"]  # the winner's run names the experiment with its gate
    assert gated not in experiments and find_experiment(tiny_project, gated)
    for child, rank in zip(children, (4, 8), strict=True):
        assert child.data.params["lora.r"] == str(rank)
        assert child.info.status == "FINISHED"
        for metric in ("adapter_val_loss", "trainable_params", "train_time_s", "peak_memory_bytes"):
            assert child.data.metrics[metric] > 0
    assert children[1].data.metrics["adapter_val_loss"] == result.trials[1].val_loss

    parent = client.get_run(parent_id)
    assert parent.info.status == "FINISHED"
    assert parent.data.tags["loraops.sweep_winner"] == result.winner.trial.name
    artifacts = {item.path for item in client.list_artifacts(parent_id, "sweep")}
    assert {"sweep/sweep.md", "sweep/val_loss.png", "sweep/sweep.json"} <= artifacts
    table = (tiny_project / "reports" / "sweep" / "sweep.md").read_text()
    assert "01-r4 (winner)" in table and "lora.r not raised past 8" in table
    assert (tiny_project / "adapters" / "sweep" / "01-r4" / "adapter_model.safetensors").is_file()

    markdown = _prefect_artifacts(parent.data.tags["loraops.prefect_flow_run_id"], "sweep")
    assert markdown and "01-r4 (winner)" in markdown[0]


@pytest.mark.slow  # about 60 s on 2 busy cores: one diverging and one good training, then the gate
def test_a_failed_trial_is_recorded_and_the_sweep_goes_on_with_the_rest(tiny_project, prefect_harness):
    from flows.sweep import sweep

    cfg = load_config(tiny_project / "params.yaml")
    # A learning rate of 1e30 passes the config (> 0) and makes training diverge at its second step.
    result = sweep(param=["train.learning_rate=1e30,0.01"], config=cfg, project_dir=str(tiny_project))

    failed, done = result.trials
    assert failed.status == "failed" and failed.note.startswith("TrainingDivergedError: ")
    assert done.status == "done" and result.winner.trial == done.trial
    assert result.registration.version == "1" and result.registration.run_id == done.run_id

    client = _client(tiny_project)
    assert len(client.search_model_versions("name='tiny-adapter'")) == 1
    failed_run, done_run = client.get_run(failed.run_id), client.get_run(done.run_id)
    assert failed_run.info.status == "FAILED"
    assert failed_run.data.tags["loraops.sweep_error"] == failed.note and "diverged" in failed.note
    assert failed_run.data.tags["mlflow.parentRunId"] == done_run.data.tags["mlflow.parentRunId"]
    assert failed_run.data.tags["mlflow.runName"] == failed.trial.name
    table = (tiny_project / "reports" / "sweep" / "sweep.md").read_text()
    assert f"| {failed.trial.name} | 1e+30 |" in table and "| failed: TrainingDivergedError: " in table
    assert f"{done.trial.name} (winner)" in table


@pytest.mark.slow  # about 50 s: contract, baseline and a training that diverges at its second step
def test_a_sweep_whose_trials_all_fail_fails_and_registers_nothing(tiny_project, prefect_harness):
    from typer.testing import CliRunner

    from loraops.cli.app import app

    params_before = (tiny_project / "params.yaml").read_text()
    cli = ["sweep", "--param", "train.learning_rate=1e30", "--params", str(tiny_project / "params.yaml")]
    result = CliRunner().invoke(app, cli)

    assert result.exit_code == 1, result.output
    (line,) = [line for line in result.output.splitlines() if line.startswith("error: ")]
    message = line.removeprefix("error: ")
    assert message.startswith("no sweep trial finished (01-learning_rate1e_30 failed: TrainingDivergedError: ")
    assert message.endswith("nothing gated or registered")

    client = _client(tiny_project)
    assert client.search_registered_models() == []
    experiment = client.get_experiment_by_name(load_config(tiny_project / "params.yaml").registry.experiment)
    (parent,) = client.search_runs([experiment.experiment_id], "tags.`loraops.sweep` LIKE 'train%'")
    assert parent.info.status == "FAILED" and parent.data.tags["loraops.sweep_error"] == message
    assert "failed: TrainingDivergedError" in (tiny_project / "reports" / "sweep" / "sweep.md").read_text()
    assert (tiny_project / "params.yaml").read_text() == params_before
