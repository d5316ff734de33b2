"""RAG question sets for the blend benchmark: CacheBlend's Musique subset and synthetic fact-QA."""

from __future__ import annotations

import itertools
import json
import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

RAG_SYSTEM = (
    "You are a helpful assistant. Answer the question using the documents. Answer in a few words."
)
MUSIQUE_INSTRUCTION = "Answer the question within 5 words."


@dataclass(frozen=True)
class RagExample:
    """One RAG prompt: system message, retrieved documents (the reusable chunks), question."""

    system: str
    documents: tuple[str, ...]
    question: str
    answers: tuple[str, ...]
    example_id: str


# --- Musique (CacheBlend authors' subset) -------------------------------------------------------


def load_musique(
    path: str | Path, num_docs: int = 6, max_examples: int | None = None
) -> list[RagExample]:
    """Reads the CacheBlend authors' Musique subset (`musique_s.json`).

    Args:
        path: JSON list of objects with `ctxs` ([{title, text}]), `question` and `answers`.
        num_docs: How many passages (the first ones) become the documents of each prompt.
        max_examples: Keep only the first this many questions; None keeps all.

    Returns:
        One example per question, ids `musique-<index>`.

    Raises:
        ValueError: The file is missing, is not JSON, or an entry lacks a required field.
    """
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{path}: Musique file not found")
    try:
        entries = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: not valid JSON ({err})") from err
    if not isinstance(entries, list):
        raise ValueError(f"{path}: expected a JSON list of questions")
    if max_examples is not None:
        entries = entries[:max_examples]
    return [_musique_example(path, i, entry, num_docs) for i, entry in enumerate(entries)]


def _musique_example(path: Path, index: int, entry: Any, num_docs: int) -> RagExample:
    """Validates one Musique entry and turns it into a RagExample."""
    where = f"{path}: entry {index}"
    if not isinstance(entry, dict):
        raise ValueError(f"{where}: expected an object")
    for field in ("ctxs", "question", "answers"):
        if field not in entry:
            raise ValueError(f"{where}: missing field {field!r}")
    ctxs, question, answers = entry["ctxs"], entry["question"], entry["answers"]
    if not isinstance(question, str) or not question.strip():
        raise ValueError(f"{where}: 'question' must be a non-empty string")
    if not isinstance(answers, list) or not answers or not all(isinstance(a, str) for a in answers):
        raise ValueError(f"{where}: 'answers' must be a non-empty list of strings")
    if not isinstance(ctxs, list) or len(ctxs) < num_docs:
        raise ValueError(f"{where}: 'ctxs' must be a list of at least {num_docs} passages")
    documents = tuple(_musique_document(where, ctx) for ctx in ctxs[:num_docs])
    return RagExample(
        system=RAG_SYSTEM,
        documents=documents,
        question=f"{question.strip()} {MUSIQUE_INSTRUCTION}",
        answers=tuple(answers),
        example_id=f"musique-{index}",
    )


def _musique_document(where: str, ctx: Any) -> str:
    """`Title: <title>` then the passage text; just the text when the title is empty."""
    if not isinstance(ctx, dict) or not isinstance(ctx.get("text"), str):
        raise ValueError(f"{where}: each ctx must be an object with a string 'text'")
    title = ctx.get("title") or ""
    if not isinstance(title, str):
        raise ValueError(f"{where}: ctx 'title' must be a string")
    text = ctx["text"].strip()
    return f"Title: {title.strip()}\n{text}" if title.strip() else text


# --- Synthetic fact-QA --------------------------------------------------------------------------


def _words(text: str, sep: str | None = None) -> tuple[str, ...]:
    """Splits a word-list literal."""
    return tuple(text.split(sep))


