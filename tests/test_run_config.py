"""Which settings a run chose (the Prefect form, -S) and how they are written into params.yaml."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from loraops.config import ConfigError, LoraopsConfig
from loraops.project.params_file import load_config, set_values, write_params
from loraops.project.run_config import chosen_overrides, form_defaults, given_values, resolve_run_config

REPO = Path(__file__).resolve().parent.parent

# A params.yaml as yaml.safe_dump writes it (explicit nulls), with comments added by hand.
COMMENTED = """\
# the tiny project's settings
model:
  base: tiny   # a local folder
  revision: null
train:
  learning_rate: 0.001
  max_steps: 24   # the demo's budget
  eval_steps: 12
  save_steps: null
registry:
  tracking_uri: ~
  model_name: "quoted-name"
"""


def test_setting_one_value_changes_only_its_line_and_keeps_nulls_comments_and_quotes(tmp_path):
    params = tmp_path / "params.yaml"
    params.write_text(COMMENTED)
    assert set_values(params, {"train.max_steps": 12}) is True
    assert params.read_text() == COMMENTED.replace("max_steps: 24   #", "max_steps: 12   #")
    assert set_values(params, {"train.max_steps": 12}) is False  # already so: the file is not rewritten


def test_setting_a_null_in_a_file_that_spells_null_writes_null(tmp_path):
    params = tmp_path / "params.yaml"
    params.write_text(COMMENTED)
    set_values(params, {"model.base": None})
    assert params.read_text() == COMMENTED.replace("  base: tiny   #", "  base: null   #")


def test_the_repository_params_keep_their_empty_values_and_comments(tmp_path):
    params = tmp_path / "params.yaml"
    original = (REPO / "params.yaml").read_text()
    params.write_text(original)
    set_values(params, {"train.save_steps": 24, "export.probe_prompts": ["Hi?"]})
    after = params.read_text()
    assert "  save_steps: 24" in after and "  revision:\n" in after and "  tracking_uri:           # empty" in after
    assert yaml.safe_load(after)["export"]["probe_prompts"] == ["Hi?"]
    changed = set(after.splitlines()) ^ set(original.splitlines())
    assert all("save_steps" in line or "Hi?" in line or "- " in line for line in changed), changed


def test_write_params_adds_no_default_the_file_leaves_out(tmp_path):
    params = tmp_path / "params.yaml"
    params.write_text("# only what differs from the defaults\ntrain:\n  max_steps: 12\n  eval_steps: 6\n")
    before = params.read_text()
    assert write_params(load_config(params), params) is False
    assert params.read_text() == before
    assert write_params(load_config(params, {"lora.r": 4}), params) is True
    assert params.read_text() == before + "lora:\n  r: 4\n"


def test_given_values_are_the_fields_a_partial_config_spells_out():
    config = LoraopsConfig.model_validate({"lora": {"r": 8}, "data": {"contract": {"min_rows": {"train": 3}}}})
    assert given_values(config) == {"lora.r": 8, "data.contract.min_rows.train": 3}


def test_a_form_run_chooses_the_fields_that_differ_from_what_the_form_prefilled():
    prefilled = form_defaults(str(REPO / "params.yaml"))["config"]
    sent = yaml.safe_load(yaml.safe_dump(prefilled))  # the form sends every field back
    sent["train"]["max_steps"] = 36
    sent["registry"]["tracking_uri"] = "http://mlflow.example:5000"
    assert chosen_overrides(LoraopsConfig.model_validate(sent), prefilled) == {
        "train.max_steps": 36,
        "registry.tracking_uri": "http://mlflow.example:5000",
    }


def test_a_run_keeps_params_yaml_edited_after_deploying_and_applies_only_its_choice(tmp_path):
    project = tmp_path
    (project / "params.yaml").write_text((REPO / "params.yaml").read_text())
    prefilled = form_defaults(str(project / "params.yaml"))["config"]  # deployed now
    set_values(project / "params.yaml", {"train.learning_rate": 0.003})  # edited later
    sent = yaml.safe_load(yaml.safe_dump(prefilled))
    sent["lora"]["r"] = 4

    cfg = resolve_run_config(LoraopsConfig.model_validate(sent), project, prefilled)
    assert cfg.lora.r == 4
    assert cfg.train.learning_rate == 0.003  # not the stale pre-filled 0.001
    # Without a deployment (loraops retrain, a direct call) the baseline is params.yaml itself.
    assert resolve_run_config(None, project, None) == load_config(project / "params.yaml")
    direct = load_config(project / "params.yaml", {"gate.min_improvement_over_base": 0.5})
    assert resolve_run_config(direct, project, None).gate.min_improvement_over_base == 0.5


def test_a_deploy_with_an_invalid_params_yaml_stops_with_its_message(tmp_path):
    params = tmp_path / "params.yaml"
    params.write_text("lora:\n  r: many\n")
    with pytest.raises(ConfigError, match=r"lora\.r"):
        form_defaults(str(params))
