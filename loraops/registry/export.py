"""Merge an adapter into its base model, and prove the merge changed nothing that matters.

The equivalence check runs the probe prompts (``export.probe_prompts``, under the chat template)
through the adapter on its base, exactly as the adapter was evaluated, and through the merged model,
and compares the logits at every position. A plain LoRA adapter merged in float32 must agree within
``export.tolerance``. A QLoRA adapter is merged into a dequantised (full-precision) base, because
4-bit weights cannot absorb a LoRA update; the merged model then differs from the 4-bit model the
adapter was trained and evaluated on. That difference is reported as it is and checked against
``export.quantized_tolerance`` when that is set, next to the exactness of the merge itself
(``merge_max_abs_diff``, against the same adapter on the dequantised base, checked against
``export.tolerance``). The gap is large on small models: SmolLM2-135M under NF4 differs from its
dequantised weights by up to 26 logits (mean 4) on the probe prompts, so it is reported, not enforced,
by default.
"""

from __future__ import annotations

import gc
import json
import logging
import shutil
from pathlib import Path

from pydantic import BaseModel

from loraops.config import ExportConfig, ModelConfig, QuantConfig
from loraops.names import EXPORT_MANIFEST
from loraops.train.adapters import AdapterSource, load_merged
from loraops.train.generate import chat_inputs

logger = logging.getLogger(__name__)


class EquivalenceReport(BaseModel):
    """How far the merged model's logits are from the adapter-on-base logits on the probe prompts."""

    passed: bool
    max_abs_diff: float  # against the adapter as evaluated (on the 4-bit base for QLoRA)
    mean_abs_diff: float
    tolerance: float | None  # None: reported, not enforced (QLoRA without export.quantized_tolerance)
    reference: str  # what max_abs_diff was measured against
    merge_max_abs_diff: float | None = None  # QLoRA: against the adapter on the dequantised base
    merge_tolerance: float | None = None
    probe_prompts: int
    probe_positions: int

    def summary(self) -> str:
        verdict = "passed" if self.passed else "FAILED"
        bound = f"tolerance {self.tolerance:.0e}" if self.tolerance is not None else "not enforced"
        text = (
            f"equivalence {verdict}: max |Δlogit| {self.max_abs_diff:.2e} (mean {self.mean_abs_diff:.2e}, "
            f"{bound}) against the {self.reference}, over {self.probe_positions} positions "
            f"of {self.probe_prompts} probe prompts"
        )
        if self.merge_max_abs_diff is not None:
            text += f"; the merge itself: {self.merge_max_abs_diff:.2e} (tolerance {self.merge_tolerance:.0e})"
        return text


class ExportMismatchError(RuntimeError):
    """The merged model does not reproduce the adapter's logits within tolerance."""

    def __init__(self, report: EquivalenceReport):
        super().__init__(
            f"{report.summary()}. Nothing was written. Raise export.tolerance (or export.quantized_tolerance "
            "for QLoRA) only if that difference is acceptable for serving, e.g. for a bfloat16 export"
        )
        self.report = report


def check_merge(
    source: AdapterSource,
    model_cfg: ModelConfig,
    export_cfg: ExportConfig,
    device: str,
    save_to: Path | None = None,
) -> EquivalenceReport:
    """Merge ``source`` into its base and compare logits; with ``save_to``, save and check the saved copy."""
    from loraops.train import base_model as modeling

    tokenizer = modeling.load_tokenizer(source.base, model_cfg)
    probes = [chat_inputs(tokenizer, prompt) for prompt in export_cfg.probe_prompts]
    as_evaluated = modeling.load_adapter_model(source.base, source.adapter_dir, model_cfg, source.quant, device)
    reference = probe_logits(as_evaluated, probes)
    merge_cfg = model_cfg.model_copy(update={"dtype": export_cfg.dtype})
    unmerged_reference = None
    if source.quant.enabled or modeling.resolve_dtype(model_cfg, device) != modeling.resolve_dtype(merge_cfg, device):
        del as_evaluated
        gc.collect()
        to_merge = modeling.load_adapter_model(
            source.base, source.adapter_dir, merge_cfg, QuantConfig(mode="none"), device
        )
        unmerged_reference = probe_logits(to_merge, probes) if source.quant.enabled else None
    else:
        to_merge = as_evaluated
    merged = to_merge.merge_and_unload()
    if save_to is not None:
        save_merged(merged, tokenizer, save_to)
        del merged
        gc.collect()
        merged, _ = load_merged(save_to, merge_cfg, device)
    report = compare(reference, probe_logits(merged, probes), unmerged_reference, source.quant, export_cfg)
    logger.info("%s", report.summary())
    return report


