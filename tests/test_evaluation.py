"""evaluate_loss is what the gate compares: it must equal a hand computation and ignore batching."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from datasets import Dataset

from loraops.data.tokenization import IGNORE_INDEX, build_dataset
from loraops.train.token_loss import evaluate_loss


@pytest.fixture(scope="module")
def tiny_model(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)


@pytest.fixture(scope="module")
def validation_dataset(tiny_tokenizer):
    lines = (Path(__file__).parent / "fixtures" / "data" / "validation.jsonl").read_text().splitlines()
    rows = [json.loads(line) for line in lines]
    return build_dataset(tiny_tokenizer, rows, max_length=64)


def _hand_nll(model, input_ids: list[int], labels: list[int]) -> tuple[float, int]:
    """One unpadded sequence: position t predicts labels[t + 1]."""
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([input_ids])).logits[0].double()
    log_probs = torch.log_softmax(logits, dim=-1)
    total, count = 0.0, 0
    for position in range(len(input_ids) - 1):
        target = labels[position + 1]
        if target != IGNORE_INDEX:
            total -= log_probs[position, target].item()
            count += 1
    return total, count


def test_equals_a_hand_computation(tiny_model):
    rows = {
        "input_ids": [[5, 6, 7, 8, 9, 10], [11, 12, 13], [14, 15, 16, 17]],
        "labels": [
            [IGNORE_INDEX, IGNORE_INDEX, 7, 8, IGNORE_INDEX, 10],
            [IGNORE_INDEX, 12, IGNORE_INDEX],
            [IGNORE_INDEX, IGNORE_INDEX, IGNORE_INDEX, 17],
        ],
    }
    totals = [_hand_nll(tiny_model, ids, labels) for ids, labels in zip(rows["input_ids"], rows["labels"])]
    expected = sum(total for total, _ in totals) / sum(count for _, count in totals)

    metrics = evaluate_loss(tiny_model, Dataset.from_dict(rows), batch_size=3)

    assert metrics.tokens == 5 and metrics.examples == 3
    assert metrics.loss == pytest.approx(expected, abs=1e-5)
    assert metrics.perplexity == pytest.approx(math.exp(expected), rel=1e-5)


def test_counts_the_target_tokens_of_the_tokenised_chats(tiny_model, validation_dataset):
    expected_tokens = sum(sum(label != IGNORE_INDEX for label in labels[1:]) for labels in validation_dataset["labels"])
    metrics = evaluate_loss(tiny_model, validation_dataset, batch_size=4)
    assert metrics.tokens == expected_tokens > 0
    assert metrics.examples == len(validation_dataset)


def test_does_not_depend_on_batch_size(tiny_model, validation_dataset):
    one, four, five = (evaluate_loss(tiny_model, validation_dataset, size) for size in (1, 4, 5))
    assert abs(one.loss - four.loss) < 1e-5 and abs(one.loss - five.loss) < 1e-5
    assert one.tokens == four.tokens == five.tokens


def test_restores_training_mode_and_tracks_no_gradients(tiny_model, validation_dataset):
    tiny_model.train()
    try:
        evaluate_loss(tiny_model, validation_dataset, batch_size=4)
        assert tiny_model.training
        assert all(parameter.grad is None for parameter in tiny_model.parameters())
    finally:
        tiny_model.eval()
