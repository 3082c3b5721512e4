"""Champion/challenger promotion, rollback, refusals, retry-safe registration and the model card.

Real SQLite MLflow store in a temp dir, real (tiny) adapters; one test runs the Prefect flows.
"""

from __future__ import annotations

import json
from pathlib import Path

import mlflow.artifacts
import pytest
from registry_helpers import make_adapter, register, registry_config
from typer.testing import CliRunner

from loraops import names
from loraops.registry import versions as registry_versions
from loraops.registry.card import card_description
from loraops.registry.mlflow_model import tracking_uri_set
from loraops.registry.promotion import PromotionRefused, alias_state, apply_promotion, check_promotion, rollback
from loraops.registry.store import make_client
from loraops.registry.values import flatten_params
from loraops.results import SampleAnswer


@pytest.fixture(scope="module")
def adapters(tiny_model_dir, tmp_path_factory) -> list[Path]:
    folder = tmp_path_factory.mktemp("adapters")
    return [make_adapter(tiny_model_dir, folder / f"a{seed}", seed) for seed in (1, 2, 3)]


pytestmark = pytest.mark.usefixtures("away_from_the_checkout")


@pytest.fixture
def client(store_uri):
    return make_client(store_uri)


def _promote(cfg, root, version, force=False, reason=None):
    check = check_promotion(cfg, root, cfg.registry.model_name, version, force)
    return apply_promotion(cfg, root, check, force, reason)


def _aliases(state) -> tuple[str | None, str | None]:
    return state.champion, state.previous


def _unchecked_version(client, name: str, source_version: str, tags: dict[str, str]) -> str:
    """A version registered outside the pipeline (another tool, an older policy) with the given tags."""
    source = client.get_model_version(name, source_version)
    base_tags = {key: value for key, value in source.tags.items() if key.startswith("loraops.base")}
    with tracking_uri_set(client):  # MLflow's SQL registry resolves a models:/m-… source through the global URI
        created = client.create_model_version(name, source.source, run_id=source.run_id, tags={**base_tags, **tags})
    return str(created.version)


def test_promote_keeps_previous_and_rollback_swaps_back(store_uri, adapters, tiny_model_dir, tmp_path, client):
    cfg = registry_config(store_uri, tmp_path)
    name = cfg.registry.model_name
    for adapter, loss in zip(adapters, (1.5, 1.4, 1.3)):
        register(cfg, tmp_path, adapter, str(tiny_model_dir), loss=loss)

    assert _aliases(_promote(cfg, tmp_path, "1")) == ("1", None)
    assert _aliases(_promote(cfg, tmp_path, "2")) == ("2", "1")
    assert _aliases(_promote(cfg, tmp_path, "challenger")) == ("3", "2"), "an alias names a version too"
    assert _aliases(_promote(cfg, tmp_path, "3")) == ("3", "2"), "promoting the champion again changes nothing"

    assert _aliases(rollback(cfg, tmp_path, name, reason="answers got worse")) == ("2", "3")
    assert client.get_model_version(name, "3").tags[names.ROLLBACK_TAG] == "answers got worse"
    assert _aliases(rollback(cfg, tmp_path, name)) == ("3", "2"), "a second rollback undoes the first"
    assert alias_state(client, name).challenger == "3"
    assert registry_versions.find_champion(client, name).version == "3"


def test_rollback_without_a_previous_champion_is_refused(store_uri, adapters, tiny_model_dir, tmp_path):
    cfg = registry_config(store_uri, tmp_path)
    register(cfg, tmp_path, adapters[0], str(tiny_model_dir))
    with pytest.raises(PromotionRefused, match="no previous champion to roll back to \\(champion: none\\)"):
        rollback(cfg, tmp_path, cfg.registry.model_name)
    _promote(cfg, tmp_path, "1")
    with pytest.raises(PromotionRefused, match="champion: 1"):
        rollback(cfg, tmp_path, cfg.registry.model_name)
    with pytest.raises(LookupError, match="no registered model 'missing'"):
        rollback(cfg, tmp_path, "missing")


