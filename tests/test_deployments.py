"""infra/ end to end: a real Prefect server and MLflow server, the deployments from infra/prefect.yaml,
a process worker, and a scheduled-style retrain run that registers a version through the server."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import (
    GIT,
    REPO_ROOT,
    background_process,
    free_port,
    make_project,
    mlflow_server_command,
    wait_until_healthy,
)

BIN = Path(sys.executable).parent
SERVER_START_S = 180  # both servers start together on 2 shared cores
CLI_S = 240
RUN_S = 600
HOLD_AFTER_CHECKPOINT = Path(__file__).parent / "fixtures" / "hold_after_checkpoint"  # holds in sitecustomize.py

pytestmark = [pytest.mark.integration, pytest.mark.slow]


@pytest.fixture
def servers(tmp_path) -> Iterator[dict[str, str]]:
    """A Prefect server (own PREFECT_HOME, SQLite) and an MLflow server (SQLite, local artifacts)."""
    prefect_port, mlflow_port = free_port(), free_port()
    base = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "MLFLOW_TRACKING"))}
    prefect_env = {
        **base,
        "PREFECT_HOME": str(tmp_path / "prefect-server-home"),
        "PREFECT_API_DATABASE_CONNECTION_URL": f"sqlite+aiosqlite:///{tmp_path / 'prefect.db'}",
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_UI_ENABLED": "false",
    }
    mlflow_env = {**base, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false", "MLFLOW_DISABLE_TELEMETRY": "true"}
    prefect_log, mlflow_log = tmp_path / "prefect-server.log", tmp_path / "mlflow-server.log"
    prefect_cmd = [str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(prefect_port)]
    mlflow_cmd = mlflow_server_command(mlflow_port, tmp_path / "mlflow.db", tmp_path / "mlflow-artifacts")
    started = time.monotonic()
    with (
        background_process(prefect_cmd, prefect_env, prefect_log) as prefect,
        background_process(mlflow_cmd, mlflow_env, mlflow_log) as mlflow,
    ):
        deadline = started + SERVER_START_S
        prefect_url, mlflow_url = f"http://127.0.0.1:{prefect_port}/api", f"http://127.0.0.1:{mlflow_port}"
        wait_until_healthy("prefect", f"{prefect_url}/health", prefect, prefect_log, deadline)
        wait_until_healthy("mlflow", f"{mlflow_url}/health", mlflow, mlflow_log, deadline)
        print(f"servers healthy after {time.monotonic() - started:.1f} s")
        yield {"prefect": prefect_url, "mlflow": mlflow_url}


def _cli(args: list[str], env: dict, timeout: float = CLI_S, cwd: Path = REPO_ROOT) -> str:
    started = time.monotonic()
    try:
        done = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as error:
        pytest.fail(f"{' '.join(args)} still running after {timeout} s:\n{error.stdout}\n{error.stderr}")
    if done.returncode != 0:
        pytest.fail(f"{' '.join(args)} exited with {done.returncode}:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    print(f"{' '.join(Path(a).name if i == 0 else a for i, a in enumerate(args))}: {time.monotonic() - started:.1f} s")
    return done.stdout


def _checkout(tmp_path: Path, tiny_model_dir: Path, mlflow_url: str, **train) -> Path:
    """A project checkout as a worker host has it: the code (flows, tasks) with its params and data."""
    project = make_project(
        tmp_path / "project",
        tiny_model_dir,
        registry={"tracking_uri": mlflow_url, "auto_promote": True},
        orchestration={"train_deployment": "train-adapter/train-adapter"},
        **({"train": train} if train else {}),
    )
    _commit_flows_and_tasks(project)
    return project


def _commit_flows_and_tasks(project: Path) -> None:
    """The Prefect code (flows, tasks) committed into a project checkout, as a worker host has it."""
    for package in ("flows", "tasks"):
        shutil.copytree(REPO_ROOT / package, project / package, ignore=shutil.ignore_patterns("__pycache__"))
    subprocess.run(["git", "add", "-A"], cwd=project, check=True)
    subprocess.run([*GIT, "commit", "-q", "-m", "flows and tasks"], cwd=project, check=True)


def _host_env(servers: dict, tmp_path: Path) -> dict:
    """A host's environment: this interpreter's tools, the test's Prefect server, none of the caller's settings."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "MLFLOW_TRACKING", "LORAOPS_"))}
    env.update(
        PATH=f"{BIN}{os.pathsep}{os.environ['PATH']}",
        PREFECT_API_URL=servers["prefect"],
        PREFECT_HOME=str(tmp_path / "prefect-client-home"),
        PREFECT_SERVER_ANALYTICS_ENABLED="false",
        PREFECT_WORKER_QUERY_SECONDS="2",
    )
    return env


