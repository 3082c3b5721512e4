"""Pre-flight checks that the servers a run needs answer, before any GPU time is spent."""

from __future__ import annotations

import os
import urllib.error
import urllib.request


class ServerUnreachableError(RuntimeError):
    """A server the run needs does not answer; the message says what to start or set."""


def check_reachable(name: str, health_url: str, hint: str, timeout_s: float = 5.0) -> None:
    """GET ``health_url``; raise ServerUnreachableError naming the server, the URL and ``hint``."""
    try:
        with urllib.request.urlopen(health_url, timeout=timeout_s) as response:
            if response.status == 200:
                return
            problem = f"answered HTTP {response.status}"
    except urllib.error.HTTPError as error:
        problem = f"answered HTTP {error.code}"
    except (urllib.error.URLError, OSError) as error:
        problem = f"does not answer ({getattr(error, 'reason', error)})"
    raise ServerUnreachableError(f"{name} at {health_url} {problem}: {hint}")


def check_prefect_api(api_url: str | None = None) -> str | None:
    """The Prefect API named by PREFECT_API_URL, if any, must answer; None means a temporary local server."""
    api_url = api_url if api_url is not None else os.environ.get("PREFECT_API_URL")
    if not api_url:
        return None
    check_reachable(
        "Prefect server",
        f"{api_url.rstrip('/')}/health",
        "start it (make stack, or docker compose -f infra/docker-compose.yml up -d) "
        "or unset PREFECT_API_URL to run with a temporary local server",
    )
    return api_url


def check_mlflow_server(tracking_uri: str) -> None:
    """An http(s) tracking URI must answer before training starts; file and SQLite stores need no server."""
    if not tracking_uri.startswith(("http://", "https://")):
        return
    check_reachable(
        "MLflow tracking server",
        f"{tracking_uri.rstrip('/')}/health",
        "start it (make stack) or point registry.tracking_uri / MLFLOW_TRACKING_URI at a running server",
    )
