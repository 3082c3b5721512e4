"""The typed config: shipped files load, bad settings are named, overrides are typed and recorded."""

from __future__ import annotations

from pathlib import Path

import pytest

from loraops.config import ConfigError, LoraopsConfig, config_from_dict
from loraops.project.params_file import apply_overrides, load_config, parse_override, write_params

REPO = Path(__file__).resolve().parent.parent


def test_shipped_params_yaml_loads_and_keeps_the_seed_recipe():
    cfg = load_config(REPO / "params.yaml")
    assert (cfg.lora.r, cfg.lora.alpha, cfg.lora.dropout, cfg.lora.target_modules) == (16, 32, 0.05, "all-linear")
    assert cfg.quant.mode == "none"
    assert cfg.model.trust_remote_code is False


def test_shipped_params_yaml_lists_every_setting():
    """Defaults live in the config class; params.yaml shows them all so DVC tracks every one."""
    import yaml

    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    defaults = LoraopsConfig().model_dump()
    assert set(raw) == set(defaults)
    for section, values in defaults.items():
        assert set(raw[section]) == set(values), section


def test_config_defaults_are_the_seed_recipe():
    cfg = LoraopsConfig()
    assert cfg.train.learning_rate == 2e-4
    assert (cfg.quant.double_quant, cfg.quant.compute_dtype) == (True, "bfloat16")


@pytest.mark.parametrize(
    ("raw", "named"),
    [
        ({"lora": {"rank": 8}}, "unknown key 'lora.rank'"),
        ({"loraa": {}}, "unknown key 'loraa'"),
        ({"lora": {"r": "eight"}}, "lora.r"),
        ({"lora": {"r": 0}}, "lora.r: Input should be greater than 0 (got 0)"),
        ({"lora": {"alpha": -2}}, "lora.alpha: Input should be greater than 0"),
        ({"train": {"learning_rate": -1}}, "train.learning_rate"),
        ({"train": {"learning_rate": float("inf")}}, "train.learning_rate: Input should be a finite number"),
        (
            {"gate": {"min_improvement_over_base": float("nan")}},
            "gate.min_improvement_over_base: Input should be a finite",
        ),
        ({"quant": {"mode": "int3"}}, "quant.mode"),
        ({"quant": {"mode": "nf4"}, "lora": {"variant": "dora"}}, "lora.variant=dora cannot be combined"),
        ({"train": {"eval_steps": 50, "max_steps": 10}}, "train.eval_steps (50) is larger than train.max_steps"),
        (
            {"train": {"checkpoint_every_n_layers": 2}},
            "train.checkpoint_every_n_layers (2) needs train.gradient_checkpointing: true; set gradient_checkpointing",
        ),
        (
            {"train": {"checkpoint_every_n_layers": 0, "gradient_checkpointing": True}},
            "train.checkpoint_every_n_layers: Input should be greater than or equal to 1",
        ),
    ],
)
def test_bad_settings_are_named(raw, named):
    with pytest.raises(ConfigError) as error:
        config_from_dict(raw, source="params.yaml")
    assert named in str(error.value)
    assert str(error.value).startswith("params.yaml")


def test_overrides_keep_yaml_types_and_reject_malformed_items():
    assert parse_override("lora.r=8") == ("lora.r", 8)
    assert parse_override("registry.auto_promote=true") == ("registry.auto_promote", True)
    assert parse_override("model.base=org/name") == ("model.base", "org/name")
    with pytest.raises(ConfigError, match="expected section.key=value"):
        parse_override("lora.r")
    with pytest.raises(ConfigError, match="'r' is a value, not a section"):
        apply_overrides({"lora": {"r": 16}}, {"lora.r.x": 1})


def test_missing_params_file_says_what_to_do(tmp_path):
    with pytest.raises(ConfigError, match="not found; run from the project root"):
        load_config(tmp_path / "params.yaml")


@pytest.mark.parametrize(
    ("content", "named"),
    [
        ("", "is empty (or holds only comments); restore it with `git checkout params.yaml`"),
        ("# only a comment\n", "is empty (or holds only comments)"),
        (b"\x89PNG\r\n\x1a\n\x00\xff\xfe", "not a text file (invalid UTF-8 at byte"),
        ("- a\n- list\n", "expected a mapping of sections"),
        ("lora: {r: [\n", "not valid YAML"),
        (None, "is a directory, not a parameters file"),
    ],
)
def test_broken_params_files_are_named_with_what_to_do(tmp_path, content, named):
    params = tmp_path / "params.yaml"
    if content is None:
        params.mkdir()
    elif isinstance(content, bytes):
        params.write_bytes(content)
    else:
        params.write_text(content)
    with pytest.raises(ConfigError) as error:
        load_config(params)
    assert named in str(error.value)
    assert str(error.value).startswith(str(params))


def test_writing_overrides_keeps_comments_and_changes_only_the_key(tmp_path):
    params = tmp_path / "params.yaml"
    params.write_text((REPO / "params.yaml").read_text())
    assert write_params(load_config(params), params) is False  # nothing to record

    assert write_params(load_config(params, {"lora.r": 8}), params) is True
    before = (REPO / "params.yaml").read_text().splitlines()
    after = params.read_text().splitlines()
    changed = [(old, new) for old, new in zip(before, after) if old != new]
    assert changed == [("  r: 16", "  r: 8")]
    assert load_config(params).lora.r == 8


def test_params_hash_changes_with_any_setting():
    assert LoraopsConfig().params_hash() == LoraopsConfig().params_hash()
    assert LoraopsConfig().params_hash() != config_from_dict({"lora": {"r": 8}}).params_hash()


def test_every_field_of_the_prefect_form_is_described_in_text_the_ui_shows():
    """Prefect's run form renders the config's JSON schema: each field needs a description, and
    descriptions render as markdown/HTML, so ``<dist>`` would vanish (it showed "pypi:/.gguf")."""
    import re

    schema = LoraopsConfig.model_json_schema()
    undescribed, mangled = [], []
    for name, definition in schema["$defs"].items():
        for field, spec in definition.get("properties", {}).items():
            description = spec.get("description")
            if not description:
                undescribed.append(f"{name}.{field}")
            elif re.search(r"<[A-Za-z][^>]*>", description):
                mangled.append(f"{name}.{field}: {description}")
    assert undescribed == []
    assert mangled == []
