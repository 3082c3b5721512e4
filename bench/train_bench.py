"""Training speed: the seed recipes and the loraops training path, side by side in one run.

    .venv/bin/python bench/train_bench.py --mode smoke                      # tiny Llama on CPU (~30 s on 2 cores)
    python3 bench/train_bench.py --mode gpu --out $OUT/train_bench.json     # Llama-3.1-8B shape, one GPU
    ... --attn flex_attention --torch-compile                               # loraops rows: other kernels
    ... --checkpoint-every-n-layers 2                                       # loraops-qlora: checkpoint half the layers
    ... --write-benchmarks                                                  # also update BENCHMARKS.md

Model: a ``LlamaConfig`` shaped like Llama-3.1-8B with random bf16 weights made on the GPU (``gpu``),
or a tiny fp32 Llama on the CPU (``smoke``), saved once and loaded for every configuration through
``loraops.train.base_model.load_base_model`` (4-bit NF4 there for QLoRA, with loraops' CPU fix).
Data: random token sequences with log-normal lengths (median ~350, at most 2048 tokens; smoke:
median 24, at most 128), tokens drawn from a Zipf-like distribution, fixed seed, labels = input_ids.

Configurations (in this order):

* ``seed-qlora``     plain PEFT + TRL SFTTrainer as in the seed article: NF4, double quant, bf16
  compute, ``prepare_model_for_kbit_training``, checkpointing, padded batches of 2;
* ``loraops-qlora``  ``loraops.train.trainer.build_trainer_for_model``: NF4, lean preparation (embeddings,
  head and norms stay bf16: ``quant.upcast_non_quantized`` false), padding-free, checkpointing, Liger
  layer kernels when installed on CUDA, batches of 16;
* ``loraops-lora``   the same path without quantisation and without checkpointing, batches of 12
  (~6k tokens: the activations of ~12k would not fit an 80 GB card);
* ``seed-lora``      seed LoRA, bf16, padded batches of 4, no checkpointing;
* ``seed-lora-ckpt`` the same with gradient checkpointing.

Every row trains through TRL's SFTTrainer, so every row (seed rows too) computes the loss with TRL >= 1.16's
chunked LM head, which never builds the [tokens x vocab] logits. The loraops rows take ``--attn``
(``model.attn_implementation``; default: transformers' sdpa, which gives a padding-free batch a dense
block-diagonal mask; flex_attention and flash_attention_2 skip the masked blocks) and ``--torch-compile``
(``train.torch_compile``; off by default: compiling costs minutes of warm-up on the GPU); the loraops rows
that checkpoint take ``--checkpoint-every-n-layers`` (``train.checkpoint_every_n_layers``; default 1, every layer).

Each configuration trains ``warmup + steps`` optimizer steps over exactly one epoch of its own
``(warmup + steps) × batch`` examples (a prefix of one shared pool), so the real tokens counted in
the batches that reached the model must equal the tokens of its dataset (``tokens_check``).
Non-padding tokens/s counts only the steps after the warm-up, between two synchronised clock
readings. Peak memory is ``torch.cuda.max_memory_allocated`` during training (reset after loading);
on the CPU the process RSS is sampled during training instead (it includes memory earlier
configurations left to the allocator, so it is not comparable across rows).
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import platform
import shutil
import statistics
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:  # run as a script from a checkout: loraops is the package next to bench/
    sys.path.insert(0, str(REPO))

BENCHMARKS = REPO / "BENCHMARKS.md"
BEGIN_MARK = "<!-- train-bench:begin -->"
END_MARK = "<!-- train-bench:end -->"
PEAK_BF16_TFLOPS = 790.0  # dense bf16 matmul measured on the lent H200 (8192³, random data)
LEARNING_RATE = 2e-4  # the seed article's; the same for every configuration
SEED = 42


@dataclass(frozen=True)
class Scale:
    """Model shape and length mix of a mode."""

    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    vocab: int
    median_length: int
    length_sigma: float
    max_length: int
    min_length: int
    dtype: str  # loraops ModelConfig.dtype
    device: str
    steps: int
    warmup_steps: int
    attn_implementation: str = "auto"  # loraops rows: model.attn_implementation
    torch_compile: bool = False  # loraops rows: train.torch_compile
    checkpoint_every_n_layers: int = 1  # loraops rows with checkpointing: train.checkpoint_every_n_layers


SCALES = {
    "gpu": Scale(4096, 14336, 32, 32, 8, 128256, 350, 0.8, 2048, 16, "bfloat16", "cuda", steps=20, warmup_steps=2),
    "smoke": Scale(64, 128, 2, 4, 2, 512, 24, 0.8, 128, 4, "float32", "cpu", steps=4, warmup_steps=2),
}


@dataclass(frozen=True)
class BenchConfig:
    name: str
    label: str
    path: str  # "seed" | "loraops"
    quant: bool
    checkpointing: bool
    batch_size: int
    padding_free: bool


CONFIGS = (
    BenchConfig("seed-qlora", "seed QLoRA NF4", "seed", True, True, 2, False),
    BenchConfig("loraops-qlora", "loraops QLoRA NF4", "loraops", True, True, 16, True),
    BenchConfig("loraops-lora", "loraops LoRA", "loraops", False, False, 12, True),
    BenchConfig("seed-lora", "seed LoRA", "seed", False, False, 4, False),
    BenchConfig("seed-lora-ckpt", "seed LoRA + checkpointing", "seed", False, True, 4, False),
)


# ------------------------------------------------------------------------------------------- data


def synthetic_lengths(count: int, scale: Scale, seed: int = SEED) -> list[int]:
    """Log-normal lengths around ``median_length``, clipped to [min_length, max_length]."""
    import numpy as np

    rng = np.random.default_rng(seed)
    raw = rng.lognormal(mean=math.log(scale.median_length), sigma=scale.length_sigma, size=count)
    return [int(x) for x in np.clip(np.rint(raw), scale.min_length, scale.max_length)]


def synthetic_dataset(lengths: list[int], vocab: int, seed: int = SEED):
    """``input_ids`` + ``labels`` (= input_ids) of random tokens from a Zipf-like distribution (ids 0-1 are special)."""
    import numpy as np
    from datasets import Dataset

    rng = np.random.default_rng(seed + 1)
    weights = 1.0 / np.arange(1, vocab - 1) ** 1.1
    probabilities = rng.permutation(weights / weights.sum())
    tokens = rng.choice(np.arange(2, vocab), size=sum(lengths), p=probabilities)
    rows, start = [], 0
    for length in lengths:
        rows.append(tokens[start : start + length].tolist())
        start += length
    return Dataset.from_dict({"input_ids": rows, "labels": rows})


def build_tokenizer(vocab: int):
    """A word-level tokenizer over ``vocab`` ids (0 = pad/eos, 1 = unk): all SFTTrainer needs for token data."""
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    table = {"<pad>": 0, "<unk>": 1, **{f"t{i}": i for i in range(2, vocab)}}
    tokenizer = Tokenizer(models.WordLevel(vocab=table, unk_token="<unk>"))
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token="<pad>", eos_token="<pad>", unk_token="<unk>")


# ------------------------------------------------------------------------------------------ model


def save_random_base(scale: Scale, directory: Path):
    """A random Llama of ``scale`` made on its device, saved once (safetensors) with its tokenizer."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from loraops.results import BaseModelRef

    config = LlamaConfig(
        vocab_size=scale.vocab,
        hidden_size=scale.hidden,
        intermediate_size=scale.intermediate,
        num_hidden_layers=scale.layers,
        num_attention_heads=scale.heads,
        num_key_value_heads=scale.kv_heads,
        max_position_embeddings=8192,
        rope_theta=500000.0,
        rms_norm_eps=1e-5,
        bos_token_id=0,
        eos_token_id=0,
        pad_token_id=0,
        tie_word_embeddings=False,
    )
    torch.manual_seed(SEED)
    with torch.device(scale.device):
        model = LlamaForCausalLM._from_config(config, dtype=getattr(torch, scale.dtype))
    model.save_pretrained(directory, safe_serialization=True)
    build_tokenizer(scale.vocab).save_pretrained(directory)
    del model
    free_memory()
    return BaseModelRef(source=str(directory), path=str(directory))


