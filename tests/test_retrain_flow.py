"""The whole retrain flow on the tiny model, with real Prefect, MLflow (SQLite), DVC and GX."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import dvc_changes

from loraops.project.params_file import load_config

DVC = str(Path(sys.executable).parent / "dvc")


def _dvc(project: Path, *args: str) -> str:
    return subprocess.run([DVC, *args], cwd=project, check=True, capture_output=True, text=True).stdout


def _client(project: Path):
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


def _linked_run(project: Path, run_id: str):
    """The MLflow run, checked to point at its Prefect flow run, which points back at it."""
    run = _client(project).get_run(run_id)
    flow_run_id = run.data.tags["loraops.prefect_flow_run_id"]
    assert run.data.tags["loraops.prefect_flow_run_url"].endswith(f"/runs/flow-run/{flow_run_id}")
    links = _prefect_artifacts(flow_run_id, "mlflow-run")
    assert links and all(run_id in markdown for markdown in links)
    return run, links


def test_retrain_registers_a_gated_adapter_with_lineage_and_versions_it(tiny_project, prefect_harness):
    from flows.retrain import retrain

    cfg = load_config(tiny_project / "params.yaml", {"registry.auto_promote": True})
    result = retrain(config=cfg, project_dir=str(tiny_project))

    assert result.decision.passed, result.decision.reasons
    assert result.candidate.loss < result.baseline.loss - cfg.gate.min_improvement_over_base
    assert result.candidate.tokens == result.baseline.tokens  # same target tokens on both sides
    assert result.registration.version == "1"
    assert set(result.registration.aliases) == {"challenger", "champion"}

    # the CLI override was recorded in params.yaml, so dvc.lock describes what ran
    assert yaml.safe_load((tiny_project / "params.yaml").read_text())["registry"]["auto_promote"] is True

    version = _client(tiny_project).get_model_version_by_alias("tiny-adapter", "champion")
    assert str(version.version) == "1"
    lock = (tiny_project / "dvc.lock").read_bytes()
    import hashlib

    assert version.tags["loraops.dvc_lock_md5"] == hashlib.md5(lock).hexdigest()
    assert version.tags["loraops.params_hash"] == cfg.params_hash()
    assert version.tags["loraops.data_md5"] == yaml.safe_load((tiny_project / "data.dvc").read_text())["outs"][0]["md5"]
    assert version.tags["loraops.base_model"] == cfg.model.base

    # dvc.lock matches the workspace: `dvc status` has nothing to report, outputs were pushed
    assert dvc_changes(json.loads(_dvc(tiny_project, "status", "--json"))) == {}
    assert "in sync" in _dvc(tiny_project, "status", "--cloud").lower()
    metrics = json.loads((tiny_project / "metrics" / "adapter.json").read_text())
    assert metrics["loss"] == pytest.approx(result.candidate.loss)

    # One MLflow run, opened by training and finished by registration, linked both ways with Prefect.
    run, _ = _linked_run(tiny_project, result.registration.run_id)
    assert run.info.status == "FINISHED" and version.run_id == run.info.run_id
    assert len(_client(tiny_project).search_runs([run.info.experiment_id])) == 1
    # One validation loss: the best checkpoint's eval loss (train.json, history, MLflow) is the gate's.
    train = json.loads((tiny_project / "metrics" / "train.json").read_text())
    assert "mlflow_run_id" not in train  # numbers only: later stages find the run by the adapter's content key
    from loraops.registry.adapter_hash import adapter_key

    assert run.data.tags["loraops.adapter_key"] == adapter_key(tiny_project / cfg.paths.adapter_dir)
    assert train["best_eval_loss"] == pytest.approx(result.candidate.loss, rel=1e-5)
    evals = {p.step: p.value for p in _client(tiny_project).get_metric_history(run.info.run_id, "eval_loss")}
    assert evals[train["best_step"]] == pytest.approx(run.data.metrics["adapter_val_loss"], rel=1e-5)


def test_retrain_with_no_gain_over_the_champion_registers_nothing(tiny_project, prefect_harness):
    from flows.retrain import retrain

    cfg = load_config(tiny_project / "params.yaml", {"registry.auto_promote": True})
    first_state = retrain(config=cfg, project_dir=str(tiny_project), return_state=True)
    first = first_state.result()
    assert first.registration.version == "1"

    # Same seed, same data: the same adapter again cannot beat the champion it equals (forced: unforced, an
    # unchanged rerun ends early, see test_data_registry.py).
    second_state = retrain(config=cfg, project_dir=str(tiny_project), return_state=True, force=True)
    second = second_state.result()
    assert not second.decision.passed

    # The final states and tags tell the two apart at a glance.
    assert (first_state.name, first_state.message) == ("Completed", "registered tiny-adapter v1 @challenger @champion")
    assert second_state.is_completed() and second_state.name == "Refused"
    assert second_state.message == "gate refused: " + "; ".join(second.decision.reasons)
    assert "no improvement" in second_state.message
    assert _run_tags(first_state) == ["registered"] and _run_tags(second_state) == ["refused"]

    # loraops' own lines (stages, training steps, gate reasons) are in the run's logs, each once.
    messages = _run_log_messages(second_state)
    steps = [m for m in messages if m.startswith("step ") and " loss " in m and "tok/s" in m and "left" in m]
    assert [m.split()[1] for m in steps] == [f"{i}/8" for i in range(1, 9)], messages
    assert any(m.startswith("baseline validation loss") for m in messages)
    assert any(m.startswith("step 4/8  eval loss") for m in messages)
    assert [m for m in messages if m.startswith("gate: ")] == [f"gate: {r}" for r in second.decision.reasons]
    assert second_state.message in messages
    assert second.decision.champion_version == "1"
    assert second.registration.version is None
    client = _client(tiny_project)
    assert [str(v.version) for v in client.search_model_versions("name='tiny-adapter'")] == ["1"]
    assert client.get_run(second.registration.run_id).data.tags["loraops.gate"] == "failed"
    # The refused run ends FINISHED (a refusal is no failure) and its Prefect run links to it and the reasons.
    run, links = _linked_run(tiny_project, second.registration.run_id)
    assert run.info.status == "FINISHED" and run.info.run_id != first.registration.run_id
    assert any(second.decision.reasons[0] in markdown for markdown in links)


def _run_tags(state) -> list[str]:
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        return client.read_flow_run(state.state_details.flow_run_id).tags


def _run_log_messages(state) -> list[str]:
    """The flow run's logs as the UI's Logs tab shows them (read back from the API)."""
    import time

    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId

    run_filter = LogFilter(flow_run_id=LogFilterFlowRunId(any_=[state.state_details.flow_run_id]))
    with get_client(sync_client=True) as client:
        for _ in range(50):  # the API log handler sends in the background, batched
            messages = [log.message for log in client.read_logs(log_filter=run_filter)]
            if any(message.startswith("registered ") or message.startswith("gate refused") for message in messages):
                return messages
            time.sleep(0.2)
    return messages


def test_bad_data_stops_the_flow_before_any_model_is_loaded(tiny_project, prefect_harness):
    from flows.retrain import retrain
    from loraops.contract import DataContractError

    validation = tiny_project / "data" / "validation.jsonl"
    rows = validation.read_text().splitlines()
    rows[2] = json.dumps({"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "  "}]})
    validation.write_text("\n".join(rows) + "\n")

    params_before = (tiny_project / "params.yaml").read_bytes()
    with pytest.raises(DataContractError, match=r"validation\.jsonl:3"):
        overridden = load_config(tiny_project / "params.yaml", {"train.learning_rate": 0.5, "lora.r": 2})
        retrain(config=overridden, project_dir=str(tiny_project))
    # the failed run's overrides were written for the run, then dropped: a later plain run won't reuse them
    assert (tiny_project / "params.yaml").read_bytes() == params_before
    assert not (tiny_project / "metrics" / "baseline.json").exists()
    assert not (tiny_project / "adapters" / "candidate").exists()
    assert not (tiny_project / "mlflow" / "mlflow.db").exists()


def test_retrain_command_on_bad_data_prints_the_message_without_a_traceback(tiny_project, prefect_harness):
    """The real command in its own process (as a user runs it): console logging is set up as in real use."""
    from prefect.settings import PREFECT_API_URL

    validation = tiny_project / "data" / "validation.jsonl"
    rows = validation.read_text().splitlines()
    rows[2] = json.dumps({"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "  "}]})
    validation.write_text("\n".join(rows) + "\n")

    env = {**os.environ, "PREFECT_API_URL": PREFECT_API_URL.value()}
    command = [sys.executable, "-m", "loraops", "retrain", "--params", str(tiny_project / "params.yaml")]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    output = result.stdout + result.stderr
    assert result.returncode == 1, output
    assert "validation.jsonl:3" in output
    assert "Traceback" not in output
    assert output.count("this run's settings: params.yaml as it is") == 1, output  # loraops lines, once
