"""Memory pre-flight: the estimate matches measured GPU peaks, scales physically, and plans what fits."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import REPO_ROOT, tiny_params
from typer.testing import CliRunner

from loraops import stages
from loraops.cli.app import app
from loraops.config import ConfigError, LoraConfig, LoraopsConfig, QuantConfig, config_from_dict
from loraops.project.params_file import apply_overrides
from loraops.train import memory
from loraops.train.memory import estimate_peak_memory
from loraops.train.plan import DEFAULT_HEADROOM, MemoryPlanError, check_memory, plan, system_memory_bytes
from loraops.train.shape import GIB, KNOWN_MODELS, parse_memory_size, resolve_model_shape, shape_from_config

LLAMA_8B = KNOWN_MODELS["meta-llama/Llama-3.1-8B"]
LLAMA_70B = KNOWN_MODELS["meta-llama/Llama-3.1-70B"]
LORA = LoraConfig()  # the seed recipe: r=16, all-linear, dropout 0.05
BF16 = QuantConfig(mode="none")
NF4 = QuantConfig(mode="nf4", double_quant=True, compute_dtype="bfloat16")

# Measured on an H200 (stack-notes.md): Llama-3.1-8B shape, 2048-token sequences, LoRA r=16 all-linear, AdamW.
ANCHORS = [
    # (quant, batch, gradient checkpointing, Liger kernels, measured peak GiB)
    (BF16, 4, False, False, 89.8),
    (BF16, 4, True, False, 29.4),
    (NF4, 2, True, False, 16.7),
    (NF4, 4, True, False, 24.7),
    (NF4, 2, True, True, 11.5),
]


def _estimate(
    shape=LLAMA_8B, quant=BF16, batch=4, seq=2048, checkpointing=False, liger=False, lora=LORA, device="cuda", loss=None
):
    return estimate_peak_memory(
        shape,
        lora,
        quant,
        batch_size=batch,
        seq_len=seq,
        gradient_checkpointing=checkpointing,
        liger_kernel=liger,
        device=device,
        loss=loss,
    )


@pytest.mark.parametrize(("quant", "batch", "checkpointing", "liger", "measured"), ANCHORS)
def test_estimate_is_within_15_percent_of_measured_h200_peaks(quant, batch, checkpointing, liger, measured):
    estimated = _estimate(quant=quant, batch=batch, checkpointing=checkpointing, liger=liger).total / GIB
    assert abs(estimated - measured) / measured < 0.15, f"estimated {estimated:.1f} GiB vs measured {measured} GiB"


def test_parameter_counts_match_the_published_model_and_peft():
    assert round(LLAMA_8B.parameters / 1e9, 2) == 8.03
    # peft's print_trainable_parameters for Llama-3.1-8B, r=16, all-linear: 41,943,040
    assert _estimate().adapter_params == 41_943_040
    assert _estimate(lora=LoraConfig(target_modules=["q_proj", "v_proj"])).adapter_params == 32 * 16 * (
        4096 * 2 + 4096 + 1024
    )


def test_weights_by_quantisation():
    bf16, nf4 = _estimate(quant=BF16), _estimate(quant=NF4)
    assert bf16.weights == LLAMA_8B.parameters * 2
    no_double = _estimate(quant=QuantConfig(mode="nf4", double_quant=False))
    assert nf4.weights < no_double.weights < bf16.weights  # double quant saves the float32 block scales
    quantised = 32 * LLAMA_8B.layer_linear_params
    assert nf4.weights == pytest.approx(quantised * (0.5 + 1 / 64) + (LLAMA_8B.parameters - quantised) * 4, rel=1e-3)


@pytest.mark.parametrize("quant", [BF16, NF4])
@pytest.mark.parametrize("checkpointing", [False, True])
def test_estimate_grows_with_batch_and_sequence_length(quant, checkpointing):
    by_batch = [_estimate(quant=quant, batch=b, checkpointing=checkpointing).total for b in (1, 2, 4, 8)]
    by_seq = [_estimate(quant=quant, seq=s, checkpointing=checkpointing).total for s in (256, 512, 1024, 4096)]
    assert by_batch == sorted(by_batch) and len(set(by_batch)) == 4
    assert by_seq == sorted(by_seq) and len(set(by_seq)) == 4
    # Activations and logits are per token: doubling the batch adds what one batch's worth of tokens costs.
    assert by_batch[3] - by_batch[2] == pytest.approx(2 * (by_batch[2] - by_batch[1]), rel=0.05)


@pytest.mark.parametrize("shape", [LLAMA_8B, KNOWN_MODELS["meta-llama/Llama-3.2-1B"], KNOWN_MODELS["Qwen/Qwen2.5-7B"]])
def test_qlora_below_lora_checkpointing_below_none_fused_loss_below_plain(shape):
    lora, qlora = _estimate(shape, BF16), _estimate(shape, NF4)
    assert qlora.weights < lora.weights and qlora.total < lora.total
    assert _estimate(shape, checkpointing=True).total < lora.total
    assert _estimate(shape, checkpointing=True).activations < lora.activations
    assert _estimate(shape, liger=True).logits < lora.logits / 10


@pytest.mark.parametrize("shape", [LLAMA_8B, KNOWN_MODELS["meta-llama/Llama-3.2-1B"], KNOWN_MODELS["Qwen/Qwen2.5-7B"]])
@pytest.mark.parametrize("quant", [BF16, NF4])
@pytest.mark.parametrize("batch", [1, 8])
def test_checkpointing_every_nth_layer_lies_between_all_and_none_and_grows_with_n(shape, quant, batch):
    def total(n: int, loss=None) -> int:
        return estimate_peak_memory(
            shape,
            LORA,
            quant,
            batch_size=batch,
            seq_len=2048,
            gradient_checkpointing=True,
            checkpoint_every_n_layers=n,
            loss=loss,
        ).total

    for loss in (None, "chunked"):
        every = [total(n, loss) for n in range(1, shape.layers + 2)]
        off = _estimate(shape, quant, batch, loss=loss).total
        assert every[0] == _estimate(shape, quant, batch, checkpointing=True, loss=loss).total  # n=1: all layers
        assert every == sorted(every) and every[0] < every[1] and every[-1] <= off
        assert every[shape.layers] == every[shape.layers - 1]  # past the last layer only layer 0 is checkpointed


def test_every_second_layer_keeps_half_the_layers_activations():
    """Llama-3.1-8B: 16 checkpointed and 16 full layers; at the loss, half the no-checkpointing activations and more."""
    half = estimate_peak_memory(
        LLAMA_8B, LORA, BF16, batch_size=4, seq_len=2048, gradient_checkpointing=True, checkpoint_every_n_layers=2
    )
    off, every = _estimate(), _estimate(checkpointing=True)
    checkpoint = 2 * LLAMA_8B.hidden * 4 * 2048  # one bf16 layer input
    assert half.activations == off.activations // 2 + 16 * checkpoint
    assert every.total < half.total < off.total


def test_config_estimate_uses_the_checkpointed_layers():
    cfg = config_from_dict({"train": {"batch_size": 4, "gradient_checkpointing": True}})
    every, second = (
        memory.estimate_for_config(LLAMA_8B, _with(cfg, [f"train.checkpoint_every_n_layers={n}"]), "cuda")
        for n in (1, 2)
    )
    assert every.total == memory.estimate_for_config(LLAMA_8B, cfg, "cuda").total < second.total


def test_a_bigger_model_needs_more_memory():
    totals = [
        _estimate(KNOWN_MODELS[name], NF4, batch=1, checkpointing=True).total
        for name in (
            "HuggingFaceTB/SmolLM2-135M",
            "meta-llama/Llama-3.2-1B",
            "meta-llama/Llama-3.1-8B",
            "meta-llama/Llama-3.1-70B",
        )
    ]
    assert totals == sorted(totals)


def test_cpu_estimate_is_float32_without_a_cuda_context():
    cpu, cuda = _estimate(device="cpu", batch=1), _estimate(device="cuda", batch=1)
    assert cpu.weights == 2 * cuda.weights
    assert cpu.activations > cuda.activations
    assert cpu.runtime != cuda.runtime


# --------------------------------------------------------------------------------------------------
# Shapes


def test_shape_from_a_local_folder_matches_its_config(tiny_model_dir):
    config = json.loads((tiny_model_dir / "config.json").read_text())
    shape = resolve_model_shape(str(tiny_model_dir))
    assert (shape.hidden, shape.intermediate, shape.layers, shape.heads, shape.kv_heads) == (64, 128, 2, 4, 2)
    assert shape.vocab == config["vocab_size"] and shape.tied_embeddings


def test_shape_from_a_transformers_config_object():
    from transformers import LlamaConfig

    config = LlamaConfig(
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        vocab_size=128256,
        tie_word_embeddings=False,
    )
    assert shape_from_config(config.to_dict()).parameters == LLAMA_8B.parameters


def test_unknown_model_id_says_to_pass_a_local_folder():
    with pytest.raises(ConfigError, match="pass a local folder with config.json"):
        resolve_model_shape("no-such-org/no-such-model")
    with pytest.raises(ConfigError, match="unknown model 'not-an-id'"):
        resolve_model_shape("not-an-id")


def test_folder_without_config_json_is_refused(tmp_path):
    with pytest.raises(ConfigError, match="no config.json"):
        resolve_model_shape(str(tmp_path))


def test_every_built_in_shape_is_consistent():
    for name, shape in KNOWN_MODELS.items():
        assert shape.q_dim % shape.heads == 0 and shape.heads % shape.kv_heads == 0, name
        assert 0.1e9 < shape.parameters < 80e9, name


@pytest.mark.slow
def test_shape_of_the_offline_default_gguf_before_conversion(tmp_path):
    shape = resolve_model_shape(LoraopsConfig().model.base, tmp_path / "not-converted")
    assert shape == KNOWN_MODELS["HuggingFaceTB/SmolLM2-135M"]


# --------------------------------------------------------------------------------------------------
# Sizes


@pytest.mark.parametrize(
    ("text", "size"),
    [
        ("24GiB", 24 * GIB),
        ("24GB", 24 * 10**9),
        ("80G", 80 * GIB),
        ("24576MiB", 24 * GIB),
        (" 23.5 gib ", int(23.5 * GIB)),
        ("1TiB", 1 << 40),
        ("512M", 512 << 20),
    ],
)
def test_parse_memory_size(text, size):
    assert parse_memory_size(text) == size


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("24", "expected a positive number and a unit"),
        ("GiB", "expected a positive number"),
        ("-1GiB", "expected a positive"),
        ("24XB", "unknown unit 'XB'"),
        ("0GiB", "larger than zero"),
        ("twenty GiB", "expected a positive number"),
    ],
)
def test_parse_memory_size_errors_are_clear(text, message):
    with pytest.raises(ConfigError, match=message):
        parse_memory_size(text)


# --------------------------------------------------------------------------------------------------
# Plans


def _with(cfg: LoraopsConfig, overrides: list[str]) -> LoraopsConfig:
    from loraops.project.params_file import parse_override

    return config_from_dict(apply_overrides(cfg.model_dump(mode="json"), dict(parse_override(o) for o in overrides)))


def test_plan_on_80gib_chooses_lora_without_checkpointing_and_the_largest_batch():
    chosen = plan(LLAMA_8B, parse_memory_size("80GiB"), LoraopsConfig(), 2048)
    assert (chosen.mode, chosen.quant_mode, chosen.gradient_checkpointing) == ("lora", "none", False)
    assert chosen.batch_size >= 1
    # The overrides reproduce the estimate; one more sequence would not fit in the usable memory.
    cfg = _with(LoraopsConfig(), chosen.overrides)
    assert memory.estimate_for_config(LLAMA_8B, cfg, "cuda").total == chosen.estimate.total <= chosen.usable
    bigger = cfg.model_copy(update={"train": cfg.train.model_copy(update={"batch_size": chosen.batch_size + 1})})
    assert memory.estimate_for_config(LLAMA_8B, bigger, "cuda").total > chosen.usable
    assert chosen.usable == int(parse_memory_size("80GiB") * 0.9)


def test_plan_on_16gib_chooses_qlora():
    chosen = plan(LLAMA_8B, parse_memory_size("16GiB"), LoraopsConfig(), 2048)
    assert (chosen.mode, chosen.quant_mode, chosen.gradient_checkpointing) == ("qlora", "nf4", True)
    assert "quant.mode=nf4" in chosen.overrides and "train.gradient_checkpointing=true" in chosen.overrides
    assert [option.batch_size for option in chosen.alternatives[:2]] == [None, None]  # LoRA tried first


def test_plan_on_24gib_prefers_lora_over_qlora_at_a_larger_batch():
    """8B LoRA with checkpointing: ~16 GiB + ~1 GiB per 2,048-token sequence once TRL's chunked head drops the logits."""
    chosen = plan(LLAMA_8B, parse_memory_size("24GiB"), LoraopsConfig(), 2048)
    assert (chosen.mode, chosen.gradient_checkpointing) == ("lora", True)
    qlora = chosen.alternatives[-1]
    assert qlora.mode == "qlora" and qlora.batch_size > chosen.batch_size > 1
    assert chosen.gradient_accumulation_steps == -(
        -8 // chosen.batch_size
    )  # keeps the configured 8 examples per update


