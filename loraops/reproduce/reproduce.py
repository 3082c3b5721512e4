"""Rebuild a registered adapter from its lineage and compare it with what the registry holds.

A version's reproducibility key is its lineage. A version registered by a run that saved a DVC
experiment (``loraops.dvc_experiment`` / ``loraops.dvc_experiment_rev``) has it all in that commit:
code, params.yaml, dvc.lock and data.dvc as the run left them. Older versions have the git commit of
the code, plus the exact dvc.lock (``lineage/dvc.lock``, md5 in ``loraops.dvc_lock_md5``) and
params.yaml (``lineage/params.yaml``) as run artifacts and the data version (``loraops.data_md5``).

``reproduce_version`` checks out the experiment's commit (else the code's commit, with the recorded
dvc.lock and params.yaml put in) in a temporary ``git worktree`` (the user's checkout is never
written to), pulls the recorded data and
outputs from the DVC remote into the worktree's own cache (proving the remote holds them), runs
``dvc repro --force`` with the worktree's own code, and compares the rebuilt metrics and adapter
tensors with the registered ones. The worktree is removed afterwards, also on failure.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import yaml
from pydantic import BaseModel, ValidationError

from loraops.config import PathsConfig, RegistryConfig
from loraops.lineage import versioning
from loraops.lineage.experiments import EXPERIMENT_REV_TAG, EXPERIMENT_TAG
from loraops.lineage.versioning import VersioningError
from loraops.registry import versions
from loraops.registry.store import client_for
from loraops.results import EvalMetrics
from loraops.stages import ADAPTER_METRICS, BASELINE_METRICS

logger = logging.getLogger(__name__)

LOCK_ARTIFACT = "lineage/dvc.lock"
PARAMS_ARTIFACT = "lineage/params.yaml"
DATA_DVC_FILE = "data.dvc"
LINEAGE_TAGS = ("loraops.git_commit", "loraops.git_dirty", "loraops.data_md5", "loraops.dvc_lock_md5")
_ERROR_TAIL_LINES = 30  # of a failed dvc command: enough to see the stage's error, not the whole log


class ReproduceError(RuntimeError):
    """The version cannot be rebuilt; the message says why and what to do. The user's checkout is untouched."""


class Check(BaseModel):
    """One row of the comparison: ``passed`` None means reported only."""

    name: str
    registered: str
    rebuilt: str
    difference: str = ""
    passed: bool | None = None


class TensorDiff(BaseModel):
    file: str  # e.g. adapter_model.safetensors
    name: str
    shape: list[int] = []
    max_abs_diff: float | None = None  # None when the tensor could not be compared (see problem)
    problem: str = ""


class ReproductionReport(BaseModel):
    model_name: str
    version: str
    git_commit: str  # the commit the rebuild checked out: the experiment's when the version has one
    dvc_experiment: str | None = None
    dvc_lock_md5: str
    data_md5: str
    checks: list[Check]
    tensors: list[TensorDiff]

    @property
    def matched(self) -> bool:
        return all(check.passed is not False for check in self.checks)

    def differences(self) -> list[Check]:
        return [check for check in self.checks if check.passed is False]


class ReproductionMismatch(RuntimeError):
    """The rebuild ran but differs from the registered version (raised by the Prefect task)."""

    def __init__(self, report: ReproductionReport):
        self.report = report
        rows = "; ".join(f"{c.name}: registered {c.registered}, rebuilt {c.rebuilt}" for c in report.differences())
        super().__init__(f"{report.model_name} version {report.version} was not reproduced: {rows}")


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
        return self.tags["loraops.git_commit"]

    @property
    def experiment(self) -> str | None:
        """The run's DVC experiment (versions registered before runs were saved as experiments have none)."""
        return self.tags.get(EXPERIMENT_TAG) or None

    @property
    def checkout(self) -> str:
        """The commit to rebuild from: the experiment's (it holds params.yaml and dvc.lock) or the code's."""
        return self.tags.get(EXPERIMENT_REV_TAG) or self.commit

    @property
    def data_md5(self) -> str:
        return self.tags["loraops.data_md5"]

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


