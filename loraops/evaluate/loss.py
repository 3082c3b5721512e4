"""The one validation loss that the gate compares for the base model and the adapter.

Token-weighted mean negative log-likelihood over the target tokens (``labels != -100``) of a dataset
built by ``loraops.data.tokenization.build_dataset``. Every target token weighs the same whatever batch it
lands in, so the number does not depend on the batch size or on how examples are grouped.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator
from pathlib import Path

from loraops.data.tokenization import IGNORE_INDEX
from loraops.names import EXAMPLE_LOSSES_DIR
from loraops.results import EvalMetrics, ExampleLosses

logger = logging.getLogger(__name__)


def example_losses_path(reports_dir: Path, name: str) -> Path:
    """``reports/example_losses/{baseline,adapter}.json``: each validation example's NLL and target tokens."""
    return Path(reports_dir) / EXAMPLE_LOSSES_DIR / f"{name}.json"


def evaluate_loss(model, dataset, batch_size: int) -> EvalMetrics:
    """Mean NLL per target token of ``model`` on ``dataset`` (``input_ids`` and ``labels`` columns)."""
    return evaluate_example_losses(model, dataset, batch_size)[0]


def evaluate_example_losses(model, dataset, batch_size: int) -> tuple[EvalMetrics, ExampleLosses]:
    """The loss, and each example's summed NLL and target tokens (in dataset order) for the bootstrap."""
    import torch

    if batch_size <= 0:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    was_training = model.training
    model.eval()
    example_nll, example_tokens = [0.0] * len(dataset), [0] * len(dataset)
    try:
        with torch.no_grad():
            for indices, batch in _length_sorted_batches(dataset, batch_size):
                for index, (nll, count) in zip(indices, _batch_nll(model, batch)):
                    example_nll[index], example_tokens[index] = nll, count
    finally:
        model.train(was_training)
    tokens = sum(example_tokens)
    metrics = EvalMetrics.from_totals(math.fsum(example_nll), tokens, examples=len(dataset))
    logger.info("Loss %.4f (perplexity %.2f) over %d target tokens", metrics.loss, metrics.perplexity, tokens)
    return metrics, ExampleLosses(nll=example_nll, tokens=example_tokens)


def _length_sorted_batches(dataset, batch_size: int) -> Iterator[tuple[list[int], list[dict]]]:
    """Longest first, so similar lengths share a batch and an out-of-memory error shows up at once."""
    order = sorted(range(len(dataset)), key=lambda index: len(dataset[index]["input_ids"]), reverse=True)
    for start in range(0, len(order), batch_size):
        indices = order[start : start + batch_size]
        yield indices, [dataset[index] for index in indices]


def _pad_right(examples: list[dict], device) -> dict:
    import torch

    width = max(len(example["input_ids"]) for example in examples)
    input_ids = torch.zeros((len(examples), width), dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((len(examples), width), dtype=torch.long)
    for row, example in enumerate(examples):
        length = len(example["input_ids"])
        input_ids[row, :length] = torch.tensor(example["input_ids"])
        labels[row, :length] = torch.tensor(example["labels"])
        attention_mask[row, :length] = 1
    return {"input_ids": input_ids.to(device), "labels": labels.to(device), "attention_mask": attention_mask.to(device)}


def _batch_nll(model, examples: list[dict]) -> list[tuple[float, int]]:
    """Each example's summed NLL and count of target tokens (token t predicts label t + 1)."""
    import torch

    batch = _pad_right(examples, _input_device(model))
    targets = batch["labels"][:, 1:]
    mask = targets != IGNORE_INDEX
    if not mask.any():
        return [(0.0, 0)] * len(examples)
    # Logits only where a target is predicted: the full (batch, length, vocab) tensor is large.
    keep = _prediction_positions(mask)
    outputs = model(
        input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False, logits_to_keep=keep
    )
    logits = outputs.logits
    if logits.dim() == 3:  # a model that ignores a mask in logits_to_keep returns every position
        logits = logits[keep]
    nll = torch.nn.functional.cross_entropy(logits.float(), targets[mask], reduction="none").double()
    rows = mask.nonzero()[:, 0]
    per_row = torch.zeros(len(examples), dtype=torch.float64, device=nll.device).index_add_(0, rows, nll)
    if not torch.isfinite(per_row).all():
        logger.warning("Non-finite loss in an evaluation batch of %d examples", len(examples))
    counts = mask.sum(dim=1)
    return [(float(total), int(count)) for total, count in zip(per_row.tolist(), counts.tolist())]


def _prediction_positions(target_mask):
    """Boolean (batch, length) mask of the positions whose next token is a target."""
    import torch

    keep = torch.zeros((target_mask.size(0), target_mask.size(1) + 1), dtype=torch.bool, device=target_mask.device)
    keep[:, :-1] = target_mask
    return keep


def _input_device(model):
    return next(model.parameters()).device