def test_the_seed_recipes_logits_and_upcasts_are_what_loraops_saves():
    """The loraops path (estimate_for_config) against the seed recipe of the anchors, on the anchors' shapes."""
    qlora = config_from_dict({"quant": {"mode": "nf4"}, "train": {"batch_size": 2, "gradient_checkpointing": True}})
    seed = _estimate(quant=NF4, batch=2, checkpointing=True)
    lean = memory.estimate_for_config(LLAMA_8B, qlora, "cuda", 2048)
    upcast_cfg = _with(qlora, ["quant.upcast_non_quantized=true"])
    upcast = memory.estimate_for_config(LLAMA_8B, upcast_cfg, "cuda", 2048)
    rest = LLAMA_8B.parameters - 32 * LLAMA_8B.layer_linear_params  # embeddings, head, norms
    assert upcast.weights - lean.weights == 2 * rest  # fp32 instead of bf16: ~1.96 GiB on 8B
    assert lean.logits == 0 and lean.compute_copies == 0  # no [tokens x vocab] logits, no bf16 copy of an fp32 head
    assert seed.logits > 5 * GIB
    assert lean.total < 0.5 * seed.total < upcast.total
    lora = config_from_dict({"train": {"batch_size": 4, "gradient_checkpointing": True}})
    assert (
        memory.estimate_for_config(LLAMA_8B, lora, "cuda", 2048).total
        < _estimate(batch=4, checkpointing=True).total - 9 * GIB
    )


