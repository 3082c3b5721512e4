"""Merged export: safetensors + tokenizer, logits equal to adapter-on-base, refusals that write nothing."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from registry_helpers import PROMPT, make_adapter, register, registry_config, shared_store_uri
from typer.testing import CliRunner

from loraops.config import ExportConfig, ModelConfig, QuantConfig
from loraops.names import EXPORT_MANIFEST
from loraops.registry.export import ExportMismatchError, check_merge, compare, export_merged
from loraops.registry.store import make_client
from loraops.results import BaseModelRef
from loraops.train.adapters import AdapterSource, UnsafeArtifactError, load_adapter, load_merged
from loraops.train.generate import chat_inputs, generate_text


@pytest.fixture(scope="module")
def adapter(tiny_model_dir, tmp_path_factory) -> Path:
    return make_adapter(tiny_model_dir, tmp_path_factory.mktemp("adapters") / "a", seed=7)


@pytest.fixture
def source(adapter, tiny_model_dir) -> AdapterSource:
    return AdapterSource("a", adapter, BaseModelRef(source="tiny", path=str(tiny_model_dir)), QuantConfig())


def _logits(model, tokenizer, prompt: str):
    import torch

    with torch.no_grad():
        return model(**chat_inputs(tokenizer, prompt)).logits[0]


def test_cli_export_writes_safetensors_whose_logits_match_the_adapter(
    adapter, tiny_model_dir, tmp_path, tmp_path_factory, monkeypatch
):
    from loraops.cli.app import app

    monkeypatch.chdir(tmp_path)
    store_uri = shared_store_uri(tmp_path_factory)
    cfg = registry_config(store_uri, tmp_path)
    register(cfg, tmp_path, adapter, str(tiny_model_dir), client=make_client(store_uri))
    params = tmp_path / "params.yaml"
    params.write_text(json.dumps(cfg.model_dump(mode="json")))
    target = tmp_path / "merged"

    command = ["export", cfg.registry.model_name, "1", "--merged", str(target), "-p", str(params)]
    result = CliRunner().invoke(app, command)

    assert result.exit_code == 0, result.output
    assert "equivalence passed" in result.stdout
    files = {path.name for path in target.iterdir()}
    assert {"model.safetensors", "config.json", "tokenizer.json", EXPORT_MANIFEST} <= files
    assert not [name for name in files if name.endswith((".bin", ".pt", ".pth"))]
    manifest = json.loads((target / EXPORT_MANIFEST).read_text())
    assert (manifest["model_name"], manifest["version"]) == (cfg.registry.model_name, "1")
    assert manifest["equivalence"]["max_abs_diff"] < 1e-4
    # Independently of the check: the saved model answers as the adapter on its base does.
    on_base = AdapterSource("a", adapter, BaseModelRef(source="tiny", path=str(tiny_model_dir)), QuantConfig())
    peft_model, tokenizer = load_adapter(on_base, ModelConfig(), "cpu")
    merged, merged_tokenizer = load_merged(target, ModelConfig(), "cpu")
    assert "lora" not in " ".join(name for name, _ in merged.named_parameters())
    difference = (_logits(merged, merged_tokenizer, PROMPT) - _logits(peft_model, tokenizer, PROMPT)).abs().max()
    assert difference < 1e-4
    assert generate_text(merged, merged_tokenizer, PROMPT, 12) == generate_text(peft_model, tokenizer, PROMPT, 12)


def test_a_mismatch_beyond_tolerance_writes_nothing(source, tmp_path):
    target = tmp_path / "merged"
    mismatch = r"equivalence FAILED: max \|Δlogit\| .* Nothing was written"
    with pytest.raises(ExportMismatchError, match=mismatch) as error:
        export_merged(source, ModelConfig(), ExportConfig(tolerance=1e-12), target, "cpu")
    assert 0 < error.value.report.max_abs_diff < 1e-4
    assert not target.exists() and not list(tmp_path.glob(".merged*"))


def test_export_replaces_an_earlier_export_but_not_other_folders(source, tmp_path):
    occupied = tmp_path / "occupied"
    occupied.mkdir()
    (occupied / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="not a loraops export"):
        export_merged(source, ModelConfig(), ExportConfig(), occupied, "cpu")

    export_merged(source, ModelConfig(), ExportConfig(), tmp_path / "merged", "cpu")
    report = export_merged(source, ModelConfig(), ExportConfig(), tmp_path / "merged", "cpu")
    assert report.passed and report.probe_prompts == 3 and report.merge_max_abs_diff is None


def test_pickled_merged_model_is_refused(tiny_model_dir, tmp_path):
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    model.config.save_pretrained(tmp_path / "pickled")
    torch.save(model.state_dict(), tmp_path / "pickled" / "pytorch_model.bin")
    with pytest.raises(UnsafeArtifactError, match=r"pickled weights \(pytorch_model.bin\).*safetensors only"):
        load_merged(tmp_path / "pickled", ModelConfig(), "cpu")


def test_qlora_adapter_is_merged_into_a_dequantised_base_and_the_gap_is_reported(source):
    pytest.importorskip("bitsandbytes")
    nf4 = QuantConfig(mode="nf4", compute_dtype="float32")
    qlora = AdapterSource(source.label, source.adapter_dir, source.base, nf4)

    report = check_merge(qlora, ModelConfig(), ExportConfig(), "cpu")

    assert report.reference == "adapter on the nf4 4-bit base"
    assert report.merge_max_abs_diff < 1e-4, "the merge itself is exact on the dequantised base"
    assert report.max_abs_diff > 100 * report.merge_max_abs_diff, "4-bit rounding shows against the 4-bit reference"
    assert report.passed and report.tolerance is None, "by default the quantisation gap is reported, not enforced"
    assert "not enforced) against the adapter on the nf4 4-bit base" in report.summary()


def test_quantised_gap_and_merge_exactness_are_both_enforced_when_bounded():
    import torch

    reference, unmerged = torch.zeros(4, 8), torch.full((4, 8), 0.5)
    merged = unmerged + 1e-6
    nf4 = QuantConfig(mode="nf4")
    bounded = ExportConfig(quantized_tolerance=0.4)

    assert not compare(reference, merged, unmerged, nf4, bounded).passed, "gap 0.5 > 0.4"
    assert compare(reference, merged, unmerged, nf4, ExportConfig(quantized_tolerance=0.6)).passed
    assert not compare(reference, unmerged + 0.01, unmerged, nf4, ExportConfig()).passed, "an inexact merge fails"
    plain = compare(reference, reference + 2e-4, None, QuantConfig(), ExportConfig())
    assert plain.passed and plain.tolerance == 1e-3 and plain.merge_max_abs_diff is None
