"""SQuAD-style answer scoring: normalisation, token F1, exact match and answer containment."""

from __future__ import annotations

import re
import string
from collections import Counter

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCTUATION = str.maketrans("", "", string.punctuation)


def normalize_answer(text: str) -> str:
    """Lower-cases, drops punctuation and articles, and collapses whitespace (SQuAD v1.1).

    Args:
        text: A predicted or gold answer.

    Returns:
        The normalised answer; words separated by single spaces.
    """
    text = text.lower().translate(_PUNCTUATION)
    text = _ARTICLES.sub(" ", text)
    return " ".join(text.split())


def _token_f1(prediction: str, gold: str) -> float:
    """Token-overlap F1 between one prediction and one gold answer, both normalised here."""
    pred_tokens = normalize_answer(prediction).split()
    gold_tokens = normalize_answer(gold).split()
    if not pred_tokens or not gold_tokens:
        return float(pred_tokens == gold_tokens)
    num_common = sum((Counter(pred_tokens) & Counter(gold_tokens)).values())
    if num_common == 0:
        return 0.0
    precision = num_common / len(pred_tokens)
    recall = num_common / len(gold_tokens)
    return 2 * precision * recall / (precision + recall)


def f1_score(prediction: str, golds: list[str]) -> float:
    """SQuAD token F1 of `prediction`, the best over the gold answers.

    Args:
        prediction: The model's answer text.
        golds: Acceptable gold answers; an empty list scores 0.

    Returns:
        F1 in [0, 1].
    """
    return max((_token_f1(prediction, gold) for gold in golds), default=0.0)


def exact_match(prediction: str, golds: list[str]) -> bool:
    """Whether the normalised prediction equals any normalised gold answer."""
    normalized = normalize_answer(prediction)
    return any(normalized == normalize_answer(gold) for gold in golds)


def contains_answer(prediction: str, golds: list[str]) -> bool:
    """Whether any normalised gold answer occurs in the normalised prediction.

    Matching is on whole words, so gold "1987" is not found in "19875". Used as accuracy on
    the fact-QA set, where the model may answer with a full sentence around the fact.

    Args:
        prediction: The model's answer text.
        golds: Acceptable gold answers; empty golds never match.

    Returns:
        True when some non-empty gold answer is contained in the prediction.
    """
    padded = f" {normalize_answer(prediction)} "
    for gold in golds:
        normalized = normalize_answer(gold)
        if normalized and f" {normalized} " in padded:
            return True
    return False