def load_model(ref, scale: Scale, quant: bool, attn_implementation: str = "auto"):
    """The base through loraops' own loader: NF4 + double quant + bf16 compute for QLoRA (seed and loraops alike)."""
    from loraops.config import ModelConfig, QuantConfig
    from loraops.train.base_model import load_base_model

    quant_cfg = QuantConfig(mode="nf4" if quant else "none", double_quant=True, compute_dtype="bfloat16")
    model_cfg = ModelConfig(base=ref.path, dtype=scale.dtype, attn_implementation=attn_implementation)
    return load_base_model(ref, model_cfg, quant_cfg, scale.device)


def free_memory() -> None:
    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def liger_available(device: str) -> bool:
    import importlib.util

    return device == "cuda" and importlib.util.find_spec("liger_kernel") is not None


# --------------------------------------------------------------------------------------- trainers


def seed_trainer(config: BenchConfig, model, tokenizer, dataset, scale: Scale, output_dir: Path):
    """The seed article's recipe: plain PEFT + TRL defaults, padded batches."""
    from peft import LoraConfig, prepare_model_for_kbit_training
    from trl import SFTConfig, SFTTrainer

    if config.quant:
        model = prepare_model_for_kbit_training(model)
    args = SFTConfig(
        output_dir=str(output_dir),
        per_device_train_batch_size=config.batch_size,
        gradient_checkpointing=config.checkpointing,
        max_length=scale.max_length,
        learning_rate=LEARNING_RATE,
        max_steps=scale.warmup_steps + scale.steps,
        logging_steps=1,
        save_strategy="no",
        bf16=scale.device == "cuda",
        use_cpu=scale.device == "cpu",
        seed=SEED,
        dataloader_num_workers=0,
        disable_tqdm=True,
        report_to=[],
    )
    lora = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05, target_modules="all-linear", task_type="CAUSAL_LM")
    return SFTTrainer(model=model, args=args, train_dataset=dataset, processing_class=tokenizer, peft_config=lora)