def _mlflow_get(base: str, endpoint: str, **query) -> dict:
    url = f"{base}/api/2.0/mlflow/{endpoint}?{urllib.parse.urlencode(query)}"
    with urllib.request.urlopen(url, timeout=10) as response:
        return json.load(response)


def _finished_run(client, run_id, deadline: float):
    while True:
        run = client.read_flow_run(run_id)
        if run.state.is_final() or time.monotonic() > deadline:
            return run
        time.sleep(2)


def _deploy(servers: dict, tmp_path: Path, project: Path) -> tuple[dict, Path]:
    """Pools and deployments on the servers; the environment of a host, and a GPU host's data-less clone.

    The GPU host's checkout has the code only: its data comes from the DVC remote when a training starts.
    """
    gpu_checkout = tmp_path / "gpu-host-checkout"
    subprocess.run(["git", "clone", "-q", str(project), str(gpu_checkout)], check=True)
    env = _host_env(servers, tmp_path)
    _cli([str(REPO_ROOT / "infra" / "work-pools.sh")], {**env, "PREFECT": str(BIN / "prefect")})
    _cli([str(BIN / "prefect"), "--no-prompt", "deploy", "--all", "--prefect-file", "infra/prefect.yaml"], env)
    return env, gpu_checkout


def test_scheduled_retrain_deploys_runs_on_a_worker_and_registers_through_the_server(
    servers, tiny_model_dir, tmp_path, monkeypatch
):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (
        ArtifactFilter,
        ArtifactFilterFlowRunId,
        DeploymentFilter,
        DeploymentFilterId,
    )
    from prefect.settings import PREFECT_API_URL, temporary_settings

    project = _checkout(tmp_path, tiny_model_dir, servers["mlflow"])
    env, gpu_checkout = _deploy(servers, tmp_path, project)
    cpu_host = {**env, "LORAOPS_PROJECT_DIR": str(project)}

    with temporary_settings(updates={PREFECT_API_URL: servers["prefect"]}), get_client(sync_client=True) as client:
        deployment = client.read_deployment_by_name("retrain/retrain")
        assert [s.schedule.cron for s in deployment.schedules] == ["0 3 * * 1"]
        assert all(s.active for s in deployment.schedules)
        assert deployment.work_pool_name == "cpu" and deployment.enforce_parameter_schema
        # Unset when deploying, so each worker moves into its own checkout when a run starts
        assert deployment.pull_steps == [
            {"prefect.deployments.steps.set_working_directory": {"directory": "{{ $LORAOPS_PROJECT_DIR }}"}}
        ]
        training = client.read_deployment_by_name("train-adapter/train-adapter")
        assert training.work_pool_name == "gpu" and training.enforce_parameter_schema
        assert client.read_work_pool("gpu").concurrency_limit == 1
        (zombies,) = client.read_automations_by_name("loraops: crash flow runs whose heartbeats stopped")
        assert zombies.trigger.posture == "Proactive" and zombies.actions[0].state.value == "CRASHED"
        for name in ("promote/promote", "rollback/rollback"):
            assert client.read_deployment_by_name(name).work_pool_name == "cpu"

        # A parameter of the wrong type is refused by the server, naming the field.
        for bad, field in (
            ({"lora": {"r": "many"}}, "config.lora.r"),
            ({"lora": {"r": -1}}, "config.lora.r"),
            ({"lora": {"dropout": 2}}, "config.lora.dropout"),
        ):
            with pytest.raises(Exception, match=field.replace(".", r"\.")):
                client.create_flow_run_from_deployment(deployment.id, parameters={"config": bad})
        # A cross-field rule (a model validator) is not in the JSON schema: the run is created and fails
        # at start, before any task, with the config's own message.
        invalid = client.create_flow_run_from_deployment(
            deployment.id, parameters={"config": {"quant": {"mode": "nf4"}, "lora": {"variant": "dora"}}}
        )
        started = time.monotonic()
        _cli([str(BIN / "prefect"), "worker", "start", "--pool", "cpu", "--run-once"], cpu_host, timeout=RUN_S)
        failed = _finished_run(client, invalid.id, started + 120)
        assert failed.state.is_failed(), failed.state
        assert "lora.variant=dora cannot be combined" in failed.state.message
        print(f"invalid run failed at start after {time.monotonic() - started:.1f} s")

        # The scheduled path: default parameters, params.yaml of the checkout.
        # The scheduled path: default parameters, params.yaml of the checkout; training on the GPU host's worker.
        run = client.create_flow_run_from_deployment(deployment.id, parameters={})
        started = time.monotonic()
        gpu_host = {**env, "LORAOPS_PROJECT_DIR": str(gpu_checkout), "PREFECT_HOME": str(tmp_path / "gpu-home")}
        gpu_worker = [str(BIN / "prefect"), "worker", "start", "--pool", "gpu", "--limit", "1"]
        with background_process(gpu_worker, gpu_host, tmp_path / "gpu-worker.log"):
            _cli([str(BIN / "prefect"), "worker", "start", "--pool", "cpu", "--run-once"], cpu_host, timeout=RUN_S)
            run = _finished_run(client, run.id, started + RUN_S)
        print(f"retrain run {run.state.type.value} after {time.monotonic() - started:.1f} s")
        assert run.state.is_completed(), (
            f"{run.state}\n{_cli([str(BIN / 'prefect'), 'flow-run', 'logs', str(run.id)], env)[-4000:]}"
        )
        artifacts = {
            a.key: a.data
            for a in client.read_artifacts(
                artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[run.id]))
            )
        }

        trainings = client.read_flow_runs(deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[training.id])))
        training_artifacts = {
            a.key: a.data
            for a in client.read_artifacts(
                artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[t.id for t in trainings]))
            )
        }
    assert [t.state.type.value for t in trainings] == ["COMPLETED"], (tmp_path / "gpu-worker.log").read_text()[-3000:]
    assert trainings[0].parent_task_run_id is not None  # a subflow of retrain's train-on-worker task
    assert "started afresh" in training_artifacts["training"]
    assert "hand-off key" in training_artifacts["training-handoff"]
    # The GPU host trained on the dataset it pulled from the DVC remote, in its own checkout.
    assert (gpu_checkout / "data" / "train.jsonl").read_bytes() == (project / "data" / "train.jsonl").read_bytes()
    assert (gpu_checkout / "adapters" / "candidate" / "adapter_model.safetensors").exists()
    assert (project / "adapters" / "candidate" / "adapter_model.safetensors").read_bytes() == (
        gpu_checkout / "adapters" / "candidate" / "adapter_model.safetensors"
    ).read_bytes()

    assert {"data-contract", "gate-decision", "registration"} <= set(artifacts)
    assert f"{servers['mlflow']}/#/models/tiny-adapter/versions/1" in artifacts["registration"]

    champion = _mlflow_get(servers["mlflow"], "registered-models/alias", name="tiny-adapter", alias="champion")
    assert champion["model_version"]["version"] == "1"
    version = _mlflow_get(servers["mlflow"], "model-versions/get", name="tiny-adapter", version="1")["model_version"]
    tags = {t["key"]: t["value"] for t in version["tags"]}
    git_head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=project, capture_output=True, text=True).stdout
    from loraops.project.params_file import load_config

    cfg = load_config(project / "params.yaml")
    assert {"champion", "challenger"} <= set(version["aliases"])
    assert tags["loraops.gate"] == "passed"
    assert tags["loraops.params_hash"] == cfg.params_hash()
    assert tags["loraops.data_md5"] and tags["loraops.dvc_lock_md5"]
    assert tags["loraops.git_commit"] == git_head.strip()
    assert tags["loraops.base_model"] == str(tiny_model_dir)
    assert version["source"].startswith("models:/m-")  # registered from an MLflow Model (a LoggedModel)
    from mlflow import MlflowClient

    logged = MlflowClient(tracking_uri=servers["mlflow"]).get_logged_model(version["source"].removeprefix("models:/"))
    assert logged.artifact_location.startswith("mlflow-artifacts:")  # uploaded through the server, not a local path


