"""SQuAD-style normalisation, F1, exact match and answer containment."""

from __future__ import annotations

import pytest

from benchmarks.metrics import contains_answer, exact_match, f1_score, normalize_answer


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("The  Eiffel Tower!", "eiffel tower"),
        ("an apple, a pear", "apple pear"),
        ("  McDonald County. ", "mcdonald county"),
        ("Theatre", "theatre"),
        ("", ""),
    ],
)
def test_normalize_answer(text: str, expected: str) -> None:
    assert normalize_answer(text) == expected


def test_f1_exact_and_partial() -> None:
    assert f1_score("McDonald County", ["mcdonald county."]) == 1.0
    # prediction "county" vs gold "mcdonald county": p=1, r=1/2 -> 2/3
    assert f1_score("County", ["McDonald County"]) == pytest.approx(2 / 3)
    # prediction "born in dravenport" vs gold "dravenport": p=1/3, r=1 -> 1/2
    assert f1_score("Born in Dravenport.", ["Dravenport"]) == pytest.approx(0.5)


def test_f1_takes_best_gold_and_handles_empty() -> None:
    assert f1_score("Paris", ["London", "paris"]) == 1.0
    assert f1_score("Paris", ["London"]) == 0.0
    assert f1_score("Paris", []) == 0.0
    assert f1_score("", ["Paris"]) == 0.0
    assert f1_score("the", ["a"]) == 1.0  # both normalise to empty


def test_exact_match() -> None:
    assert exact_match("The Beatles.", ["beatles"])
    assert not exact_match("The Beatles were a band", ["beatles"])


def test_contains_answer_is_word_bounded() -> None:
    assert contains_answer("Marla was born in the city of Dravenport.", ["Dravenport"])
    assert contains_answer("She works as a pharmacist", ["baker", "Pharmacist"])
    assert not contains_answer("born in 19875", ["1987"])
    assert not contains_answer("anything", [""])
    assert not contains_answer("anything", [])
