"""RAG question sets for the blend benchmark: CacheBlend's Musique subset and synthetic fact-QA."""

from __future__ import annotations

import itertools
import json
import random
from collections.abc import Iterator
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
    title, text = str(ctx.get("title") or "").strip(), ctx["text"].strip()
    return f"Title: {title}\n{text}" if title else text


def _words(text: str, sep: str | None = None) -> tuple[str, ...]:
    """Splits a word-list literal."""
    return tuple(text.split(sep))


_FIRST_NAMES = _words(
    "Marla Tobin Edwina Corwin Ilse Baxter Rosalind Emmett Greta Lucian Odette Silas Petra Hollis "
    "Wilhelmina Caspian Imogen Thaddeus Beatrix Ansel Clementine Dorian Fenella Gideon Harriet "
    "Jasper Leonora Magnus Ottilie Percival Quentin Rowena Sybil Ulric Verity Winifred Ambrose"
)
_SURNAME_HEADS = _words(
    "Quist Brom Halver Vend Ostra Calder Merrow Thorn Pell Dunmar Ashgrove Kers Lind Ravel Selk "
    "Wick Yarrow Zell Fenn Garrick Hobb Jessop Kettle Lorne Munro Nettle Orm Prowse Rudd Stave"
)
_SURNAME_TAILS = _words("enby ford wick mere ton ley holt worth stead dale ridge cott")
_TOWN_HEADS = _words("Drav Kel Mor Tal Vess Bran Cor Eld Fal Gris Hav Lun Nor Pel Ril Sar Tor Ulv")
_TOWN_TAILS = _words("enport hollow haven mouth gate field crest brook moor vale spire bury")
_RIVERS = _words("Olwen Tarrow Veyle Casse Brund Imber Lorrow Quenna Sallow Dwyre Ferrin Ashet")
_GOODS = _words("wool salt timber honey cheese copper pottery barley apples linen glass leather")
_PROSE = (
    "The town of {p} lies on the {d} bank of the river {r}.",
    "Every {s}, {p} holds a fair where merchants sell {g} and {g2}.",
    "In {y}, a great flood damaged the lower streets of {p}.",
    "The old road from {p} to {p2} is about {n} miles long and crosses two hills.",
    "Most families in {p} earn their living from {g}.",
    "The harbour of {p} is too shallow for large ships, so goods travel by barge.",
    "Travellers often describe {p} as quiet and green, though cold in {s}.",
    "A stone bridge with {n} arches was built over the river {r} in {y}.",
    "The market square of {p} is surrounded by narrow houses with red roofs.",
    "The council of {p} meets once a month in a hall near the river {r}.",
    "Around {n} thousand people live in {p} today.",
    "The hills north of {p} are covered with pine forests and sheep pastures.",
    "Heavy snow closes the mountain pass above {p} for most of the winter.",
    "The library of {p} keeps old maps of the valley of the river {r}.",
    "A small museum in {p} shows tools once used by farmers and fishermen.",
    "Shops in {p} are known for fine {g} sold at fair prices.",
    "The railway reached {p} in {y} and brought many new visitors.",
    "In {s}, boats carry {g} down the river {r} to the coast.",
)
# Sentences that name other invented people without stating an askable fact about them.
_PERSON_PROSE = (
    "{x} repaired the roof of the library in {p} in {y}.",
    "{x} sold {g} at the market of {p} for many years.",
    "{x} once crossed the mountain pass above {p} in deep snow.",
    "{x} wrote a short history of the bridge over the river {r}.",
    "{x} moved from {p} to {p2} after the flood.",
)
# Fact kinds, two lines each: "statement | question" ({x} person, {a} answer, {an} its article)
# and the answers. The statement reads like the sentence SmolLM2 starts its reply with when it
# restates the question, so it can copy the answer; the answers are common one-word terms, which
# it copies far more reliably than invented names.
_FACT_TABLE = """\
The profession of {x} is {an} {a}. | What is the profession of {x}?
baker carpenter astronomer pharmacist florist librarian architect plumber dentist
The best friend of {x} is {a}. | Who is the best friend of {x}?
Mabel Otto Hilda Rufus Agnes Cyril Edna Felix Nora Hugo Ida Leon
The pet of {x} is {an} {a}. | What kind of pet does {x} have?
hamster parrot goat rabbit turtle ferret pony canary goldfish lizard
The favorite color of {x} is {a}. | What is the favorite color of {x}?
green purple orange yellow silver crimson turquoise brown
The favorite sport of {x} is {a}. | What is the favorite sport of {x}?
tennis rowing chess fencing archery cycling swimming hockey golf boxing
The instrument that {x} plays is {an} {a}. | Which instrument does {x} play?
violin cello flute trumpet harp piano guitar tuba clarinet banjo
The favorite food of {x} is {a}. | What is the favorite food of {x}?
soup pancakes dumplings porridge pie noodles omelette stew waffles risotto
The home country of {x} is {a}. | What is the home country of {x}?
Norway Chile Egypt Portugal Canada Kenya Japan Peru Austria Iceland
"""
_YEAR_KIND = (
    "{x} was born in the year {a}.",
    "In which year was {x} born?",
    tuple(str(year) for year in range(1921, 2005)),
)