def test_chunked_loss_holds_one_tile_not_the_logits():
    chunked = _estimate(batch=4, loss="chunked").logits
    assert chunked < _estimate(batch=4).logits / 10
    tile = 2 * memory.TRL_TILE_TOKENS * memory.TRL_TILE_VOCAB
    assert tile < chunked < tile + 12 * LLAMA_8B.hidden * 4 * 2048 + 41 * 4 * 2048


def test_plan_refuses_70b_on_8gib_naming_what_to_change():
    with pytest.raises(MemoryPlanError) as refused:
        plan(LLAMA_70B, parse_memory_size("8GiB"), LoraopsConfig(), 2048)
    message = str(refused.value)
    assert "no training setting fits in 8.0 GiB" in message
    assert "more GPU memory" in message and "a smaller model (model.base)" in message


def test_plan_suggests_a_shorter_sequence_when_that_would_fit():
    with pytest.raises(MemoryPlanError, match=r"data.max_length=\d+ or less fits") as refused:
        plan(LLAMA_8B, parse_memory_size("8GiB"), LoraopsConfig(), 8192)
    longest = int(str(refused.value).split("data.max_length=")[1].split()[0])
    assert 0 < longest < 8192
    assert plan(LLAMA_8B, parse_memory_size("8GiB"), LoraopsConfig(), longest).mode == "qlora"


