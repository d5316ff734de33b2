"""Tokenizer wrapper on the real SmolLM2 tokenizer: chat frames, stop ids and plain encoding."""

from __future__ import annotations

import copy

import pytest

from kvfuse.errors import InvalidRequestError
from kvfuse.model.loader import LoadedModel
from kvfuse.model.tokenizer import Tokenizer

USER_MESSAGE = "Summarise the documents below.\n\nDoc one.\n\nWhat changed in 1987?"


def render(tokenizer: Tokenizer, system: str | None, user: str) -> str:
    messages = [{"role": "user", "content": user}]
    if system is not None:
        messages.insert(0, {"role": "system", "content": system})
    return str(
        tokenizer.hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    )


@pytest.mark.parametrize("system", [None, "You answer in one sentence."])
def test_chat_frame_wraps_user_message_like_the_template(
    smollm: LoadedModel, system: str | None
) -> None:
    tok = smollm.tokenizer
    head, tail = tok.chat_frame(system)
    assert head + USER_MESSAGE + tail == render(tok, system, USER_MESSAGE)
    assert tail.endswith("<|im_start|>assistant\n")  # generation prompt included


def test_chat_frame_puts_system_prompt_in_head(smollm: LoadedModel) -> None:
    head, tail = smollm.tokenizer.chat_frame("Be terse.")
    assert "Be terse." in head
    assert "Be terse." not in tail


def test_eos_ids_include_im_end(smollm: LoadedModel) -> None:
    tok = smollm.tokenizer
    im_end = tok.hf.convert_tokens_to_ids("<|im_end|>")
    assert isinstance(im_end, int)
    assert im_end in tok.eos_token_ids
    assert len(set(tok.eos_token_ids)) == len(tok.eos_token_ids)  # no duplicates


def test_eos_ids_include_endoftext(smollm: LoadedModel) -> None:
    # SmolLM2's <|endoftext|> (id 0) is a real token that doubles as the unk token; being the
    # unk token must not hide it from the stop list.
    tok = smollm.tokenizer
    assert "<|endoftext|>" in tok.hf.get_vocab()
    assert tok.hf.convert_tokens_to_ids("<|endoftext|>") in tok.eos_token_ids


def test_encode_adds_no_special_tokens(smollm: LoadedModel) -> None:
    tok = smollm.tokenizer
    ids = tok.encode("hello world")
    assert ids == list(tok.hf("hello world", add_special_tokens=False)["input_ids"])
    assert tok.decode(ids) == "hello world"


def test_encode_keeps_special_token_text_as_tokens(smollm: LoadedModel) -> None:
    tok = smollm.tokenizer
    im_start = tok.hf.convert_tokens_to_ids("<|im_start|>")
    assert tok.encode("<|im_start|>user\n")[0] == im_start


def test_fingerprint_is_stable(smollm: LoadedModel) -> None:
    tok = smollm.tokenizer
    again = Tokenizer(tok.hf, ())
    assert again.fingerprint == tok.fingerprint
    assert len(tok.fingerprint) == 64


def test_no_chat_template_raises(smollm: LoadedModel) -> None:
    hf = copy.copy(smollm.tokenizer.hf)
    hf.chat_template = None
    tok = Tokenizer(hf, ())
    assert not tok.has_chat_template
    assert tok.fingerprint != smollm.tokenizer.fingerprint  # the template is part of it
    with pytest.raises(InvalidRequestError, match="chat template"):
        tok.chat_frame(None)