_FIRST_NAMES = _words(
    "Marla Tobin Edwina Corwin Ilse Baxter Rosalind Emmett Greta Lucian Odette Silas Petra Hollis "
    "Wilhelmina Caspian Imogen Thaddeus Beatrix Ansel Clementine Dorian Fenella Gideon Harriet "
    "Jasper Leonora Magnus Ottilie Percival Quentin Rowena Sybil Ulric Verity Winifred Ambrose "
    "Delphine Evander Florian"
)
_SURNAME_HEADS = _words(
    "Quist Brom Halver Vend Ostra Calder Merrow Thorn Pell Dunmar Ashgrove Kers Lind Ravel Selk "
    "Wick Yarrow Zell Fenn Garrick Hobb Jessop Kettle Lorne Munro Nettle Orm Prowse Rudd Stave"
)
_SURNAME_TAILS = _words("enby ford wick mere ton ley holt worth stead dale ridge cott")
_CITY_HEADS = _words(
    "Drav Kel Mor Tal Vess Bran Cor Eld Fal Gris Hav Lun Nor Pel Ril Sar Tor Ulv Var Wen"
)
_CITY_TAILS = _words("enport hollow haven mouth gate field crest brook moor vale spire bury")
_COMPANY_HEADS = _words("Zen Vor Quel Brix Lum Tarn Oxa Plex Kiv Nim Strat Helio Cobal Vanta Oriz")
_COMPANY_TAILS = _words("tronics corp labs works dyne soft gen ica loom field")
_JOBS = _words(
    "baker carpenter astronomer pharmacist florist librarian architect plumber dentist "
    "veterinarian geologist locksmith jeweler photographer beekeeper blacksmith cartographer "
    "translator surgeon tailor"
)
_PET_NAMES = _words(
    "Biscuit Pickle Mochi Waffles Pepper Noodle Truffle Juniper Marble Pumpkin Clover Sprocket "
    "Tofu Nugget Pistachio Bramble Dumpling Sorrel Zigzag Muffin"
)
_PETS = _words("cat dog parrot rabbit tortoise")
_THINGS = _words(
    "old stone bridge|annual lantern festival|copper rooftops|quiet harbour|busy fish market|"
    "tall clock tower|narrow winding streets|botanical garden|glassblowing workshops|river ferries",
    sep="|",
)


class _Fact(NamedTuple):
    """One invented fact: the sentence stating it, the question asking it, and its answer."""

    sentence: str
    question: str
    answer: str


def _city(rng: random.Random) -> str:
    return rng.choice(_CITY_HEADS) + rng.choice(_CITY_TAILS)


def _fact_birth_city(rng: random.Random, person: str) -> _Fact:
    city = _city(rng)
    return _Fact(
        f"{person} was born in the city of {city}.", f"In which city was {person} born?", city
    )


def _fact_birth_year(rng: random.Random, person: str) -> _Fact:
    year = str(rng.randint(1921, 2004))
    return _Fact(
        f"{person} was born in the year {year}.", f"In which year was {person} born?", year
    )


def _fact_job(rng: random.Random, person: str) -> _Fact:
    job = rng.choice(_JOBS)
    article = "an" if job[0] in "aeiou" else "a"
    return _Fact(f"{person} works as {article} {job}.", f"What is the profession of {person}?", job)


def _fact_company(rng: random.Random, person: str) -> _Fact:
    company = rng.choice(_COMPANY_HEADS) + rng.choice(_COMPANY_TAILS)
    return _Fact(
        f"{person} is employed by a company called {company}.",
        f"Which company employs {person}?",
        company,
    )


def _fact_pet(rng: random.Random, person: str) -> _Fact:
    pet, name = rng.choice(_PETS), rng.choice(_PET_NAMES)
    return _Fact(
        f"{person} has a pet {pet} named {name}.",
        f"What is the name of the pet {pet} of {person}?",
        name,
    )


_FactKind = Callable[[random.Random, str], _Fact]
_FACT_KINDS: tuple[_FactKind, ...] = (
    _fact_birth_city,
    _fact_birth_year,
    _fact_job,
    _fact_company,
    _fact_pet,
)


