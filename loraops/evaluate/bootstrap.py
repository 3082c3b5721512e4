"""How sure is a loss improvement? A paired bootstrap over the validation examples.

Both models were scored on the same examples, so each resample draws examples (with replacement) and
recomputes both token-weighted losses on that draw: the spread of ``reference - candidate`` says how
much of the gain a different draw of ~100 validation examples could erase. Seeded, so reruns agree.
"""

from __future__ import annotations

from dataclasses import dataclass

from loraops.results import ExampleLosses


@dataclass(frozen=True)
class Interval:
    """Improvement (reference loss - candidate loss, nats per token) and its percentile interval."""

    estimate: float
    low: float
    high: float
    confidence: float

    def describe(self) -> str:
        return f"{self.confidence:.0%} CI [{self.low:.3f}, {self.high:.3f}]"


def resample_indices(examples: int, resamples: int, seed: int):
    """The example indices of each resample, shape (resamples, examples): what the interval is computed over."""
    import numpy as np

    return np.random.default_rng(seed).integers(0, examples, size=(resamples, examples))


def paired_improvement_interval(
    reference: ExampleLosses, candidate: ExampleLosses, confidence: float, resamples: int, seed: int
) -> Interval:
    """Percentile interval of the token-weighted loss improvement of ``candidate`` over ``reference``."""
    import numpy as np

    if len(reference.nll) != len(candidate.nll) or reference.tokens != candidate.tokens:
        raise ValueError(
            f"paired bootstrap needs the same examples and target tokens for both models; got "
            f"{len(reference.nll)} examples / {sum(reference.tokens)} tokens vs "
            f"{len(candidate.nll)} / {sum(candidate.tokens)}"
        )
    if not reference.nll:
        raise ValueError("paired bootstrap needs at least one example")
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must lie strictly between 0 and 1, got {confidence}")
    indices = resample_indices(len(reference.nll), resamples, seed)
    ref_nll, cand_nll = np.asarray(reference.nll), np.asarray(candidate.nll)
    tokens = np.asarray(reference.tokens, dtype=np.float64)
    drawn_tokens = np.maximum(tokens[indices].sum(axis=1), 1.0)
    gains = (ref_nll[indices].sum(axis=1) - cand_nll[indices].sum(axis=1)) / drawn_tokens
    tail = (1 - confidence) / 2
    low, high = np.quantile(gains, [tail, 1 - tail])
    estimate = (ref_nll.sum() - cand_nll.sum()) / max(tokens.sum(), 1.0)
    return Interval(estimate=float(estimate), low=float(low), high=float(high), confidence=confidence)
