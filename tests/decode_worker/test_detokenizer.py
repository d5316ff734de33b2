"""Incremental detokenization: deltas add up to the full text; stop strings cut it, never late."""

from __future__ import annotations

import pytest

from decode_worker.detokenizer import TextStream
from kvfuse.model.loader import LoadedModel
from kvfuse.model.tokenizer import Tokenizer

TEXT = "Héllo wörld 日本語 emoji 🤖 end.\nNext line, with   spaces and a tab\there."


@pytest.fixture(scope="module")
def tokenizer(smollm: LoadedModel) -> Tokenizer:
    return smollm.tokenizer


def stream_all(tokenizer: Tokenizer, text: str, stop: tuple[str, ...] = ()) -> list[str]:
    stream = TextStream(tokenizer, stop)
    deltas = [stream.push(t) for t in tokenizer.encode(text)]
    return [*deltas, stream.flush()]


def test_deltas_add_up_to_the_decoded_text(tokenizer: Tokenizer) -> None:
    deltas = stream_all(tokenizer, TEXT)
    assert "".join(deltas) == tokenizer.decode(tokenizer.encode(TEXT)) == TEXT
    assert not any("\ufffd" in d for d in deltas)  # half characters are held back


def test_stop_string_cuts_before_it_and_ends_the_stream(tokenizer: Tokenizer) -> None:
    stream = TextStream(tokenizer, ("wörld",))
    sent = ""
    for token in tokenizer.encode(TEXT):
        sent += stream.push(token)
        if stream.stopped:
            break
    assert stream.stopped and sent == "Héllo "
    assert stream.push(tokenizer.encode("more")[0]) == "" and stream.flush() == ""


def test_text_that_may_start_a_stop_string_is_held_back(tokenizer: Tokenizer) -> None:
    # "end.\nNext" — while "\nN" could still become the stop "\nNope", it is not sent
    deltas = stream_all(tokenizer, TEXT, ("\nNope",))
    joined = ""
    for delta in deltas[:-1]:
        joined += delta
        assert not joined.endswith("\n")
    assert "".join(deltas) == TEXT  # never matched: everything comes out in the end


def test_earliest_of_several_stop_strings_wins(tokenizer: Tokenizer) -> None:
    deltas = stream_all(tokenizer, TEXT, ("tab", "emoji", "Next"))
    assert "".join(deltas) == "Héllo wörld 日本語 "


def test_stop_string_spanning_tokens_and_a_multibyte_character(tokenizer: Tokenizer) -> None:
    deltas = stream_all(tokenizer, TEXT, ("語 emo",))
    assert "".join(deltas) == "Héllo wörld 日本"