def probe_logits(model, probes: list[dict]):
    """Float32 logits at every position of every probe, concatenated into (positions, vocab)."""
    import torch

    device = next(model.parameters()).device
    model.eval()
    with torch.no_grad():
        rows = [
            model(**{key: value.to(device) for key, value in probe.items()}, use_cache=False).logits[0].float().cpu()
            for probe in probes
        ]
    return torch.cat(rows)


def compare(reference, merged, unmerged_reference, quant: QuantConfig, export_cfg: ExportConfig) -> EquivalenceReport:
    difference = (merged - reference).abs()
    tolerance = export_cfg.quantized_tolerance if quant.enabled else export_cfg.tolerance
    max_diff, mean_diff = difference.max().item(), difference.mean().item()
    passed = tolerance is None or max_diff <= tolerance
    merge_diff = None
    if unmerged_reference is not None:
        merge_diff = (merged - unmerged_reference).abs().max().item()
        passed = passed and merge_diff <= export_cfg.tolerance
    return EquivalenceReport(
        passed=passed,
        max_abs_diff=max_diff,
        mean_abs_diff=mean_diff,
        tolerance=tolerance,
        reference=f"adapter on the {quant.mode} 4-bit base" if quant.enabled else "adapter on the base model",
        merge_max_abs_diff=merge_diff,
        merge_tolerance=export_cfg.tolerance if merge_diff is not None else None,
        probe_prompts=len(export_cfg.probe_prompts),
        probe_positions=int(reference.shape[0]),
    )


def save_merged(merged, tokenizer, folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    merged.save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)


def export_merged(
    source: AdapterSource, model_cfg: ModelConfig, export_cfg: ExportConfig, target: Path, device: str
) -> EquivalenceReport:
    """Write the merged model (safetensors + tokenizer) to ``target`` only if the saved copy passes the check."""
    _check_target(target)
    staging = target.with_name(f".{target.name}.exporting")
    shutil.rmtree(staging, ignore_errors=True)
    try:
        report = check_merge(source, model_cfg, export_cfg, device, save_to=staging)
        if not report.passed:
            raise ExportMismatchError(report)
        _write_manifest(staging, source, export_cfg, report)
        shutil.rmtree(target, ignore_errors=True)
        staging.rename(target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    logger.info("merged model of %s written to %s", source.label, target)
    return report


def _check_target(target: Path) -> None:
    """Replace an earlier export, never a folder that holds something else."""
    if target.exists() and any(target.iterdir()) and not (target / EXPORT_MANIFEST).is_file():
        raise FileExistsError(f"{target} exists and is not a loraops export: choose an empty or new folder")


def _write_manifest(folder: Path, source: AdapterSource, export_cfg: ExportConfig, report: EquivalenceReport) -> None:
    manifest = {
        "source": source.label,
        "model_name": source.model_name,
        "version": source.version,
        "run_id": source.run_id,
        "base_model": source.base.source,
        "base_revision": source.base.revision,
        "quant_mode_in_training": source.quant.mode,
        "dtype": export_cfg.dtype,
        "equivalence": report.model_dump(),
    }
    (folder / EXPORT_MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
