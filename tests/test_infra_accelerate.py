"""infra/accelerate/fsdp-qlora.yaml is read by accelerate's own loader and launcher, as `accelerate launch` reads it."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

REPO_ROOT = Path(__file__).resolve().parent.parent
CONFIG = REPO_ROOT / "infra" / "accelerate" / "fsdp-qlora.yaml"
LAUNCH = ["--config_file", str(CONFIG), "-m", "loraops", "stage", "train-adapter"]


def _launch_env() -> tuple[object, dict[str, str]]:
    """The arguments and environment `accelerate launch` would give each training process."""
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils.launch import prepare_multi_gpu_env

    args, _, _ = _validate_launch_command(launch_command_parser().parse_args(LAUNCH))
    return args, prepare_multi_gpu_env(args)


def test_config_loads_as_an_fsdp_cluster_config():
    from accelerate.commands.config.config_args import ClusterConfig, load_config_from_file
    from accelerate.utils import DistributedType

    config = load_config_from_file(str(CONFIG))
    assert isinstance(config, ClusterConfig)
    assert config.distributed_type == DistributedType.FSDP
    assert config.mixed_precision == "bf16" and config.num_processes == 2 and config.use_cpu is False
    fsdp = config.fsdp_config
    assert fsdp["fsdp_version"] == 1
    assert fsdp["fsdp_sharding_strategy"] == "FULL_SHARD"
    assert fsdp["fsdp_auto_wrap_policy"] == "TRANSFORMER_BASED_WRAP"
    assert fsdp["fsdp_use_orig_params"] is False  # PEFT + QLoRA with FSDP v1
    assert fsdp["fsdp_cpu_ram_efficient_loading"] is True and fsdp["fsdp_sync_module_states"] is True


def test_launch_runs_the_dvc_training_stage_with_the_fsdp_settings():
    args, env = _launch_env()
    assert args.module and [args.training_script, *args.training_script_args] == ["loraops", "stage", "train-adapter"]
    stages = yaml.safe_load((REPO_ROOT / "dvc.yaml").read_text())["stages"]
    assert stages["train_adapter"]["cmd"] == "python -m loraops stage train-adapter"  # the same stage command
    assert env["ACCELERATE_USE_FSDP"] == "true" and env["FSDP_VERSION"] == "1"
    assert env["FSDP_SHARDING_STRATEGY"] == "FULL_SHARD"
    assert env["FSDP_AUTO_WRAP_POLICY"] == "TRANSFORMER_BASED_WRAP"
    assert env["FSDP_USE_ORIG_PARAMS"] == "false"
    assert env["FSDP_CPU_RAM_EFFICIENT_LOADING"] == "true" and env["FSDP_SYNC_MODULE_STATES"] == "true"
    assert env["ACCELERATE_MIXED_PRECISION"] == "bf16"


def test_under_the_launch_environment_each_rank_loads_bf16_stored_4bit_weights_on_its_own_gpu(monkeypatch):
    from loraops.config import ModelConfig, QuantConfig
    from loraops.train import base_model as modeling
    from loraops.train import builders

    _, env = _launch_env()
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("WORLD_SIZE", "2")  # torchrun sets these per process
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert modeling.distributed_env() == (2, 1)
    assert modeling.device_map_for("cuda") == {"": 1}
    dtype = modeling.resolve_dtype(ModelConfig(), "cuda", QuantConfig(mode="nf4"))
    assert builders.build_quant_config(QuantConfig(mode="nf4"), storage_dtype=dtype).bnb_4bit_quant_storage == dtype


@pytest.mark.gpu
def test_the_fsdp_plugin_builds_from_the_launch_environment(monkeypatch):
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("FullyShardedDataParallelPlugin needs an accelerator")
    from accelerate import FullyShardedDataParallelPlugin

    _, env = _launch_env()
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    plugin = FullyShardedDataParallelPlugin()
    assert plugin.fsdp_version == 1
    assert plugin.use_orig_params is False and plugin.sync_module_states is True
    assert plugin.cpu_ram_efficient_loading is True
    assert plugin.sharding_strategy.name == "FULL_SHARD"
