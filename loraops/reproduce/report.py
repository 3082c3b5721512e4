"""The reproduction report: one row per check, the tensors compared, and the table the CLI and Prefect show."""

from __future__ import annotations

from pydantic import BaseModel


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
