"""Config to library objects: small pure builders of the LoRA, 4-bit quantisation and SFT configs.

Each takes config sections and returns the peft, transformers or TRL object; nothing is loaded.
"""

from __future__ import annotations

import importlib
from pathlib import Path

from loraops.config import ConfigError, LoraConfig, LoraopsConfig, QuantConfig


def build_lora_config(lora_cfg: LoraConfig):
    from peft import LoraConfig as PeftLoraConfig
    from peft import TaskType

    return PeftLoraConfig(
        task_type=TaskType.CAUSAL_LM,
        r=lora_cfg.r,
        lora_alpha=lora_cfg.alpha,
        lora_dropout=lora_cfg.dropout,
        target_modules=lora_cfg.target_modules,
        use_dora=lora_cfg.variant == "dora",
        use_rslora=lora_cfg.variant == "rslora",
    )


def build_quant_config(quant_cfg: QuantConfig, storage_dtype=None):
    """A 4-bit ``BitsAndBytesConfig`` for QLoRA, or None when ``quant.mode`` is none.

    ``storage_dtype`` stores the packed 4-bit weights in a float dtype (``bnb_4bit_quant_storage``):
    FSDP only shards floating-point tensors, all of one dtype, so it must be the model's load dtype.
    """
    if not quant_cfg.enabled:
        return None
    _require_bitsandbytes()
    import torch
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=quant_cfg.mode,
        bnb_4bit_use_double_quant=quant_cfg.double_quant,
        bnb_4bit_compute_dtype=getattr(torch, quant_cfg.compute_dtype),
        bnb_4bit_quant_storage=storage_dtype,  # None: uint8
    )


def _require_bitsandbytes() -> None:
    try:
        importlib.import_module("bitsandbytes")
    except Exception as error:  # ImportError, or the native library failing to load
        raise ConfigError(
            f"quant.mode: 4-bit loading needs bitsandbytes, which could not be loaded ({error}); "
            "set quant.mode: none for plain LoRA or install bitsandbytes"
        ) from None


def build_sft_config(cfg: LoraopsConfig, output_dir: str | Path, device: str):
    """SFTConfig from the config sections; checkpoints every evaluation, the best one restored at the end."""
    from trl import SFTConfig

    train = cfg.train
    return SFTConfig(
        output_dir=str(output_dir),
        learning_rate=train.learning_rate,
        max_steps=train.max_steps,
        per_device_train_batch_size=train.batch_size,
        per_device_eval_batch_size=cfg.eval.batch_size,
        gradient_accumulation_steps=train.gradient_accumulation_steps,
        lr_scheduler_type=train.lr_scheduler,
        warmup_steps=train.warmup_ratio,  # transformers 5: a float in [0, 1) is a ratio of max_steps
        weight_decay=train.weight_decay,
        activation_checkpointing=train.gradient_checkpointing,
        # The Trainer enables checkpointing on the model with these (TRL reads the alias gradient_checkpointing_kwargs).
        activation_checkpointing_kwargs={"every_n_layers": train.checkpoint_every_n_layers, "use_reentrant": False}
        if train.gradient_checkpointing
        else None,
        eval_strategy="steps",
        eval_steps=train.eval_steps,
        save_strategy="steps",
        save_steps=train.checkpoint_steps,
        save_total_limit=train.save_total_limit,
        save_only_model=False,  # optimizer, scheduler and RNG state too: an interrupted run resumes exactly
        load_best_model_at_end=True,
        metric_for_best_model="eval_loss",
        greater_is_better=False,
        # Examples arrive truncated to data.max_length (loraops.data.tokenization); TRL refuses max_length with padding_free.
        max_length=None if train.padding_free else cfg.data.max_length,
        padding_free=train.padding_free,
        logging_steps=1,
        logging_nan_inf_filter=False,  # the filter hides a NaN loss from the divergence guard
        use_cpu=device == "cpu",
        bf16=device == "cuda",  # SFTConfig turns bf16 on by default; on CPU it is slow and changes results
        seed=train.seed,
        data_seed=train.seed,
        # TRL >= 1.16 computes the loss through its own chunked LM head: the [tokens x vocab] logits are never
        # built in training (Liger's fused cross-entropy is switched off in its favour; its layer kernels stay).
        use_liger_kernel=train.use_liger_kernel,
        torch_compile=train.torch_compile,
        dataloader_num_workers=0,
        disable_tqdm=True,
        report_to=[],
    )
