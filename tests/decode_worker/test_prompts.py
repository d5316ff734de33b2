"""Request bodies to segments: the separator, explicit segments, chat history, limits, refusals."""

from __future__ import annotations

from typing import Any

import pytest
from decode_helpers import DOCS, QUESTION, SEP, SYSTEM, rag_messages

from decode_worker.config import DecodeConfig
from decode_worker.limits import RequestLimits
from decode_worker.prompts import PromptBuilder, PromptDefaults
from decode_worker.schemas import (
    ChatCompletionRequest,
    CompletionRequest,
    TokenizeRequest,
    WarmRequest,
)
from kvfuse.blend import Mode
from kvfuse.engine import Engine
from kvfuse.errors import InvalidRequestError, PromptTooLongError

LIMIT = 512
# Small limits, so that a test can pass each with a few words.
LIMITS = DecodeConfig(
    max_segments=6,
    max_segment_tokens=100,
    max_stop_strings=3,
    max_stop_chars=8,
    max_warm_documents=4,
)


def make_builder(engine: Engine, limits: DecodeConfig) -> PromptBuilder:
    defaults = PromptDefaults(
        separator=SEP,
        max_model_len=LIMIT,
        default_max_tokens=64,
        default_temperature=1.0,
        default_mode=Mode.BLEND,
        default_recompute_ratio=0.3,
        vocab_size=engine.model.cfg.vocab_size,
    )
    return PromptBuilder(engine.tokenizer, defaults, RequestLimits.from_config(limits, LIMIT))


@pytest.fixture
def builder(engine: Engine) -> PromptBuilder:
    return make_builder(engine, LIMITS)


def chat(builder: PromptBuilder, **body: Any) -> Any:
    return builder.chat(ChatCompletionRequest.model_validate(body), "rid")


def complete(builder: PromptBuilder, **body: Any) -> Any:
    return builder.completion(CompletionRequest.model_validate(body), "rid")


def test_chat_separator_gives_the_engines_segments_and_keys(
    builder: PromptBuilder, engine: Engine
) -> None:
    gen = chat(builder, messages=rag_messages())
    want = engine.prepare([SYSTEM, *DOCS, QUESTION])
    assert gen.prefill.segments == want.segments
    assert engine.compute.prepare(gen.prefill.segments).chunk_keys == want.chunk_keys
    assert gen.prefill.mode is Mode.BLEND and gen.prefill.recompute_ratio == 0.3
    assert gen.prefill.sampling.temperature == 1.0 and gen.prefill.sampling.max_tokens == 64


def test_without_a_system_message_documents_stay_chunks(
    builder: PromptBuilder, engine: Engine
) -> None:
    gen = chat(builder, messages=[{"role": "user", "content": SEP.join([*DOCS, QUESTION])}])
    assert len(gen.prefill.segments.chunk_ids) == 3
    assert gen.prefill.segments == engine.prepare(["", *DOCS, QUESTION]).segments


def test_explicit_segments_replace_the_messages(builder: PromptBuilder, engine: Engine) -> None:
    options = {"segments": [SYSTEM, *DOCS, QUESTION], "mode": "full_reuse", "recompute_ratio": 0}
    gen = chat(builder, messages=[{"role": "user", "content": "x"}], kvfuse=options)
    assert gen.prefill.segments == engine.prepare([SYSTEM, *DOCS, QUESTION]).segments
    assert gen.prefill.mode is Mode.FULL_REUSE and gen.prefill.recompute_ratio == 0.0


def test_earlier_turns_join_the_prefix_and_chunks_keep_their_tokens(
    builder: PromptBuilder,
) -> None:
    one_turn = chat(builder, messages=rag_messages()).prefill.segments
    history = [
        rag_messages()[0],
        {"role": "user", "content": "Hello"},
        {"role": "assistant", "content": [{"type": "text", "text": "Hi! How can I help?"}]},
        rag_messages()[1],
    ]
    multi = chat(builder, messages=history).prefill.segments
    assert multi.chunk_ids == one_turn.chunk_ids and multi.query_ids == one_turn.query_ids
    assert len(multi.prefix_ids) > len(one_turn.prefix_ids)
    assert multi.prefix_ids[: len(one_turn.prefix_ids) - 3] == one_turn.prefix_ids[:-3]


