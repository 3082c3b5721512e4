"""What the registry recorded for a version: its lineage tags and artifacts, checked before anything is rebuilt."""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path

import yaml
from pydantic import ValidationError

from loraops.config import PathsConfig
from loraops.lineage import versioning
from loraops.lineage.versioning import VersioningError
from loraops.names import (
    DATA_DVC_FILE,
    DATA_MD5_TAG,
    DVC_EXPERIMENT_REV_TAG,
    DVC_EXPERIMENT_TAG,
    DVC_LOCK_FILE,
    DVC_LOCK_MD5_TAG,
    GIT_COMMIT_TAG,
    GIT_DIRTY_TAG,
    LINEAGE_TAGS,
    LOCK_ARTIFACT,
    PARAMS_ARTIFACT,
)
from loraops.registry import versions as registry


class ReproduceError(RuntimeError):
    """The version cannot be rebuilt; the message says why and what to do. The user's checkout is untouched."""


@dataclass(frozen=True)
class RecordedVersion:
    """A registered version with its lineage tags and the dvc.lock and params.yaml its run logged."""

    model_name: str
    version: str
    run_id: str
    adapter_uri: str
    tags: dict[str, str]
    lock_text: str
    params_text: str

    @property
    def commit(self) -> str:
        return self.tags[GIT_COMMIT_TAG]

    @property
    def experiment(self) -> str | None:
        """The run's DVC experiment (versions registered before runs were saved as experiments have none)."""
        return self.tags.get(DVC_EXPERIMENT_TAG) or None

    @property
    def checkout(self) -> str:
        """The commit to rebuild from: the experiment's (it holds params.yaml and dvc.lock) or the code's."""
        return self.tags.get(DVC_EXPERIMENT_REV_TAG) or self.commit

    @property
    def data_md5(self) -> str:
        return self.tags[DATA_MD5_TAG]

    @property
    def lock(self) -> dict:
        return yaml.safe_load(self.lock_text) or {}

    @property
    def paths(self) -> PathsConfig:
        """Where the run wrote its adapter and metrics (``paths`` of its params.yaml)."""
        raw = (yaml.safe_load(self.params_text) or {}).get("paths") or {}
        try:
            return PathsConfig.model_validate(raw)
        except ValidationError:
            return PathsConfig()


def parse_version_ref(ref: str) -> tuple[str, str]:
    """``NAME/VERSION``, ``NAME@ALIAS`` or ``models:/NAME/VERSION`` -> (name, version or alias)."""
    text = ref.removeprefix("models:/").strip()
    name, separator, which = text.rpartition("@") if "@" in text else text.rpartition("/")
    if not separator or not name or not which:
        raise ReproduceError(
            f"{ref!r} is not a version: use NAME/VERSION (e.g. loraops-smollm2-chatterbot/3) or NAME@champion"
        )
    return name, which


def fetch_recorded_version(client, model_name: str, which: str) -> RecordedVersion:
    try:
        version = registry.get_version(client, model_name, which)
    except LookupError as error:
        raise ReproduceError(str(error)) from None
    tags = dict(version.tags)
    missing = [tag for tag in LINEAGE_TAGS if not tags.get(tag)]
    if missing:
        raise ReproduceError(
            f"{model_name} version {version.version} has no lineage tags ({', '.join(missing)} missing): it was not "
            "registered by the loraops retrain flow, so there is no commit, dvc.lock or data version to rebuild from"
        )
    return RecordedVersion(
        model_name=model_name,
        version=str(version.version),
        run_id=version.run_id,
        adapter_uri=version.source,
        tags=tags,
        lock_text=_run_artifact_text(client, version.run_id, LOCK_ARTIFACT, model_name, str(version.version)),
        params_text=_run_artifact_text(client, version.run_id, PARAMS_ARTIFACT, model_name, str(version.version)),
    )


def _run_artifact_text(client, run_id: str, path: str, model_name: str, version: str) -> str:
    import mlflow.artifacts
    from mlflow.exceptions import MlflowException

    with tempfile.TemporaryDirectory() as scratch:
        try:
            local = mlflow.artifacts.download_artifacts(
                run_id=run_id, artifact_path=path, dst_path=scratch, tracking_uri=client.tracking_uri
            )
            return Path(local).read_text()
        except (MlflowException, OSError) as error:
            raise ReproduceError(
                f"{model_name} version {version}: its run {run_id} has no artifact {path} ({error}); "
                "versions registered before lineage artifacts were logged cannot be reproduced"
            ) from None


