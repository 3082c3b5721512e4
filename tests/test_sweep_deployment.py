"""The sweep on a GPU pool: its trials as runs of the train-adapter deployment, on a real Prefect server with
process workers and a real MLflow server (the harness of tests/test_deployments.py)."""

from __future__ import annotations

import subprocess

import pytest
from conftest import REPO_ROOT, background_process
from test_deployments import BIN, _checkout, _cli, _host_env, servers  # noqa: F401  (servers: a fixture)

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def test_sweep_trials_run_as_train_adapter_runs_within_the_pool_limit_a_failed_one_is_recorded(
    servers,  # noqa: F811
    tiny_model_dir,
    tmp_path,
):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterId
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from flows.sweep import sweep
    from loraops.names import PREFECT_FLOW_RUN_ID_TAG, PREFECT_TRAIN_FLOW_RUN_ID_TAG, TRAIN_KEY_TAG
    from loraops.project.params_file import load_config
    from mlflow import MlflowClient

    project = _checkout(tmp_path, tiny_model_dir, servers["mlflow"])  # orchestration.train_deployment set
    env = _host_env(servers, tmp_path)
    _cli([str(REPO_ROOT / "infra" / "work-pools.sh")], {**env, "PREFECT": str(BIN / "prefect")})  # gpu limit 1
    deploy = [str(BIN / "prefect"), "--no-prompt", "deploy", "--name", "train-adapter"]
    _cli([*deploy, "--prefect-file", "infra/prefect.yaml"], env)
    # Two GPU hosts, each with its own data-less checkout and a worker that takes one run at a time: without
    # the pool's limit of 1 they would train the two trials side by side.
    hosts = [tmp_path / f"gpu-host-{name}" for name in ("a", "b")]
    for host in hosts:
        subprocess.run(["git", "clone", "-q", str(project), str(host)], check=True)
    worker = [str(BIN / "prefect"), "worker", "start", "--pool", "gpu", "--limit", "1"]
    cfg = load_config(project / "params.yaml")

    with temporary_settings(updates={PREFECT_API_URL: servers["prefect"]}):
        with (
            background_process(worker, {**env, "LORAOPS_PROJECT_DIR": str(hosts[0])}, tmp_path / "gpu-a.log"),
            background_process(worker, {**env, "LORAOPS_PROJECT_DIR": str(hosts[1])}, tmp_path / "gpu-b.log"),
        ):
            # A learning rate of 1e30 passes the config and makes that trial's training diverge on its worker.
            result = sweep(param=["train.learning_rate=1e30,0.01"], config=cfg, project_dir=str(project))
        _drain_prefect_workers()  # the flow ran in this process: its logs and events go out before the server stops
        with get_client(sync_client=True) as client:
            training = client.read_deployment_by_name("train-adapter/train-adapter")
            runs = client.read_flow_runs(deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[training.id])))
            assert client.read_work_pool("gpu").concurrency_limit == 1

    logs = "\n".join((tmp_path / f"gpu-{name}.log").read_text()[-2000:] for name in ("a", "b"))
    failed, done = result.trials
    assert (failed.status, done.status) == ("failed", "done"), (result.trials, logs)
    # Each trial ran as its own train-adapter flow run, a subflow of the sweep's task.
    by_name = {run.name: run for run in runs}
    assert sorted(by_name) == [f"sweep-{failed.trial.name}", f"sweep-{done.trial.name}"]
    assert all(run.parent_task_run_id is not None for run in runs)
    assert by_name[f"sweep-{failed.trial.name}"].state.is_failed()
    assert by_name[f"sweep-{done.trial.name}"].state.is_completed()
    # The pool's limit held: the recorded runs never overlapped.
    first, second = sorted(runs, key=lambda run: run.start_time)
    assert first.end_time <= second.start_time, [(run.name, run.start_time, run.end_time) for run in runs]

    # Each trial was its own child MLflow run, opened by the worker that trained it; the failed one ended
    # FAILED with its error, and the sweep went on.
    mlflow = MlflowClient(tracking_uri=servers["mlflow"])
    failed_run, done_run = mlflow.get_run(failed.run_id), mlflow.get_run(done.run_id)
    assert failed_run.info.status == "FAILED" and done_run.info.status == "FINISHED"
    assert failed.note.startswith(f"its run sweep-{failed.trial.name} of deployment 'train-adapter/train-adapter'")
    assert "ended Failed" in failed.note and "diverged" in failed.note
    assert failed_run.data.tags["loraops.sweep_error"] == failed.note
    assert failed_run.data.tags[PREFECT_FLOW_RUN_ID_TAG] == str(by_name[f"sweep-{failed.trial.name}"].id)
    # the winner's run: registration adds the sweep's links and keeps the worker's as train_*
    assert done_run.data.tags[PREFECT_TRAIN_FLOW_RUN_ID_TAG] == str(by_name[f"sweep-{done.trial.name}"].id)
    assert done_run.data.tags[TRAIN_KEY_TAG] and done_run.data.params["train.learning_rate"] == "0.01"
    (parent,) = {run.data.tags["mlflow.parentRunId"] for run in (failed_run, done_run)}
    assert mlflow.get_run(parent).data.tags["loraops.sweep_winner"] == done.trial.name
    assert {run.data.tags["mlflow.runName"] for run in (failed_run, done_run)} == {failed.trial.name, done.trial.name}
    assert done_run.data.metrics["adapter_val_loss"] == done.val_loss and done_run.data.metrics["train_time_s"] > 0
    assert done.peak_memory_bytes == done_run.data.metrics["peak_memory_bytes"] > 0  # measured on its worker
    # It trained in its own folders on the host that ran it, never in the project's adapter folder.
    trained_on = [host for host in hosts if (host / "adapters" / "sweep" / done.trial.name).is_dir()]
    assert len(trained_on) == 1 and not (trained_on[0] / "adapters" / "candidate").exists()
    assert (trained_on[0] / "adapters" / "sweep" / done.trial.name / "adapter_model.safetensors").is_file()

    # The winner, fetched back and evaluated here, went through the gate and was registered, alone.
    assert result.winner.trial == done.trial
    assert result.registration.version == "1" and result.registration.run_id == done.run_id
    assert [v.version for v in mlflow.search_model_versions("name='tiny-adapter'")] == ["1"]
    assert (project / "adapters" / "sweep" / done.trial.name / "adapter_model.safetensors").is_file()


def _drain_prefect_workers() -> None:
    """Send this process's queued Prefect logs and events to the test's server now; left queued, the session's
    harness would drain them at exit into a server long stopped, and wait on it."""
    from prefect.events.worker import EventsWorker
    from prefect.logging.handlers import APILogWorker

    APILogWorker.drain_all(timeout=30)
    EventsWorker.drain_all(timeout=30)