def test_completion_prompt_is_raw_text_split_at_the_separator(
    builder: PromptBuilder, engine: Engine
) -> None:
    gen = complete(builder, prompt=SEP.join(["Facts:\n", *DOCS, "\nQ: Where?\nA:"]))
    assert len(gen.prefill.segments.chunk_ids) == 3
    assert (
        gen.prefill.segments
        == engine.prepare(["Facts:\n", *DOCS, "\nQ: Where?\nA:"], chat=False).segments
    )
    tokens = complete(builder, prompt=[1, 2, 3], max_tokens=2).prefill.segments
    assert tokens.token_ids == [1, 2, 3]
    assert complete(builder, prompt=["single"]).prefill.segments.query_ids


def test_max_tokens_defaults_within_the_context(engine: Engine) -> None:
    builder = make_builder(engine, DecodeConfig())  # a segment may fill the context
    long_prompt = "word " * (LIMIT - 10)
    gen = complete(builder, prompt=long_prompt)
    assert gen.num_prompt_tokens + gen.prefill.sampling.max_tokens == LIMIT
    with pytest.raises(PromptTooLongError, match=str(LIMIT)):
        complete(builder, prompt="word " * LIMIT)


def test_max_tokens_beyond_the_context_is_reported_as_max_tokens(builder: PromptBuilder) -> None:
    num_prompt = len(complete(builder, prompt="hi").prefill.segments.token_ids)
    room = LIMIT - num_prompt
    assert complete(builder, prompt="hi", max_tokens=room).prefill.sampling.max_tokens == room
    for too_many in (room + 1, 10**12):
        want = (
            f"max_tokens is {too_many}, more than the {room} tokens the model's context of "
            f"{LIMIT} leaves after the prompt's {num_prompt}"
        )
        with pytest.raises(InvalidRequestError) as info:
            complete(builder, prompt="hi", max_tokens=too_many)
        assert str(info.value) == want and not isinstance(info.value, PromptTooLongError)


def test_segment_limits_count_prefix_documents_and_query(builder: PromptBuilder) -> None:
    """6 segments pass and 7 do not, however the prompt is cut into them."""
    docs = [f"doc {i}" for i in range(5)]
    assert len(chat(builder, messages=rag_messages(docs[:4])).prefill.segments.chunk_ids) == 4
    too_many = "the prompt has 7 segments (prefix, documents and query), more than the limit of 6"
    bodies: list[Any] = [
        {"messages": rag_messages(docs)},
        {"messages": [{"role": "user", "content": SEP.join([*docs, "q"])}]},
        {"messages": [{"role": "user", "content": "x"}], "kvfuse": {"segments": [*docs, "a", "q"]}},
        {"messages": [*rag_messages(), {"role": "assistant", "content": "x"},
                      {"role": "user", "content": SEP.join([*docs, "q"])}]},
    ]  # fmt: skip
    for body in bodies:
        with pytest.raises(InvalidRequestError) as info:
            chat(builder, **body)
        assert str(info.value) == too_many
    with pytest.raises(InvalidRequestError, match="7 segments"):
        complete(builder, prompt=SEP.join([*docs, "q", "q"]))
    with pytest.raises(InvalidRequestError, match="7 segments"):
        builder.tokenize(TokenizeRequest.model_validate({"prompt": SEP.join([*docs, "q", "q"])}))


@pytest.mark.parametrize(
    ("segments", "name"),
    [
        (["word " * 120, "doc", "q"], "the prefix"),
        (["sys", "doc", "word " * 120, "q"], "document 2"),
        (["sys", "doc", "word " * 120], "the query"),
    ],
)
def test_tokens_per_segment_are_limited(
    builder: PromptBuilder, segments: list[str], name: str
) -> None:
    with pytest.raises(InvalidRequestError, match=f"^{name} has 1[0-9]{{2}} tokens, more than "):
        complete(builder, prompt="x", kvfuse={"segments": segments})
    with pytest.raises(InvalidRequestError, match="the limit of 100 per segment"):
        complete(builder, prompt=[1] * 101)


