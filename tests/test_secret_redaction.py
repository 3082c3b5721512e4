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
