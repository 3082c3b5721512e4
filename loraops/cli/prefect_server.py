"""The temporary Prefect server of a command run without a Prefect API: it dies with the command, even on SIGKILL.

Without PREFECT_API_URL, Prefect starts a local server process on first use and stops it at exit
(an atexit hook); a command killed by SIGKILL (or the OOM killer) skips that hook and used to leave
the server running. Here the command starts that server itself, on Linux with the parent-death
signal (``prctl(PR_SET_DEATHSIG)``): the kernel sends the server SIGTERM when the command dies.
"""

from __future__ import annotations

import ctypes
import logging
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from typing import Any

log = logging.getLogger(__name__)

_PR_SET_DEATHSIG = 1


def prefect_api_configured() -> bool:
    """True when runs go to a Prefect API (PREFECT_API_URL in the environment, a profile, or a test harness)."""
    from prefect.settings import PREFECT_API_URL

    return bool(PREFECT_API_URL.value())


def temporary_server_if_needed():
    """:func:`temporary_server` when no Prefect API is configured; else nothing to do."""
    return nullcontext() if prefect_api_configured() else temporary_server()


@contextmanager
def temporary_server() -> Iterator[str]:
    """Start Prefect's local server for the block (its API URL is set for Prefect meanwhile); stop it after."""
    from prefect.server.api.server import SubprocessASGIServer
    from prefect.settings import PREFECT_API_URL, temporary_settings

    class DiesWithParent(SubprocessASGIServer):
        def _run_uvicorn_command(self) -> subprocess.Popen[Any]:
            return _popen_dying_with_parent(super()._run_uvicorn_command)

    server = DiesWithParent(port=_free_port())  # its own instance: Prefect's default one stays unused
    server.start()
    log.info("temporary Prefect server at %s (pid %s), stopped with this command", server.api_url, _pid(server))
    try:
        with temporary_settings({PREFECT_API_URL: server.api_url}):
            try:
                yield server.api_url
            finally:
                _drain_to_server()
    finally:
        server.stop()


def _drain_to_server(timeout_s: float = 30) -> None:
    """Send the run's queued logs and events now: at exit they would go to a server already stopped
    ("Error logging to API")."""
    from prefect.events.worker import EventsWorker
    from prefect.logging.handlers import APILogWorker

    APILogWorker.drain_all(timeout=timeout_s)
    EventsWorker.drain_all(timeout=timeout_s)


def _free_port() -> int:
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _pid(server) -> int | None:
    return server.server_process.pid if server.server_process else None


def _popen_dying_with_parent(start) -> subprocess.Popen[Any]:
    """Call ``start`` (which runs one ``subprocess.Popen``) with the parent-death signal set in the child."""
    if not sys.platform.startswith("linux"):
        return start()  # no prctl: the atexit hook still stops the server on a normal exit or SIGTERM
    original = subprocess.Popen

    def popen(*args, **kwargs):
        kwargs.setdefault("preexec_fn", _die_with(os.getpid()))
        return original(*args, **kwargs)

    subprocess.Popen = popen  # type: ignore[misc]  # only for Prefect's own start of this one process
    try:
        return start()
    finally:
        subprocess.Popen = original  # type: ignore[misc]


def _die_with(parent: int):
    libc = ctypes.CDLL(None, use_errno=True)

    def in_child() -> None:
        libc.prctl(_PR_SET_DEATHSIG, signal.SIGTERM)
        if os.getppid() != parent:  # the parent died before prctl: no signal would come
            os._exit(1)

    return in_child