# --- the one call -----------------------------------------------------------------------------


def reproduce_version(
    root: str | Path,
    registry_cfg: RegistryConfig,
    ref: str,
    *,
    allow_dirty: bool = False,
    loss_tolerance: float = 1e-4,
    weight_tolerance: float | None = None,
) -> ReproductionReport:
    """Rebuild ``ref`` (``NAME/VERSION`` or ``NAME@ALIAS``) from its lineage and compare it with the registry.

    Raises ``ReproduceError`` when the version cannot be rebuilt (unknown, no lineage, uncommitted
    code without ``allow_dirty``, commit or remote objects missing, a stage failing). A rebuild
    that differs returns a report whose ``matched`` is False.
    """
    root = Path(root).resolve()
    client = client_for(registry_cfg, root)
    model_name, which = parse_version_ref(ref)
    with tempfile.TemporaryDirectory(prefix="loraops-reproduce-") as scratch:
        recorded = fetch_recorded_version(client, model_name, which)
        check_reproducible(recorded, root, allow_dirty)
        registered_adapter = download_registered_adapter(client, recorded, Path(scratch) / "registered")
        with recorded_worktree(root, recorded.checkout, Path(scratch) / "worktree") as project:
            if recorded.experiment:
                _use_users_remotes(project, root)  # params.yaml, dvc.lock and data.dvc are in the commit
                untrack_outputs(project)
            else:
                restore_recorded_inputs(project, root, recorded)
            pull_recorded_outputs(project)
            rebuild(project, recorded.checkout)
            return compare_rebuild(recorded, project, registered_adapter, loss_tolerance, weight_tolerance)


def parse_version_ref(ref: str) -> tuple[str, str]:
    """``NAME/VERSION``, ``NAME@ALIAS`` or ``models:/NAME/VERSION`` -> (name, version or alias)."""
    text = ref.removeprefix("models:/").strip()
    name, separator, which = text.rpartition("@") if "@" in text else text.rpartition("/")
    if not separator or not name or not which:
        raise ReproduceError(
            f"{ref!r} is not a version: use NAME/VERSION (e.g. loraops-smollm2-chatterbot/3) or NAME@champion"
        )
    return name, which


# --- what the registry recorded ---------------------------------------------------------------


def fetch_recorded_version(client, model_name: str, which: str) -> RecordedVersion:
    try:
        version = versions.get_version(client, model_name, which)
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
    if recorded.tags["loraops.git_dirty"] == "True" and not allow_dirty:
        raise ReproduceError(
            f"{label} was trained from uncommitted code (loraops.git_dirty=True): commit {recorded.commit[:12]} does "
            "not hold the code that ran, so a rebuild from it may differ. Pass --allow-dirty to rebuild from the "
            "commit anyway"
        )
    lock_md5 = _text_md5(recorded.lock_text)
    if lock_md5 != recorded.tags["loraops.dvc_lock_md5"]:
        raise ReproduceError(
            f"{label}: the logged {LOCK_ARTIFACT} has md5 {lock_md5} but the version records loraops.dvc_lock_md5="
            f"{recorded.tags['loraops.dvc_lock_md5']}: the lineage was altered, refusing to rebuild"
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
        lock_text = versioning.git_show(root, rev, "dvc.lock")
    except VersioningError:
        raise ReproduceError(
            f"{label} is DVC experiment {name} (commit {rev[:12]}), which is not in the git repository at {root}: "
            f"fetch it with `dvc exp pull origin {name}` (or run reproduce where the run happened)"
        ) from None
    if _text_md5(lock_text) != recorded.tags["loraops.dvc_lock_md5"]:
        raise ReproduceError(
            f"{label}: the dvc.lock of DVC experiment {name} ({rev[:12]}) does not have the md5 the version records "
            f"(loraops.dvc_lock_md5={recorded.tags['loraops.dvc_lock_md5']}): the lineage was altered, refusing to rebuild"
        )
    data_dvc = yaml.safe_load(versioning.git_show(root, rev, DATA_DVC_FILE)) or {}
    data_path = ((data_dvc.get("outs") or [{}])[0]).get("path", "data")
    _check_lock_uses_data(recorded, data_path)


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
            client, versions.get_version(client, recorded.model_name, recorded.version), destination
        )
    except (AdapterIntegrityError, LookupError) as error:  # changed files, or the version deleted meanwhile
        raise ReproduceError(str(error)) from None
    except (MlflowException, OSError) as error:
        raise ReproduceError(
            f"cannot download the registered adapter of {recorded.model_name} version {recorded.version} "
            f"from {recorded.adapter_uri}: {error}"
        ) from None


