"""Pre-flight server checks: a missing Prefect or MLflow server is named before any work starts."""

from __future__ import annotations

import http.server
import shutil
import threading

import pytest
from conftest import REPO_ROOT, free_port
from typer.testing import CliRunner

from loraops.cli.app import app
from loraops.project import servers


class _Health(http.server.BaseHTTPRequestHandler):
    status = 200

    def do_GET(self):  # noqa: N802 (http.server's naming)
        self.send_response(self.status)
        self.end_headers()
        self.wfile.write(b"OK")

    def log_message(self, *args):
        pass


@pytest.fixture
def health_server():
    def start(status: int) -> str:
        handler = type("Handler", (_Health,), {"status": status})
        server = http.server.HTTPServer(("127.0.0.1", 0), handler)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        started.append(server)
        return f"http://127.0.0.1:{server.server_port}"

    started: list = []
    yield start
    for server in started:
        server.shutdown()


def test_a_healthy_server_passes_and_others_are_named_with_what_to_do(health_server):
    servers.check_mlflow_server(health_server(200))
    servers.check_prefect_api(health_server(200) + "/api")
    with pytest.raises(
        servers.ServerUnreachableError, match=r"MLflow tracking server at .*/health answered HTTP 503: start it"
    ):
        servers.check_mlflow_server(health_server(503))
    dead = f"http://127.0.0.1:{free_port()}"
    with pytest.raises(
        servers.ServerUnreachableError, match=r"Prefect server at .*/api/health does not answer .*make stack"
    ):
        servers.check_prefect_api(dead + "/api")


class _AuthHealth(_Health):
    def do_GET(self):  # noqa: N802
        import base64

        expected = "Basic " + base64.b64encode(b"alice:s3cr3t-pw").decode()
        self.status = 200 if self.headers.get("Authorization") == expected else 401
        super().do_GET()


def test_credentials_in_a_tracking_uri_authenticate_and_are_never_printed(monkeypatch):
    server = http.server.HTTPServer(("127.0.0.1", 0), _AuthHealth)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        host = f"127.0.0.1:{server.server_port}"
        servers.check_mlflow_server(f"http://alice:s3cr3t-pw@{host}")  # basic auth from the URL
        monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "alice")
        monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", "s3cr3t-pw")
        servers.check_mlflow_server(f"http://{host}")  # MLflow's own credential variables
        monkeypatch.delenv("MLFLOW_TRACKING_USERNAME")
        with pytest.raises(servers.ServerUnreachableError) as refused:
            servers.check_mlflow_server(f"http://alice:wrong-pw@{host}")
        assert "answered HTTP 401" in str(refused.value)
        assert "wrong-pw" not in str(refused.value) and f"***@{host}" in str(refused.value)
    finally:
        server.shutdown()
    with pytest.raises(servers.ServerUnreachableError) as dead:
        servers.check_mlflow_server(f"http://alice:s3cr3t-pw@127.0.0.1:{free_port()}")
    assert "s3cr3t-pw" not in str(dead.value) and "does not answer" in str(dead.value)


def test_local_stores_and_an_unset_prefect_url_need_no_server(monkeypatch):
    servers.check_mlflow_server("sqlite:////tmp/mlflow.db")
    servers.check_mlflow_server("file:///tmp/mlruns")
    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    assert servers.check_prefect_api() is None


def test_retrain_refuses_to_start_without_its_servers_and_changes_nothing(tmp_path, monkeypatch):
    shutil.copy(REPO_ROOT / "params.yaml", tmp_path / "params.yaml")
    before = (tmp_path / "params.yaml").read_bytes()
    dead = f"http://127.0.0.1:{free_port()}"
    runner = CliRunner()
    monkeypatch.setenv("PREFECT_API_URL", dead + "/api")
    refused = runner.invoke(app, ["retrain", "--params", str(tmp_path / "params.yaml"), "-S", "lora.r=8"])
    assert refused.exit_code == 1 and "Prefect server at" in refused.output and "make stack" in refused.output
    monkeypatch.delenv("PREFECT_API_URL")
    refused = runner.invoke(
        app, ["retrain", "--params", str(tmp_path / "params.yaml"), "-S", f"registry.tracking_uri={dead}"]
    )
    assert refused.exit_code == 1 and f"MLflow tracking server at {dead}/health does not answer" in refused.output
    assert (tmp_path / "params.yaml").read_bytes() == before  # the overrides were not recorded
    assert sorted(p.name for p in tmp_path.iterdir()) == ["params.yaml"]


def test_a_terminated_retrain_stops_its_temporary_prefect_server(tiny_project):
    """SIGTERM (what `kill`, systemd and Kubernetes send) must not orphan the run's temporary Prefect server."""
    import os
    import re
    import signal
    import subprocess
    import sys
    import time
    import urllib.request

    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    env.update(PREFECT_SERVER_ANALYTICS_ENABLED="false", HF_HUB_OFFLINE="1", DVC_NO_ANALYTICS="1")
    command = [sys.executable, "-m", "loraops", "retrain"]
    process = subprocess.Popen(command, cwd=tiny_project, env=env, stderr=subprocess.PIPE, text=True)
    url, seen = None, []
    try:
        for line in process.stderr:  # the line Prefect logs once the temporary server is up
            seen.append(line)
            if match := re.search(r"Starting temporary server on (http://127\.0\.0\.1:\d+)", line):
                url = match.group(1)
                break
        assert url, "".join(seen)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:  # the server answers before we stop its parent
            try:
                urllib.request.urlopen(f"{url}/api/health", timeout=2)
                break
            except OSError:
                time.sleep(0.5)
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=60) == 128 + signal.SIGTERM
    finally:
        process.kill()
    with pytest.raises(OSError):
        urllib.request.urlopen(f"{url}/api/health", timeout=2)