def loraops_config(config: BenchConfig, scale: Scale, ref, output_dir: Path, liger: bool = True):
    """A LoraopsConfig for one bench configuration: defaults, plus what the bench varies."""
    from loraops.config import DataConfig, EvalConfig, LoraopsConfig, ModelConfig, QuantConfig, TrainConfig

    steps = scale.warmup_steps + scale.steps
    return LoraopsConfig(
        model=ModelConfig(base=ref.path, dtype=scale.dtype, attn_implementation=scale.attn_implementation),
        data=DataConfig(max_length=scale.max_length),
        quant=QuantConfig(mode="nf4" if config.quant else "none"),
        train=TrainConfig(
            device=scale.device,
            learning_rate=LEARNING_RATE,
            max_steps=steps,
            batch_size=config.batch_size,
            gradient_checkpointing=config.checkpointing,
            checkpoint_every_n_layers=scale.checkpoint_every_n_layers if config.checkpointing else 1,
            padding_free=config.padding_free,
            use_liger_kernel=liger and liger_available(scale.device),
            torch_compile=scale.torch_compile,
            eval_steps=steps,  # one evaluation, after the measured steps
            early_stopping_patience=0,
            save_total_limit=1,
            seed=SEED,
            output_dir=str(output_dir),
        ),
        eval=EvalConfig(batch_size=2),
    )


def loraops_trainer(config: BenchConfig, model, tokenizer, dataset, scale: Scale, ref, output_dir: Path, liger: bool):
    from loraops.train.trainer import build_trainer_for_model

    cfg = loraops_config(config, scale, ref, output_dir, liger)
    eval_dataset = dataset.select(range(2))
    return build_trainer_for_model(cfg, model, tokenizer, dataset, eval_dataset, scale.device)


