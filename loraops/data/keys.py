"""One deterministic key scheme for duplicates and train/validation leakage, shared with the data contract.

A text's key is a 64-bit hash of its UTF-8 bytes (``hash_strings``), the same in every process and
on every machine (Python's ``hash()`` of a string is salted per process). It is computed by numpy
over an Arrow string array's buffers, with no Python object per text, so the contract hashes a
million rows' turns in about a second: each 8-byte word of a text is mixed with its position,
the words are summed and the sum is mixed with the text's length through splitmix64's finaliser.
An example's key combines its turns: each turn's key is mixed with its role and position and the
results are summed, so training (``overlap_keys``) and the contract's vectorised scan
(``contract.keys``) compute equal keys from these same functions. Two different texts share a key
with a probability of about n²/2⁶⁵ for non-adversarial data, a false duplicate in ~10⁻⁸ of
million-row runs. Not a cryptographic hash: someone who wants two rows to collide can make them.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from loraops.data.formats import TEXT_ROLE

if TYPE_CHECKING:
    import numpy as np
    import pyarrow as pa

KEY_TAGS = {"question": 0x9E3779B97F4A7C15, "answer": 0xC2B2AE3D27D4EB4F, "whole": 0x165667B19E3779F9}
WORD_SALT = 0x9E3779B97F4A7C15
HASH_SLICE = 1 << 16


def normalize_text(value: Any) -> str:
    """Casefold and collapse whitespace: "Hello  there" and "hello there" count as one text."""
    return "" if value is None else " ".join(str(value).casefold().split())


def digests(texts: Iterable[str | None]) -> np.ndarray:
    """uint64 key of each text's UTF-8 (a lone surrogate passes through); 0 for None."""
    import pyarrow as pa

    encoded = [None if text is None else text.encode("utf-8", "surrogatepass") for text in texts]
    return hash_strings(pa.array(encoded, pa.binary()))


def hash_strings(array: pa.Array) -> np.ndarray:
    """uint64 key of each value of an Arrow string or binary array (0 for null), from its buffers."""
    return hash_strings_and_lowered(array, lowered=False)[0]


def hash_strings_and_lowered(array: pa.Array, lowered: bool = True) -> tuple[np.ndarray, np.ndarray | None]:
    """``hash_strings`` of each value and (``lowered``) of its ASCII-lowercased form, from one read of the bytes.

    The second equals ``hash_strings(pyarrow.compute.ascii_lower(array))``: only A-Z change.
    """
    import numpy as np

    parts = [_hash_slice(array.slice(start, HASH_SLICE), lowered) for start in range(0, len(array), HASH_SLICE)]
    if not parts:
        return np.zeros(0, dtype=np.uint64), np.zeros(0, dtype=np.uint64) if lowered else None
    exact = np.concatenate([part[0] for part in parts])
    return exact, np.concatenate([part[1] for part in parts]) if lowered else None


def _hash_slice(array: pa.Array, lowered: bool) -> tuple[np.ndarray, np.ndarray | None]:
    """``hash_strings_and_lowered`` of up to HASH_SLICE values (the temporaries stay a few MB)."""
    import numpy as np
    import pyarrow as pa

    count = len(array)
    large = array.type in (pa.large_string(), pa.large_binary())
    _, offset_buffer, data_buffer = array.buffers()
    width = 8 if large else 4
    offsets = np.frombuffer(offset_buffer, dtype=f"<i{width}", count=count + 1, offset=array.offset * width)
    low, high = int(offsets[0]), int(offsets[-1])
    padded = np.zeros(high - low + 8, dtype=np.uint8)  # 8 zero bytes after the last text: whole words
    if high > low:
        padded[: high - low] = np.frombuffer(data_buffer, dtype=np.uint8, count=high - low, offset=low)
    lengths = np.diff(offsets).astype(np.int64)
    words = (lengths + 7) >> 3
    first = np.zeros(count + 1, dtype=np.int64)
    np.cumsum(words, out=first[1:])
    word = np.arange(first[-1], dtype=np.int64)
    position = word - np.repeat(first[:-1], words)  # the word's index within its text
    starts = np.repeat(offsets[:-1].astype(np.int64) - low, words)
    values = np.lib.stride_tricks.sliding_window_view(padded, 8)[starts + 8 * position].view("<u8")[:, 0]
    tails = np.flatnonzero(lengths & 7)  # a text's last word holds bytes of the next text: mask them off
    kept_bits = (lengths[tails] & 7).astype(np.uint64) * np.uint64(8)
    values[first[tails + 1] - 1] &= (np.uint64(1) << kept_bits) - np.uint64(1)
    salt = position.astype(np.uint64) * np.uint64(WORD_SALT)
    length_salt = mix(lengths.astype(np.uint64) + np.uint64(WORD_SALT))
    invalid = ~array.is_valid().to_numpy(zero_copy_only=False) if array.null_count else None
    keys = [_combine(values, salt, first, length_salt, invalid)]
    if lowered:
        keys.append(_combine(_ascii_lower(values), salt, first, length_salt, invalid))
    return keys[0], keys[1] if lowered else None


def _ascii_lower(words: np.ndarray) -> np.ndarray:
    """Bytes A-Z of each 8-byte word made a-z, all eight at once (no carry crosses a byte)."""
    import numpy as np

    low7 = words & np.uint64(0x7F7F7F7F7F7F7F7F)
    at_least_a = low7 + np.uint64(0x3F3F3F3F3F3F3F3F)  # high bit set where the byte's low 7 bits >= 'A'
    past_z = low7 + np.uint64(0x2525252525252525)  # ... where they are > 'Z'
    upper = at_least_a & ~past_z & ~words & np.uint64(0x8080808080808080)  # ASCII bytes only
    return words | (upper >> np.uint64(2))  # 0x80 >> 2 == 0x20, the case bit


def _combine(
    values: np.ndarray, salt: np.ndarray, first: np.ndarray, length_salt: np.ndarray, invalid: np.ndarray | None
) -> np.ndarray:
    """Mix each word with its position, sum a text's words, mix the sum with the length."""
    import numpy as np

    mixed = (values ^ salt) * np.uint64(0xBF58476D1CE4E5B9)
    mixed ^= mixed >> np.uint64(29)
    mixed *= np.uint64(0x94D049BB133111EB)
    sums = np.zeros(len(mixed) + 1, dtype=np.uint64)
    np.cumsum(mixed, out=sums[1:])
    keys = mix((sums[first[1:]] - sums[first[:-1]]) ^ length_salt)
    if invalid is not None:
        keys[invalid] = 0
    return keys


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
