"""Tokenizer wrapper: segment-wise encoding and chat rendering that keeps segment boundaries."""

from __future__ import annotations

import hashlib
from typing import Any

from kvfuse.errors import InvalidRequestError

# Stands in for the user message while rendering the chat template, so the rendered text can be
# cut into the part before the documents and the part after them.
_BODY_MARKER = "\x00kvfuse-body\x00"


class Tokenizer:
    """Encodes text without special tokens and renders chat frames around a user message."""

    def __init__(self, hf_tokenizer: Any, eos_token_ids: tuple[int, ...]) -> None:
        self.hf = hf_tokenizer
        extra = _template_stop_ids(hf_tokenizer)
        self.eos_token_ids = tuple(dict.fromkeys((*eos_token_ids, *extra)))
        self.bos_token_id: int | None = hf_tokenizer.bos_token_id
        self.add_bos: bool = bool(getattr(hf_tokenizer, "add_bos_token", False))
        self.fingerprint = _fingerprint(hf_tokenizer)

    def encode(self, text: str) -> list[int]:
        """Token ids of `text` alone, without BOS/EOS."""
        return list(self.hf.encode(text, add_special_tokens=False))

    def decode(self, token_ids: list[int]) -> str:
        return str(self.hf.decode(token_ids, skip_special_tokens=True))

    @property
    def has_chat_template(self) -> bool:
        return bool(getattr(self.hf, "chat_template", None))

    def chat_frame(self, system: str | None) -> tuple[str, str]:
        """Text before and after the user message in a one-turn chat with a generation prompt.

        Raises:
            InvalidRequestError: the model has no chat template.
        """
        if not self.has_chat_template:
            raise InvalidRequestError("the model has no chat template; send chat=False")
        messages = [{"role": "user", "content": _BODY_MARKER}]
        if system is not None:
            messages.insert(0, {"role": "system", "content": system})
        rendered = self.hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        head, sep, tail = str(rendered).partition(_BODY_MARKER)
        if not sep:
            raise InvalidRequestError("the chat template does not render the user message")
        return head, tail


def _template_stop_ids(hf_tokenizer: Any) -> tuple[int, ...]:
    """End-of-turn tokens that chat models emit instead of EOS (e.g. `<|im_end|>`)."""
    vocab = hf_tokenizer.get_vocab()
    return tuple(vocab[t] for t in ("<|im_end|>", "<|eot_id|>", "<|endoftext|>") if t in vocab)


def _fingerprint(hf_tokenizer: Any) -> str:
    """Stable digest of the vocabulary, merges and chat template."""
    digest = hashlib.sha256()
    backend = getattr(hf_tokenizer, "backend_tokenizer", None)
    digest.update(backend.to_str().encode() if backend is not None else b"")
    digest.update(str(getattr(hf_tokenizer, "chat_template", "")).encode())
    return digest.hexdigest()
