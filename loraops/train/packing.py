"""How much of a batch is padding: padded batches, padding-free batches, fixed-length packed bins.

Plain Python over example lengths (no torch): the benchmark and the docs use it to say what
padding costs on a given dataset before any GPU time is spent.

* **padded**: each batch is padded to its longest example (what ``DataCollatorForLanguageModeling``
  does without ``padding_free``), batches drawn in a seeded random order as the trainer's sampler does;
* **padding-free**: each batch is one flattened sequence with per-example positions (loraops'
  default): no pad token at all, by construction;
* **packed bins**: examples placed best-fit-decreasing into rows of ``capacity`` tokens, each row
  padded to ``capacity`` (classic fixed-length packing without padding-free attention).
"""

from __future__ import annotations

import random
from bisect import bisect_left, insort
from collections.abc import Sequence
from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class PaddingReport:
    examples: int
    tokens: int
    batch_size: int
    padded_slots: int  # tokens + pad tokens of the padded batches
    packed_bins: int
    bin_capacity: int

    @property
    def padded_share(self) -> float:
        return 1 - self.tokens / self.padded_slots if self.padded_slots else 0.0

    @property
    def padding_free_share(self) -> float:
        return 0.0

    @property
    def packed_share(self) -> float:
        slots = self.packed_bins * self.bin_capacity
        return 1 - self.tokens / slots if slots else 0.0

    def as_dict(self) -> dict:
        return {
            **asdict(self),
            "padded_share": self.padded_share,
            "padding_free_share": self.padding_free_share,
            "packed_share": self.packed_share,
        }


def padded_slots(lengths: Sequence[int], batch_size: int, seed: int | None = None) -> int:
    """Token slots of batches padded to their longest example; ``seed`` shuffles first (None keeps the order)."""
    order = list(lengths)
    if seed is not None:
        random.Random(seed).shuffle(order)
    return sum(
        max(order[start : start + batch_size]) * len(order[start : start + batch_size])
        for start in range(0, len(order), batch_size)
    )


def best_fit_bins(lengths: Sequence[int], capacity: int) -> int:
    """Rows of ``capacity`` tokens that best-fit-decreasing packing needs (longer examples are cut to capacity)."""
    free: list[int] = []  # sorted free space of the open rows
    for length in sorted((min(length, capacity) for length in lengths), reverse=True):
        index = bisect_left(free, length)
        if index == len(free):
            insort(free, capacity - length)
        else:
            space = free.pop(index)
            insort(free, space - length)
    return len(free)


def padding_report(lengths: Sequence[int], batch_size: int, capacity: int, seed: int | None = 42) -> PaddingReport:
    """Padding of one epoch of ``lengths`` at ``batch_size``: padded, padding-free, and in packed rows of ``capacity``."""
    if batch_size < 1 or capacity < 1:
        raise ValueError(f"batch_size ({batch_size}) and capacity ({capacity}) must be positive")
    return PaddingReport(
        examples=len(lengths),
        tokens=sum(min(length, capacity) for length in lengths),
        batch_size=batch_size,
        padded_slots=padded_slots([min(length, capacity) for length in lengths], batch_size, seed),
        packed_bins=best_fit_bins(lengths, capacity),
        bin_capacity=capacity,
    )