def check_reproducible(recorded: RecordedVersion, root: Path, allow_dirty: bool) -> None:
    """Refuse, before anything is checked out, a version whose lineage cannot lead to a faithful rebuild."""
    label = f"{recorded.model_name} version {recorded.version}"
    if recorded.experiment:
        _check_experiment(recorded, root, label)
        return
    if recorded.commit == versioning.UNKNOWN_COMMIT:
        raise ReproduceError(f"{label} was trained outside a git repository (no commit recorded): nothing to check out")
    if recorded.tags[GIT_DIRTY_TAG] == "True" and not allow_dirty:
        raise ReproduceError(
            f"{label} was trained from uncommitted code ({GIT_DIRTY_TAG}=True): commit {recorded.commit[:12]} does "
            "not hold the code that ran, so a rebuild from it may differ. Pass --allow-dirty to rebuild from the "
            "commit anyway"
        )
    lock_md5 = _text_md5(recorded.lock_text)
    if lock_md5 != recorded.tags[DVC_LOCK_MD5_TAG]:
        raise ReproduceError(
            f"{label}: the logged {LOCK_ARTIFACT} has md5 {lock_md5} but the version records {DVC_LOCK_MD5_TAG}="
            f"{recorded.tags[DVC_LOCK_MD5_TAG]}: the lineage was altered, refusing to rebuild"
        )
    _check_commit_exists(root, recorded.commit, label)


def _check_experiment(recorded: RecordedVersion, root: Path, label: str) -> None:
    """The experiment's commit is here and holds the dvc.lock the version records (uncommitted code included)."""
    name, rev = recorded.experiment, recorded.checkout
    try:
        versioning.run_git(root, "rev-parse", "--show-toplevel")
    except VersioningError:
        raise ReproduceError(f"{root} is not a git repository: run reproduce in a clone of the project") from None
    try:
        lock_text = versioning.git_show(root, rev, DVC_LOCK_FILE)
    except VersioningError:
        raise ReproduceError(
            f"{label} is DVC experiment {name} (commit {rev[:12]}), which is not in the git repository at {root}: "
            f"fetch it with `dvc exp pull origin {name}` (or run reproduce where the run happened)"
        ) from None
    if _text_md5(lock_text) != recorded.tags[DVC_LOCK_MD5_TAG]:
        raise ReproduceError(
            f"{label}: the dvc.lock of DVC experiment {name} ({rev[:12]}) does not have the md5 the version records "
            f"({DVC_LOCK_MD5_TAG}={recorded.tags[DVC_LOCK_MD5_TAG]}): the lineage was altered, refusing to rebuild"
        )
    data_dvc = yaml.safe_load(versioning.git_show(root, rev, DATA_DVC_FILE)) or {}
    data_path = ((data_dvc.get("outs") or [{}])[0]).get("path", "data")
    check_lock_uses_data(recorded, data_path)


def check_lock_uses_data(recorded: RecordedVersion, data_path: str) -> None:
    used = {
        dep.get("md5")
        for stage in (recorded.lock.get("stages") or {}).values()
        for dep in stage.get("deps") or []
        if dep.get("path") == data_path
    }
    other = sorted(md5 for md5 in used if md5 != recorded.data_md5)
    if other:
        raise ReproduceError(
            f"{recorded.model_name} version {recorded.version} records {DATA_MD5_TAG}={recorded.data_md5} but its "
            f"dvc.lock used {data_path} = {', '.join(other)}: the lineage points at different data, refusing to rebuild"
        )


def _check_commit_exists(root: Path, commit: str, label: str) -> None:
    try:
        versioning.run_git(root, "rev-parse", "--show-toplevel")
    except VersioningError:
        raise ReproduceError(f"{root} is not a git repository: run reproduce in a clone of the project") from None
    try:
        versioning.run_git(root, "cat-file", "-e", f"{commit}^{{commit}}")
    except VersioningError:
        raise ReproduceError(
            f"commit {commit} recorded by {label} is not in the git repository at {root}: "
            f"fetch it (`git fetch origin {commit}`) or run reproduce in a clone that has it"
        ) from None


def _text_md5(text: str) -> str:
    import hashlib

    return hashlib.md5(text.encode()).hexdigest()


def download_registered_adapter(client, recorded: RecordedVersion, destination: Path) -> Path:
    """The registered adapter, checked against the hashes recorded at registration (else ReproduceError)."""
    from mlflow.exceptions import MlflowException

    from loraops.registry.integrity import AdapterIntegrityError, download_verified

    try:
        return download_verified(
            client, registry.get_version(client, recorded.model_name, recorded.version), destination
        )
    except (AdapterIntegrityError, LookupError) as error:  # changed files, or the version deleted meanwhile
        raise ReproduceError(str(error)) from None
    except (MlflowException, OSError) as error:
        raise ReproduceError(
            f"cannot download the registered adapter of {recorded.model_name} version {recorded.version} "
            f"from {recorded.adapter_uri}: {error}"
        ) from None
