"""A secret-looking value in a setting is redacted by value wherever a run logs its params (issue #13)."""

from __future__ import annotations

import json
from pathlib import Path

import yaml

TOKEN = "sk-loraopsTEST0123456789abcdefXYZ"  # matches the contract's OpenAI-style key pattern


def test_a_token_in_a_free_text_setting_is_stored_nowhere_but_in_params_yaml(tiny_project, prefect_harness):
    from prefect import get_client
    from prefect.client.schemas.filters import (
        ArtifactFilter,
        ArtifactFilterFlowRunId,
        FlowFilter,
        FlowFilterName,
        LogFilter,
        LogFilterFlowRunId,
    )
    from typer.testing import CliRunner

    from loraops.cli.app import app
    from mlflow import MlflowClient

    prompts = json.dumps(["Tell me a joke.", f"my key is {TOKEN}"])
    result = CliRunner().invoke(
        app, ["retrain", "--params", str(tiny_project / "params.yaml"), "-S", f"export.probe_prompts={prompts}"]
    )
    assert result.exit_code == 0, result.output[-3000:]
    # the run used and recorded the real value: params.yaml (the project's own file) keeps it
    recorded = yaml.safe_load((tiny_project / "params.yaml").read_text())["export"]["probe_prompts"]
    assert recorded == ["Tell me a joke.", f"my key is {TOKEN}"]

    uri = f"sqlite:///{tiny_project}/mlflow/mlflow.db"
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    (run,) = client.search_runs([client.get_experiment_by_name("loraops").experiment_id])
    assert run.data.params["export.probe_prompts"] == json.dumps(["Tell me a joke.", "my key is ***"])
    assert TOKEN not in json.dumps(run.data.params)
    lineage = Path(client.download_artifacts(run.info.run_id, "lineage/params.yaml")).read_text()
    assert yaml.safe_load(lineage)["export"]["probe_prompts"] == ["Tell me a joke.", "my key is ***"]

    with get_client(sync_client=True) as prefect:
        flow_runs = prefect.read_flow_runs(flow_filter=FlowFilter(name=FlowFilterName(any_=["retrain"])))
        flow_run = next(r for r in flow_runs if r.parameters.get("project_dir") == str(tiny_project))
        artifacts = prefect.read_artifacts(
            artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run.id]))
        )
        logs = prefect.read_logs(log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run.id])))
    assert flow_run.parameters["config"]["export"]["probe_prompts"] == ["Tell me a joke.", "my key is ***"]
    assert artifacts and not [a.key for a in artifacts if TOKEN in json.dumps(a.data)]
    assert any("probe_prompts" in log.message for log in logs)  # the override is named in the run's logs…
    assert not [log.message for log in logs if TOKEN in log.message]  # …its secret is not


def test_a_password_in_a_url_is_redacted_in_the_logged_params_file_and_the_run_parameters(tmp_path):
    from loraops.registry.values import redact_nested, redacted_file

    params = tmp_path / "params.yaml"
    params.write_text("registry:\n  tracking_uri: https://alice:s3cret-pw@mlflow.example:5000/  # team server\n")
    (tmp_path / "scratch").mkdir()
    logged = redacted_file(params, tmp_path / "scratch")
    assert logged.read_text() == "registry:\n  tracking_uri: https://***@mlflow.example:5000/  # team server\n"
    stored = redact_nested({"config": {"registry": {"tracking_uri": "http://bob:pw@127.0.0.1:5000"}}, "n": 3})
    assert stored == {"config": {"registry": {"tracking_uri": "http://***@127.0.0.1:5000"}}, "n": 3}


def test_a_registry_command_whose_server_does_not_answer_prints_one_line_without_the_password(tmp_path):
    import os
    import subprocess
    import sys

    from conftest import free_port

    port = free_port()  # nothing listens there
    (tmp_path / "params.yaml").write_text("registry:\n  model_name: some-model\n")
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"http://bob:hunter2-pw@127.0.0.1:{port}"}
    done = subprocess.run(
        [str(Path(sys.executable).parent / "loraops"), "promote", "some-model", "1"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 1
    assert f"error: MLflow tracking server http://***@127.0.0.1:{port} did not answer" in done.stderr
    assert "hunter2-pw" not in done.stdout + done.stderr
    assert "Traceback" not in done.stderr


def test_dvc_lock_records_no_free_text_setting(tiny_project):
    """dvc.lock keeps the params each stage lists: none lists export.probe_prompts, where a token could sit."""
    from dvc.dependency.param import ParamsDependency
    from dvc.repo import Repo

    from loraops.project.params_file import load_config, write_params

    prompts = ["Tell me a joke.", f"my key is {TOKEN}"]
    write_params(
        load_config(tiny_project / "params.yaml", {"export.probe_prompts": prompts}), tiny_project / "params.yaml"
    )
    assert TOKEN in (tiny_project / "params.yaml").read_text()

    recorded = {}
    with Repo(str(tiny_project)) as repo:
        for stage in repo.index.stages:
            for dep in stage.deps:
                if isinstance(dep, ParamsDependency):
                    recorded[stage.name] = dep.read_params()  # what `dvc commit` / `dvc repro` write to dvc.lock
    assert {"train_adapter", "evaluate_baseline", "resolve_init_adapter"} <= recorded.keys()
    assert recorded["train_adapter"]["lora"]["r"] == load_config(tiny_project / "params.yaml").lora.r
    assert TOKEN not in json.dumps(recorded)