def test_failed_or_unrecorded_gate_is_refused_unless_forced_with_a_reason(
    store_uri, adapters, tiny_model_dir, tmp_path, client
):
    cfg = registry_config(store_uri, tmp_path)
    name = cfg.registry.model_name
    register(cfg, tmp_path, adapters[0], str(tiny_model_dir))
    _promote(cfg, tmp_path, "1")
    gate_failed = {names.GATE_TAG: "failed", names.GATE_REASONS_TAG: "worse by 0.2"}
    failed = _unchecked_version(client, name, "1", gate_failed)
    untagged = _unchecked_version(client, name, "1", {})

    with pytest.raises(PromotionRefused, match=rf"version {failed} failed the gate \(worse by 0.2\).*--force --reason"):
        _promote(cfg, tmp_path, failed)
    with pytest.raises(PromotionRefused, match="has no loraops.gate tag"):
        _promote(cfg, tmp_path, untagged)
    with pytest.raises(PromotionRefused, match="--force needs --reason"):
        _promote(cfg, tmp_path, failed, force=True)
    assert alias_state(client, name).champion == "1", "refusals move nothing"

    state = _promote(cfg, tmp_path, failed, force=True, reason="hotfix for the demo, see ticket 12")

    assert _aliases(state) == (failed, "1")
    tags = client.get_model_version(name, failed).tags
    assert tags[names.PROMOTION_REASON_TAG] == "hotfix for the demo, see ticket 12"
    assert tags[names.PROMOTION_FORCED_TAG] == "true"
    assert "failed the gate (worse by 0.2)" in tags[names.PROMOTION_OVERRIDDEN_TAG]


def test_merge_check_runs_before_promotion_and_a_mismatch_refuses_it(
    store_uri, adapters, tiny_model_dir, tmp_path, client
):
    cfg = registry_config(store_uri, tmp_path, export={"check_before_promote": True})
    name = cfg.registry.model_name
    register(cfg, tmp_path, adapters[0], str(tiny_model_dir))

    strict = cfg.model_copy(update={"export": cfg.export.model_copy(update={"tolerance": 1e-12})})
    check = check_promotion(strict, tmp_path, name, "1")
    assert check.equivalence is not None and not check.equivalence.passed
    with pytest.raises(PromotionRefused, match="merge check failed: equivalence FAILED"):
        apply_promotion(strict, tmp_path, check)

    state = _promote(cfg, tmp_path, "1")

    assert state.champion == "1"
    assert client.get_model_version(name, "1").tags[names.EXPORT_CHECK_TAG].startswith("equivalence passed")


def test_registration_retried_after_a_crash_before_the_alias_creates_no_second_version(
    store_uri, adapters, tiny_model_dir, tmp_path, client, monkeypatch
):
    cfg = registry_config(store_uri, tmp_path)
    name = cfg.registry.model_name
    real_promote = registry_versions.promote_version

    def crash(*args, **kwargs):
        raise ConnectionError("tracking server went away")

    monkeypatch.setattr(registry_versions, "promote_version", crash)
    with pytest.raises(ConnectionError):
        register(cfg, tmp_path, adapters[0], str(tiny_model_dir))
    versions = client.search_model_versions(f"name = '{name}'")
    assert [str(v.version) for v in versions] == ["1"], "the crash came after create_model_version"
    assert client.get_registered_model(name).aliases == {}

    monkeypatch.setattr(registry_versions, "promote_version", real_promote)
    retried = register(cfg, tmp_path, adapters[0], str(tiny_model_dir))
    again = register(cfg, tmp_path, adapters[0], str(tiny_model_dir))

    assert retried.version == again.version == "1"
    assert len(client.search_model_versions(f"name = '{name}'")) == 1
    experiment = client.get_experiment_by_name(cfg.registry.experiment)
    assert len(client.search_runs([experiment.experiment_id])) == 1
    assert client.get_registered_model(name).aliases == {"challenger": 1}
    assert client.get_model_version(name, "1").description.startswith(f"# {name} version 1")


