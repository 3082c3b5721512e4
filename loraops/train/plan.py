"""The memory plan and pre-flight: which LoRA/QLoRA setting and batch fit, and the check before training.

Both rest on ``loraops.train.memory``'s estimate. The plan tries options fastest first and keeps the
largest batch that fits; the pre-flight refuses configured settings that cannot fit, naming the
overrides that would. Pure Python: no torch, prefect or mlflow needed (torch only to ask a GPU its size).
"""

from __future__ import annotations

import logging
import math
import os
from typing import Literal

from pydantic import BaseModel, ValidationError

from loraops.config import ConfigError, LoraopsConfig
from loraops.results import BaseModelRef
from loraops.train.memory import Device, MemoryEstimate, estimate_for_config
from loraops.train.shape import ModelShape, format_gib, resolve_model_shape

log = logging.getLogger(__name__)

DEFAULT_HEADROOM = 0.10
MAX_BATCH_SIZE = 128


class MemoryPlanError(ConfigError):
    """The configured training cannot fit in the memory available; the message says what to change."""


Mode = Literal["lora", "qlora"]


class PlanOption(BaseModel):
    """One way of training considered by the plan."""

    mode: Mode
    gradient_checkpointing: bool
    batch_size: int | None  # the largest that fits; None when not even batch 1 fits
    estimate: MemoryEstimate  # at batch_size, or at batch 1 when nothing fits
    note: str = ""

    @property
    def label(self) -> str:
        name = "LoRA (bf16 base)" if self.mode == "lora" else "QLoRA (4-bit base)"
        return f"{name}, checkpointing {'on' if self.gradient_checkpointing else 'off'}"


class Plan(BaseModel):
    """What to train with: the fastest option that fits, at the largest batch that fits."""

    memory: int
    usable: int
    headroom: float
    seq_len: int
    device: Device
    mode: Mode
    quant_mode: str
    gradient_checkpointing: bool
    batch_size: int
    gradient_accumulation_steps: int
    estimate: MemoryEstimate
    alternatives: list[PlanOption]
    overrides: list[str]  # section.key=value, for -S


def _qlora_mode(cfg: LoraopsConfig) -> str:
    return cfg.quant.mode if cfg.quant.enabled else "nf4"


def _variant(cfg: LoraopsConfig, quant_mode: str, checkpointing: bool, batch: int | None = None) -> LoraopsConfig:
    """``cfg`` with other quantisation, checkpointing (of every layer) and batch size (not validated: see ``_refusal``)."""
    train = {"gradient_checkpointing": checkpointing, "checkpoint_every_n_layers": 1}
    train.update({"batch_size": batch} if batch else {})
    return cfg.model_copy(
        update={
            "quant": cfg.quant.model_copy(update={"mode": quant_mode}),
            "train": cfg.train.model_copy(update=train),
        }
    )


def _refusal(cfg: LoraopsConfig) -> str:
    """Why the config refuses this combination (e.g. DoRA on a 4-bit base), or an empty string."""
    try:
        LoraopsConfig.model_validate(cfg.model_dump(mode="json"))
    except ValidationError as error:
        return "; ".join(item["msg"].removeprefix("Value error, ") for item in error.errors())
    return ""


def _largest_batch(fits, limit: int) -> int | None:
    """The largest b in [1, limit] with fits(b), given fits is monotone (True up to some b)."""
    if not fits(1):
        return None
    low, high = 1, limit
    while low < high:
        middle = (low + high + 1) // 2
        low, high = (middle, high) if fits(middle) else (low, middle - 1)
    return low


