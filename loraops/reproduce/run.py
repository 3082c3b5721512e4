"""Rebuild a registered adapter from its lineage and compare it with what the registry holds: the one call.

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

import tempfile
from pathlib import Path

from loraops.config import RegistryConfig
from loraops.registry.store import client_for
from loraops.reproduce.compare import compare_rebuild
from loraops.reproduce.recorded import (
    check_reproducible,
    download_registered_adapter,
    fetch_recorded_version,
    parse_version_ref,
)
from loraops.reproduce.report import ReproductionReport
from loraops.reproduce.worktree import pull_recorded_outputs, put_recorded_inputs, rebuild, recorded_worktree


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
            put_recorded_inputs(project, root, recorded)
            pull_recorded_outputs(project)
            rebuild(project, recorded.checkout)
            return compare_rebuild(recorded, project, registered_adapter, loss_tolerance, weight_tolerance)
