"""Data and pipeline lineage with DVC and git.

The flow runs stages in-process instead of through ``dvc repro``, so afterwards
``record_pipeline_state`` makes ``dvc.lock`` describe what ran (``dvc commit --force``: hashes of
the deps, params and outs as they are on disk now, nothing re-run) and caches the outputs, and
``push_outputs`` sends the cache to the remote. DVC and git are driven through their CLIs in a
subprocess: the same commands a user would type, no global state in this process, and errors
carry the tool's own message.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import time
from collections.abc import Mapping
from pathlib import Path

import yaml
from pydantic import BaseModel

from loraops.config import LoraopsConfig
from loraops.data.files import file_md5
from loraops.names import DATA_DVC_FILE, DVC_LOCK_FILE, LINEAGE_FILES
from loraops.results import Lineage

logger = logging.getLogger(__name__)

UNKNOWN_COMMIT = "unknown"


class VersioningError(RuntimeError):
    """A git or DVC command failed; the message names the command, the folder and the tool's error."""


def _run(command: list[str], cwd: str | Path, what: str, env: Mapping[str, str] | None = None) -> str:
    env = {**(os.environ if env is None else env), "DVC_NO_ANALYTICS": "1"}
    try:
        done = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, check=False)
    except FileNotFoundError as error:
        raise VersioningError(f"{what}: '{command[0]}' is not installed or not on PATH") from error
    if done.returncode != 0:
        detail = (done.stderr or done.stdout).strip()
        raise VersioningError(f"{what} failed in {cwd} (exit {done.returncode}): {detail}")
    return done.stdout


DVC_LOCK_WAIT_S = 120.0  # the default of version.dvc_lock_wait_s
# What DVC prints when another DVC process holds the repository lock (.dvc/tmp/lock) or an output (.dvc/tmp/rwlock).
_DVC_LOCK_ERRORS = ("Unable to acquire lock", "is busy, it is being blocked by")
_LOCK_POLL_S = 1.0


class DvcLockedError(VersioningError):
    """Another DVC process kept this checkout locked for longer than loraops waits; the message names it."""


def run_dvc(
    repo_root: str | Path,
    *args: str,
    what: str | None = None,
    env: Mapping[str, str] | None = None,
    lock_wait_s: float = DVC_LOCK_WAIT_S,
) -> str:
    """``dvc ARGS`` in ``repo_root``; ``env`` replaces the process environment (e.g. a PATH for stage commands).

    While another DVC process (the user's ``dvc repro``, another run) holds the checkout's lock, the command
    is retried for up to ``lock_wait_s`` seconds; then ``DvcLockedError`` names the process holding it.
    """
    # The interpreter's own DVC, so a venv's dvc is used even when its bin/ is not on PATH.
    command, label = [sys.executable, "-m", "dvc", *args], what or f"dvc {' '.join(args)}"
    deadline = time.monotonic() + lock_wait_s
    while True:
        try:
            return _run(command, repo_root, label, env)
        except VersioningError as error:
            if not any(marker in str(error) for marker in _DVC_LOCK_ERRORS):
                raise
            if time.monotonic() >= deadline:
                raise DvcLockedError(_lock_message(repo_root, label, lock_wait_s, str(error))) from None
            logger.info("%s: the DVC repository is locked by another process, waiting", label)
            time.sleep(_LOCK_POLL_S)


def _lock_message(repo_root: str | Path, what: str, waited_s: float, error: str) -> str:
    tmp = Path(repo_root) / ".dvc" / "tmp"
    blocked_by = error.partition("it is being blocked by:")[2].partition("If there are no processes")[0].strip()
    holder = blocked_by or _lock_holder(tmp / "lock")
    return (
        f"{what}: another DVC process ({holder}) holds the lock of the DVC repository at {repo_root} and still "
        f"held it after {waited_s:.0f} s (version.dvc_lock_wait_s). Let it finish or stop it, then rerun; if that "
        f"process no longer exists, delete {tmp / 'lock'} and {tmp / 'rwlock'}"
    )


def _lock_holder(lock_file: Path) -> str:
    """``PID 123: dvc repro`` from the PID DVC's lock file holds (the command line where /proc has it)."""
    try:
        pid = int(lock_file.read_text().strip())
    except (OSError, ValueError):
        return "unknown process"
    try:
        command = (Path("/proc") / str(pid) / "cmdline").read_bytes().replace(b"\0", b" ").decode().strip()
    except OSError:
        command = ""
    return f"PID {pid}: {command}" if command else f"PID {pid}"


def run_git(repo_root: str | Path, *args: str) -> str:
    return _run(["git", *args], repo_root, f"git {' '.join(args)}").strip()


