"""Content hashes of adapter files: recorded at registration, checked wherever an adapter is loaded.

A registered version's ``loraops.adapter_sha256`` tag holds a JSON map, file path (relative to the
adapter folder) -> sha256, of every file registered. ``download_verified`` is the one way loraops
fetches a registered adapter (generate, export, promote, rollback, the gate's champion, reproduce):
it refuses files that differ from the map, are missing or were added, and any ``*.safetensors`` or
``adapter_config.json`` that cannot be read, naming model, version and file. There is no override:
a version whose files changed is not the version that passed the gate. Versions registered before
the tag existed still load, with a warning, after the readability check.

The workspace adapter is checked too: after ``version_outputs`` dvc.lock records its md5, and
``check_workspace_adapter`` refuses to register a folder that no longer matches it.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING

import yaml

from loraops.names import ADAPTER_SHA256_TAG, DVC_LOCK_FILE

if TYPE_CHECKING:
    from mlflow.entities.model_registry import ModelVersion

    from mlflow import MlflowClient

logger = logging.getLogger(__name__)

_RESTORE = (
    "The registry's copy was changed after registration (another version's file copied over it, or corruption), "
    "so loraops will not load, serve, promote or export it, and there is no override. Restore the original "
    "files: check out the version's commit (tag loraops.git_commit) and `dvc pull` the adapter folder its "
    "dvc.lock records (run artifact lineage/dvc.lock), then copy them back to {source}; or promote another version"
)


class AdapterIntegrityError(RuntimeError):
    """An adapter's files are not the files that were recorded, or cannot be read."""


# --- recording ----------------------------------------------------------------------------------


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def adapter_digests(folder: str | Path) -> dict[str, str]:
    """sha256 of every file under ``folder``, keyed by its POSIX path relative to ``folder``."""
    folder = Path(folder)
    return {
        path.relative_to(folder).as_posix(): file_sha256(path) for path in sorted(folder.rglob("*")) if path.is_file()
    }


def digest_tags(folder: str | Path) -> dict[str, str]:
    """The version tag that records ``folder``'s content (a short JSON map, readable in the MLflow UI)."""
    return {ADAPTER_SHA256_TAG: json.dumps(adapter_digests(folder), sort_keys=True)}


# --- checking -----------------------------------------------------------------------------------


def download_verified(client: MlflowClient, version: ModelVersion, destination: Path) -> Path:
    """Download ``version``'s adapter into ``destination`` and verify it; returns the adapter folder."""
    import mlflow.artifacts

    from loraops.registry.mlflow_model import adapter_folder, tracking_uri_set

    destination.mkdir(parents=True, exist_ok=True)
    with tracking_uri_set(client):  # a models:/m-… source resolves through the global URIs
        local = Path(mlflow.artifacts.download_artifacts(artifact_uri=version.source, dst_path=str(destination)))
    adapter = adapter_folder(local)  # an MLflow model holds it under artifacts/adapter/; an old version is the folder
    label = f"{version.name} version {version.version}"
    verify_adapter(adapter, version.tags, label, _RESTORE.format(source=version.source))
    return adapter


def verify_version(client: MlflowClient, version: ModelVersion) -> None:
    """Refuse ``version`` if its registered files changed since registration (downloads them to a temp folder)."""
    import tempfile

    with tempfile.TemporaryDirectory(prefix="loraops-verify-") as scratch:
        download_verified(client, version, Path(scratch))


def verify_adapter(folder: Path, tags: Mapping[str, str], label: str, remedy: str) -> None:
    """Check ``folder`` against the hashes in ``tags``, then that its weights and config can be read.

    ``label`` names the adapter (model and version) and ``remedy`` says what to do, in every refusal.
    """
    recorded = tags.get(ADAPTER_SHA256_TAG)
    if recorded is None:
        logger.warning(
            "%s carries no content hashes (no %s tag: made before loraops recorded them)", label, ADAPTER_SHA256_TAG
        )
    else:
        problems = digest_problems(_recorded_digests(recorded, label), adapter_digests(folder))
        if problems:
            raise AdapterIntegrityError(f"{label}: {'; '.join(problems)}. {remedy}")
    check_readable(folder, label)


