"""Fact-QA generator properties and the Musique loader (no model needed)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from benchmarks.datasets import MUSIQUE_INSTRUCTION, RagExample, load_musique, make_factqa

MUSIQUE = Path(__file__).resolve().parents[3] / "shared" / "data" / "musique_s.json"
WORDS_PER_DOC = 330


@pytest.fixture(scope="module")
def factqa() -> list[RagExample]:
    return make_factqa(40, num_docs=6, words_per_doc=WORDS_PER_DOC, seed=0)


def _answer_docs(example: RagExample) -> list[int]:
    return [i for i, doc in enumerate(example.documents) if example.answers[0] in doc]


def test_factqa_is_deterministic() -> None:
    assert make_factqa(5, seed=3) == make_factqa(5, seed=3)
    assert make_factqa(5, seed=3) != make_factqa(5, seed=4)
    assert make_factqa(3, seed=3) == make_factqa(5, seed=3)[:3]


def test_factqa_shape(factqa: list[RagExample]) -> None:
    assert len({e.example_id for e in factqa}) == len(factqa)
    for example in factqa:
        assert len(example.documents) == 6
        assert len(example.answers) == 1
        assert 1 <= len(example.answers[0].split()) <= 2
        assert example.question.endswith("?")
        assert example.system


def test_exactly_one_document_holds_the_answer(factqa: list[RagExample]) -> None:
    for example in factqa:
        docs = [
            i for i, d in enumerate(example.documents) if example.answers[0].lower() in d.lower()
        ]
        assert len(docs) == 1, example.example_id


def test_asked_person_appears_only_in_the_answer_document(factqa: list[RagExample]) -> None:
    for example in factqa:
        (answer_doc,) = _answer_docs(example)
        surname = _asked_surname(example)
        holders = [i for i, d in enumerate(example.documents) if surname in d]
        assert holders == [answer_doc], example.example_id


def _asked_surname(example: RagExample) -> str:
    """The asked person's surname: the last capitalised word of the question."""
    words = example.question.rstrip("?").split()
    capitalised = [w for w in words[1:] if w[0].isupper()]
    return capitalised[-1]


def test_answer_position_varies(factqa: list[RagExample]) -> None:
    positions = [_answer_docs(e)[0] for e in factqa]
    assert len(set(positions)) >= 4
    assert positions.count(0) < len(positions) / 2
    offsets = [
        e.documents[p].index(e.answers[0]) / len(e.documents[p])
        for e, p in zip(factqa, positions, strict=True)
    ]
    assert min(offsets) < 0.3 and max(offsets) > 0.7


def test_document_lengths(factqa: list[RagExample]) -> None:
    for example in factqa:
        for doc in example.documents:
            assert WORDS_PER_DOC <= len(doc.split()) <= WORDS_PER_DOC + 60


def test_factqa_rejects_bad_sizes() -> None:
    with pytest.raises(ValueError):
        make_factqa(1, num_docs=0)
    assert make_factqa(0) == []


@pytest.mark.skipif(not MUSIQUE.is_file(), reason="shared Musique data not present")
def test_load_musique_real_file() -> None:
    examples = load_musique(MUSIQUE, num_docs=6, max_examples=5)
    assert len(examples) == 5
    assert len(load_musique(MUSIQUE)) == 150
    for example in examples:
        assert len(example.documents) == 6
        assert all(doc.strip() for doc in example.documents)
        assert example.question.endswith(MUSIQUE_INSTRUCTION)
        assert example.answers and all(example.answers)
    assert examples[0].example_id == "musique-0"


def _write(tmp_path: Path, payload: object) -> Path:
    path = tmp_path / "musique.json"
    path.write_text(json.dumps(payload))
    return path


def _entry(**overrides: object) -> dict[str, object]:
    entry: dict[str, object] = {
        "ctxs": [{"title": "T", "text": f"passage {i}"} for i in range(3)],
        "question": "Who?",
        "answers": ["Someone"],
    }
    entry.update(overrides)
    return entry


def test_load_musique_formats_titles(tmp_path: Path) -> None:
    ctxs = [{"title": "Alpha", "text": "first"}, {"title": "", "text": "second"}]
    (example,) = load_musique(_write(tmp_path, [_entry(ctxs=ctxs)]), num_docs=2)
    assert example.documents == ("Title: Alpha\nfirst", "second")
    assert example.question == f"Who? {MUSIQUE_INSTRUCTION}"


@pytest.mark.parametrize(
    "payload",
    [
        {"not": "a list"},
        [{"ctxs": [], "question": "Who?"}],
        [_entry(answers=[])],
        [_entry(question="")],
        [_entry(ctxs=[{"title": "T"}] * 3)],
        [_entry(ctxs=[{"title": "T", "text": "x"}])],
    ],
)
def test_load_musique_rejects_malformed(tmp_path: Path, payload: object) -> None:
    path = _write(tmp_path, payload)
    with pytest.raises(ValueError, match=re.escape(str(path))):
        load_musique(path, num_docs=2)


def test_load_musique_rejects_missing_and_invalid(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="not found"):
        load_musique(tmp_path / "absent.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        load_musique(bad)