def test_stop_strings_are_limited_in_count_and_length(builder: PromptBuilder) -> None:
    assert complete(builder, prompt="x", stop=["a", "b", "12345678"]).stop == ("a", "b", "12345678")
    with pytest.raises(InvalidRequestError, match=r"^stop: at most 3 stop strings \(got 4\)$"):
        complete(builder, prompt="x", stop=["a"] * 4)
    with pytest.raises(InvalidRequestError, match=r"^stop.1: .* at most 8 characters \(got 9\)$"):
        complete(builder, prompt="x", stop=["a", "123456789"])


def test_warm_documents_are_limited_in_count_and_tokens(builder: PromptBuilder) -> None:
    def warm(documents: list[str]) -> Any:
        return builder.warm(WarmRequest.model_validate({"documents": documents}))

    assert len(warm(["a", "b", "c", "d"]).chunk_ids) == 4
    with pytest.raises(InvalidRequestError, match=r"at most 4 documents in a warm call \(got 5\)"):
        warm(["a", "b", "c", "d", "e"])
    with pytest.raises(InvalidRequestError, match=r"document 2 has .* the limit of 100"):
        warm(["a", "word " * 120])


def test_sampling_fields_reach_the_request(builder: PromptBuilder) -> None:
    gen = chat(
        builder,
        messages=rag_messages(),
        max_completion_tokens=7,
        temperature=0.5,
        top_p=0.9,
        seed=3,
        stop=["\n", ""],
        stop_token_ids=[2],
        ignore_eos=True,
    )
    params = gen.prefill.sampling
    assert (params.max_tokens, params.temperature, params.top_p, params.seed) == (7, 0.5, 0.9, 3)
    assert params.stop_token_ids == (2,) and params.ignore_eos and gen.stop == ("\n",)
    assert complete(builder, prompt="x", stop="END").stop == ("END",)


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ({"prompt": "hi", "n": 2}, "n=1"),
        ({"prompt": "hi", "echo": True}, "echo"),
        ({"prompt": "hi", "best_of": 2}, "best_of"),
        ({"prompt": "hi", "presence_penalty": 0.5}, "penalties"),
        ({"prompt": "hi", "stop": ["x"] * 4}, "stop strings"),
        ({"prompt": "hi", "stop_token_ids": [10**9]}, "stop_token_ids"),
        ({"prompt": [5, -1]}, "token ids"),
        ({"prompt": ["a", "b"]}, "one prompt"),
        ({"prompt": ""}, "prompt"),
        ({"prompt": f"a{SEP}{SEP}question"}, "segment 1 is empty"),
        ({}, "prompt"),
    ],
)
def test_bad_completions_are_refused(
    builder: PromptBuilder, body: dict[str, Any], message: str
) -> None:
    with pytest.raises(InvalidRequestError, match=message):
        complete(builder, **body)


@pytest.mark.parametrize(
    ("messages", "message"),
    [
        ([], "messages"),
        ([{"role": "system", "content": "only a system prompt"}], "last message"),
        ([{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}], "last message"),
        ([{"role": "user", "content": "  "}], "query"),
        (
            [{"role": "user", "content": "a"}, {"role": "system", "content": "late"},
             {"role": "user", "content": "b"}],
            "system messages",
        ),
    ],
)  # fmt: skip
def test_bad_chats_are_refused(
    builder: PromptBuilder, messages: list[dict[str, str]], message: str
) -> None:
    with pytest.raises(InvalidRequestError, match=message):
        chat(builder, messages=messages)


def test_tokenize_uses_the_same_segments(builder: PromptBuilder) -> None:
    body = TokenizeRequest.model_validate({"messages": rag_messages()})
    assert builder.tokenize(body) == chat(builder, messages=rag_messages()).prefill.segments
    raw = TokenizeRequest.model_validate({"prompt": "Hello world"})
    assert (
        builder.tokenize(raw).token_ids
        == complete(builder, prompt="Hello world").prefill.segments.token_ids
    )
