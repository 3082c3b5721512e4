"""Every retrain run as a DVC experiment: ``dvc exp show`` is the run history, ``dvc exp apply NAME`` restores one.

After ``version_outputs`` has made dvc.lock describe the run, ``save_experiment`` records the workspace
(params.yaml, dvc.lock, the metrics and plots it names, metrics/gate.json) as an experiment ref with
``dvc exp save -n NAME``: the branch and the workspace stay as they are. With a git remote, the ref is
pushed with ``dvc exp push`` (the DVC remote already holds the outputs). The run's lineage then names
the experiment and its commit, so the MLflow run and the registered version carry both as tags.
"""

from __future__ import annotations

import logging
import os
import re
import secrets
from datetime import UTC, datetime
from pathlib import Path

from loraops.lineage import versioning
from loraops.lineage.versioning import DVC_LOCK_WAIT_S, VersioningError
from loraops.names import DVC_LOCK_FILE
from loraops.results import Lineage

log = logging.getLogger(__name__)

_EXPS_NAMESPACE = "refs/exps"
# Used only when git has no identity configured: `dvc exp save` makes a commit, and a run must not fail for that.
_FALLBACK_IDENTITY = {"name": "loraops", "email": "loraops@localhost"}


def experiment_name(run_name: str | None = None, when: datetime | None = None) -> str:
    """``<run name>-YYYYMMDD-HHMMSS`` (UTC), a valid git ref name; without a run name ``retrain-…-<random id>``.

    A Prefect flow run's name and scheduled start are fixed for the run, so a retried task gets the same name.
    """
    when = (when or datetime.now(UTC)).astimezone(UTC)
    slug = re.sub(r"[^a-z0-9]+", "-", (run_name or "").lower()).strip("-")[:40]
    suffix = "" if slug else f"-{secrets.token_hex(3)}"
    return f"{slug or 'retrain'}-{when:%Y%m%d-%H%M%S}{suffix}"


def find_experiment(root: str | Path, name: str) -> str | None:
    """The commit of experiment ``name`` in this git repository (any baseline), or None."""
    refs = versioning.run_git(root, "for-each-ref", "--format=%(objectname) %(refname)", _EXPS_NAMESPACE)
    found = [line.split(" ", 1)[0] for line in refs.splitlines() if line.endswith(f"/{name}")]
    return found[0] if found else None


def git_remote(root: str | Path) -> str | None:
    """``origin`` if the checkout has it, else its first git remote, else None."""
    remotes = versioning.run_git(root, "remote").split()
    return "origin" if "origin" in remotes else (remotes[0] if remotes else None)


def save_experiment(
    root: str | Path, name: str, *, push: bool = True, lock_wait_s: float = DVC_LOCK_WAIT_S
) -> tuple[str, str] | None:
    """Save the workspace as DVC experiment ``name`` and push it; returns (name, commit), or None outside git.

    A retry finds the experiment it saved (same name, same dvc.lock) and only pushes it again; an
    experiment of that name recording another dvc.lock is an error, never overwritten.
    """
    root = Path(root)
    if versioning.git_state(root)[0] == versioning.UNKNOWN_COMMIT:
        log.warning("%s has no git commit: the run is not saved as a DVC experiment", root)
        return None
    rev = find_experiment(root, name)
    if rev is None:
        versioning.run_dvc(
            root,
            "exp",
            "save",
            "--name",
            name,
            what=f"dvc exp save --name {name}",
            env=_git_identity_env(root),
            lock_wait_s=lock_wait_s,
        )
        rev = find_experiment(root, name)
        if rev is None:
            raise VersioningError(f"dvc exp save --name {name} reported success but no ref ends in /{name} in {root}")
        log.info("saved DVC experiment %s (%s): `dvc exp show` lists it", name, rev[:12])
    else:
        _check_same_lock(root, name, rev)
    remote = git_remote(root) if push else None
    if remote:
        versioning.run_dvc(
            root, "exp", "push", remote, name, what=f"dvc exp push {remote} {name}", lock_wait_s=lock_wait_s
        )
        log.info("pushed DVC experiment %s to git remote '%s'", name, remote)
    return name, rev


def _check_same_lock(root: Path, name: str, rev: str) -> None:
    try:
        saved = versioning.git_show(root, rev, DVC_LOCK_FILE)
    except VersioningError:
        saved = None
    if saved != (root / DVC_LOCK_FILE).read_text():
        raise VersioningError(
            f"a DVC experiment named {name} already exists in {root} ({rev[:12]}) and records another dvc.lock: "
            f"remove it with `dvc exp remove {name}` or run again (each run gets a new name)"
        )
    log.info("DVC experiment %s already saved (%s): reusing it", name, rev[:12])


def _git_identity_env(root: Path) -> dict[str, str]:
    """The environment for a command that commits: git's own identity if configured, else loraops'."""
    env = dict(os.environ)
    for key in ("name", "email"):
        try:
            configured = versioning.run_git(root, "config", f"user.{key}")
        except VersioningError:  # `git config` exits 1 when the key is unset
            configured = ""
        if not configured:
            for role in ("AUTHOR", "COMMITTER"):
                env.setdefault(f"GIT_{role}_{key.upper()}", _FALLBACK_IDENTITY[key])
    return env


def with_experiment(lineage: Lineage, saved: tuple[str, str] | None) -> Lineage:
    """The lineage naming the run's experiment (unchanged when none was saved)."""
    if saved is None:
        return lineage
    name, rev = saved
    return lineage.model_copy(update={"dvc_experiment": name, "dvc_experiment_rev": rev})


def reproduce_commands(name: str) -> str:
    """What the model card tells a user to run to get this version back with DVC alone."""
    return f"dvc exp apply {name} && dvc pull && dvc repro"
