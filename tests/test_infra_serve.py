"""The shipped `loraops serve` service files (compose, Kubernetes) load and agree with the real CLI."""

from __future__ import annotations

import re
from importlib.metadata import entry_points
from pathlib import Path

import click
import typer.main
import yaml

INFRA = Path(__file__).resolve().parent.parent / "infra"


def _base_model_dir_in_image() -> str:
    """Where the server converts a ``pypi:`` base in the image: the project (WORKDIR) + ``paths.base_model_dir``."""
    from loraops.project.params_file import load_config

    lines = (INFRA / "Dockerfile.worker").read_text().splitlines()
    (workdir,) = [line.split()[1] for line in lines if line.startswith("WORKDIR ")]
    return f"{workdir}/{load_config(INFRA.parent / 'params.yaml').paths.base_model_dir}"


def _serve_options(argv: list[str]) -> tuple[click.Command, dict[str, object]]:
    """Parse ``argv`` as the installed ``loraops`` script would: the serve command and its values by flag."""
    (script,) = [e for e in entry_points(group="console_scripts") if e.name == argv[0]]
    group = typer.main.get_command(script.load())
    assert argv[1] == "serve", argv
    command = group.commands["serve"]
    context = command.make_context("serve", list(argv[2:]))  # unknown flags or bad values raise here
    return command, {flag: context.params[p.name] for p in command.params for flag in p.opts}


def _api_key_envvar(command: click.Command) -> str:
    (option,) = [p for p in command.params if "--api-key" in p.opts]
    return option.envvar


def _health_port(url: str) -> int:
    match = re.search(r"https?://localhost:(\d+)/health\b", url)
    assert match, url
    return int(match.group(1))


def test_compose_serve_service_runs_the_cli_on_its_published_port_after_mlflow():
    compose = yaml.safe_load((INFRA / "docker-compose.yml").read_text())
    services = compose["services"]
    serve = services["serve"]
    command, options = _serve_options(serve["command"])
    assert options["--host"] == "0.0.0.0"
    port = options["--port"]
    assert [mapping.split(":")[-1] for mapping in serve["ports"]] == [str(port)]
    assert _health_port(" ".join(serve["healthcheck"]["test"])) == port
    assert serve["depends_on"]["mlflow"]["condition"] == "service_healthy"
    mlflow_port = services["mlflow"]["ports"][0].split(":")[-1]
    assert serve["environment"]["MLFLOW_TRACKING_URI"] == f"http://mlflow:{mlflow_port}"
    # the key comes from the shell or .env, never a literal, under the name the CLI reads
    envvar = _api_key_envvar(command)
    assert re.fullmatch(rf"\$\{{{envvar}(:-)?\}}", serve["environment"][envvar]), serve["environment"]
    assert serve["image"] == services["gpu-worker"]["image"] and serve["build"] == services["gpu-worker"]["build"]
    assert {volume.split(":")[0] for volume in serve["volumes"]} <= set(compose["volumes"])
    assert _base_model_dir_in_image() in [volume.split(":")[1] for volume in serve["volumes"]]


def test_kubernetes_serve_deployment_and_service_agree_with_the_cli():
    documents = list(yaml.safe_load_all((INFRA / "k8s" / "serve.yaml").read_text()))
    by_kind = {d["kind"]: d for d in documents}
    assert set(by_kind) == {"Deployment", "Service"} and len(documents) == 2
    deployment, service = by_kind["Deployment"], by_kind["Service"]
    assert deployment["apiVersion"] == "apps/v1" and service["apiVersion"] == "v1"
    pod = deployment["spec"]["template"]
    assert deployment["spec"]["selector"]["matchLabels"].items() <= pod["metadata"]["labels"].items()
    assert service["spec"]["selector"].items() <= pod["metadata"]["labels"].items()
    (container,) = pod["spec"]["containers"]
    command, options = _serve_options(container["command"])
    assert options["--host"] == "0.0.0.0"
    (port,) = container["ports"]
    assert port["containerPort"] == options["--port"]
    (service_port,) = service["spec"]["ports"]
    assert service_port["targetPort"] in (port["name"], port["containerPort"])
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        get = container[probe]["httpGet"]
        assert get["path"] == "/health" and get["port"] in (port["name"], port["containerPort"]), probe
    env = {item["name"]: item for item in container["env"]}
    key = env[_api_key_envvar(command)]
    assert "value" not in key and set(key["valueFrom"]) == {"secretKeyRef"}, "the API key comes from a Secret"
    assert env["MLFLOW_TRACKING_URI"]["value"].startswith("http")
    resources = container["resources"]
    assert resources["requests"]["cpu"] and resources["requests"]["memory"] and resources["limits"]["memory"]
    assert {m["name"] for m in container["volumeMounts"]} <= {v["name"] for v in pod["spec"]["volumes"]}
    assert _base_model_dir_in_image() in [m["mountPath"] for m in container["volumeMounts"]]
