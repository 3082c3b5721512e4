"""Turn normalised examples into token ids and loss labels, once, for training and evaluation alike.

Chat examples train on the final assistant turn only: the prompt is every earlier turn rendered with
the chat template and a generation prompt, the completion is what the template adds for the final
assistant turn (its text and end-of-turn tokens). Plain-text examples train on every token. The same
function feeds the trainer and the evaluator, so baseline and adapter losses cover identical tokens.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

IGNORE_INDEX = -100


@dataclass(frozen=True)
class TokenizedExample:
    input_ids: list[int]
    labels: list[int]  # IGNORE_INDEX where the token is context, not a target

    @property
    def length(self) -> int:
        return len(self.input_ids)

    @property
    def target_tokens(self) -> int:
        return sum(label != IGNORE_INDEX for label in self.labels[1:])


def _ids(encoded: Any) -> list[int]:
    """``apply_chat_template(tokenize=True)`` returns a BatchEncoding in transformers 5, a list before."""
    if isinstance(encoded, dict) or hasattr(encoded, "keys"):
        return list(encoded["input_ids"])
    return list(encoded)


def _common_prefix_length(a: list[int], b: list[int]) -> int:
    length = 0
    for left, right in zip(a, b):
        if left != right:
            break
        length += 1
    return length


def tokenize_example(tokenizer: Any, example: dict[str, Any], max_length: int | None = None) -> TokenizedExample:
    """Tokenise one normalised example (``{"messages": [...]}`` or ``{"text": ...}``)."""
    if "messages" in example:
        messages = example["messages"]
        prompt_ids = _ids(tokenizer.apply_chat_template(messages[:-1], tokenize=True, add_generation_prompt=True))
        full_ids = _ids(tokenizer.apply_chat_template(messages, tokenize=True))
        prompt_length = _common_prefix_length(prompt_ids, full_ids)
        labels = [IGNORE_INDEX] * prompt_length + full_ids[prompt_length:]
    else:
        full_ids = list(tokenizer(example["text"], add_special_tokens=True)["input_ids"])
        if tokenizer.eos_token_id is not None and (not full_ids or full_ids[-1] != tokenizer.eos_token_id):
            full_ids.append(tokenizer.eos_token_id)
        labels = list(full_ids)
    if max_length is not None:
        full_ids, labels = full_ids[:max_length], labels[:max_length]
    return TokenizedExample(input_ids=full_ids, labels=labels)


def token_lengths(tokenizer: Any, examples: list[dict[str, Any]]) -> list[int]:
    """Untruncated length of each example after the chat template (for the data contract)."""
    return [tokenize_example(tokenizer, example).length for example in examples]


def build_dataset(tokenizer: Any, examples: list[dict[str, Any]], max_length: int):
    """A ``datasets.Dataset`` with ``input_ids`` and ``labels``: TRL's SFTTrainer uses it as is."""
    from datasets import Dataset

    tokenized = [tokenize_example(tokenizer, example, max_length) for example in examples]
    return Dataset.from_dict(
        {"input_ids": [item.input_ids for item in tokenized], "labels": [item.labels for item in tokenized]}
    )
