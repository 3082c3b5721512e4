"""Markdown summaries of stage results, for Prefect artifacts and the CLI's closing lines."""

from __future__ import annotations

from loraops.results import ContractReport, EvalMetrics, GateDecision, Registration


def contract_markdown(report: ContractReport) -> str:
    verdict = "passed" if report.passed else "FAILED"
    lines = [
        f"# Data contract {verdict}",
        f"Format `{report.format}`: {report.train_rows} train rows, {report.validation_rows} validation rows.",
        "",
        "| expectation | split | result | observed | threshold |",
        "|---|---|---|---|---|",
    ]
    for check in report.checks:
        result = "pass" if check.passed else ("warn" if check.severity == "warn" else "**fail**")
        lines.append(f"| {check.expectation} | {check.split} | {result} | {check.observed} | {check.threshold} |")
    return "\n".join(lines)


def evaluation_markdown(baseline: EvalMetrics, candidate: EvalMetrics, decision: GateDecision) -> str:
    verdict = "passed" if decision.passed else "FAILED"
    lines = [
        f"# Gate {verdict}",
        "| model | validation loss | perplexity | target tokens |",
        "|---|---|---|---|",
        f"| base | {baseline.loss:.4f} | {baseline.perplexity:.2f} | {baseline.tokens} |",
        f"| adapter | {candidate.loss:.4f} | {candidate.perplexity:.2f} | {candidate.tokens} |",
    ]
    if decision.champion_loss is not None:
        lines.append(f"| champion v{decision.champion_version} | {decision.champion_loss:.4f} | | |")
    lines += ["", *[f"- {reason}" for reason in decision.reasons]]
    return "\n".join(lines)


def registration_markdown(registration: Registration, tracking_url: str | None) -> str:
    if registration.version is None:
        body = f"Gate failed: MLflow run `{registration.run_id}` logged, nothing registered."
    else:
        aliases = ", ".join(f"`@{alias}`" for alias in registration.aliases) or "none"
        body = f"Registered `{registration.model_name}` version **{registration.version}** (aliases {aliases})."
    link = f"\n\nMLflow: {tracking_url}" if tracking_url else ""
    return f"# Registry\n{body}{link}"


def closing_lines(baseline: EvalMetrics, candidate: EvalMetrics, decision: GateDecision, registration: Registration) -> list[str]:
    """What `loraops retrain` and `make demo` print at the end."""
    lines = [
        f"baseline validation loss: {baseline.loss:.4f} (perplexity {baseline.perplexity:.2f})",
        f"adapter  validation loss: {candidate.loss:.4f} (perplexity {candidate.perplexity:.2f})",
        f"gate: {'PASSED' if decision.passed else 'FAILED'}",
        *[f"  - {reason}" for reason in decision.reasons],
    ]
    if registration.version is None:
        lines.append(f"registry: nothing registered (MLflow run {registration.run_id})")
    else:
        aliases = ", ".join(f"@{alias}" for alias in registration.aliases)
        lines.append(f"registry: {registration.model_name} version {registration.version} [{aliases}] (run {registration.run_id})")
    return lines