def _recorded_digests(text: str, label: str) -> dict[str, str]:
    try:
        recorded = json.loads(text)
    except json.JSONDecodeError:
        recorded = None
    if not isinstance(recorded, dict) or not all(isinstance(value, str) for value in recorded.values()):
        raise AdapterIntegrityError(
            f"{label}: its {ADAPTER_SHA256_TAG} tag is not a JSON map of file -> sha256, so its files cannot be "
            "verified; the tag was edited after registration. Register the adapter again"
        )
    return recorded


def digest_problems(recorded: Mapping[str, str], actual: Mapping[str, str]) -> list[str]:
    """One phrase per file that differs, is missing or was added; empty when the contents match."""
    problems = []
    for name in sorted(recorded.keys() | actual.keys()):
        if name not in actual:
            problems.append(f"{name} is missing (it was registered with sha256 {recorded[name][:12]}…)")
        elif name not in recorded:
            problems.append(f"{name} was not part of the adapter when it was registered")
        elif recorded[name] != actual[name]:
            problems.append(
                f"{name} differs from the sha256 recorded at registration "
                f"(recorded {recorded[name][:12]}…, found {actual[name][:12]}…)"
            )
    return problems


def check_readable(folder: Path, label: str) -> None:
    """Every ``*.safetensors`` header and ``adapter_config.json`` parses (random bytes or a truncated file do not)."""
    from safetensors import SafetensorError, safe_open

    for path in sorted(folder.rglob("*.safetensors")):
        try:
            with safe_open(str(path), framework="pt") as handle:
                handle.keys()
        except (SafetensorError, OSError) as error:
            raise AdapterIntegrityError(
                f"{label}: {path.relative_to(folder).as_posix()} is not a readable safetensors file ({error}): "
                "it is corrupt or not a safetensors file. Restore the original adapter files (`dvc pull`) or "
                "register the adapter again"
            ) from None
    config = folder / "adapter_config.json"
    if config.is_file():
        try:
            json.loads(config.read_text())
        except (UnicodeDecodeError, json.JSONDecodeError) as error:
            raise AdapterIntegrityError(
                f"{label}: adapter_config.json is not valid JSON ({error}). Restore the original adapter files "
                "(`dvc pull`) or register the adapter again"
            ) from None


# --- the workspace adapter against dvc.lock -----------------------------------------------------


def check_workspace_adapter(root: Path, adapter_dir: str) -> None:
    """Refuse ``adapter_dir`` when it differs from the md5 dvc.lock records for it (no record: nothing to check).

    Hashes the folder the way DVC does (dvc-data, nothing written); call after ``version_outputs``.
    """
    recorded = _locked_md5(root / DVC_LOCK_FILE, adapter_dir)
    folder = root / adapter_dir
    if recorded is None or not folder.is_dir():
        return
    from dvc.repo import Repo
    from dvc_data.hashfile.build import build
    from dvc_data.hashfile.hash_info import HashInfo
    from dvc_data.hashfile.tree import Tree

    from loraops.lineage.versioning import _entries, _tree_difference

    with Repo(str(root)) as repo:
        odb = repo.cache.local
        _, _, obj = build(odb, str(folder), repo.fs, "md5", dry_run=True)
        if obj.hash_info.value == recorded:
            return
        detail = ""
        if isinstance(obj, Tree) and odb.exists(recorded):
            detail = _tree_difference(dict(_entries(Tree.load(odb, HashInfo("md5", recorded)))), dict(_entries(obj)))
    raise AdapterIntegrityError(
        f"{folder} differs from what {root / 'dvc.lock'} records for it (md5 {obj.hash_info.value}, recorded "
        f"{recorded}){detail}: the adapter changed after this run recorded it, so it is not the adapter that was "
        f"evaluated. Nothing was registered. Run `dvc checkout {adapter_dir}` to restore the recorded adapter, or "
        "rerun the retrain flow"
    )


def _locked_md5(lock: Path, out_path: str) -> str | None:
    if not lock.is_file():
        return None
    stages = (yaml.safe_load(lock.read_text()) or {}).get("stages") or {}
    wanted = Path(out_path).as_posix().rstrip("/")
    for stage in stages.values():
        for out in stage.get("outs") or []:
            if str(out.get("path", "")).rstrip("/") == wanted and out.get("md5"):
                return out["md5"]
    return None
