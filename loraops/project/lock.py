"""One run per checkout: the file lock every command that writes the project holds while it runs.

Two runs writing one checkout at once delete each other's checkpoints and register versions whose
params.yaml and dvc.lock describe the other run. The retrain flow (however it was started), `loraops
stage` (what `dvc repro` calls) and `loraops import-data` hold ``.loraops/run.lock``; a second one
waits ``orchestration.lock_timeout_s`` and is then refused, naming the holder.

The lock is an OS lock (``flock``) on that file, so it dies with its process: a crashed run never
blocks the next one, which takes over and says whose lock it found. The file also records the
holder (command, pid, host, start time, Prefect flow run) for the refusal message. Within one
process the lock is reentrant (the flow calling stages); child processes the holder starts (``dvc``
running ``loraops stage``) find it in ``LORAOPS_PROJECT_LOCK`` and run under it. A run the holder started
elsewhere (the ``train-adapter`` deployment run a retrain waits for, on a worker that shares its checkout)
is no child process: the holder hands it its lock token (``held_token``) and that run accepts a lock held by
exactly that token (``parent_token``); anyone else is refused as usual.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from loraops.names import RUN_LOCK_FILE

log = logging.getLogger(__name__)

HOLDER_ENV = "LORAOPS_PROJECT_LOCK"  # "<pid>:<lock file>" for the holder's child processes
_POLL_S = 0.5


class ProjectLockedError(RuntimeError):
    """Another run holds this checkout; the message names it and what to do."""


@dataclass
class Holder:
    command: str
    pid: int = field(default_factory=os.getpid)
    host: str = field(default_factory=socket.gethostname)
    started: str = field(default_factory=lambda: datetime.now(UTC).strftime("%Y-%m-%d %H:%M:%S UTC"))
    flow_run_id: str | None = None
    token: str = field(default_factory=lambda: uuid.uuid4().hex)  # names this hold for runs it starts elsewhere

    def describe(self) -> str:
        run = f", Prefect flow run {self.flow_run_id}" if self.flow_run_id else ""
        return f"'{self.command}' (pid {self.pid} on {self.host}, started {self.started}{run})"


@dataclass
class _Hold:
    fd: int
    holder: Holder
    count: int = 1
    previous_env: str | None = None


_held: dict[Path, _Hold] = {}
_guard = threading.Lock()


def lock_path(root: str | Path) -> Path:
    return Path(root).resolve() / RUN_LOCK_FILE


def held_token(root: str | Path) -> str | None:
    """The token of the run lock this process holds on ``root`` (None when it holds none), for runs it starts."""
    with _guard:
        hold = _held.get(lock_path(root))
    return hold.holder.token if hold else None


@contextmanager
def project_lock(
    root: str | Path, command: str, timeout_s: float = 0.0, parent_token: str | None = None
) -> Iterator[None]:
    """Hold the project's run lock while the block runs; raise ProjectLockedError if another run keeps it.

    ``parent_token``: the token of the run that started this one (``held_token``); a lock held under that
    token is the parent's, and this run works under it instead of waiting for its own parent.
    """
    path = lock_path(root)
    with _guard:
        hold = _held.get(path)
        if hold is not None:  # nested in this process: the flow calling stages, a CLI command calling the flow
            hold.count += 1
            _note_flow_run(hold)
    if hold is None and _held_by_parent(path):
        yield  # a child process of the holder (dvc repro -> loraops stage): it runs under the parent's lock
        return
    if hold is None:
        hold = _acquire(path, command, timeout_s, parent_token)
        if hold is None:  # held by the run that started this one: it waits for this run, so work under its lock
            yield
            return
    try:
        yield
    finally:
        _release(path)


def _acquire(path: Path, command: str, timeout_s: float, parent_token: str | None = None) -> _Hold | None:
    """Take the lock (a _Hold), or None when the run whose token is ``parent_token`` holds it."""
    import fcntl

    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    deadline = time.monotonic() + timeout_s
    waiting = False
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            break
        except BlockingIOError:
            holder = _read_holder(fd)
            if parent_token and holder is not None and holder.token == parent_token:
                os.close(fd)
                log.info("%s runs under the run lock of the run that started it, %s", command, holder.describe())
                return None
            if time.monotonic() >= deadline:
                os.close(fd)
                raise ProjectLockedError(_refusal(path, holder, timeout_s)) from None
            if not waiting:
                log.info("waiting up to %.0f s for %s to finish (it holds %s)", timeout_s, _who(holder), path)
                waiting = True
            time.sleep(min(_POLL_S, max(0.0, deadline - time.monotonic())))
        except OSError as error:
            os.close(fd)
            raise ProjectLockedError(
                f"cannot lock {path} ({error.strerror}): keep the project on a file system with file locks"
            ) from None
    stale = _read_holder(fd)
    if stale is not None:
        log.warning(
            "taking over the run lock %s left by %s: that process no longer holds it (it ended without releasing it)",
            path,
            stale.describe(),
        )
    holder = Holder(command=command, flow_run_id=_flow_run_id())
    _write_holder(fd, holder)
    hold = _Hold(fd=fd, holder=holder, previous_env=os.environ.get(HOLDER_ENV))
    os.environ[HOLDER_ENV] = f"{holder.pid}:{path}"
    with _guard:
        _held[path] = hold
    return hold


def _release(path: Path) -> None:
    import fcntl

    with _guard:
        hold = _held.get(path)
        if hold is None:
            return
        hold.count -= 1
        if hold.count:
            return
        del _held[path]
    os.ftruncate(hold.fd, 0)  # an empty file: the next holder finds no stale record
    fcntl.flock(hold.fd, fcntl.LOCK_UN)
    os.close(hold.fd)
    if hold.previous_env is None:
        os.environ.pop(HOLDER_ENV, None)
    else:
        os.environ[HOLDER_ENV] = hold.previous_env


def _held_by_parent(path: Path) -> bool:
    """True in a process the holder started: the variable names this lock and the holder still runs."""
    pid, _, locked = os.environ.get(HOLDER_ENV, "").partition(":")
    if locked != str(path) or not pid.isdigit():
        return False
    try:
        with path.open() as handle:
            holder = _parse(handle.read())
    except OSError:
        return False
    return holder is not None and holder.pid == int(pid) and holder.host == socket.gethostname() and _alive(holder.pid)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _flow_run_id() -> str | None:
    """The Prefect flow run this process is in, if any (Prefect is not imported just to ask)."""
    if "prefect" not in sys.modules:
        return None
    try:
        from prefect.runtime import flow_run

        return flow_run.id
    except Exception:  # noqa: BLE001 (outside a run, or a Prefect without runtime: no id to record)
        return None


def _note_flow_run(hold: _Hold) -> None:
    """A CLI command took the lock before its flow run existed: record the run's id once it does."""
    if hold.holder.flow_run_id is None and (run_id := _flow_run_id()):
        hold.holder.flow_run_id = run_id
        _write_holder(hold.fd, hold.holder)


def _write_holder(fd: int, holder: Holder) -> None:
    data = (json.dumps(asdict(holder)) + "\n").encode()
    os.ftruncate(fd, 0)
    os.pwrite(fd, data, 0)
    os.fsync(fd)


def _read_holder(fd: int) -> Holder | None:
    return _parse(os.pread(fd, 65536, 0).decode(errors="replace"))


def _parse(text: str) -> Holder | None:
    try:
        return Holder(**json.loads(text))
    except (ValueError, TypeError):
        return None


def _who(holder: Holder | None) -> str:
    return holder.describe() if holder else "another process (it has not recorded its details yet)"


def _refusal(path: Path, holder: Holder | None, timeout_s: float) -> str:
    waited = f"after waiting {timeout_s:.0f} s " if timeout_s > 0 else ""
    return (
        f"{path.parent.parent} is in use {waited}by {_who(holder)}: one run per checkout at a time "
        "(two would overwrite each other's checkpoints, params.yaml and dvc.lock). Wait for it to finish, "
        f"or set orchestration.lock_timeout_s to wait for it; lock file {path}"
    )