# --- the worktree -----------------------------------------------------------------------------


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


def restore_recorded_inputs(project: Path, root: Path, recorded: RecordedVersion) -> None:
    """Put the run's dvc.lock, params.yaml and data version in the worktree; point its remotes where the user's do."""
    (project / "dvc.lock").write_text(recorded.lock_text)
    (project / "params.yaml").write_text(recorded.params_text)
    data_path = _point_data_at(project / DATA_DVC_FILE, recorded.data_md5)
    _check_lock_uses_data(recorded, data_path)
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


def _check_lock_uses_data(recorded: RecordedVersion, data_path: str) -> None:
    used = {
        dep.get("md5")
        for stage in (recorded.lock.get("stages") or {}).values()
        for dep in stage.get("deps") or []
        if dep.get("path") == data_path
    }
    other = sorted(md5 for md5 in used if md5 != recorded.data_md5)
    if other:
        raise ReproduceError(
            f"{recorded.model_name} version {recorded.version} records loraops.data_md5={recorded.data_md5} but its "
            f"dvc.lock used {data_path} = {', '.join(other)}: the lineage points at different data, refusing to rebuild"
        )


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
    lock = yaml.safe_load((project / "dvc.lock").read_text()) or {}
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


# --- the comparison ---------------------------------------------------------------------------


def compare_rebuild(
    recorded: RecordedVersion,
    project: Path,
    registered_adapter: Path,
    tolerance: float,
    weight_tolerance: float | None,
) -> ReproductionReport:
    paths = recorded.paths
    adapter_metrics = project / paths.metrics_dir / ADAPTER_METRICS
    baseline_metrics = project / paths.metrics_dir / BASELINE_METRICS
    tensors = compare_adapters(project / paths.adapter_dir, registered_adapter)
    rebuilt_lock = yaml.safe_load((project / "dvc.lock").read_text()) or {}
    tags = recorded.tags
    checks = [
        loss_check("adapter validation loss", tags.get(versions.VAL_LOSS_TAG), adapter_metrics, tolerance),
        loss_check("baseline validation loss", tags.get(versions.BASELINE_LOSS_TAG), baseline_metrics, tolerance),
        tokens_check(tags.get("loraops.val_tokens"), adapter_metrics),
        tensors_check(tensors, weight_tolerance),
        inputs_check(recorded.lock, rebuilt_lock),
        outputs_check(recorded.lock, rebuilt_lock),
    ]
    return ReproductionReport(
        model_name=recorded.model_name,
        version=recorded.version,
        git_commit=recorded.checkout,
        dvc_experiment=recorded.experiment,
        dvc_lock_md5=recorded.tags["loraops.dvc_lock_md5"],
        data_md5=recorded.data_md5,
        checks=checks,
        tensors=tensors,
    )


def loss_check(name: str, registered: str | None, metrics_file: Path, tolerance: float) -> Check:
    rebuilt = EvalMetrics.read_json(metrics_file).loss if metrics_file.exists() else None
    if registered in (None, "") or rebuilt is None:
        return Check(name=name, registered=registered or "missing", rebuilt=_fmt(rebuilt), passed=False)
    try:
        difference = abs(float(registered) - rebuilt)
    except ValueError:
        return Check(name=name, registered=registered, rebuilt=_fmt(rebuilt), difference="not a number", passed=False)
    return Check(
        name=name,
        registered=_fmt(float(registered)),
        rebuilt=_fmt(rebuilt),
        difference=f"{difference:.2e} (tolerance {tolerance:g})",
        passed=difference <= tolerance,
    )


