"""Register, promote, roll back and serve through a real ``mlflow server`` process on loopback."""

from __future__ import annotations

import pytest
from registry_helpers import PROMPT, make_adapter, register, registry_config

from loraops.registry.fetch import fetch_adapter
from loraops.registry.promotion import apply_promotion, check_promotion, rollback
from loraops.registry.store import make_client
from loraops.train.adapters import load_adapter
from loraops.train.generate import generate_text


@pytest.mark.integration
def test_registry_round_trip_through_a_tracking_server(tracking_server, tiny_model_dir, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = registry_config(tracking_server, tmp_path, export={"check_before_promote": True})
    name = cfg.registry.model_name
    adapters = [make_adapter(tiny_model_dir, tmp_path / f"a{seed}", seed) for seed in (1, 2)]
    for adapter, loss in zip(adapters, (1.5, 1.4)):
        register(cfg, tmp_path, adapter, str(tiny_model_dir), loss=loss)
    client = make_client(tracking_server)
    assert client.get_run(client.get_model_version(name, "1").run_id).info.artifact_uri.startswith("mlflow-artifacts:")

    for version in ("1", "2"):  # the merge check downloads each adapter through the server
        state = apply_promotion(cfg, tmp_path, check_promotion(cfg, tmp_path, name, version))
    assert (state.champion, state.previous) == ("2", "1")
    state = rollback(cfg, tmp_path, name, reason="integration test")
    assert (state.champion, state.previous) == ("1", "2")

    source = fetch_adapter(cfg, tmp_path, f"models:/{name}@champion", tmp_path / "downloads")
    assert source.version == "1"
    local = source.__class__("local", adapters[0], source.base, source.quant)
    assert generate_text(*load_adapter(source, cfg.model, "cpu"), PROMPT, 12) == generate_text(
        *load_adapter(local, cfg.model, "cpu"), PROMPT, 12
    )
    assert client.get_model_version(name, "1").description.startswith(f"# {name} version 1")