# How often a distractor person may get a fact of the asked kind (a same-kind hard negative).
_SAME_KIND_RATE = 0.0


def _person_names(rng: random.Random, count: int) -> list[str]:
    """Up to `count` full names with distinct surnames, so each person is unambiguous."""
    surnames = [h + t for h in _SURNAME_HEADS for t in _SURNAME_TAILS]
    chosen = rng.sample(surnames, min(count, len(surnames)))
    return [f"{rng.choice(_FIRST_NAMES)} {s}" for s in chosen]


def _filler_sentence(rng: random.Random) -> str:
    """A sentence about an invented place: no person, no answerable fact."""
    return f"The city of {_city(rng)} is known for its {rng.choice(_THINGS)}."


def _distractor_document(
    rng: random.Random,
    people: Iterator[str],
    answer: str,
    avoid: _FactKind,
    num_words: int,
) -> list[str]:
    """Fact sentences about other people (and a few places) until `num_words` words.

    No sentence contains `answer`, so the answer fact is the only place it appears.
    """
    sentences: list[str] = []
    total_words = 0
    while total_words < num_words:
        if rng.random() < 0.15:
            sentence = _filler_sentence(rng)
        else:
            person = next(people)
            pool = [k for k in _FACT_KINDS if k is not avoid or rng.random() < _SAME_KIND_RATE]
            kinds = rng.sample(pool, min(len(pool), rng.randint(2, 3)))
            sentence = " ".join(kind(rng, person).sentence for kind in kinds)
        if answer.lower() in sentence.lower():
            continue
        sentences.append(sentence)
        total_words += len(sentence.split())
    return sentences


def _factqa_example(
    rng: random.Random, index: int, num_docs: int, words_per_doc: int
) -> RagExample:
    """One example: the answer fact sits in a random document at a random sentence position."""
    names = _person_names(rng, num_docs * words_per_doc // 12 + 2)
    target = names.pop()
    target_first = target.split()[0]
    people = itertools.cycle([p for p in names if not p.startswith(target_first + " ")])
    kind = rng.choice(_FACT_KINDS)
    fact = kind(rng, target)
    answer_doc = rng.randrange(num_docs)
    documents = []
    for doc_idx in range(num_docs):
        sentences = _distractor_document(rng, people, fact.answer, kind, words_per_doc)
        if doc_idx == answer_doc:
            sentences.insert(rng.randrange(len(sentences) + 1), fact.sentence)
        documents.append(" ".join(sentences))
    return RagExample(
        system=RAG_SYSTEM,
        documents=tuple(documents),
        question=fact.question,
        answers=(fact.answer,),
        example_id=f"factqa-{index}",
    )


def make_factqa(
    num_examples: int, num_docs: int = 6, words_per_doc: int = 330, seed: int = 0
) -> list[RagExample]:
    """A deterministic synthetic multi-document fact-QA set about invented people.

    Each document bundles fact sentences (birth city/year, profession, employer, pet) about
    invented people. Exactly one document states the asked fact, at a random document and
    sentence position; the answer string appears nowhere else. Example `i` depends only on
    (`seed`, `i`), so a smaller set is a prefix of a larger one.

    Args:
        num_examples: How many questions.
        num_docs: Documents per question.
        words_per_doc: Approximate words per document (~1.5 SmolLM2 tokens per word here).
        seed: Seed of the generator; same seed, same set.

    Returns:
        The examples, ids `factqa-<index>`; each has a single one- or two-word answer.
    """
    if num_examples < 0 or num_docs < 1 or words_per_doc < 1:
        raise ValueError("num_examples must be >= 0, num_docs and words_per_doc >= 1")
    return [
        _factqa_example(random.Random(f"factqa-{seed}-{i}"), i, num_docs, words_per_doc)
        for i in range(num_examples)
    ]
