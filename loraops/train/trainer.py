"""Train a LoRA/QLoRA adapter with TRL's SFTTrainer and save it in PEFT format.

The datasets come from ``loraops.data.tokenization.build_dataset`` (``input_ids`` + ``labels``), which
SFTTrainer uses as they are, so training optimises exactly the tokens the evaluation scores.
Imports only the ML stack: no prefect, no mlflow.
"""

from __future__ import annotations

import logging
import math
import re
from pathlib import Path

from loraops.config import ConfigError, LoraopsConfig
from loraops.names import TRAIN_HISTORY
from loraops.results import BaseModelRef, TrainResult
from loraops.train.base_model import load_base_model, load_tokenizer, prepare_quantized_for_training, resolve_device
from loraops.train.builders import build_lora_config, build_sft_config
from loraops.train.checkpoints import (
    checkpoint_step,
    prepare_checkpoint_dir,
    remove_checkpoints,
    run_fingerprint,
    save_adapter,
)
from loraops.train.history import write_history

logger = logging.getLogger(__name__)


class TrainingDivergedError(RuntimeError):
    """The loss became NaN or infinite; nothing was saved."""


def _divergence_guard():
    """A TrainerCallback that stops the run as soon as a logged loss is not finite."""
    from transformers import TrainerCallback

    class DivergenceGuard(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):
            for key in ("loss", "eval_loss"):
                value = (logs or {}).get(key)
                if value is not None and not math.isfinite(value):
                    raise TrainingDivergedError(
                        f"{key} became {value} at step {state.global_step}: training diverged. "
                        f"Lower train.learning_rate (now {args.learning_rate:g}), e.g. by a factor of 10"
                    )

    return DivergenceGuard()


def build_trainer(
    cfg: LoraopsConfig,
    base: BaseModelRef,
    train_dataset,
    eval_dataset,
    device: str,
    init_adapter_dir: Path | None = None,
):
    """An SFTTrainer around a fresh adapter on the base model (4-bit base for QLoRA), or ``init_adapter_dir``'s."""
    from transformers import set_seed

    set_seed(cfg.train.seed)  # before the adapter exists: its initial weights are random
    tokenizer = load_tokenizer(base, cfg.model)
    model = load_base_model(base, cfg.model, cfg.quant, device)
    return build_trainer_for_model(cfg, model, tokenizer, train_dataset, eval_dataset, device, init_adapter_dir)


def _progress_log():
    """A TrainerCallback logging one line per logging step: step i/N, loss, tokens/s and time left.

    It replaces the Trainer's printed metric dicts. Tokens are TRL's ``num_tokens`` (all tokens fed,
    prompt included); the rates count only this process's steps, so a resumed run starts afresh.
    """
    import time

    from transformers import TrainerCallback

    class ProgressLog(TrainerCallback):
        started = start_step = start_tokens = None

        def on_train_begin(self, args, state, control, **kwargs):
            self.started, self.start_step, self.start_tokens = time.monotonic(), state.global_step, None

        def on_log(self, args, state, control, logs=None, **kwargs):
            logs = logs or {}
            step, total = state.global_step, state.max_steps
            if "eval_loss" in logs:
                note = "token-weighted over completion tokens, as the gate measures; picks the best checkpoint"
                logger.info("step %d/%d  eval loss %.4f (%s)", step, total, logs["eval_loss"], note)
            if "loss" not in logs or self.started is None:
                return
            elapsed = max(time.monotonic() - self.started, 1e-9)
            tokens = float(logs.get("num_tokens", 0.0))
            if self.start_tokens is None:  # a resumed run counts tokens from its first logged step on
                self.start_tokens = 0.0 if self.start_step == 0 else tokens
            left = elapsed / max(step - self.start_step, 1) * max(total - step, 0)
            rate = (tokens - self.start_tokens) / elapsed
            logger.info(
                "step %d/%d  loss %.4f  lr %.2e  %.0f tok/s  %s elapsed, %s left",
                step,
                total,
                logs["loss"],
                logs.get("learning_rate", 0.0),
                rate,
                _clock(elapsed),
                _clock(left),
            )

    return ProgressLog()


