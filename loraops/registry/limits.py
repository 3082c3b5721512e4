"""A tracking server lost mid-run fails the run within ``registry.timeout_s``, in one line saying what was kept.

MLflow's client retries a failing request for minutes by default (7 retries, backoff factor 2, a
120 s timeout each), and Prefect retries the task around it: a server gone after training used to
hold a run for 13 minutes and end in a long traceback. Inside a run, MLflow's HTTP settings are
bounded so that one request gives up within the budget, a stage that talks to the server turns
"the server does not answer" into :class:`TrackingServerLostError`, and the tasks do not retry that
error (the network tasks still retry errors of a server that answers). Training logs each step to the
live run, so a server lost mid-training stops training there; its checkpoints are kept for the rerun.
"""

from __future__ import annotations

import functools
import os
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TypeVar

from loraops.config import LoraopsConfig
from loraops.project.servers import ServerUnreachableError, check_mlflow_server, redact_url

HEALTH_CHECK_S = 5  # servers.check_reachable's timeout
_RETRIES = 1  # one immediate retry of a dropped connection; Prefect retries the task while the server answers

F = TypeVar("F", bound=Callable)


class TrackingServerLostError(ServerUnreachableError):
    """The tracking server stopped answering during a run; the message says what was kept and what to do."""


def http_settings(timeout_s: int) -> dict[str, str]:
    """MLflow's HTTP variables for a request that gives up within ``timeout_s``, with the health check after it.

    Worst case of one request: (1 + retries) attempts, each waiting up to the timeout to connect and
    again to read (a server that hangs rather than refuses), no backoff before the first retry, no
    ``Retry-After`` sleeps: 4 x per-request timeout, plus the health check.
    """
    per_request = max(1, (timeout_s - HEALTH_CHECK_S) // (2 * (1 + _RETRIES)))
    return {
        "MLFLOW_HTTP_REQUEST_TIMEOUT": str(per_request),
        "MLFLOW_HTTP_REQUEST_MAX_RETRIES": str(_RETRIES),
        "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
        "MLFLOW_HTTP_REQUEST_BACKOFF_JITTER": "0",
        "MLFLOW_HTTP_RESPECT_RETRY_AFTER_HEADER": "false",
    }


@contextmanager
def bounded_requests(timeout_s: int) -> Iterator[None]:
    """Set :func:`http_settings` for the block (MLflow reads them at each request), then restore the old values."""
    settings = http_settings(timeout_s)
    before = {name: os.environ.get(name) for name in settings}
    os.environ.update(settings)
    try:
        yield
    finally:
        for name, value in before.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def server_lost(tracking_uri: str) -> bool:
    """True when ``tracking_uri`` is a server that does not answer its health check now.

    A "lost" answer is remembered for one health-check period: the run's failure path (ending the
    MLflow run, naming the stage) asks again right away and should not wait on the server twice.
    """
    if not tracking_uri.startswith(("http://", "https://")):
        return False
    lost_at = _lost.get(tracking_uri)
    if lost_at is not None and time.monotonic() - lost_at < HEALTH_CHECK_S:
        return True
    try:
        check_mlflow_server(tracking_uri)
    except ServerUnreachableError:
        _lost[tracking_uri] = time.monotonic()
        return True
    _lost.pop(tracking_uri, None)
    return False


_lost: dict[str, float] = {}  # tracking URI -> when its health check last failed

_OUTCOME = {
    "train-adapter": "nothing was registered (its MLflow run stays RUNNING until the next run marks it FAILED)",
    "gate-candidate": "nothing was logged or registered",
    "register-adapter": "its registration may be incomplete (a rerun completes it: registration is keyed on the run)",
    "resolve-init-adapter": "nothing was trained or registered",
}


def kept_files(cfg: LoraopsConfig, stage: str) -> str:
    """What a run that lost its server at ``stage`` leaves for the rerun."""
    if stage == "resolve-init-adapter":
        return "no model was loaded yet"
    if stage == "train-adapter":
        return f"the checkpoints written so far are kept in {cfg.train.output_dir}/ (a rerun resumes from the last)"
    return f"the adapter and metrics are kept in {cfg.paths.adapter_dir}/, {cfg.paths.metrics_dir}/"


def lost_server_message(tracking_uri: str, stage: str, kept: str) -> str:
    outcome = _OUTCOME.get(stage, "nothing was registered")
    return (
        f"MLflow tracking server {redact_url(tracking_uri)} stopped answering during {stage}; {outcome}; "
        f"{kept}; rerun `loraops retrain` once the server is back"
    )


def reports_lost_server(stage: str) -> Callable[[F], F]:
    """For a stage ``fn(cfg, root, ...)`` that talks to MLflow: a failure while the server is gone becomes
    TrackingServerLostError naming the server, the stage and the kept files; other failures pass unchanged."""

    def decorate(fn: F) -> F:
        @functools.wraps(fn)
        def wrapper(cfg, root, *args, **kwargs):
            from loraops.registry.store import resolve_tracking_uri

            try:
                return fn(cfg, root, *args, **kwargs)
            except Exception as error:
                tracking_uri = resolve_tracking_uri(cfg.registry, root)
                if isinstance(error, TrackingServerLostError) or not server_lost(tracking_uri):
                    raise
                message = lost_server_message(tracking_uri, stage, kept_files(cfg, stage))
                raise TrackingServerLostError(message) from error

        return wrapper  # type: ignore[return-value]

    return decorate
