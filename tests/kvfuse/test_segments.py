"""Prompt segmentation on the real SmolLM2 tokenizer: chat framing and neighbour-free chunks."""

from __future__ import annotations

import pytest

from kvfuse.errors import InvalidRequestError
from kvfuse.model.loader import LoadedModel
from kvfuse.model.tokenizer import Tokenizer
from kvfuse.segments import (
    DEFAULT_SEPARATOR,
    DOCUMENT_SUFFIX,
    PromptSegments,
    build_prompt,
    split_text,
)

SYSTEM = "Answer from the documents."
DOCS = (
    "The bridge opened in 1987.",
    "Salinity rose at station 4 after the dam.",
    "Rice yields fell by a tenth.",
)
QUESTION = "When did the bridge open?"


@pytest.fixture(scope="module")
def tok(smollm: LoadedModel) -> Tokenizer:
    return smollm.tokenizer


def chat_text(tok: Tokenizer, system: str, docs: tuple[str, ...], question: str) -> str:
    user = "".join(doc + DOCUMENT_SUFFIX for doc in docs) + question
    messages = [{"role": "system", "content": system}, {"role": "user", "content": user}]
    return str(tok.hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=True))


def test_split_text_removes_the_separator() -> None:
    text = f"sys{DEFAULT_SEPARATOR}doc a{DEFAULT_SEPARATOR}doc b{DEFAULT_SEPARATOR}question?"
    assert split_text(text) == ["sys", "doc a", "doc b", "question?"]
    assert split_text("a||b", separator="||") == ["a", "b"]
    assert split_text("no separator here") == ["no separator here"]


def test_split_text_rejects_empty_separator() -> None:
    with pytest.raises(InvalidRequestError):
        split_text("abc", separator="")


def test_chat_prompt_renders_like_the_template(tok: Tokenizer) -> None:
    seg = build_prompt(tok, [SYSTEM, *DOCS, QUESTION], chat=True)
    decoded = tok.hf.decode(seg.token_ids, skip_special_tokens=False)
    assert decoded == chat_text(tok, SYSTEM, DOCS, QUESTION)
    assert len(seg.chunk_ids) == len(DOCS)
    assert seg.num_tokens == len(seg.token_ids)


def test_chat_prompt_query_ends_with_assistant_header(tok: Tokenizer) -> None:
    seg = build_prompt(tok, [SYSTEM, *DOCS, QUESTION], chat=True)
    assert tok.hf.decode(list(seg.query_ids)).endswith("<|im_start|>assistant\n")
    assert tok.hf.decode(list(seg.prefix_ids)).endswith(SYSTEM + "<|im_end|>\n<|im_start|>user\n")


def test_chunk_ids_do_not_depend_on_neighbours_or_order(tok: Tokenizer) -> None:
    forward = build_prompt(tok, [SYSTEM, *DOCS, QUESTION], chat=True)
    shuffled = (DOCS[2], DOCS[0], DOCS[1])
    backward = build_prompt(tok, ["Other system.", *shuffled, "Another question?"], chat=True)
    for doc, ids in zip(DOCS, forward.chunk_ids, strict=True):
        assert list(ids) == tok.encode(doc + DOCUMENT_SUFFIX)
    assert backward.chunk_ids == (forward.chunk_ids[2], forward.chunk_ids[0], forward.chunk_ids[1])


def test_chunk_offsets_point_at_each_chunk(tok: Tokenizer) -> None:
    seg = build_prompt(tok, [SYSTEM, *DOCS, QUESTION], chat=True)
    token_ids = seg.token_ids
    expected, pos = [], len(seg.prefix_ids)
    for ids in seg.chunk_ids:
        expected.append(pos)
        assert tuple(token_ids[pos : pos + len(ids)]) == ids
        pos += len(ids)
    assert seg.chunk_offsets == expected
    assert tuple(token_ids[pos:]) == seg.query_ids


def test_chunk_offsets_by_hand() -> None:
    seg = PromptSegments((1, 2), ((3,), (4, 5, 6), (7, 8)), (9,))
    assert seg.chunk_offsets == [2, 3, 6]
    assert seg.token_ids == list(range(1, 10))
    assert seg.num_tokens == 9


def test_chat_with_question_only_has_no_chunks(tok: Tokenizer) -> None:
    seg = build_prompt(tok, [QUESTION], chat=True)
    assert seg.chunk_ids == ()
    assert tok.hf.decode(seg.token_ids) == tok.hf.decode(
        tok.hf.apply_chat_template(
            [{"role": "user", "content": QUESTION}], tokenize=True, add_generation_prompt=True
        )["input_ids"]
    )


@pytest.mark.parametrize("chat", [True, False])
@pytest.mark.parametrize(
    "segments",
    [
        [SYSTEM, "", QUESTION],
        [SYSTEM, DOCS[0], "  \n", QUESTION],
        [SYSTEM, DOCS[0], ""],
        [SYSTEM, DOCS[0], " \n\t"],
        [],
    ],
    ids=["empty-doc", "blank-doc", "empty-query", "blank-query", "no-segments"],
)
def test_empty_segments_are_refused(tok: Tokenizer, segments: list[str], chat: bool) -> None:
    with pytest.raises(InvalidRequestError):
        build_prompt(tok, segments, chat=chat)


def test_plain_prompt_keeps_segments_as_given(tok: Tokenizer) -> None:
    prefix, query = "Context follows.\n", "\nQ: when?\nA:"
    seg = build_prompt(tok, [prefix, *DOCS, query], chat=False)
    assert list(seg.prefix_ids) == tok.encode(prefix)
    assert [list(ids) for ids in seg.chunk_ids] == [tok.encode(doc) for doc in DOCS]
    assert list(seg.query_ids) == tok.encode(query)


def test_plain_single_segment_is_all_query(tok: Tokenizer) -> None:
    seg = build_prompt(tok, ["just a query"], chat=False)
    assert seg.prefix_ids == ()
    assert seg.chunk_ids == ()
    assert list(seg.query_ids) == tok.encode("just a query")


def test_plain_prompt_allows_an_empty_prefix(tok: Tokenizer) -> None:
    seg = build_prompt(tok, ["", DOCS[0], QUESTION], chat=False)
    assert seg.prefix_ids == ()
    assert list(seg.chunk_ids[0]) == tok.encode(DOCS[0])
