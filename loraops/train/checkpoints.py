"""Checkpoints and resume: which run a checkpoint belongs to, the last complete one, and the saved adapter.

A rerun of an interrupted run with the same settings, base and tokens (its fingerprint) continues from
its last complete checkpoint; anything else in ``train.output_dir`` is cleared. The adapter is written
atomically, with sorted target modules so that equal adapters have equal bytes.
"""

from __future__ import annotations

import json
import logging
import re
import shutil
from pathlib import Path

from loraops.config import LoraopsConfig
from loraops.names import RUN_FILE
from loraops.results import BaseModelRef

logger = logging.getLogger(__name__)

_NOT_TRAJECTORY = {"resume", "output_dir", "save_steps", "save_total_limit"}  # settings that leave the weights alone


def run_fingerprint(
    cfg: LoraopsConfig,
    base: BaseModelRef,
    train_dataset,
    eval_dataset,
    device: str,
    init_adapter_dir: Path | None = None,
) -> str:
    """What decides the trajectory of a run: settings, base model, device, the exact tokens and the starting adapter.

    ``init_adapter_dir`` (train.init_from) counts by its files' content: a new champion is another run.
    """
    import hashlib

    settings = {
        "model": cfg.model.model_dump(mode="json"),
        "lora": cfg.lora.model_dump(mode="json"),
        "quant": cfg.quant.model_dump(mode="json"),
        "train": cfg.train.model_dump(mode="json", exclude=_NOT_TRAJECTORY),
        "eval": cfg.eval.model_dump(mode="json"),
        "max_length": cfg.data.max_length,
        "base": base.model_dump(mode="json", exclude={"path"}),
        "device": device,
    }
    digest = hashlib.sha256(json.dumps(settings, sort_keys=True).encode())
    for dataset in (train_dataset, eval_dataset):
        for column in ("input_ids", "labels"):
            for row in dataset[column]:
                digest.update(json.dumps(row, separators=(",", ":")).encode())
            digest.update(b"|")
    if init_adapter_dir is not None:
        for path in sorted(path for path in Path(init_adapter_dir).rglob("*") if path.is_file()):
            digest.update(path.relative_to(init_adapter_dir).as_posix().encode())
            digest.update(hashlib.sha256(path.read_bytes()).digest())
    return digest.hexdigest()[:24]


def prepare_checkpoint_dir(output_dir: Path, fingerprint: str, resume: bool) -> Path | None:
    """The checkpoint to resume from, or None after clearing checkpoints of other runs.

    Only a complete checkpoint of a run with the same fingerprint is resumed; anything else in
    ``output_dir`` named checkpoint-* is removed so it cannot mix into this run's rotation.
    """
    run_file = output_dir / RUN_FILE
    same_run = run_file.exists() and _read_fingerprint(run_file) == fingerprint
    checkpoint = last_complete_checkpoint(output_dir) if same_run and resume else None
    if checkpoint is None:
        remove_checkpoints(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    run_file.write_text(json.dumps({"fingerprint": fingerprint}) + "\n")
    return checkpoint


def last_complete_checkpoint(output_dir: Path) -> Path | None:
    """The newest checkpoint whose state files were all written (a kill mid-save leaves one incomplete)."""
    candidates = sorted(
        (path for path in output_dir.glob("checkpoint-*") if path.is_dir() and checkpoint_step(path) is not None),
        key=checkpoint_step,
        reverse=True,
    )
    for checkpoint in candidates:
        if _is_complete(checkpoint):
            return checkpoint
        logger.warning("%s is incomplete (interrupted while saving): skipped", checkpoint)
    return None


def _is_complete(checkpoint: Path) -> bool:
    required = ("adapter_model.safetensors", "optimizer.pt", "scheduler.pt", "trainer_state.json")
    if not all((checkpoint / name).is_file() for name in required) or not any(checkpoint.glob("rng_state*.pth")):
        return False
    try:  # written last by the trainer; a kill while writing it leaves broken JSON
        json.loads((checkpoint / "trainer_state.json").read_text())
    except ValueError:
        return False
    return True


def _read_fingerprint(run_file: Path) -> str | None:
    try:
        return json.loads(run_file.read_text()).get("fingerprint")
    except (ValueError, AttributeError):
        return None


def checkpoint_step(path: Path) -> int | None:
    match = re.fullmatch(r"checkpoint-(\d+)", path.name)
    return int(match.group(1)) if match else None


def save_adapter(model, tokenizer, adapter_dir: str | Path, accelerator=None) -> Path:
    """Write the adapter (adapter_config.json + adapter_model.safetensors) and tokenizer, replacing atomically.

    Everything is written to a sibling folder first, so a failure never leaves a half-written adapter.
    Under FSDP (``accelerator`` of an FSDP run) every rank takes part in gathering the full state dict,
    and only the main process writes it.
    """
    from accelerate.utils import DistributedType

    state_dict = None
    if accelerator is not None and accelerator.distributed_type == DistributedType.FSDP:
        accelerator.state.fsdp_plugin.set_state_dict_type("FULL_STATE_DICT")  # checkpoints may be sharded
        state_dict = accelerator.get_state_dict(model)  # a collective: every rank must call it
        model = accelerator.unwrap_model(model)
    if accelerator is None or accelerator.is_main_process:
        _write_adapter(model, tokenizer, Path(adapter_dir), state_dict)
    if accelerator is not None:
        accelerator.wait_for_everyone()
    return Path(adapter_dir)


def _write_adapter(model, tokenizer, adapter_dir: Path, state_dict: dict | None) -> None:
    staging = adapter_dir.with_name(f".{adapter_dir.name}.writing")
    previous = adapter_dir.with_name(f".{adapter_dir.name}.previous")
    for leftover in (staging, previous):
        shutil.rmtree(leftover, ignore_errors=True)
    staging.parent.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(staging, safe_serialization=True, state_dict=state_dict)  # None: the model's own
    _sort_target_modules(staging / "adapter_config.json")
    tokenizer.save_pretrained(staging)
    if adapter_dir.exists():
        adapter_dir.rename(previous)
    staging.rename(adapter_dir)
    shutil.rmtree(previous, ignore_errors=True)


def _sort_target_modules(config_path: Path) -> None:
    """peft writes target_modules from a set, in hash-seed order; sorted, equal adapters have equal bytes (DVC md5)."""
    config = json.loads(config_path.read_text())
    if isinstance(config.get("target_modules"), list):
        config["target_modules"] = sorted(config["target_modules"])
        config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def remove_checkpoints(output_dir: Path) -> None:
    """Only checkpoint-* folders are removed: output_dir may be a shared, durable volume."""
    for stale in output_dir.glob("checkpoint-*"):
        if stale.is_dir():
            shutil.rmtree(stale)