def _clock(seconds: float) -> str:
    minutes, secs = divmod(int(round(seconds)), 60)
    return f"{minutes // 60}:{minutes % 60:02d}:{secs:02d}" if minutes >= 60 else f"{minutes}:{secs:02d}"


def _token_weighted_evaluation(trainer_class):
    """``trainer_class`` whose evaluation is the gate's: ``loraops.train.token_loss.evaluate_loss``.

    The Trainer's own eval loss (TRL's collator and loss) is another number: SmolLM2 after 4 steps
    measured 2.878 there and 2.509 here, the gate's. This one weighs every completion token the
    same, so the checkpoint picked as best, metrics/train.json, the history and the MLflow run show
    the number the gate compares (the adapter's validation loss). ``evaluate(eval_dataset=...)``
    keeps the Trainer's own evaluation.
    """
    import time

    from loraops.train.token_loss import evaluate_loss

    class TokenWeightedEvaluation(trainer_class):
        def __init__(self, *args, eval_loss_dataset=None, **kwargs):
            super().__init__(*args, **kwargs)
            self._eval_loss_dataset = eval_loss_dataset

        def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix="eval"):
            if eval_dataset is not None or self._eval_loss_dataset is None:
                return super().evaluate(eval_dataset, ignore_keys, metric_key_prefix)
            started = time.monotonic()
            result = evaluate_loss(self.model, self._eval_loss_dataset, self.args.per_device_eval_batch_size)
            metrics = {
                f"{metric_key_prefix}_loss": result.loss,
                f"{metric_key_prefix}_tokens": result.tokens,
                f"{metric_key_prefix}_runtime": round(time.monotonic() - started, 4),
            }
            self.log(metrics)
            self.control = self.callback_handler.on_evaluate(self.args, self.state, self.control, metrics)
            return metrics

    return TokenWeightedEvaluation


def build_trainer_for_model(
    cfg: LoraopsConfig, model, tokenizer, train_dataset, eval_dataset, device: str, init_adapter_dir: Path | None = None
):
    """The loraops training path around an already loaded base model (also used by bench/).

    ``init_adapter_dir`` (a PEFT adapter folder, train.init_from) is the starting adapter: training continues
    from its weights instead of a fresh LoRA; the caller has checked that it matches the lora settings.
    """
    from transformers import EarlyStoppingCallback, PrinterCallback, set_seed
    from trl import SFTTrainer

    set_seed(cfg.train.seed)
    # Without a KV cache, transformers derives a per-example attention mask from the restarting
    # position_ids of a padding-free batch; with one, examples would attend across boundaries.
    model.config.use_cache = False
    if cfg.quant.enabled:
        model = prepare_quantized_for_training(
            model, cfg.quant, cfg.train.gradient_checkpointing, every_n_layers=cfg.train.checkpoint_every_n_layers
        )
    peft_config = build_lora_config(cfg.lora)
    if init_adapter_dir is not None:
        from peft import PeftModel

        # this run's LoRA config (dropout included) with the starting adapter's weights
        model = PeftModel.from_pretrained(model, str(init_adapter_dir), is_trainable=True, config=peft_config)
        peft_config = None
    callbacks = [_divergence_guard(), _progress_log()]
    if cfg.train.early_stopping_patience > 0:
        callbacks.append(EarlyStoppingCallback(early_stopping_patience=cfg.train.early_stopping_patience))
    trainer = _token_weighted_evaluation(SFTTrainer)(
        eval_loss_dataset=eval_dataset,
        model=model,
        args=build_sft_config(cfg, cfg.train.output_dir, device),
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        processing_class=tokenizer,
        peft_config=peft_config,
        callbacks=callbacks,
    )
    trainer.remove_callback(PrinterCallback)  # raw metric dicts on stdout; ProgressLog logs readable lines
    return trainer


