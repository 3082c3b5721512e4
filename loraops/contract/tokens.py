"""Token lengths after the chat template, as training measures them; rows the template refuses."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from loraops.contract.facts import SplitFacts
from loraops.data.batches import RowBatch
from loraops.data.formats import TEXT_ROLE

if TYPE_CHECKING:
    import numpy as np

TOKENIZE_BATCH = 256


def token_lengths(facts: SplitFacts, batch: RowBatch, tokenizer: Any, max_length: int, renderable: np.ndarray) -> None:
    """Untruncated length after the chat template, as ``tokenization.tokenize_example`` measures it."""
    import numpy as np

    rows = np.flatnonzero(renderable)
    examples = batch.messages.take(rows).to_pylist()
    lengths = np.full(len(batch), np.nan)
    errors: dict[int, str] = {}
    for start in range(0, len(rows), TOKENIZE_BATCH):
        chunk = examples[start : start + TOKENIZE_BATCH]
        for offset, (length, error) in enumerate(_measure(tokenizer, chunk)):
            row = int(rows[start + offset])
            lengths[row] = np.nan if length is None else length
            if error:
                errors[row] = error
    failed = np.zeros(len(batch), dtype=bool)
    failed[list(errors)] = True
    over = np.nan_to_num(lengths, nan=0) > max_length
    facts.template_errors.update({int(batch.lines[row]): error for row, error in errors.items()})
    facts.add("token_length", lengths)
    facts.add("tokenizes", failed)
    facts.add("over_length", over)
    facts.explain("tokenizes", batch.lines, failed, lambda row: errors[row])
    facts.explain("over_length", batch.lines, over, lambda row: f"{int(lengths[row])} tokens > max_length {max_length}")


def _measure(tokenizer: Any, examples: list[list[dict[str, Any]]]) -> list[tuple[int | None, str | None]]:
    """Token counts of a batch; a template that raises is retried row by row to find the rows it refuses."""
    try:
        return [(length, None) for length in _batch_lengths(tokenizer, examples)]
    except Exception:  # the chat template is user Jinja and may raise anything
        results: list[tuple[int | None, str | None]] = []
        for example in examples:
            try:
                results.append((_batch_lengths(tokenizer, [example])[0], None))
            except Exception as caught:
                results.append((None, f"tokenisation failed: {type(caught).__name__}: {caught}"))
        return results


def _batch_lengths(tokenizer: Any, examples: list[list[dict[str, Any]]]) -> list[int]:
    if not examples:
        return []
    if examples[0][0]["role"] == TEXT_ROLE:
        texts = [turns[0]["content"] for turns in examples]
        eos = tokenizer.eos_token_id
        ids = tokenizer(texts, add_special_tokens=True)["input_ids"]
        return [len(item) + (eos is not None and (not item or item[-1] != eos)) for item in ids]
    encoded = tokenizer.apply_chat_template(examples, tokenize=True)
    ids = encoded["input_ids"] if hasattr(encoded, "keys") else encoded
    return [len(item) for item in ids]