def plan(
    shape: ModelShape,
    memory_bytes: int,
    base_cfg: LoraopsConfig,
    seq_len: int,
    *,
    device: Device = "cuda",
    headroom: float = DEFAULT_HEADROOM,
    max_batch_size: int = MAX_BATCH_SIZE,
) -> Plan:
    """Choose LoRA or QLoRA, checkpointing and the largest batch (≤ ``max_batch_size``) that fit.

    Options are tried fastest first (measured on the H200: LoRA without checkpointing, LoRA with it,
    then QLoRA); the first that fits at batch 1 wins. ``headroom`` of the memory is kept free for
    allocator fragmentation and the estimate's error. Raises MemoryPlanError, naming what to change,
    when not even QLoRA with checkpointing at batch 1 fits.
    """
    usable = int(memory_bytes * (1 - headroom))
    options = [
        _consider(shape, _variant(base_cfg, quant_mode, checkpointing), mode, usable, seq_len, device, max_batch_size)
        for mode, quant_mode in (("lora", "none"), ("qlora", _qlora_mode(base_cfg)))
        for checkpointing in (False, True)
    ]
    chosen = next((option for option in options if option.batch_size), None)
    if chosen is None:
        raise MemoryPlanError(_nothing_fits(shape, base_cfg, memory_bytes, usable, seq_len, device, headroom))
    return _make_plan(base_cfg, chosen, options, memory_bytes, usable, headroom, seq_len, device)


def _consider(
    shape: ModelShape, cfg: LoraopsConfig, mode: Mode, usable: int, seq_len: int, device: Device, max_batch_size: int
) -> PlanOption:
    """The largest batch at which ``cfg`` fits in ``usable`` bytes (None when not even batch 1 fits)."""

    def at(batch: int) -> MemoryEstimate:
        return estimate_for_config(
            shape, _variant(cfg, cfg.quant.mode, cfg.train.gradient_checkpointing, batch), device, seq_len
        )

    refusal = _refusal(cfg)
    batch = None if refusal else _largest_batch(lambda b: at(b).total <= usable, max_batch_size)
    return PlanOption(
        mode=mode,
        gradient_checkpointing=cfg.train.gradient_checkpointing,
        batch_size=batch,
        estimate=at(batch or 1),
        note=refusal,
    )


def _make_plan(
    base_cfg: LoraopsConfig,
    chosen: PlanOption,
    options: list[PlanOption],
    memory_bytes: int,
    usable: int,
    headroom: float,
    seq_len: int,
    device: Device,
) -> Plan:
    quant_mode = "none" if chosen.mode == "lora" else _qlora_mode(base_cfg)
    effective = base_cfg.train.batch_size * base_cfg.train.gradient_accumulation_steps
    accumulation = max(1, math.ceil(effective / chosen.batch_size))  # keep the configured examples per update
    overrides = [
        f"quant.mode={quant_mode}",
        f"train.gradient_checkpointing={'true' if chosen.gradient_checkpointing else 'false'}",
        f"train.batch_size={chosen.batch_size}",
        f"train.gradient_accumulation_steps={accumulation}",
    ]
    if base_cfg.train.checkpoint_every_n_layers != 1:  # the plan checkpoints all layers or none
        overrides.append("train.checkpoint_every_n_layers=1")
    if seq_len != base_cfg.data.max_length:
        overrides.append(f"data.max_length={seq_len}")
    return Plan(
        memory=memory_bytes,
        usable=usable,
        headroom=headroom,
        seq_len=seq_len,
        device=device,
        mode=chosen.mode,
        quant_mode=quant_mode,
        gradient_checkpointing=chosen.gradient_checkpointing,
        batch_size=chosen.batch_size,
        gradient_accumulation_steps=accumulation,
        estimate=chosen.estimate,
        alternatives=options,
        overrides=overrides,
    )


def _nothing_fits(
    shape: ModelShape, cfg: LoraopsConfig, memory_bytes: int, usable: int, seq_len: int, device: Device, headroom: float
) -> str:
    """Why nothing fits, and the three ways out: a shorter sequence, more memory, a smaller model."""
    smallest = _variant(cfg, _qlora_mode(cfg), checkpointing=True, batch=1)
    needed = estimate_for_config(shape, smallest, device, seq_len).total
    where = "GPU memory" if device == "cuda" else "RAM"
    ways = [
        f"more {where}: QLoRA with gradient checkpointing at batch 1 needs about {format_gib(needed / (1 - headroom))} "
        f"({format_gib(needed)} estimated + {headroom:.0%} headroom)"
    ]
    longest = _largest_batch(lambda n: estimate_for_config(shape, smallest, device, n).total <= usable, seq_len)
    if longest:
        ways.insert(0, f"a shorter sequence: data.max_length={longest} or less fits (QLoRA, checkpointing, batch 1)")
    ways.append("a smaller model (model.base)")
    lines = [
        f"no training setting fits in {format_gib(memory_bytes)} of {where} at sequence length {seq_len} "
        f"(usable {format_gib(usable)} after {headroom:.0%} headroom); even QLoRA with gradient checkpointing "
        f"at batch 1 needs {format_gib(needed)}. Change one of:"
    ]
    return "\n".join(lines + [f"  - {way}" for way in ways])