def git_show(repo_root: str | Path, rev: str, path: str) -> str:
    """The content of ``path`` at commit ``rev``, byte for byte (``git show REV:PATH``)."""
    return _run(["git", "show", f"{rev}:{path}"], repo_root, f"git show {rev}:{path}")


def data_md5(repo_root: str | Path, dvc_file: str = DATA_DVC_FILE) -> str:
    """The md5 DVC recorded for the tracked data (``outs[0].md5`` of ``dvc_file``)."""
    path = Path(repo_root) / dvc_file
    if not path.exists():
        raise VersioningError(f"{path} not found: track the data first with `dvc add data`")
    outs = (yaml.safe_load(path.read_text()) or {}).get("outs") or []
    md5 = outs[0].get("md5") if outs and isinstance(outs[0], dict) else None
    if not md5:
        raise VersioningError(f"{path} records no md5 for its output: run `dvc commit {dvc_file}`")
    return md5


def tracked_data_problem(repo_root: str | Path, dvc_file: str = DATA_DVC_FILE) -> str | None:
    """Why the workspace copy of ``dvc_file``'s output differs from what it records, or None if identical.

    ``dvc status`` cannot answer this on a fresh clone: with an empty cache it reports "not in cache"
    whether or not the bytes match. This hashes the workspace the way DVC does (nothing is written) and
    compares with the recorded md5; when the cache holds the recorded listing, the differing files are named.
    """
    from dvc.repo import Repo
    from dvc_data.hashfile.build import build
    from dvc_data.hashfile.hash_info import HashInfo
    from dvc_data.hashfile.tree import Tree

    root = Path(repo_root)
    recorded = data_md5(root, dvc_file)
    outs = yaml.safe_load((root / dvc_file).read_text())["outs"]
    target = root / outs[0].get("path", "data")
    if not target.exists():
        return f"{target} is missing: run `dvc pull {dvc_file}` or `loraops import-data`"
    with Repo(str(root)) as repo:
        odb = repo.cache.local
        _, _, obj = build(odb, str(target), repo.fs, "md5", dry_run=True)
        actual = obj.hash_info.value
        if actual == recorded:
            return None
        detail = ""
        if isinstance(obj, Tree) and odb.exists(recorded):
            expected = Tree.load(odb, HashInfo("md5", recorded))
            detail = _tree_difference(dict(_entries(expected)), dict(_entries(obj)))
    return (
        f"{target} differs from what {root / dvc_file} records (md5 {actual}, recorded {recorded}){detail}: "
        f"run `dvc checkout {dvc_file}` to restore it, or `dvc add {target.name}` to record the new data"
    )


def _entries(tree) -> list[tuple[str, str]]:
    return [("/".join(key), hash_info.value) for key, _, hash_info in tree]


def _tree_difference(expected: Mapping[str, str], actual: Mapping[str, str]) -> str:
    changed = sorted(name for name in expected.keys() & actual.keys() if expected[name] != actual[name])
    parts = [
        f"{label}: {', '.join(names)}"
        for label, names in (
            ("changed", changed),
            ("missing", sorted(expected.keys() - actual.keys())),
            ("added", sorted(actual.keys() - expected.keys())),
        )
        if names
    ]
    return f" [{'; '.join(parts)}]" if parts else ""


class DataVersion(BaseModel):
    """Which data a run trains on: the md5 DVC records and where it came from."""

    md5: str
    kind: str  # "registry" (dvc import), "url" (dvc import-url) or "local" (dvc add)
    source: str | None = None  # the registry's URL and path, or the imported URL
    rev: str | None = None  # the registry commit the import is locked to (rev_lock)
    updated: bool = False  # this refresh changed data.dvc

    def describe(self) -> str:
        origin = f"{self.source}@{self.rev[:12]}" if self.source and self.rev else self.source or "local data (dvc add)"
        return f"{origin}, md5 {self.md5}"


def read_data_version(root: Path, dvc_file: str = DATA_DVC_FILE) -> DataVersion:
    """What ``dvc_file`` records: md5, import kind, source and locked revision (nothing is run)."""
    path = Path(root) / dvc_file
    md5 = data_md5(root, dvc_file)
    deps = (yaml.safe_load(path.read_text()) or {}).get("deps") or []
    dep = deps[0] if deps and isinstance(deps[0], dict) else None
    if dep is None:
        return DataVersion(md5=md5, kind="local")
    repo = dep.get("repo")
    if isinstance(repo, dict):
        return DataVersion(
            md5=md5, kind="registry", source=f"{repo.get('url')}:{dep.get('path')}", rev=repo.get("rev_lock")
        )
    return DataVersion(md5=md5, kind="url", source=str(dep.get("path")))


