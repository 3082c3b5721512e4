"""ROUGE-L (rouge-score) and exact match on strings whose scores are known by hand."""

from __future__ import annotations

import pytest

from loraops.evaluate.answers import score_answers


def test_scores_of_known_strings():
    scores = score_answers(
        ["The capital is Paris.", "paris", "I like turtles"],
        ["Paris is the capital", "Paris.", "Eleven"],
    )
    # LCS("the capital is paris", "paris is the capital") = 2 tokens: P = R = 2/4, F1 = 0.5; then 1.0; then 0.
    assert scores.rouge_l == pytest.approx((0.5 + 1.0 + 0.0) / 3)
    assert scores.exact_match == pytest.approx(1 / 3)
    assert scores.examples == 3


def test_refuses_unpaired_lists():
    with pytest.raises(ValueError, match="2 answers for 1 references"):
        score_answers(["a", "b"], ["a"])