def tokens_check(registered: str | None, metrics_file: Path) -> Check:
    rebuilt = EvalMetrics.read_json(metrics_file).tokens if metrics_file.exists() else None
    return Check(
        name="validation target tokens",
        registered=registered or "missing",
        rebuilt="missing" if rebuilt is None else str(rebuilt),
        passed=registered is not None and str(rebuilt) == registered,
    )


def tensors_check(tensors: list[TensorDiff], weight_tolerance: float | None) -> Check:
    problems = [t for t in tensors if t.problem]
    compared = [t for t in tensors if t.max_abs_diff is not None]
    worst = max(compared, key=lambda t: t.max_abs_diff, default=None)
    largest = worst.max_abs_diff if worst else None
    within = weight_tolerance is None or (largest is not None and largest <= weight_tolerance)
    limit = "reported only" if weight_tolerance is None else f"tolerance {weight_tolerance:g}"
    difference = f"max |diff| {largest:.2e} ({limit})" if largest is not None else ""
    if problems:
        difference = f"{len(problems)} tensor(s) missing or reshaped; {difference}".rstrip("; ")
    return Check(
        name=f"adapter tensors ({len(compared)} compared)",
        registered=f"{sum(t.problem != 'missing in registered adapter' for t in tensors)} tensors",
        rebuilt=f"{sum(t.problem != 'missing in rebuilt adapter' for t in tensors)} tensors",
        difference=difference,
        passed=not problems and bool(compared) and within,
    )


def compare_adapters(rebuilt: Path, registered: Path) -> list[TensorDiff]:
    """Per tensor of every ``*.safetensors`` file: max absolute difference, or why it cannot be compared."""
    files = sorted(
        {
            path.relative_to(folder).as_posix()
            for folder in (rebuilt, registered)
            for path in folder.rglob("*.safetensors")
        }
    )
    if not files:
        return [TensorDiff(file="*.safetensors", name="*", problem="no adapter weights in either adapter")]
    diffs: list[TensorDiff] = []
    for file in files:
        diffs.extend(_compare_tensor_file(rebuilt / file, registered / file, file))
    return diffs


def _compare_tensor_file(rebuilt: Path, registered: Path, file: str) -> list[TensorDiff]:
    from safetensors.torch import load_file

    for path, side in ((rebuilt, "rebuilt"), (registered, "registered")):
        if not path.exists():
            return [TensorDiff(file=file, name="*", problem=f"missing in {side} adapter")]
    ours, theirs = load_file(str(rebuilt)), load_file(str(registered))
    diffs = []
    for name in sorted(ours.keys() | theirs.keys()):
        if name not in theirs or name not in ours:
            side = "registered" if name not in theirs else "rebuilt"
            diffs.append(TensorDiff(file=file, name=name, problem=f"missing in {side} adapter"))
            continue
        a, b = ours[name], theirs[name]
        if a.shape != b.shape:
            problem = f"shape {list(a.shape)} vs registered {list(b.shape)}"
            diffs.append(TensorDiff(file=file, name=name, shape=list(a.shape), problem=problem))
            continue
        largest = (a.float() - b.float()).abs().max().item() if a.numel() else 0.0
        diffs.append(TensorDiff(file=file, name=name, shape=list(a.shape), max_abs_diff=largest))
    return diffs


def inputs_check(recorded_lock: dict, rebuilt_lock: dict) -> Check:
    """Data, code and params the rebuild used, as its dvc.lock records them, against the recorded dvc.lock."""
    recorded, rebuilt = lock_inputs(recorded_lock), lock_inputs(rebuilt_lock)
    differing = sorted(key for key in recorded.keys() | rebuilt.keys() if recorded.get(key) != rebuilt.get(key))
    return Check(
        name="inputs in dvc.lock (data, code, params)",
        registered=f"{len(recorded)} inputs",
        rebuilt=f"{len(rebuilt)} inputs",
        difference="identical" if not differing else "differ: " + ", ".join(differing),
        passed=not differing,
    )


