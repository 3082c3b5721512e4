"""The checks of a rebuild against the registered version: losses, tokens, adapter tensors, dvc.lock inputs and outputs."""

from __future__ import annotations

import json
from pathlib import Path

import yaml

from loraops.names import (
    ADAPTER_METRICS,
    BASELINE_LOSS_TAG,
    BASELINE_METRICS,
    DVC_LOCK_FILE,
    DVC_LOCK_MD5_TAG,
    VAL_LOSS_TAG,
    VAL_TOKENS_TAG,
)
from loraops.reproduce.recorded import RecordedVersion
from loraops.reproduce.report import Check, ReproductionReport, TensorDiff
from loraops.results import EvalMetrics


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
    rebuilt_lock = yaml.safe_load((project / DVC_LOCK_FILE).read_text()) or {}
    tags = recorded.tags
    checks = [
        loss_check("adapter validation loss", tags.get(VAL_LOSS_TAG), adapter_metrics, tolerance),
        loss_check("baseline validation loss", tags.get(BASELINE_LOSS_TAG), baseline_metrics, tolerance),
        tokens_check(tags.get(VAL_TOKENS_TAG), adapter_metrics),
        tensors_check(tensors, weight_tolerance),
        inputs_check(recorded.lock, rebuilt_lock),
        outputs_check(recorded.lock, rebuilt_lock),
    ]
    return ReproductionReport(
        model_name=recorded.model_name,
        version=recorded.version,
        git_commit=recorded.checkout,
        dvc_experiment=recorded.experiment,
        dvc_lock_md5=recorded.tags[DVC_LOCK_MD5_TAG],
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