def test_a_gpu_worker_sharing_the_retrain_checkout_trains_under_the_retrain_runs_lock(
    servers, tiny_model_dir, tmp_path
):
    """One host, one checkout, both pools: the train-adapter run neither deadlocks on its parent's lock nor skips it."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterId, LogFilter, LogFilterFlowRunId
    from prefect.settings import PREFECT_API_URL, temporary_settings

    project = _checkout(tmp_path, tiny_model_dir, servers["mlflow"])
    env, _ = _deploy(servers, tmp_path, project)
    host = {**env, "LORAOPS_PROJECT_DIR": str(project)}
    with temporary_settings(updates={PREFECT_API_URL: servers["prefect"]}), get_client(sync_client=True) as client:
        run = client.create_flow_run_from_deployment(
            client.read_deployment_by_name("retrain/retrain").id, parameters={}
        )
        started = time.monotonic()
        gpu_worker = [str(BIN / "prefect"), "worker", "start", "--pool", "gpu", "--limit", "1"]
        with background_process(gpu_worker, {**host, "PREFECT_HOME": str(tmp_path / "gpu-home")}, tmp_path / "gpu.log"):
            _cli([str(BIN / "prefect"), "worker", "start", "--pool", "cpu", "--run-once"], host, timeout=RUN_S)
            run = _finished_run(client, run.id, started + RUN_S)
        training = client.read_deployment_by_name("train-adapter/train-adapter")
        (trained,) = client.read_flow_runs(
            deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[training.id]))
        )
        logs = client.read_logs(log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[trained.id])))
    assert run.state.is_completed(), f"{run.state}\n{(tmp_path / 'gpu.log').read_text()[-3000:]}"
    assert trained.state.is_completed() and trained.parameters["parent_lock"]
    assert any("runs under the run lock of the run that started it" in log.message for log in logs)
    assert (project / ".loraops" / "run.lock").read_text() == ""  # released by the retrain run at its end


def _kill_processes_of_flow_run(flow_run_id) -> int:
    """SIGKILL every process running the flow run (Linux: its environment names the run); returns how many."""
    marker = f"PREFECT__FLOW_RUN_ID={flow_run_id}".encode()
    killed = 0
    for proc in Path("/proc").iterdir():
        try:
            if proc.name.isdigit() and marker in (proc / "environ").read_bytes().split(b"\0"):
                os.kill(int(proc.name), signal.SIGKILL)
                killed += 1
        except (OSError, ProcessLookupError):
            continue
    return killed


def test_a_crashed_gpu_worker_fails_retrain_and_the_rerun_resumes_its_training(servers, tiny_model_dir, tmp_path):
    """Kill the GPU host mid-training; once its run is Crashed, retrain fails; rerunning retrain resumes."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterId
    from prefect.settings import PREFECT_API_URL, temporary_settings
    from prefect.states import Crashed

    from loraops import stages
    from loraops.project.params_file import load_config
    from loraops.train.checkpoints import last_complete_checkpoint

    project = _checkout(tmp_path, tiny_model_dir, servers["mlflow"], max_steps=150, eval_steps=10)
    env, gpu_checkout = _deploy(servers, tmp_path, project)
    cpu_host = {**env, "LORAOPS_PROJECT_DIR": str(project)}
    gpu_host = {**env, "LORAOPS_PROJECT_DIR": str(gpu_checkout), "PREFECT_HOME": str(tmp_path / "gpu-home")}
    gpu_worker = [str(BIN / "prefect"), "worker", "start", "--pool", "gpu", "--limit", "1"]
    cpu_worker = [str(BIN / "prefect"), "worker", "start", "--pool", "cpu", "--run-once"]

    with temporary_settings(updates={PREFECT_API_URL: servers["prefect"]}), get_client(sync_client=True) as client:
        retrain = client.read_deployment_by_name("retrain/retrain")
        training_deployment = client.read_deployment_by_name("train-adapter/train-adapter")
        only_training = DeploymentFilter(id=DeploymentFilterId(any_=[training_deployment.id]))

        first = client.create_flow_run_from_deployment(retrain.id, parameters={})
        started = time.monotonic()
        # The first GPU host's training stops for good once its first checkpoint is saved (tests/fixtures/
        # hold_after_checkpoint): the kill always finds it there, however fast or slow the machine is.
        held = tmp_path / "gpu-host-held-at-step"
        held_host = {
            **gpu_host,
            "PYTHONPATH": os.pathsep.join(filter(None, [str(HOLD_AFTER_CHECKPOINT), gpu_host.get("PYTHONPATH")])),
            "LORAOPS_TEST_HELD_FILE": str(held),
        }
        with background_process(cpu_worker, cpu_host, tmp_path / "cpu-worker-1.log") as waiting_retrain:
            with background_process(gpu_worker, held_host, tmp_path / "gpu-worker-1.log") as gpu:
                while not held.exists():
                    assert time.monotonic() < started + RUN_S, (tmp_path / "gpu-worker-1.log").read_text()[-3000:]
                    assert gpu.poll() is None, (tmp_path / "gpu-worker-1.log").read_text()[-3000:]
                    time.sleep(0.5)
                survivor = last_complete_checkpoint(gpu_checkout / "checkpoints")
                assert survivor is not None and survivor.name == f"checkpoint-{int(held.read_text())}"
                (crashed,) = client.read_flow_runs(deployment_filter=only_training)
                # The host dies: the worker and the training process (its own session) at once.
                os.killpg(gpu.pid, signal.SIGKILL)
                assert _kill_processes_of_flow_run(crashed.id) >= 1
            assert last_complete_checkpoint(gpu_checkout / "checkpoints") == survivor
            crashed = client.read_flow_run(crashed.id)
            assert crashed.state.is_running()  # nothing reports a dead host's end ...
            # ... until the heartbeat automation (infra/automations.py) marks it, as here:
            client.set_flow_run_state(crashed.id, Crashed(message="no heartbeat: the worker stopped"), force=True)
            waiting_retrain.wait(timeout=RUN_S)
        first = _finished_run(client, first.id, time.monotonic() + 60)
        assert first.state.is_failed(), first.state
        assert "ended Crashed: no heartbeat" in first.state.message and "rerun this flow run" in first.state.message
        assert not (project / "adapters" / "candidate").exists()  # nothing fetched, nothing registered
        assert _mlflow_get(servers["mlflow"], "registered-models/search").get("registered_models", []) == []

        # The rerun: a new retrain run; its training lands on the (restarted) GPU host and resumes.
        second = client.create_flow_run_from_deployment(retrain.id, parameters={})
        started = time.monotonic()
        with background_process(gpu_worker, gpu_host, tmp_path / "gpu-worker-2.log"):
            _cli(cpu_worker, cpu_host, timeout=RUN_S)
            second = _finished_run(client, second.id, started + RUN_S)
        print(f"rerun {second.state.type.value} after {time.monotonic() - started:.1f} s, resumed past {survivor.name}")
        assert second.state.is_completed(), (tmp_path / "gpu-worker-2.log").read_text()[-3000:]

    resumed = stages.read_training(load_config(project / "params.yaml"), project)  # fetched back from the GPU host
    assert resumed.resumed_from_step == int(survivor.name.split("-")[1])  # the checkpoint the host died at
    assert resumed.steps == 150
    history = json.loads((project / "metrics" / "train_history.json").read_text())
    assert [row["step"] for row in history if "loss" in row] == list(range(1, 151))
    version = _mlflow_get(servers["mlflow"], "model-versions/get", name="tiny-adapter", version="1")["model_version"]
    assert "champion" in version["aliases"]