# ------------------------------------------------------------------------------------ measurement


def checkpointed_layers(model) -> int:
    """Decoder layers whose activations are recomputed in backward (transformers' per-layer flag)."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    return sum(bool(m.gradient_checkpointing) for m in model.modules() if isinstance(m, GradientCheckpointingLayer))


class RssSampler:
    """Highest resident set size of this process while running (sampled every 20 ms)."""

    def __init__(self) -> None:
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        page = os.sysconf("SC_PAGE_SIZE")
        while not self._stop.is_set():
            with open("/proc/self/statm") as handle:
                self.peak = max(self.peak, int(handle.read().split()[1]) * page)
            self._stop.wait(0.02)

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


class Meter:
    """Counts the tokens of every training forward and clocks each optimizer step.

    A forward pre-hook on the trained model sees the exact batch the model gets: real tokens are
    ``attention_mask.sum()`` in a padded batch, every token of a padding-free one.
    """

    def __init__(self, trainer, device: str) -> None:
        import torch

        self.device = device
        self.trainer = trainer  # train() replaces trainer.state: read it at each forward
        self.real: dict[int, int] = {}  # step index (0-based) -> real tokens
        self.slots: dict[int, int] = {}  # step index -> tokens + pad tokens
        self.step_end: dict[int, float] = {}  # global step (1-based) -> perf_counter after it
        self.peak_bytes = 0
        self._handle = trainer.model.register_forward_pre_hook(self._count, with_kwargs=True)
        self._torch = torch

    def _count(self, module, args, kwargs):
        if not module.training or not self._torch.is_grad_enabled():
            return
        input_ids = kwargs.get("input_ids", args[0] if args else None)
        mask = kwargs.get("attention_mask")
        step = self.trainer.state.global_step
        real = int(mask.sum()) if mask is not None else input_ids.numel()
        self.real[step] = self.real.get(step, 0) + real
        self.slots[step] = self.slots.get(step, 0) + input_ids.numel()

    def callback(self):
        from transformers import TrainerCallback

        meter = self

        class StepClock(TrainerCallback):
            def on_step_end(self, args, state, control, **kwargs):
                if meter.device == "cuda":
                    meter._torch.cuda.synchronize()
                    meter.peak_bytes = max(meter.peak_bytes, meter._torch.cuda.max_memory_allocated())
                meter.step_end[state.global_step] = time.perf_counter()

        return StepClock()

    def close(self) -> None:
        self._handle.remove()
        self.trainer = None


def run_config(
    config: BenchConfig, scale: Scale, ref, pool_lengths: list[int], pool, work_dir: Path, liger: bool = True
) -> dict:
    """Train one configuration and measure it; the model and trainer are freed before returning."""
    import torch

    steps = scale.warmup_steps + scale.steps
    examples = steps * config.batch_size
    dataset = pool.select(range(examples))
    tokenizer = build_tokenizer(scale.vocab)
    output_dir = work_dir / f"out-{config.name}"
    model = load_model(ref, scale, config.quant, scale.attn_implementation if config.path == "loraops" else "auto")
    if config.path == "seed":
        trainer = seed_trainer(config, model, tokenizer, dataset, scale, output_dir)
    else:
        trainer = loraops_trainer(config, model, tokenizer, dataset, scale, ref, output_dir, liger)
    meter = Meter(trainer, scale.device)
    trainer.add_callback(meter.callback())
    if scale.device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    trainable, total = trainer.model.get_nb_trainable_parameters()
    with RssSampler() as rss:
        trainer.train()
    meter.close()
    losses = [row["loss"] for row in trainer.state.log_history if "loss" in row]
    row = measured_row(config, scale, meter, losses, dataset_tokens=sum(pool_lengths[:examples]))
    row.update(
        trainable_params=trainable,
        total_params=total,
        liger=bool(getattr(trainer.args, "use_liger_kernel", False)),
        attn_implementation=trainer.model.config._attn_implementation,
        torch_compile=bool(trainer.args.torch_compile),
        checkpointed_layers=checkpointed_layers(trainer.model),
        upcast_non_quantized=config.quant and config.path == "seed",  # peft's prepare_model_for_kbit_training
        peak_rss_mib=round(rss.peak / 2**20, 1),
    )
    del trainer, model, meter
    free_memory()
    shutil.rmtree(output_dir, ignore_errors=True)
    return row


def measured_row(config: BenchConfig, scale: Scale, meter: Meter, losses: list[float], dataset_tokens: int) -> dict:
    warmup, last = scale.warmup_steps, scale.warmup_steps + scale.steps
    timed = range(warmup, last)  # step indices whose forward happened after the warm-up
    seconds = meter.step_end[last] - meter.step_end[warmup]
    step_seconds = [meter.step_end[s + 1] - meter.step_end[s] for s in timed]
    real_timed = sum(meter.real[s] for s in timed)
    real_all, slots_all = sum(meter.real.values()), sum(meter.slots.values())
    return {
        **asdict(config),
        "status": "ok",
        "steps_timed": scale.steps,
        "warmup_steps": warmup,
        "seconds_timed": seconds,
        "step_seconds_median": statistics.median(step_seconds),
        "real_tokens_timed": real_timed,
        "tokens_per_s": real_timed / seconds,
        "padding_share": 1 - real_all / slots_all,
        "real_tokens_all_steps": real_all,
        "slots_all_steps": slots_all,
        "dataset_tokens": dataset_tokens,
        "tokens_check": real_all == dataset_tokens,
        "peak_memory_gib": meter.peak_bytes / 2**30 if scale.device == "cuda" else None,
        "first_loss": losses[0] if losses else None,
        "final_loss": losses[-1] if losses else None,
        "losses": losses,
    }


# ----------------------------------------------------------------------------------------- report


def machine_info(device: str) -> dict:
    import importlib.metadata

    import torch

    versions = {}
    for dist in ("torch", "transformers", "peft", "trl", "accelerate", "bitsandbytes", "datasets", "liger-kernel"):
        try:
            versions[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            versions[dist] = None
    info = {
        "python": platform.python_version(),
        "cpu_count": os.cpu_count(),
        "cpu": _cpu_name(),
        "memory_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
        "versions": versions,
        "gpu": torch.cuda.get_device_name(0) if device == "cuda" else None,
        "load_average_at_start": round(os.getloadavg()[0], 2),
        "torch_threads": torch.get_num_threads(),
    }
    return info


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def four_n_limit(ref_config: dict) -> float:
    """Tokens/s at which LoRA's ~4N FLOPs per token (2N forward, 2N input gradients) fill the measured peak.

    N counts the parameters of the linear layers (projections and LM head); the embedding is a lookup.
    """
    h, i, layers, v = ref_config["hidden"], ref_config["intermediate"], ref_config["layers"], ref_config["vocab"]
    kv = h * ref_config["kv_heads"] // ref_config["heads"]
    per_layer = h * h * 2 + h * kv * 2 + 3 * h * i
    return PEAK_BF16_TFLOPS * 1e12 / (4 * (layers * per_layer + h * v))


def goal_ratios(rows: list[dict], scale: Scale) -> dict:
    by_name = {row["name"]: row for row in rows if row.get("status") == "ok"}
    ratios: dict = {}
    seed_q, ops_q, ops_l = by_name.get("seed-qlora"), by_name.get("loraops-qlora"), by_name.get("loraops-lora")
    if seed_q and ops_q:
        ratios["qlora_speedup"] = ops_q["tokens_per_s"] / seed_q["tokens_per_s"]
        if scale.device == "cuda":
            ratios["qlora_memory_ratio"] = ops_q["peak_memory_gib"] / seed_q["peak_memory_gib"]
    if scale.device == "cuda":
        limit = four_n_limit(asdict(scale))
        ratios["four_n_limit_tokens_per_s"] = limit
        if ops_l:
            ratios["lora_share_of_4n_limit"] = ops_l["tokens_per_s"] / limit
    return ratios


def render_markdown(result: dict) -> str:
    """The table for BENCHMARKS.md (between the train-bench marks)."""
    machine, scale = result["machine"], result["scale"]
    where = machine["gpu"] or f"{machine['cpu_count']}-core {machine['cpu']}, {machine['memory_gib']} GiB, no GPU"
    versions = ", ".join(f"{k} {v}" for k, v in machine["versions"].items() if v)
    kind = "GPU run" if result["mode"] == "gpu" else "CPU smoke run (checks the bench works; not a performance claim)"
    lines = [
        f"**{kind}**, {result['date']}: {where}, {machine['torch_threads']} torch thread(s); {versions}; load average "
        f"{machine['load_average_at_start']} at the start, {machine.get('load_average_at_end', '?')} at the end.",
        f"Model: Llama shape hidden {scale['hidden']}, {scale['layers']} layers, vocab {scale['vocab']}, "
        f"{scale['dtype']}; lengths log-normal, median {scale['median_length']}, max {scale['max_length']}; "
        f"{scale['steps']} timed steps after {scale['warmup_steps']} warm-up; LoRA r=16 all-linear, lr {LEARNING_RATE:g}.",
        "",
        f"Loss through TRL's chunked LM head in every row (no full logits); loraops rows: torch.compile "
        f"{'on' if scale.get('torch_compile') else 'off'}.",
        "",
        "| configuration | batch | ckpt | padding-free | Liger | fp32 upcast | attention | non-pad tok/s | padding share | peak memory | loss first → last | tokens check |",
        "|---|---:|:-:|:-:|:-:|:-:|:-:|---:|---:|---:|---|:-:|",
    ]
    for row in result["rows"]:
        if row.get("status") != "ok":
            lines.append(f"| {row['label']} | {row['batch_size']} | | | | | | {row['status']} | | | | |")
            continue
        memory = (
            f"{row['peak_memory_gib']:.1f} GiB"
            if row["peak_memory_gib"] is not None
            else f"RSS {row['peak_rss_mib']:.0f} MiB"
        )
        lines.append(
            f"| {row['label']} | {row['batch_size']} | {_checkpointing(row, scale)} | {_yes(row['padding_free'])} "
            f"| {_yes(row['liger'])} | {_yes(row['upcast_non_quantized']) if row['quant'] else ''} | {row['attn_implementation']} "
            f"| {row['tokens_per_s']:,.0f} | {row['padding_share']:.1%} | {memory} "
            f"| {row['first_loss']:.3f} → {row['final_loss']:.3f} | {'ok' if row['tokens_check'] else 'MISMATCH'} |"
        )
    ratios = result["ratios"]
    lines.append("")
    if "qlora_speedup" in ratios:
        goal = (
            "goal ≥ 2.0×"
            if result["mode"] == "gpu"
            else "the ≥ 2.0× goal is for the GPU run; on a tiny CPU model it means little"
        )
        lines.append(f"- loraops QLoRA ÷ seed QLoRA non-padding tokens/s: **{ratios['qlora_speedup']:.2f}×** ({goal})")
    if "qlora_memory_ratio" in ratios:
        lines.append(f"- loraops QLoRA ÷ seed QLoRA peak memory: **{ratios['qlora_memory_ratio']:.2f}×** (goal ≤ 0.5×)")
    if "lora_share_of_4n_limit" in ratios:
        lines.append(
            f"- loraops LoRA: **{ratios['lora_share_of_4n_limit']:.0%}** of the 4N limit "
            f"({ratios['four_n_limit_tokens_per_s']:,.0f} tok/s at {PEAK_BF16_TFLOPS:.0f} TFLOP/s; goal ≥ 60%)"
        )
    if result["mode"] == "smoke":
        lines.append(
            "- Smoke figures on a tiny model measure Python and framework overhead, not kernels; "
            "RSS is the process's, sampled during each configuration (later rows carry earlier ones' memory)."
        )
    return "\n".join(lines) + "\n"


def _yes(flag: bool) -> str:
    return "✓" if flag else "–"


def _checkpointing(row: dict, scale: dict) -> str:
    """✓ when every decoder layer is checkpointed, else how many of them are."""
    count = row.get("checkpointed_layers", scale["layers"] if row["checkpointing"] else 0)
    return _yes(bool(count)) if count in (0, scale["layers"]) else f"{count}/{scale['layers']}"


def write_benchmarks(markdown: str, path: Path = BENCHMARKS) -> None:
    """Replace what stands between the train-bench marks of ``path``."""
    text = path.read_text()
    if BEGIN_MARK not in text or END_MARK not in text:
        raise SystemExit(f"{path} has no {BEGIN_MARK} … {END_MARK} section to update")
    head, rest = text.split(BEGIN_MARK, 1)
    _, tail = rest.split(END_MARK, 1)
    path.write_text(f"{head}{BEGIN_MARK}\n{markdown}{END_MARK}{tail}")


# ------------------------------------------------------------------------------------------- main


def run_bench(
    mode: str,
    steps: int | None = None,
    configs: list[str] | None = None,
    time_budget_s: float | None = None,
    work_dir: Path | None = None,
    out: Path | None = None,
    attn: str = "auto",
    torch_compile: bool = False,
    checkpoint_every_n_layers: int = 1,
) -> dict:
    """Run the configurations of ``mode`` one after the other; ``out`` is rewritten after each one."""
    import torch

    scale = replace(
        SCALES[mode],
        attn_implementation=attn,
        torch_compile=torch_compile,
        checkpoint_every_n_layers=checkpoint_every_n_layers,
    )
    scale = scale if steps is None else replace(scale, steps=steps)
    if scale.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--mode gpu needs CUDA; use --mode smoke on a CPU machine")
    threads = torch.get_num_threads()
    if scale.device == "cpu":
        # A tiny model gains nothing from intra-op threads, and spinning OpenMP threads on a shared
        # 2-core machine made step times swing tenfold between runs; one thread keeps them steady.
        torch.set_num_threads(1)
    try:
        return _run_configs(mode, scale, configs, time_budget_s, work_dir, out)
    finally:
        torch.set_num_threads(threads)


def _run_configs(mode, scale: Scale, configs, time_budget_s, work_dir, out) -> dict:
    import datetime

    chosen = [c for c in CONFIGS if configs is None or c.name in configs]
    started = time.monotonic()
    own_work_dir = work_dir is None
    work_dir = Path(work_dir or tempfile.mkdtemp(prefix="loraops-bench-"))
    result = {
        "mode": mode,
        "date": datetime.date.today().isoformat(),
        "scale": asdict(scale),
        "machine": machine_info(scale.device),
        "rows": [],
        "ratios": {},
    }
    pool_size = (scale.warmup_steps + scale.steps) * max(c.batch_size for c in chosen)
    lengths = synthetic_lengths(pool_size, scale)
    pool = synthetic_dataset(lengths, scale.vocab)
    ref = save_random_base(scale, work_dir / "base")
    result["setup_seconds"] = time.monotonic() - started
    for config in chosen:
        if time_budget_s is not None and time.monotonic() - started > time_budget_s:
            result["rows"].append({**asdict(config), "status": "skipped (time budget)"})
            continue
        print(f"[train_bench] {config.name} ...", flush=True)
        result["rows"].append(_run_guarded(config, scale, ref, lengths, pool, work_dir, keep_going=mode == "gpu"))
        result["ratios"] = goal_ratios(result["rows"], scale)
        if out is not None:
            _write_json(result, out)
    result["total_seconds"] = time.monotonic() - started
    result["machine"]["load_average_at_end"] = round(os.getloadavg()[0], 2)
    shutil.rmtree(work_dir if own_work_dir else work_dir / "base", ignore_errors=True)
    if out is not None:
        _write_json(result, out)
    return result


def _run_guarded(config, scale, ref, lengths, pool, work_dir, keep_going: bool) -> dict:
    """On the GPU one configuration's failure (out of memory, a missing kernel) must not lose the others.

    A loraops configuration that fails with Liger kernels on is run once more without them (noted in the row).
    """
    row = _attempt(config, scale, ref, lengths, pool, work_dir, keep_going, liger=True)
    if row["status"] != "ok" and config.path == "loraops" and liger_available(scale.device):
        print(f"[train_bench] {config.name}: {row['status']}; again without Liger kernels", flush=True)
        retry = _attempt(config, scale, ref, lengths, pool, work_dir, keep_going, liger=False)
        row = {**retry, "note": f"with Liger: {row['status']}"}
    print(f"[train_bench] {config.name}: {_summary(row)}", flush=True)
    return row


def _attempt(config, scale, ref, lengths, pool, work_dir, keep_going: bool, liger: bool) -> dict:
    try:
        return run_config(config, scale, ref, lengths, pool, work_dir, liger=liger)
    except Exception as error:  # noqa: BLE001 - reported in the row, re-raised in smoke mode
        if not keep_going:
            raise
        status = f"failed: {type(error).__name__}: {str(error)[:300]}"
    free_memory()  # outside the except block: the traceback no longer holds the failed model
    return {**asdict(config), "status": status}


def _summary(row: dict) -> str:
    if row.get("status") != "ok":
        return row["status"]
    memory = (
        f"{row['peak_memory_gib']:.1f} GiB"
        if row["peak_memory_gib"] is not None
        else f"RSS {row['peak_rss_mib']:.0f} MiB"
    )
    return (
        f"{row['tokens_per_s']:,.0f} tok/s, padding {row['padding_share']:.1%}, {memory}, loss {row['final_loss']:.3f}"
    )


def _write_json(result: dict, out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mode", choices=sorted(SCALES), default="smoke")
    parser.add_argument("--steps", type=int, help="timed steps per configuration (after the warm-up)")
    parser.add_argument("--configs", nargs="+", choices=[c.name for c in CONFIGS], help="run only these")
    parser.add_argument("--out", type=Path, help="JSON results (default bench/results/train_bench-MODE.json)")
    parser.add_argument("--markdown", type=Path, help="also write the markdown table here")
    parser.add_argument("--time-budget-s", type=float, help="start no configuration after this many seconds")
    parser.add_argument("--work-dir", type=Path, help="where the random base model is saved (default: a temp dir)")
    parser.add_argument("--write-benchmarks", action="store_true", help="replace the marked section of BENCHMARKS.md")
    parser.add_argument(
        "--attn",
        default="auto",
        choices=["auto", "sdpa", "eager", "flash_attention_2", "flex_attention"],
        help="model.attn_implementation of the loraops rows (auto: transformers' sdpa)",
    )
    parser.add_argument("--torch-compile", action="store_true", help="train.torch_compile for the loraops rows")
    parser.add_argument(
        "--checkpoint-every-n-layers",
        type=int,
        default=1,
        metavar="N",
        help="train.checkpoint_every_n_layers for the loraops rows that checkpoint (1: every layer)",
    )
    args = parser.parse_args(argv)
    out = args.out or REPO / "bench" / "results" / f"train_bench-{args.mode}.json"
    result = run_bench(
        args.mode,
        args.steps,
        args.configs,
        args.time_budget_s,
        args.work_dir,
        out,
        args.attn,
        args.torch_compile,
        args.checkpoint_every_n_layers,
    )
    markdown = render_markdown(result)
    print(markdown)
    if args.markdown:
        args.markdown.parent.mkdir(parents=True, exist_ok=True)
        args.markdown.write_text(markdown)
    if args.write_benchmarks:
        write_benchmarks(markdown)
    return 0


if __name__ == "__main__":
    sys.exit(main())