# --------------------------------------------------------------------------------------------------
# The pre-flight check


class MemoryCheck(BaseModel):
    """The pre-flight's verdict on the configured settings."""

    device: Device
    available: int  # GPU memory (total) or system RAM
    seq_len: int
    batch_size: int
    estimate: MemoryEstimate
    fits: bool

    def summary(self) -> str:
        where = "GPU memory" if self.device == "cuda" else "RAM"
        return (
            f"estimated peak {format_gib(self.estimate.total)} of {format_gib(self.available)} {where} "
            f"(batch {self.batch_size} x {self.seq_len} tokens)"
        )


def system_memory_bytes() -> int:
    """Physical RAM, from sysconf (no extra dependency)."""
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def device_memory_bytes(device: Device) -> int:
    """The budget of the pre-flight: the GPU's total memory, or the system RAM."""
    if device == "cpu":
        return system_memory_bytes()
    import torch

    free, total = torch.cuda.mem_get_info()
    if free < total * (1 - DEFAULT_HEADROOM):
        log.warning(
            "memory pre-flight: only %s of %s GPU memory is free (other processes?)",
            format_gib(free),
            format_gib(total),
        )
    return total


def check_memory(shape: ModelShape, cfg: LoraopsConfig, device: Device, available: int) -> MemoryCheck:
    """Refuse settings whose estimated peak exceeds ``available`` bytes, naming what to change.

    On CUDA the plan's headroom applies. On CPU nothing is refused: the estimate assumes every
    sequence at data.max_length (padding-free batches of real data are usually far shorter) and the
    operating system can page, so an estimate above the RAM is a warning with the same advice.
    """
    estimate = estimate_for_config(shape, cfg, device)
    limit = available if device == "cpu" else int(available * (1 - DEFAULT_HEADROOM))
    check = MemoryCheck(
        device=device,
        available=available,
        seq_len=cfg.data.max_length,
        batch_size=cfg.train.batch_size,
        estimate=estimate,
        fits=estimate.total <= limit,
    )
    if check.fits:
        log.info("memory pre-flight: %s", check.summary())
        return check
    every_n = cfg.train.checkpoint_every_n_layers
    current = (
        f"quant.mode={cfg.quant.mode}, train.batch_size={cfg.train.batch_size}, "
        f"train.gradient_checkpointing={str(cfg.train.gradient_checkpointing).lower()}, "
        f"{f'train.checkpoint_every_n_layers={every_n}, ' if every_n > 1 else ''}"
        f"data.max_length={cfg.data.max_length}"
    )
    problem = f"memory pre-flight: {check.summary()} does not fit with {current}"
    try:
        better = plan(
            shape,
            available,
            cfg,
            cfg.data.max_length,
            device=device,
            headroom=0.0 if device == "cpu" else DEFAULT_HEADROOM,
        )
    except MemoryPlanError as error:
        refusal = MemoryPlanError(f"{problem}.\n{error}")
    else:
        refusal = MemoryPlanError(
            f"{problem}; set {' '.join('-S ' + item for item in better.overrides)} "
            f"(estimated {format_gib(better.estimate.total)}; `loraops plan` explains)"
        )
    if device == "cpu":
        log.warning("%s (worst case: every sequence at data.max_length; continuing on CPU)", refusal)
        return check
    raise refusal


def check_base_model_memory(
    cfg: LoraopsConfig, base: BaseModelRef, device: Device, available: int | None = None
) -> MemoryCheck:
    """``check_memory`` for the prepared base model; ``available`` defaults to the GPU's memory or the RAM."""
    shape = resolve_model_shape(base.path, revision=base.revision)
    budget = device_memory_bytes(device) if available is None else available
    return check_memory(shape, cfg, device, budget)
