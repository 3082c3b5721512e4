"""Scores of generated answers against reference answers: ROUGE-L F1 (``rouge-score``) and exact match.

Exact match compares after casefolding, stripping punctuation at the ends and collapsing whitespace,
so "Paris." matches "paris". Both are means over the scored examples, in [0, 1].
"""

from __future__ import annotations

import re
from dataclasses import dataclass


@dataclass(frozen=True)
class AnswerScores:
    rouge_l: float  # mean ROUGE-L F1
    exact_match: float  # share of answers equal to their reference after normalisation
    examples: int


def normalise(text: str) -> str:
    return re.sub(r"\s+", " ", text.casefold()).strip().strip(".!?,;:'\" ").strip()


def score_answers(predictions: list[str], references: list[str]) -> AnswerScores:
    from rouge_score import rouge_scorer

    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} answers for {len(references)} references: score them pairwise")
    if not predictions:
        raise ValueError("no answers to score")
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)
    rouge = [
        scorer.score(reference, prediction)["rougeL"].fmeasure for prediction, reference in zip(predictions, references)
    ]
    exact = [normalise(prediction) == normalise(reference) for prediction, reference in zip(predictions, references)]
    return AnswerScores(rouge_l=sum(rouge) / len(rouge), exact_match=sum(exact) / len(exact), examples=len(rouge))