def test_the_retrain_form_means_params_yaml_and_a_form_run_changes_only_the_field_it_changed(
    servers, tiny_model_dir, tmp_path
):
    """Deployed from a checkout, the form's defaults are its params.yaml; params.yaml is then edited, and a
    form run that changes one field records that field alone, into the edited file, keeping its layout."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from loraops.project.params_file import load_config

    project = make_project(tmp_path / "project", tiny_model_dir, registry={"tracking_uri": servers["mlflow"]})
    params = project / "params.yaml"
    params.write_text("# the tiny project (yaml.safe_dump spells null out)\n" + params.read_text())
    _commit_flows_and_tasks(project)
    env = _host_env(servers, tmp_path)
    _cli([str(REPO_ROOT / "infra" / "work-pools.sh")], {**env, "PREFECT": str(BIN / "prefect")})
    deploy = [str(BIN / "prefect"), "--no-prompt", "deploy", "--name", "retrain"]
    _cli([*deploy, "--prefect-file", str(REPO_ROOT / "infra" / "prefect.yaml")], env, cwd=project)

    with temporary_settings(updates={PREFECT_API_URL: servers["prefect"]}), get_client(sync_client=True) as client:
        deployment = client.read_deployment_by_name("retrain/retrain")
        assert deployment.parameters["config"] == load_config(params).model_dump(mode="json")
        with pytest.raises(Exception, match=r"config\.lora\.r"):  # the schema is still enforced at run creation
            client.create_flow_run_from_deployment(deployment.id, parameters={"config": {"lora": {"r": "many"}}})

        # params.yaml changes after deploying; the form still shows the deployed values.
        edited = params.read_text().replace("\n  r: 16\n", "\n  r: 8\n")
        assert edited != params.read_text() and ": null\n" in edited
        params.write_text(edited)
        form = json.loads(json.dumps(deployment.parameters))  # the form sends every field it shows
        form["config"]["train"]["max_steps"] = 4
        run = client.create_flow_run_from_deployment(deployment.id, parameters=form)
        started = time.monotonic()
        cpu_host = {**env, "LORAOPS_PROJECT_DIR": str(project)}
        _cli([str(BIN / "prefect"), "worker", "start", "--pool", "cpu", "--run-once"], cpu_host, timeout=RUN_S)
        run = _finished_run(client, run.id, started + RUN_S)
        print(f"form run {run.state.name} after {time.monotonic() - started:.1f} s")
        logs = client.read_logs(log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[run.id])))
        messages = [log.message for log in logs]
        assert run.state.is_completed(), f"{run.state}\n" + "\n".join(messages[-40:])
        assert (run.state.name, run.state.message) == ("Completed", "registered tiny-adapter v1 @challenger")
        assert "registered" in run.tags

    # Exactly the chosen field changed; the edit made after deploying, comments and nulls stayed.
    assert params.read_text() == edited.replace("\n  max_steps: 8\n", "\n  max_steps: 4\n")
    # loraops' own lines reached the run's logs through the worker's flow-run process, once each.
    steps = [m.split()[1] for m in messages if m.startswith("step ") and " loss " in m and "tok/s" in m]
    assert steps == ["1/4", "2/4", "3/4", "4/4"], messages
    assert any(m.startswith("baseline validation loss") for m in messages)
    assert any(m.startswith("gate: validation loss") for m in messages)
    assert any(m == "this run's settings: params.yaml with train.max_steps=4" for m in messages), messages