def test_plan_checkpoints_all_layers_or_none_and_resets_every_n_layers():
    """The plan does not weigh selective checkpointing: its options use every layer, and it says so in its overrides."""
    selective = config_from_dict({"train": {"gradient_checkpointing": True, "checkpoint_every_n_layers": 4}})
    chosen = plan(LLAMA_8B, parse_memory_size("80GiB"), selective, 2048)
    assert not chosen.gradient_checkpointing and all(option.note == "" for option in chosen.alternatives)
    assert "train.checkpoint_every_n_layers=1" in chosen.overrides
    assert (
        memory.estimate_for_config(LLAMA_8B, _with(selective, chosen.overrides), "cuda").total == chosen.estimate.total
    )
    assert (
        "train.checkpoint_every_n_layers=1"
        not in plan(LLAMA_8B, parse_memory_size("80GiB"), LoraopsConfig(), 2048).overrides
    )


def test_plan_skips_qlora_for_dora_with_the_configs_reason():
    dora = config_from_dict({"lora": {"variant": "dora"}})
    with pytest.raises(MemoryPlanError):
        plan(LLAMA_8B, parse_memory_size("16GiB"), dora, 2048)
    chosen = plan(LLAMA_8B, parse_memory_size("80GiB"), dora, 2048)
    assert all("dora" in option.note for option in chosen.alternatives if option.mode == "qlora")


