"""The dataset from a DVC data registry: refresh ``data.dvc`` before a run and say which version it holds.

``data.dvc`` made by ``dvc import REPO PATH -o data`` (a git + DVC repo of datasets) or by
``dvc import-url URL data`` is frozen: ``dvc repro`` never refreshes it, ``dvc update`` does. A plain
``dvc add data`` (the built-in chatterbot import) has no source to refresh from and is used as it is.
"""

from __future__ import annotations

import logging
from pathlib import Path

from loraops.lineage.versioning import DataVersion, VersioningError, read_data_version, run_dvc
from loraops.names import DATA_DVC_FILE

log = logging.getLogger(__name__)


class DataRegistryError(VersioningError):
    """The data import could not be refreshed; the message names data.dvc and what to do."""


def refresh_data(
    root: Path, rev: str | None = None, dvc_file: str = DATA_DVC_FILE, lock_wait_s: float = 120.0
) -> DataVersion:
    """``dvc update dvc_file [--rev REV]`` for an import; a plain ``dvc add`` is left as it is.

    ``rev`` (a registry branch, tag or commit) only applies to ``dvc import``: asking for one with any
    other data.dvc is refused, since no revision of that data exists to go to.
    """
    root = Path(root)
    before = read_data_version(root, dvc_file)
    if before.kind == "local":
        if rev:
            raise DataRegistryError(
                f"a data revision ('{rev}', data_rev / --data-rev) needs {root / dvc_file} made by "
                "`dvc import REPO PATH -o data`; this one was made by `dvc add data`: import from a data registry "
                "first, or leave data_rev empty"
            )
        log.info("data: %s (not an import, nothing to refresh)", before.describe())
        return before
    if rev and before.kind != "registry":
        raise DataRegistryError(
            f"a data revision ('{rev}') needs {root / dvc_file} made by `dvc import`; `dvc import-url` "
            f"data ({before.source}) has no revisions: leave data_rev empty"
        )
    args = ["update", dvc_file, *(["--rev", rev] if rev else [])]
    try:
        run_dvc(root, *args, lock_wait_s=lock_wait_s)
    except VersioningError as error:
        raise DataRegistryError(
            f"could not refresh {root / dvc_file} from {before.source}: {error}. Check that the registry is "
            "reachable and the revision exists (data_rev), or rerun"
        ) from error
    after = read_data_version(root, dvc_file).model_copy(update={"updated": False})
    after.updated = after.md5 != before.md5 or after.rev != before.rev
    log.info("data: %s (%s)", after.describe(), "updated" if after.updated else "unchanged")
    return after
