"""The ``loraops plan`` command: which of LoRA/QLoRA, checkpointing and batch size fit in a GPU's memory."""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Annotated

import typer

from loraops.config import LoraopsConfig, config_from_dict
from loraops.names import PARAMS_FILE
from loraops.project.params_file import apply_overrides, load_config, parse_override
from loraops.train.memory import GIB
from loraops.train.plan import Plan, plan
from loraops.train.shape import format_gib, parse_memory_size, resolve_model_shape

ParamsOption = Annotated[Path, typer.Option("--params", "-p", help="The parameters file (DVC-tracked)")]
SetOption = Annotated[
    list[str] | None, typer.Option("--set", "-S", help="Override a params.yaml key, e.g. -S lora.r=8")
]


def add_commands(app: typer.Typer, exit_cleanly_on_user_error: Callable[[], AbstractContextManager]) -> None:
    @app.command("plan")
    def plan_command(
        gpu_memory: Annotated[
            str | None, typer.Option("--gpu-memory", help="e.g. 24GiB, 80G, 24576MiB (default: this machine's GPU)")
        ] = None,
        model: Annotated[
            str | None, typer.Option("--model", help="Hub id or local folder with config.json (default: model.base)")
        ] = None,
        seq_len: Annotated[
            int | None, typer.Option("--seq-len", min=1, help="Tokens per example (default: data.max_length)")
        ] = None,
        params: ParamsOption = Path(PARAMS_FILE),
        overrides: SetOption = None,
    ) -> None:
        """Estimate peak memory and choose LoRA or QLoRA and the largest batch that fits; print the -S overrides."""
        with exit_cleanly_on_user_error():
            cfg = _config(params, overrides)
            source = model or cfg.model.base
            shape = resolve_model_shape(source, params.resolve().parent / cfg.paths.base_model_dir, cfg.model.revision)
            memory = parse_memory_size(gpu_memory) if gpu_memory else _local_gpu_memory()
            chosen = plan(shape, memory, cfg, seq_len or cfg.data.max_length)
            extra = [f"model.base={source}"] if source != cfg.model.base else []
            typer.echo(format_plan(chosen, source, shape.parameters, extra))


def _config(params: Path, overrides: list[str] | None) -> LoraopsConfig:
    values = dict(parse_override(item) for item in overrides or [])
    return load_config(params, values) if params.exists() else config_from_dict(apply_overrides({}, values), "defaults")


def _local_gpu_memory() -> int:
    import torch

    from loraops.train.plan import device_memory_bytes

    if not torch.cuda.is_available():
        from loraops.cli.app import UserError

        raise UserError("no CUDA device on this machine: pass --gpu-memory SIZE, e.g. --gpu-memory 24GiB")
    return device_memory_bytes("cuda")


def format_plan(chosen: Plan, source: str, parameters: int, extra_overrides: list[str]) -> str:
    """The plan as text: the choice, the -S overrides, the estimate's breakdown and the options considered."""
    mode = "LoRA (bf16 base)" if chosen.mode == "lora" else f"QLoRA ({chosen.quant_mode} base)"
    lines = [
        f"memory plan for {source} ({parameters / 1e9:.2f} B parameters), sequence length {chosen.seq_len}",
        f"memory {format_gib(chosen.memory)}, usable {format_gib(chosen.usable)} "
        f"({chosen.headroom:.0%} kept free for allocator fragmentation and the estimate's error)",
        "",
        f"choice: {mode}, gradient checkpointing {'on' if chosen.gradient_checkpointing else 'off'}, "
        f"batch size {chosen.batch_size} (x {chosen.gradient_accumulation_steps} accumulation steps)",
        "use:    loraops retrain " + " ".join(f"-S {item}" for item in [*extra_overrides, *chosen.overrides]),
        "",
        f"estimated peak at batch {chosen.batch_size}:",
    ]
    rows = [(label, size) for label, size in chosen.estimate.rows() if size]
    width = max(len(label) for label, _ in rows)
    lines += [f"  {label:<{width}}  {size / GIB:7.2f} GiB" for label, size in rows]
    lines += [
        f"  {'total':<{width}}  {chosen.estimate.total / GIB:7.2f} GiB",
        "",
        "options considered (fastest first):",
    ]
    for option in chosen.alternatives:
        if option.batch_size:
            verdict = f"largest batch {option.batch_size} ({format_gib(option.estimate.total)})"
        else:
            verdict = option.note or f"does not fit: {format_gib(option.estimate.total)} at batch 1"
        marker = (
            "*"
            if option.mode == chosen.mode and option.gradient_checkpointing == chosen.gradient_checkpointing
            else " "
        )
        lines.append(f" {marker} {option.label:<44} {verdict}")
    return "\n".join(lines)