# --------------------------------------------------------------------------------------------------
# The command


def _plan_cli(*args: str):
    return CliRunner().invoke(app, ["plan", *args, "--params", str(REPO_ROOT / "params.yaml")])


def test_cli_plan_for_a_hub_id_prints_the_choice_breakdown_and_overrides():
    result = _plan_cli("--model", "meta-llama/Llama-3.1-8B", "--gpu-memory", "16GiB", "--seq-len", "2048")
    assert result.exit_code == 0, result.output
    assert "choice: QLoRA (nf4 base), gradient checkpointing on, batch size" in result.output
    assert (
        "-S model.base=meta-llama/Llama-3.1-8B -S quant.mode=nf4 -S train.gradient_checkpointing=true" in result.output
    )
    assert "-S data.max_length=2048" in result.output
    for row in ("base weights (nf4 + double quant", "AdamW states", "activations", "total"):
        assert row in result.output


def test_cli_plan_24gib_prints_a_batch_size():
    result = _plan_cli("--model", "meta-llama/Llama-3.1-8B", "--gpu-memory", "24GiB")
    assert result.exit_code == 0, result.output
    assert "train.batch_size=" in result.output and "options considered" in result.output


def test_cli_plan_unknown_model_and_bad_size_are_user_errors():
    unknown = _plan_cli("--model", "no-such-org/no-such-model", "--gpu-memory", "24GiB")
    assert unknown.exit_code == 1 and "pass a local folder with config.json" in unknown.output
    bad_size = _plan_cli("--model", "meta-llama/Llama-3.1-8B", "--gpu-memory", "lots")
    assert bad_size.exit_code == 1 and "expected a positive number and a unit" in bad_size.output
    too_small = _plan_cli("--model", "meta-llama/Llama-3.1-70B", "--gpu-memory", "8GiB")
    assert too_small.exit_code == 1 and "a smaller model" in too_small.output


def test_cli_plan_for_a_local_folder_with_overrides(tiny_model_dir):
    result = _plan_cli("--model", str(tiny_model_dir), "--gpu-memory", "2GiB", "-S", "train.batch_size=4")
    assert result.exit_code == 0, result.output
    assert "choice: LoRA (bf16 base), gradient checkpointing off, batch size 128" in result.output
    assert "train.gradient_accumulation_steps=1" in result.output


# --------------------------------------------------------------------------------------------------
# The pre-flight stage


def _tiny_project(root: Path, model_dir: Path, **sections) -> LoraopsConfig:
    cfg = config_from_dict(tiny_params(model_dir, **sections))
    stages.prepare_base_model(cfg, root)
    return cfg


def test_stage_passes_the_tiny_model_on_cpu(tmp_path, tiny_model_dir):
    cfg = _tiny_project(tmp_path, tiny_model_dir)
    check = stages.check_memory(cfg, tmp_path)
    assert check.fits and check.device == "cpu"
    assert check.available == system_memory_bytes()
    assert (check.batch_size, check.seq_len) == (8, 64)