def lock_inputs(lock: dict) -> dict[str, str]:
    """Deps no stage produces (data, code files) by md5, and every stage's params by value."""
    stages = lock.get("stages") or {}
    produced = {out.get("path") for stage in stages.values() for out in stage.get("outs") or []}
    inputs: dict[str, str] = {}
    for stage in stages.values():
        for dep in stage.get("deps") or []:
            if dep.get("path") not in produced:
                inputs[dep.get("path")] = str(dep.get("md5"))
        for params_file, values in (stage.get("params") or {}).items():
            for key, value in (values or {}).items():
                inputs[f"{params_file}:{key}"] = json.dumps(value, sort_keys=True)
    return inputs


def outputs_check(recorded_lock: dict, rebuilt_lock: dict) -> Check:
    """Reported only: outputs can embed the checkout's path, so byte identity is not required."""
    recorded, rebuilt = _lock_outputs(recorded_lock), _lock_outputs(rebuilt_lock)
    differing = sorted(path for path in recorded if rebuilt.get(path) != recorded[path])
    same = len(recorded) - len(differing)
    return Check(
        name="outputs byte-identical (md5 in dvc.lock)",
        registered=f"{len(recorded)} outputs",
        rebuilt=f"{same} identical",
        difference="" if not differing else "differ: " + ", ".join(differing),
        passed=None,
    )


def _lock_outputs(lock: dict) -> dict[str, str]:
    stages = (lock.get("stages") or {}).values()
    return {out.get("path"): str(out.get("md5")) for stage in stages for out in stage.get("outs") or []}


def _fmt(value: float | None) -> str:
    return "missing" if value is None else f"{value:.6f}"


# --- the table --------------------------------------------------------------------------------

_WORST_TENSORS = 5
_CELL = 48  # longer differences are printed under the table


def format_report(report: ReproductionReport) -> str:
    """The comparison table the CLI prints and the Prefect task shows as an artifact."""
    experiment = f" (DVC experiment {report.dvc_experiment})" if report.dvc_experiment else ""
    header = (
        f"{report.model_name} version {report.version}: rebuilt from commit {report.git_commit[:12]}{experiment}, "
        f"dvc.lock {report.dvc_lock_md5[:12]}, data {report.data_md5[:12]}"
    )
    rows = [("check", "registered", "rebuilt", "difference", "result")]
    notes = []
    for check in report.checks:
        difference = check.difference
        if len(difference) > _CELL:
            notes.append(f"{check.name}: {difference}")
            difference = "see below"
        rows.append((check.name, check.registered, check.rebuilt, difference, _RESULT[check.passed]))
    widths = [max(len(row[column]) for row in rows) for column in range(len(rows[0]))]
    lines = [header, ""] + ["  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip() for row in rows]
    lines += [""] * bool(notes) + notes + _tensor_lines(report.tensors)
    verdict = (
        "reproduced: the rebuild matches the registered version within tolerance"
        if report.matched
        else f"NOT reproduced: {len(report.differences())} check(s) differ"
    )
    return "\n".join([*lines, "", verdict])


_RESULT = {True: "ok", False: "DIFFERS", None: "info"}


def _tensor_lines(tensors: list[TensorDiff]) -> list[str]:
    """The tensors that differ most (none listed when all are identical) and those that could not be compared."""
    differing = [t for t in tensors if t.max_abs_diff]
    worst = sorted(differing, key=lambda t: -t.max_abs_diff)[:_WORST_TENSORS]
    problems = [t for t in tensors if t.problem]
    lines = [f"  {t.max_abs_diff:.3e}  {t.file}:{t.name} {tuple(t.shape)}" for t in worst]
    lines += [f"  {t.file}:{t.name}: {t.problem}" for t in problems]
    if not lines:
        return []
    title = f"tensors that differ ({len(differing)} of {len(tensors)}; largest |rebuilt - registered| first):"
    return ["", title, *lines]
