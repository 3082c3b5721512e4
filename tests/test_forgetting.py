"""The forgetting check end to end on the tiny model: a destructively trained adapter gains on the task
but loses on general text, and the gate refuses it for that reason."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from loraops.config import GateConfig, LoraopsConfig
from loraops.data.tokenization import build_dataset
from loraops.evaluate.evidence import interval
from loraops.evaluate.forgetting import GeneralTextError, general_loss, general_texts
from loraops.evaluate.gate import GateEvidence, gate_candidate
from loraops.train.token_loss import evaluate_example_losses

FIXTURES = Path(__file__).parent / "fixtures" / "data"
GENERAL = [
    "Rain fell on the old harbour while gulls circled the fishing boats.",
    "Quantum computers use qubits; classical machines use bits.",
    "My grandmother bakes bread every Sunday morning before church.",
    "The orchestra tuned up, then played Dvorak's ninth symphony.",
]


def _rows(name: str) -> list[dict]:
    return [json.loads(line) for line in (FIXTURES / name).read_text().splitlines()]


@pytest.fixture
def general_file(tmp_path) -> Path:
    path = tmp_path / "general.jsonl"
    path.write_text("".join(json.dumps({"text": text}) + "\n" for text in GENERAL))
    return path


def _destructive_adapter(model_dir: Path, train):
    """A damaged candidate: every weight trained at a destructive learning rate on the task's answers only."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    model.train()
    for step in range(48):
        example = train[step % len(train)]
        loss = model(input_ids=torch.tensor([example["input_ids"]]), labels=torch.tensor([example["labels"]])).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    return model


def test_a_destructive_adapter_improves_the_task_but_fails_the_forgetting_check(
    tiny_model_dir, tiny_tokenizer, general_file
):
    from transformers import AutoModelForCausalLM

    cfg = LoraopsConfig.model_validate(
        {"eval": {"general_file": str(general_file), "general_examples": 4, "batch_size": 4}}
    )
    validation = build_dataset(tiny_tokenizer, _rows("validation.jsonl"), 64)
    train = build_dataset(tiny_tokenizer, _rows("train.jsonl"), 64)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    base_metrics, base_examples = evaluate_example_losses(base, validation, 4)
    base_metrics.general_loss = general_loss(cfg.eval, Path("/"), base, tiny_tokenizer)

    adapter = _destructive_adapter(tiny_model_dir, train)
    adapter_metrics, adapter_examples = evaluate_example_losses(adapter, validation, 4)
    adapter_metrics.general_loss = general_loss(cfg.eval, Path("/"), adapter, tiny_tokenizer)

    assert adapter_metrics.loss < base_metrics.loss - 0.5  # the task loss improved a lot
    assert adapter_metrics.general_loss > base_metrics.general_loss * 1.05  # general text got worse
    evidence = GateEvidence(
        over_base=interval(cfg, base_examples, adapter_examples),
        general_base_loss=base_metrics.general_loss,
        general_candidate_loss=adapter_metrics.general_loss,
    )
    decision = gate_candidate(base_metrics, adapter_metrics, None, None, GateConfig(), evidence)

    assert not decision.passed
    assert "improved by" in decision.reasons[0] and "95% CI" in decision.reasons[0]
    assert "rises more than the allowed 5.0%" in decision.reasons[2]
    assert sum(base_examples.tokens) == base_metrics.tokens
    assert sum(base_examples.nll) / base_metrics.tokens == pytest.approx(base_metrics.loss)


def test_general_file_errors_name_the_file_and_line(tmp_path):
    bad = tmp_path / "general.jsonl"
    bad.write_text('{"text": "fine"}\n{"txt": "typo"}\n')
    with pytest.raises(GeneralTextError, match=r"general.jsonl:2: needs a non-empty string field \"text\""):
        general_texts(str(bad), 1, tmp_path)
    with pytest.raises(GeneralTextError, match="fewer than eval.general_examples=5"):
        general_texts(_write(tmp_path), 5, tmp_path)
    with pytest.raises(GeneralTextError, match="does not exist"):
        general_texts("missing.jsonl", 1, tmp_path)


def _write(tmp_path: Path) -> str:
    good = tmp_path / "good.jsonl"
    good.write_text('{"text": "one"}\n{"text": "two"}\n')
    return str(good)


def test_the_default_general_set_ships_offline():
    texts = general_texts("pypi:chitchat-dataset", 3, Path("."))
    assert len(texts) == 3 and all(text.strip() for text in texts)
    assert texts == general_texts("pypi:chitchat-dataset", 3, Path("."))  # deterministic order