def test_stage_refuses_what_cannot_fit_and_names_the_settings(tmp_path, tiny_model_dir):
    cfg = _tiny_project(tmp_path, tiny_model_dir, data={"max_length": 512}, train={"batch_size": 64})
    shape = resolve_model_shape(str(tiny_model_dir))
    small = cfg.model_copy(update={"train": cfg.train.model_copy(update={"batch_size": 4})})
    budget = int(memory.estimate_for_config(shape, small, "cuda").total / (1 - DEFAULT_HEADROOM))
    with pytest.raises(MemoryPlanError) as refused:  # room for batch 4, not 64
        check_memory(shape, cfg, "cuda", budget)
    message = str(refused.value)
    assert "does not fit with quant.mode=none, train.batch_size=64" in message
    assert "-S train.batch_size=" in message
    suggested = _with(cfg, message.split("; set ")[1].split(" (estimated")[0].replace("-S ", "").split())
    assert memory.estimate_for_config(shape, suggested, "cuda").total <= budget


def test_on_cpu_an_estimate_above_ram_only_warns(tmp_path, tiny_model_dir, caplog):
    cfg = _tiny_project(tmp_path, tiny_model_dir, data={"max_length": 512}, train={"batch_size": 64})
    with caplog.at_level("WARNING", logger="loraops.train.plan"):
        check = stages.check_memory(cfg, tmp_path, available=64 << 20)
    assert not check.fits and check.device == "cpu"
    assert (
        "does not fit with quant.mode=none, train.batch_size=64" in caplog.text and "continuing on CPU" in caplog.text
    )


def test_stage_refuses_hopeless_settings_with_the_ways_out(tmp_path, tiny_model_dir):
    cfg = _tiny_project(tmp_path, tiny_model_dir)
    shape = resolve_model_shape(str(tiny_model_dir))
    with pytest.raises(MemoryPlanError, match="no training setting fits"):
        check_memory(shape, cfg, "cuda", 64 << 20)


def test_gpu_check_names_the_plans_settings():
    with pytest.raises(MemoryPlanError) as refused:
        check_memory(LLAMA_8B, _with(LoraopsConfig(), ["data.max_length=2048"]), "cuda", parse_memory_size("24GiB"))
    assert "-S quant.mode=none -S train.gradient_checkpointing=true -S train.batch_size=5" in str(refused.value)


@pytest.mark.integration
def test_the_flow_checks_memory_before_loading_a_model(tiny_project, prefect_harness, monkeypatch):
    """The real pre-flight runs in the retrain flow; when it refuses (as on a GPU too small), the run ends
    there, before any stage that loads a model, and the refusal is not retried."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    from flows.retrain import retrain

    preflight, checks, loaded = stages.check_memory, [], []

    def refusing(cfg, root, available=None):
        checks.append(preflight(cfg, root, available))
        raise MemoryPlanError("memory pre-flight: does not fit")

    def loads_a_model(*args, **kwargs):
        loaded.append(args)
        raise AssertionError("a model was loaded before the memory pre-flight")

    monkeypatch.setattr(stages, "check_memory", refusing)
    for stage in ("sanity_check", "evaluate_baseline", "train_adapter", "evaluate_adapter"):
        monkeypatch.setattr(stages, stage, loads_a_model)
    state = retrain(project_dir=str(tiny_project), return_state=True)

    assert state.is_failed()
    with pytest.raises(MemoryPlanError, match="does not fit"):
        state.result()
    assert len(checks) == 1 and checks[0].fits and checks[0].device == "cpu"  # the real pre-flight ran, once
    assert not loaded
    with get_client(sync_client=True) as client:
        runs = client.read_task_runs(
            flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[state.state_details.flow_run_id]))
        )
    (check,) = [run for run in runs if run.name.rsplit("-", 1)[0] == "check-memory"]
    assert check.run_count == 1 and check.state.is_failed(), "a refusal is not retried"


def test_memory_check_is_a_cli_stage(tmp_path, tiny_model_dir):
    import yaml

    _tiny_project(tmp_path, tiny_model_dir)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(tiny_params(tiny_model_dir)))
    result = CliRunner().invoke(app, ["stage", "memory-check", "--params", str(tmp_path / "params.yaml")])
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["fits"] is True
