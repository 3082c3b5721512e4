"""Pre-flight checks that the servers a run needs answer, before any GPU time is spent."""

from __future__ import annotations

import base64
import os
import urllib.error
import urllib.parse
import urllib.request


class ServerUnreachableError(RuntimeError):
    """A server the run needs does not answer; the message says what to start or set."""


def redact_url(url: str) -> str:
    """``url`` with any ``user:password@`` part replaced by ``***@``: safe to print or log."""
    parts = urllib.parse.urlsplit(url)
    if "@" not in parts.netloc:
        return url
    return urllib.parse.urlunsplit(parts._replace(netloc="***@" + parts.netloc.rpartition("@")[2]))


def _request(url: str, credentials: tuple[str, str] | None) -> urllib.request.Request:
    """A GET for ``url`` with credentials from its ``user:password@`` part (or ``credentials``) as basic auth."""
    parts = urllib.parse.urlsplit(url)
    if parts.username is not None:
        credentials = (urllib.parse.unquote(parts.username), urllib.parse.unquote(parts.password or ""))
        url = urllib.parse.urlunsplit(parts._replace(netloc=parts.netloc.rpartition("@")[2]))
    request = urllib.request.Request(url)
    if credentials:
        token = base64.b64encode(f"{credentials[0]}:{credentials[1]}".encode()).decode()
        request.add_header("Authorization", f"Basic {token}")
    return request


def check_reachable(
    name: str, health_url: str, hint: str, timeout_s: float = 5.0, credentials: tuple[str, str] | None = None
) -> None:
    """GET ``health_url``; raise ServerUnreachableError naming the server, the URL (credentials hidden) and ``hint``."""
    try:
        with urllib.request.urlopen(_request(health_url, credentials), timeout=timeout_s) as response:
            if response.status == 200:
                return
            problem = f"answered HTTP {response.status}"
    except urllib.error.HTTPError as error:
        problem = f"answered HTTP {error.code}"
    except (urllib.error.URLError, OSError, ValueError) as error:
        problem = f"does not answer ({getattr(error, 'reason', error)})"
    raise ServerUnreachableError(f"{name} at {redact_url(health_url)} {problem}: {hint}")


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
    user, password = os.environ.get("MLFLOW_TRACKING_USERNAME"), os.environ.get("MLFLOW_TRACKING_PASSWORD")
    check_reachable(
        "MLflow tracking server",
        f"{tracking_uri.rstrip('/')}/health",
        "start it (make stack) or point registry.tracking_uri / MLFLOW_TRACKING_URI at a running server",
        credentials=(user, password or "") if user else None,
    )