def git_state(repo_root: str | Path, ignore: tuple[str, ...] = ()) -> tuple[str, bool]:
    """HEAD commit and whether tracked files differ from it (untracked files do not count).

    Outside a git repository, or in one without commits, returns ``("unknown", True)`` rather
    than failing: the run still happens, and its lineage says plainly that the code is unversioned.
    Paths in ``ignore`` (relative to ``repo_root``) are left out of the dirty check.
    """
    try:
        commit = run_git(repo_root, "rev-parse", "HEAD")
        excludes = [f":(exclude){path}" for path in ignore]
        changes = run_git(repo_root, "status", "--porcelain", "--untracked-files=no", "--", ".", *excludes)
    except VersioningError as error:
        logger.warning("no git commit for %s, lineage records '%s': %s", repo_root, UNKNOWN_COMMIT, error)
        return UNKNOWN_COMMIT, True
    return commit, bool(changes)


def collect_lineage(
    cfg: LoraopsConfig,
    repo_root: str | Path,
    base_model: str,
    base_revision: str | None,
    dvc_file: str = DATA_DVC_FILE,
) -> Lineage:
    """Lineage of a run; call after ``record_pipeline_state`` so dvc.lock describes what ran.

    ``git_dirty`` ignores dvc.lock, data.dvc and params.yaml: each is recorded by its own hash.
    """
    lock = Path(repo_root) / DVC_LOCK_FILE
    if not lock.exists():
        raise VersioningError(f"{lock} not found: call record_pipeline_state (dvc commit) before collecting lineage")
    commit, dirty = git_state(repo_root, ignore=(*LINEAGE_FILES, dvc_file))
    data = read_data_version(Path(repo_root), dvc_file)
    return Lineage(
        git_commit=commit,
        git_dirty=dirty,
        data_md5=data_md5(repo_root, dvc_file),
        dvc_lock_md5=file_md5(lock),
        params_hash=cfg.params_hash(),
        base_model=base_model,
        base_revision=base_revision,
        data_source=f"{data.source}@{data.rev}" if data.rev else data.source,
    )


def record_pipeline_state(
    repo_root: str | Path, stages: list[str] | None = None, lock_wait_s: float = DVC_LOCK_WAIT_S
) -> None:
    """Make dvc.lock (and .dvc files) match the workspace without re-running anything.

    ``dvc commit --force`` records the current hashes of each stage's deps, params and outs in
    dvc.lock and copies the outs into the DVC cache. With ``stages=None`` every target is
    committed, ``data.dvc`` included, so a dataset edited since ``dvc add`` is recorded as the
    data that trained this adapter. Pass stage names (or ``.dvc`` files) to commit only those,
    e.g. when some stages of dvc.yaml did not run and their outputs are missing.
    """
    targets = list(stages or [])
    what = f"dvc commit --force {' '.join(targets) or '(all stages)'}"
    run_dvc(repo_root, "commit", "--force", *targets, what=what, lock_wait_s=lock_wait_s)
    logger.info("recorded pipeline state in %s", Path(repo_root) / DVC_LOCK_FILE)


def default_remote(repo_root: str | Path) -> str | None:
    name = run_dvc(repo_root, "remote", "default").strip()
    return name or None


def remote_urls(repo_root: str | Path) -> dict[str, str]:
    """Remote name -> URL as DVC resolves it (a relative local path becomes absolute)."""
    urls = {}
    for line in run_dvc(repo_root, "config", "--list").splitlines():
        key, _, value = line.partition("=")
        if key.startswith("remote.") and key.endswith(".url"):
            urls[key.removeprefix("remote.").removesuffix(".url")] = value
    return urls


def ensure_default_remote(repo_root: str | Path, path: str | Path, name: str = "local") -> str:
    """Use the configured default remote, else add a local-directory remote at ``path`` as default."""
    try:
        existing = default_remote(repo_root)
    except VersioningError:
        existing = None  # `dvc remote default` fails when none is set
    if existing:
        return existing
    target = Path(path).resolve()
    target.mkdir(parents=True, exist_ok=True)
    run_dvc(repo_root, "remote", "add", "--default", "--force", name, str(target))
    logger.info("added DVC default remote '%s' at %s", name, target)
    return name


def push_outputs(repo_root: str | Path, remote: str | None = None, lock_wait_s: float = DVC_LOCK_WAIT_S) -> str:
    """``dvc push`` the cached data and outputs; returns the remote's name."""
    name = remote
    if name is None:
        try:
            name = default_remote(repo_root)
        except VersioningError:
            name = None
        if not name:
            raise VersioningError(
                f"no default DVC remote in {repo_root}: add one with `dvc remote add -d NAME URL` "
                "or set version.push: false"
            )
    output = run_dvc(repo_root, "push", "--remote", name, what=f"dvc push to remote '{name}'", lock_wait_s=lock_wait_s)
    logger.info("dvc push to '%s': %s", name, output.strip().splitlines()[-1] if output.strip() else "done")
    return name
