"""The old commit's temporary git worktree: the recorded inputs put in, ``dvc pull`` from the remote, ``dvc repro``."""

from __future__ import annotations

import logging
import os
import re
import shutil
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import yaml

from loraops.lineage import versioning
from loraops.lineage.versioning import VersioningError
from loraops.names import DATA_DVC_FILE, DVC_LOCK_FILE, PARAMS_FILE
from loraops.reproduce.recorded import RecordedVersion, ReproduceError, check_lock_uses_data

logger = logging.getLogger(__name__)
_ERROR_TAIL_LINES = 30  # of a failed dvc command: enough to see the stage's error, not the whole log


@contextmanager
def recorded_worktree(root: Path, commit: str, path: Path) -> Iterator[Path]:
    """A detached ``git worktree`` of ``commit``; yields the project folder in it (``root``'s place in the repo)."""
    top = Path(versioning.run_git(root, "rev-parse", "--show-toplevel")).resolve()
    versioning.run_git(top, "worktree", "add", "--detach", str(path), commit)
    logger.info("checked out %s in %s", commit[:12], path)
    try:
        yield path / root.relative_to(top)
    finally:
        _remove_worktree(top, path)


def _remove_worktree(top: Path, path: Path) -> None:
    try:
        versioning.run_git(top, "worktree", "remove", "--force", str(path))
    except VersioningError as error:
        logger.warning("git worktree remove failed (%s): deleting %s and pruning", error, path)
        shutil.rmtree(path, ignore_errors=True)
        versioning.run_git(top, "worktree", "prune")


def put_recorded_inputs(project: Path, root: Path, recorded: RecordedVersion) -> None:
    """The worktree runs on the version's inputs, with the user's DVC remotes.

    An experiment's commit holds params.yaml, dvc.lock and data.dvc as the run left them; for an older
    version they are put in from the run's artifacts.
    """
    if recorded.experiment:
        _use_users_remotes(project, root)
        untrack_outputs(project)
    else:
        restore_recorded_inputs(project, root, recorded)


def restore_recorded_inputs(project: Path, root: Path, recorded: RecordedVersion) -> None:
    """Put the run's dvc.lock, params.yaml and data version in the worktree; point its remotes where the user's do."""
    (project / DVC_LOCK_FILE).write_text(recorded.lock_text)
    (project / PARAMS_FILE).write_text(recorded.params_text)
    data_path = _point_data_at(project / DATA_DVC_FILE, recorded.data_md5)
    check_lock_uses_data(recorded, data_path)
    _use_users_remotes(project, root)


def _point_data_at(dvc_file: Path, md5: str) -> str:
    """Make ``data.dvc`` name the recorded data (the flow may have recorded data edited after the commit)."""
    if not dvc_file.exists():
        raise ReproduceError(f"{dvc_file.name} is not in the recorded commit: the data was not tracked with DVC")
    document = yaml.safe_load(dvc_file.read_text()) or {}
    out = (document.get("outs") or [{}])[0]
    if out.get("md5") != md5:
        logger.info("data.dvc at the commit names %s; the version was trained on %s", out.get("md5"), md5)
        document["outs"] = [{key: value for key, value in out.items() if key not in ("size", "nfiles")} | {"md5": md5}]
        dvc_file.write_text(yaml.safe_dump(document, sort_keys=False))
    return out["path"]


def _use_users_remotes(project: Path, root: Path) -> None:
    """Copy the user's ``.dvc/config.local`` (credentials) and re-anchor relative local remote URLs at ``root``.

    A relative URL such as ``../.dvcstore`` is relative to ``.dvc/``: in a temporary worktree it
    would point into the temporary folder instead of the user's project.
    """
    from dvc.config import Config

    local = root / ".dvc" / "config.local"
    if local.exists():
        shutil.copy(local, project / ".dvc" / "config.local")
    for config_file in (project / ".dvc" / "config", project / ".dvc" / "config.local"):
        if not config_file.exists():
            continue
        for name, remote in (Config.load_file(str(config_file)).get("remote") or {}).items():
            url = remote.get("url", "")
            if url and not re.match(r"\w+://", url) and not os.path.isabs(os.path.expanduser(url)):
                anchored = os.path.normpath(root / ".dvc" / url)
                versioning.run_dvc(project, "remote", "modify", "--local", name, "url", anchored)


def untrack_outputs(project: Path) -> None:
    """Take DVC outputs out of the worktree's git index, where an experiment commit can hold them.

    ``dvc exp save`` force-adds the files top-level plots read (metrics/plots/*.json), although stages
    produce them; ``dvc repro`` refuses to write an output git tracks. Only the temporary worktree's index changes.
    """
    lock = yaml.safe_load((project / DVC_LOCK_FILE).read_text()) or {}
    outs = sorted({out["path"] for stage in (lock.get("stages") or {}).values() for out in stage.get("outs") or []})
    tracked = versioning.run_git(project, "ls-files", "--", *outs).split() if outs else []
    if tracked:
        versioning.run_git(project, "rm", "-r", "--cached", "--quiet", "--", *tracked)
        logger.info(
            "untracked %s in the worktree's git index (DVC outputs the experiment commit holds)", ", ".join(tracked)
        )


def pull_recorded_outputs(project: Path) -> None:
    """``dvc pull`` the recorded data and outputs into the worktree's own (empty) cache."""
    remote = _default_remote(project)
    logger.info("dvc pull from remote '%s' (the version's data and outputs)", remote)
    try:
        versioning.run_dvc(project, "pull", what=f"dvc pull from remote '{remote}'")
    except VersioningError as error:
        raise ReproduceError(
            f"the DVC remote '{remote}' does not hold everything this version recorded (data or outputs are "
            f"missing or unreadable), so it cannot be rebuilt from the remote: {_tail(str(error))}"
        ) from None


def _default_remote(project: Path) -> str:
    try:
        return versioning.default_remote(project) or "(none)"
    except VersioningError:
        raise ReproduceError(
            "the recorded commit configures no default DVC remote: there is nowhere to pull the data from"
        ) from None


def stage_env() -> dict[str, str]:
    """The environment for ``dvc repro``: stages' ``python`` is this interpreter, hashing and cuBLAS deterministic."""
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env.setdefault("PYTHONHASHSEED", "0")
    env.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    return env


def rebuild(project: Path, commit: str) -> None:
    """Run every stage again (``--force``: the pulled outputs are not trusted, they are rebuilt)."""
    logger.info("dvc repro --force in the worktree of %s (every stage reruns)", commit[:12])
    try:
        output = versioning.run_dvc(project, "repro", "--force", what="dvc repro --force", env=stage_env())
    except VersioningError as error:
        raise ReproduceError(f"rebuilding commit {commit[:12]} failed: {_tail(str(error))}") from None
    logger.debug("dvc repro output:\n%s", output)


def _tail(text: str) -> str:
    lines = text.strip().splitlines()
    return "\n".join(lines[-_ERROR_TAIL_LINES:])