def test_model_card_samples_table_and_loss_curves_are_logged(store_uri, adapters, tiny_model_dir, tmp_path, client):
    cfg = registry_config(store_uri, tmp_path)
    name = cfg.registry.model_name
    samples = [SampleAnswer("What is five plus six?", "Five.", "Five plus six is eleven.")]

    registration = register(cfg, tmp_path, adapters[0], str(tiny_model_dir), loss=1.25, samples=samples)

    version = client.get_model_version(name, "1")
    card = Path(
        mlflow.artifacts.download_artifacts(
            run_id=registration.run_id, artifact_path="model_card.md", tracking_uri=store_uri, dst_path=str(tmp_path)
        )
    ).read_text()
    for expected in (
        f"# {name} version 1",
        f"- base model: `{tiny_model_dir}` (revision `default`)",
        "- data version (DVC md5 of data/): `" + "d" * 32 + ".dir`",
        "| base model | 2.0000 |",
        "| adapter | 1.2500 |",
        "## Gate: passed",
        "| `lora.r` | `16` |",
        "| `loraops.git_commit` | `0123456789abcdef` |",
        "| What is five plus six? | Five. | Five plus six is eleven. |",
        f'loraops generate --model models:/{name}/1 "',
        f"loraops generate --model models:/{name}@champion",
        "PeftModel.from_pretrained(base, adapter_dir)",
    ):
        assert expected in card, expected
    assert version.description.startswith(f"# {name} version 1\n")
    assert "## How to load" in version.description and len(version.description) <= 5000
    assert version.tags[names.GATE_TAG] == "passed"
    table = json.loads(
        Path(
            mlflow.artifacts.download_artifacts(
                run_id=registration.run_id,
                artifact_path="evaluation/samples.json",
                tracking_uri=store_uri,
                dst_path=str(tmp_path),
            )
        ).read_text()
    )
    assert table["columns"] == ["prompt", "base_answer", "adapter_answer"]
    assert table["data"] == [["What is five plus six?", "Five.", "Five plus six is eleven."]]
    plot = {item.path: item.file_size for item in client.list_artifacts(registration.run_id, "training")}
    assert plot["training/loss_curves.png"] > 1000

    too_long = "# t\n\nsummary\n\n## a\n\n" + "x" * 3000 + "\n\n## b\n\n" + "y" * 3000
    description = card_description(too_long)
    assert "## a" in description and "## b" not in description, "whole sections, cut to fit 5000 characters"
    assert description.endswith("The full model card is `model_card.md` in the model and in the run.\n")


def test_cli_promote_refuses_then_forces_and_rolls_back(store_uri, adapters, tiny_model_dir, tmp_path, client):
    from loraops.cli.app import app

    cfg = registry_config(store_uri, tmp_path)
    name = cfg.registry.model_name
    register(cfg, tmp_path, adapters[0], str(tiny_model_dir))
    failed = _unchecked_version(client, name, "1", {names.GATE_TAG: "failed"})
    params = tmp_path / "params.yaml"
    params.write_text(json.dumps(cfg.model_dump(mode="json")))
    run = lambda *args: CliRunner().invoke(app, [*args, "--params", str(params)])  # noqa: E731

    assert run("promote", name, "1").stdout.strip() == f"{name}: champion -> version 1 (previous: None)"
    refused = run("promote", name, failed)
    assert refused.exit_code == 1 and f"version {failed} failed the gate" in refused.stderr
    forced = run("promote", name, failed, "--force", "--reason", "customer demo")
    assert forced.exit_code == 0, forced.output
    assert run("rollback", name).stdout.strip() == f"{name}: champion -> version 1 (previous: {failed})"
    missing = run("promote", name, "99")
    assert missing.exit_code == 1 and "has no version '99'" in missing.stderr


def test_promote_and_rollback_flows(store_uri, adapters, tiny_model_dir, tmp_path, prefect_harness):
    from flows.promotion import promote as promote_flow
    from flows.promotion import rollback as rollback_flow

    cfg = registry_config(store_uri, tmp_path)
    name = cfg.registry.model_name
    for adapter, loss in zip(adapters[:2], (1.5, 1.4)):
        register(cfg, tmp_path, adapter, str(tiny_model_dir), loss=loss)

    promote_flow(model_name=name, version="1", config=cfg, project_dir=str(tmp_path))
    state = promote_flow(model_name=name, version="2", config=cfg, project_dir=str(tmp_path))
    assert _aliases(state) == ("2", "1")
    state = rollback_flow(model_name=name, reason="flow test", config=cfg, project_dir=str(tmp_path))
    assert _aliases(state) == ("1", "2")
    with pytest.raises(PromotionRefused):
        promote_flow(model_name=name, version="2", force=True, config=cfg, project_dir=str(tmp_path))


def test_params_redact_secret_keys_but_not_token_counts():
    flat = flatten_params(
        {"hub": {"hf_token": "hf_abc", "api_key": "k", "password": "p"}, "gen": {"max_tokens": 64, "tokenizes": "fail"}}
    )
    assert flat == {
        "hub.hf_token": "***",
        "hub.api_key": "***",
        "hub.password": "***",
        "gen.max_tokens": "64",
        "gen.tokenizes": "fail",
    }


def test_secret_looking_values_in_free_text_settings_are_redacted_by_value():
    token = "ghp_" + "A1b2C3d4" * 4 + "Zz9y"
    flat = flatten_params({"export": {"probe_prompts": [f"use {token} please", "What is your name?"]}})
    assert token not in flat["export.probe_prompts"]
    assert json.loads(flat["export.probe_prompts"]) == ["use *** please", "What is your name?"]