def train_adapter(
    cfg: LoraopsConfig,
    base: BaseModelRef,
    train_dataset,
    eval_dataset,
    adapter_dir: str | Path,
    device: str | None = None,
    history_path: str | Path | None = None,
    extra_callbacks: tuple = (),
    init_adapter_dir: Path | None = None,
) -> TrainResult:
    """Train, restore the best checkpoint, and save the adapter (PEFT safetensors) to ``adapter_dir``.

    ``init_adapter_dir``: start from that adapter's weights (train.init_from) instead of a fresh LoRA.

    Checkpoints (adapter, optimizer, scheduler, RNG) go to ``train.output_dir`` every
    ``train.checkpoint_steps``; a rerun of an interrupted run with the same settings, base and
    tokens continues from its last complete checkpoint. Raises ``TrainingDivergedError`` when
    the loss stops being finite; ``adapter_dir`` is then untouched.
    """
    device = device or resolve_device(cfg.train)
    _check_device_features(cfg, device)
    history_path = Path(history_path or Path(cfg.paths.metrics_dir) / TRAIN_HISTORY)
    output_dir = Path(cfg.train.output_dir)
    fingerprint = run_fingerprint(cfg, base, train_dataset, eval_dataset, device, init_adapter_dir)
    resume_from = prepare_checkpoint_dir(output_dir, fingerprint, resume=cfg.train.resume)
    trainer = build_trainer(cfg, base, train_dataset, eval_dataset, device, init_adapter_dir)
    for callback in extra_callbacks:
        trainer.add_callback(callback)
    if resume_from is not None:
        logger.info("Resuming from %s (step %d of %d)", resume_from, checkpoint_step(resume_from), cfg.train.max_steps)
    else:
        start = f"from the adapter in {init_adapter_dir}" if init_adapter_dir else "from a fresh adapter"
        logger.info("Training on %s for up to %d steps, %s", device, cfg.train.max_steps, start)
    trainer.train(resume_from_checkpoint=str(resume_from) if resume_from else None)
    save_adapter(trainer.model, trainer.processing_class, adapter_dir, accelerator=trainer.accelerator)
    result = _train_result(trainer, cfg, adapter_dir, history_path)
    result.resumed_from_step = checkpoint_step(resume_from) if resume_from else None
    if trainer.accelerator.is_main_process:
        write_history(trainer.state.log_history, history_path)
        remove_checkpoints(output_dir)  # the adapter is saved: a rerun starts afresh
    logger.info(
        "Adapter saved to %s: %d steps, best validation loss %s (per completion token, as the gate) at step %s",
        adapter_dir,
        result.steps,
        result.best_eval_loss,
        result.best_step,
    )
    return result


def _check_device_features(cfg: LoraopsConfig, device: str) -> None:
    """Refuse, before loading anything, settings whose kernels this device or environment lacks."""
    import importlib.util

    if cfg.train.use_liger_kernel:
        if device != "cuda":
            raise ConfigError(
                f"train.use_liger_kernel=true needs a CUDA device (this run uses {device}): set it to false"
            )
        if importlib.util.find_spec("liger_kernel") is None:
            raise ConfigError(
                "train.use_liger_kernel=true but liger-kernel is not installed: pip install 'loraops[gpu]'"
            )
    if cfg.model.attn_implementation == "flash_attention_2":
        if device != "cuda":
            raise ConfigError(
                f"model.attn_implementation=flash_attention_2 needs a CUDA device (this run uses {device}): "
                "set it to auto, sdpa or flex_attention"
            )
        if importlib.util.find_spec("flash_attn") is None:
            raise ConfigError(
                "model.attn_implementation=flash_attention_2 but flash-attn is not installed: pip install flash-attn, "
                "or set it to flex_attention (also skips the masked blocks of padding-free batches) or sdpa"
            )


def _train_result(trainer, cfg: LoraopsConfig, adapter_dir: str | Path, history_path: Path) -> TrainResult:
    state = trainer.state
    trainable, total = trainer.model.get_nb_trainable_parameters()
    return TrainResult(
        adapter_dir=str(adapter_dir),
        trainable_params=trainable,
        total_params=total,
        steps=state.global_step,
        best_step=_best_step(state),
        best_eval_loss=state.best_metric,
        stopped_early=state.global_step < cfg.train.max_steps,
        history_path=str(history_path),
    )


def _best_step(state) -> int | None:
    if state.best_global_step is not None:
        return state.best_global_step
    match = re.search(r"checkpoint-(\d+)$", state.best_model_checkpoint or "")
    return int(match.group(1)) if match else None
