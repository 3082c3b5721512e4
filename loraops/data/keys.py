"""One deterministic key scheme for duplicates and train/validation leakage, shared with the data contract.

A text's key is the 64-bit blake2b digest of its UTF-8 bytes, the same in every process and on
every machine (Python's ``hash()`` of a string is salted per process). An example's key combines
its turns: each turn's digest is mixed with its role and position and the results are summed, so
training (``overlap_keys``) and the contract's vectorised scan (``contract.keys``) compute equal
keys from these same functions. Two different texts share a key with a probability of about
n²/2⁶⁵, a false duplicate in ~10⁻⁸ of million-row runs.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from loraops.data.formats import TEXT_ROLE

if TYPE_CHECKING:
    import numpy as np

KEY_TAGS = {"question": 0x9E3779B97F4A7C15, "answer": 0xC2B2AE3D27D4EB4F, "whole": 0x165667B19E3779F9}
_NO_TEXT = bytes(8)  # the key of a missing (null) text is 0


def normalize_text(value: Any) -> str:
    """Casefold and collapse whitespace: "Hello  there" and "hello there" count as one text."""
    return "" if value is None else " ".join(str(value).casefold().split())


def digests(texts: Iterable[str | None]) -> np.ndarray:
    """uint64 blake2b digest of each text's UTF-8 (a lone surrogate passes through); 0 for None."""
    import numpy as np

    blake2b = hashlib.blake2b
    data = b"".join(
        [
            _NO_TEXT if text is None else blake2b(text.encode("utf-8", "surrogatepass"), digest_size=8).digest()
            for text in texts
        ]
    )
    return np.frombuffer(data, dtype="<u8").astype(np.uint64)


def mix(values: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser: spreads every input bit over the whole 64-bit key."""
    import numpy as np

    values = values ^ (values >> np.uint64(30))
    values = values * np.uint64(0xBF58476D1CE4E5B9)
    values = values ^ (values >> np.uint64(27))
    values = values * np.uint64(0x94D049BB133111EB)
    return values ^ (values >> np.uint64(31))


def turn_salts(role_digests: np.ndarray, positions: np.ndarray) -> np.ndarray:
    """What a turn's content key is mixed with: its role and its position in the example."""
    import numpy as np

    return mix(role_digests ^ positions.astype(np.uint64))


def tagged(kind: str, keys: np.ndarray) -> np.ndarray:
    """Keys of one kind, tagged so a question never matches an answer or a whole example."""
    import numpy as np

    return mix(keys ^ np.uint64(KEY_TAGS[kind]))


def _messages(example: dict[str, Any]) -> list[dict[str, Any]]:
    messages = example.get("messages")
    if not isinstance(messages, list):
        return []
    return [message for message in messages if isinstance(message, dict)]


def dedup_key(example: dict[str, Any]) -> str:
    """Normalised content of a whole example, as readable text (a data diff shows it)."""
    if "messages" in example:
        return "\x1e".join(
            f"{normalize_text(message.get('role'))}\x1f{normalize_text(message.get('content'))}"
            for message in _messages(example)
        )
    return normalize_text(example.get("text"))


def question_key(example: dict[str, Any]) -> str | None:
    """Normalised first user turn: the question a validation example asks."""
    for message in _messages(example):
        if message.get("role") == "user":
            return normalize_text(message.get("content")) or None
    return None


def answer_keys(example: dict[str, Any]) -> set[str]:
    """Normalised assistant turns: the targets a model could memorise from training."""
    return {
        normalize_text(message.get("content"))
        for message in _messages(example)
        if message.get("role") == "assistant" and normalize_text(message.get("content"))
    }


def example_key(example: dict[str, Any]) -> int:
    """Key of a whole normalised example (roles as written); equal keys are duplicates, as in the contract."""
    import numpy as np

    if "messages" in example:
        turns = [(message.get("role"), message.get("content")) for message in _messages(example)]
    else:
        turns = [(TEXT_ROLE, example.get("text"))]
    contents = digests(None if content is None else normalize_text(content) for _, content in turns)
    roles = digests(None if role is None else str(role) for role, _ in turns)
    salts = turn_salts(roles, np.arange(len(turns)))
    return int(mix(contents ^ salts).sum(dtype=np.uint64))


def overlap_keys(example: dict[str, Any]) -> set[int]:
    """Keys two examples must not share across train and validation (question, answers, whole).

    They equal the contract's tagged keys of the same row, so the import's split and the
    contract's leakage check agree on what overlaps.
    """
    import numpy as np

    question = question_key(example)
    keys = [
        tagged("whole", np.array([example_key(example)], dtype=np.uint64)),
        tagged("question", digests([question] if question else [])),
        tagged("answer", digests(sorted(answer_keys(example)))),
    ]
    return {int(key) for key in np.concatenate(keys)}