def _fact_kinds() -> tuple[tuple[str, str, tuple[str, ...]], ...]:
    """(statement, question, answers) for every fact kind: the table's, then birth year."""
    lines = _FACT_TABLE.splitlines()
    kinds = []
    for templates, answers in zip(lines[::2], lines[1::2], strict=True):
        statement, question = (part.strip() for part in templates.split("|"))
        kinds.append((statement, question, _words(answers)))
    return (*kinds, _YEAR_KIND)


_FACT_KINDS = _fact_kinds()
# Fraction of distractor sentences that name another person (the rest is about places).
_PERSON_RATE = 0.1


class _Fact(NamedTuple):
    """One invented fact: the sentence stating it, the question asking it, and its answer."""

    sentence: str
    question: str
    answer: str


def _fact(rng: random.Random, person: str) -> _Fact:
    """Draws a fact kind and an answer for it about `person`."""
    statement, question, answers = rng.choice(_FACT_KINDS)
    answer = rng.choice(answers)
    article = "an" if answer[0].lower() in "aeiou" else "a"
    slots = {"x": person, "a": answer, "an": article}
    return _Fact(statement.format(**slots), question.format(**slots), answer)


def _person_names(rng: random.Random, count: int) -> list[str]:
    """Up to `count` full names with distinct surnames, so each person is unambiguous."""
    surnames = [h + t for h in _SURNAME_HEADS for t in _SURNAME_TAILS]
    chosen = rng.sample(surnames, min(count, len(surnames)))
    return [f"{rng.choice(_FIRST_NAMES)} {s}" for s in chosen]


def _town(rng: random.Random) -> str:
    return rng.choice(_TOWN_HEADS) + rng.choice(_TOWN_TAILS)


def _distractor_sentence(rng: random.Random, people: Iterator[str]) -> str:
    """A sentence about invented towns and rivers, sometimes naming another person."""
    templates = _PERSON_PROSE if rng.random() < _PERSON_RATE else _PROSE
    return rng.choice(templates).format(
        x=next(people),
        p=_town(rng),
        p2=_town(rng),
        r=rng.choice(_RIVERS),
        d=rng.choice(("north", "south", "east", "west")),
        s=rng.choice(("spring", "summer", "autumn", "winter")),
        g=rng.choice(_GOODS),
        g2=rng.choice(_GOODS),
        y=rng.randint(1700, 1990),
        n=rng.randint(2, 40),
    )


def _distractor_document(
    rng: random.Random, people: Iterator[str], answer: str, num_words: int
) -> list[str]:
    """Distractor sentences until `num_words` words; none of them contains `answer`."""
    sentences: list[str] = []
    total_words = 0
    while total_words < num_words:
        sentence = _distractor_sentence(rng, people)
        if answer.lower() not in sentence.lower():
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
    fact = _fact(rng, target)
    answer_doc = rng.randrange(num_docs)
    documents = []
    for doc_idx in range(num_docs):
        sentences = _distractor_document(rng, people, fact.answer, words_per_doc)
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

    Documents are prose about invented towns and rivers that also names invented people.
    Exactly one document states the asked fact about the asked person (profession, birth
    year, best friend, pet, favourite colour/sport/food, instrument, home country), at a random
    document and sentence position; the answer word appears in no other document. Example `i`
    depends only on (`seed`, `i`), so a smaller set is a prefix of a larger one.

    Args:
        num_examples: How many questions.
        num_docs: Documents per question.
        words_per_doc: Approximate words per document; 330 words is ~490 SmolLM2 tokens.
        seed: Seed of the generator; same seed, same set.

    Returns:
        The examples, ids `factqa-<index>`; each has a single one-word answer.

    Raises:
        ValueError: A negative count, or fewer than one document or word per document.
    """
    if num_examples < 0 or num_docs < 1 or words_per_doc < 1:
        raise ValueError("num_examples must be >= 0, num_docs and words_per_doc >= 1")
    return [
        _factqa_example(random.Random(f"factqa-{seed}-{i}"), i, num_docs, words_per_doc)
        for i in range(num_examples)
    ]
