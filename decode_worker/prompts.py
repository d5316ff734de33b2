"""Turns an HTTP request body into a tokenized, validated `GenerationRequest`.

Segments come from `kvfuse.segments` or from splitting the prompt / the last user message at
the separator. For chat, system (and developer) messages form the prefix, the documents and
the question sit in the last user message, and earlier turns join the prefix.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from decode_worker.limits import RequestLimits
from decode_worker.schemas import (
    ChatCompletionRequest,
    ChatMessage,
    CompletionRequest,
    KvfuseOptions,
    SamplingBody,
    TokenizeRequest,
    WarmRequest,
)
from decode_worker.sequence import GenerationRequest
from kvfuse.blend import Mode
from kvfuse.errors import InvalidRequestError, PromptTooLongError
from kvfuse.model.sampling import SamplingParams
from kvfuse.model.tokenizer import Tokenizer
from kvfuse.prefill import PrefillRequest
from kvfuse.segments import DOCUMENT_SUFFIX, PromptSegments, build_prompt, split_text

# Stands in for the last user message while the chat template renders earlier turns.
_BODY_MARKER = "\x00kvfuse-decode-body\x00"
_SYSTEM_ROLES = ("system", "developer")
_WARM_QUERY = "?"  # stands in for the question: the prefix and chunks do not depend on it


@dataclass(frozen=True)
class PromptDefaults:
    """What a request leaves unset, and the limits it must respect."""

    separator: str
    max_model_len: int
    default_max_tokens: int
    default_temperature: float
    default_mode: Mode
    default_recompute_ratio: float | None
    vocab_size: int


class PromptBuilder:
    """Tokenizes request bodies. Thread-safe (tokenizers are; the builder holds no state).

    Segment counts are checked before tokenizing, tokens per segment after; message counts
    and body size before validation (`RequestLimits.check_parsed`, `body_limit`).
    """

    def __init__(
        self, tokenizer: Tokenizer, defaults: PromptDefaults, limits: RequestLimits
    ) -> None:
        self.tokenizer = tokenizer
        self.defaults = defaults
        self.limits = limits

    def completion(self, body: CompletionRequest, request_id: str) -> GenerationRequest:
        """Raises InvalidRequestError / PromptTooLongError (both 400)."""
        _refuse_unsupported(body)
        if body.echo or body.suffix or body.logprobs is not None or (body.best_of or 1) > 1:
            raise InvalidRequestError("echo, suffix, logprobs and best_of > 1 are not supported")
        segments = self.completion_segments(body.prompt, body.kvfuse)
        return self._generation(body, segments, body.max_tokens, request_id)

    def chat(self, body: ChatCompletionRequest, request_id: str) -> GenerationRequest:
        """Raises InvalidRequestError / PromptTooLongError (both 400)."""
        _refuse_unsupported(body)
        if body.logprobs or body.top_logprobs:
            raise InvalidRequestError("logprobs are not supported")
        segments = self.chat_segments(body.messages, body.kvfuse)
        max_tokens = body.max_completion_tokens or body.max_tokens
        return self._generation(body, segments, max_tokens, request_id)

    def tokenize(self, body: TokenizeRequest) -> PromptSegments:
        if body.messages is not None:
            return self.chat_segments(body.messages, body.kvfuse)
        return self.completion_segments(body.prompt, body.kvfuse)

    def warm(self, body: WarmRequest) -> PromptSegments:
        """The prefix and chunks the requests carrying `body.documents` will have (no query).

        Raises InvalidRequestError for an empty document, too many, or one too long.
        """
        self.limits.check_warm_documents(len(body.documents))
        texts = [body.system, *body.documents, _WARM_QUERY]
        seg = build_prompt(self.tokenizer, texts, chat=body.chat)
        self.limits.check_segment_tokens(seg)
        return PromptSegments(seg.prefix_ids, seg.chunk_ids, ())

    def completion_segments(
        self, prompt: str | list[str] | list[int] | None, options: KvfuseOptions | None
    ) -> PromptSegments:
        """Raw text (no chat template): [prefix, chunk…, query]."""
        if options is not None and options.segments is not None:
            return self._build(options.segments, chat=False)
        if isinstance(prompt, list) and prompt and all(isinstance(p, int) for p in prompt):
            return self._token_prompt([int(p) for p in prompt])
        if isinstance(prompt, list):
            if len(prompt) != 1:
                raise InvalidRequestError(
                    f"send one prompt per request (got a list of {len(prompt)})"
                )
            prompt = str(prompt[0])
        if not prompt or not prompt.strip():
            raise InvalidRequestError("prompt is missing or empty (or send kvfuse.segments)")
        return self._build(split_text(prompt, self.defaults.separator), chat=False)

    def chat_segments(
        self, messages: list[ChatMessage] | None, options: KvfuseOptions | None
    ) -> PromptSegments:
        """Chat-framed: [system, document…, question], earlier turns in the prefix."""
        if options is not None and options.segments is not None:
            return self._build(options.segments, chat=True)
        if not messages:
            raise InvalidRequestError("messages is missing or empty (or send kvfuse.segments)")
        num_system = 0
        while num_system < len(messages) and messages[num_system].role in _SYSTEM_ROLES:
            num_system += 1
        system = "\n\n".join(m.text for m in messages[:num_system])
        turns = messages[num_system:]
        if not turns or turns[-1].role != "user":
            raise InvalidRequestError("the last message must be from the user")
        history, last = turns[:-1], turns[-1]
        parts = split_text(last.text, self.defaults.separator)
        if not history:
            return self._build([system, *parts], chat=True)
        self.limits.check_segments(1 + len(parts))
        return self._with_history(system, history, parts)

    def _build(self, texts: Sequence[str], chat: bool) -> PromptSegments:
        self.limits.check_segments(len(texts))
        return build_prompt(self.tokenizer, texts, chat=chat)

    def _with_history(
        self, system: str, history: Sequence[ChatMessage], parts: list[str]
    ) -> PromptSegments:
        """Renders system + earlier turns into the prefix, as `build_prompt` frames one turn."""
        if not parts[-1].strip() or any(not p.strip() for p in parts[:-1]):
            raise InvalidRequestError("the question or a document in the last message is empty")
        if any(m.role in _SYSTEM_ROLES for m in history):
            raise InvalidRequestError("system messages must come before the conversation")
        turns = [{"role": "system", "content": system}] if system else []
        turns += [{"role": m.role, "content": m.text} for m in history]
        turns.append({"role": "user", "content": _BODY_MARKER})
        hf = self.tokenizer.hf
        rendered = str(hf.apply_chat_template(turns, tokenize=False, add_generation_prompt=True))
        head, sep, tail = rendered.partition(_BODY_MARKER)
        if not sep:
            raise InvalidRequestError("the chat template does not render the user message")
        prefix_ids = self.tokenizer.encode(head)
        if self.tokenizer.add_bos and self.tokenizer.bos_token_id is not None:
            prefix_ids.insert(0, self.tokenizer.bos_token_id)
        return PromptSegments(
            prefix_ids=tuple(prefix_ids),
            chunk_ids=tuple(tuple(self.tokenizer.encode(d + DOCUMENT_SUFFIX)) for d in parts[:-1]),
            query_ids=tuple(self.tokenizer.encode(parts[-1] + tail)),
        )

    def _token_prompt(self, token_ids: list[int]) -> PromptSegments:
        self._check_token_ids(token_ids, "prompt")
        return PromptSegments(prefix_ids=(), chunk_ids=(), query_ids=tuple(token_ids))

    def _check_token_ids(self, token_ids: Sequence[int], what: str) -> None:
        vocab_size = self.defaults.vocab_size
        bad = [t for t in token_ids if not 0 <= t < vocab_size]
        if bad:
            raise InvalidRequestError(f"{what} has token ids outside [0, {vocab_size}): {bad[:5]}")

    def _generation(
        self,
        body: SamplingBody,
        segments: PromptSegments,
        max_tokens: int | None,
        request_id: str,
    ) -> GenerationRequest:
        defaults = self.defaults
        max_tokens = self._max_tokens(segments, max_tokens)
        self.limits.check_segment_tokens(segments)
        stop_token_ids = tuple(body.stop_token_ids or ())
        self._check_token_ids(stop_token_ids, "stop_token_ids")
        sampling = SamplingParams(
            max_tokens=max_tokens,
            temperature=defaults.default_temperature
            if body.temperature is None
            else body.temperature,
            top_p=1.0 if body.top_p is None else body.top_p,
            seed=body.seed,
            stop_token_ids=stop_token_ids,
            ignore_eos=body.ignore_eos,
        )
        options = body.kvfuse or KvfuseOptions()
        ratio = options.recompute_ratio
        ratio = defaults.default_recompute_ratio if ratio is None else ratio
        mode = options.mode or defaults.default_mode
        prefill = PrefillRequest(request_id, segments, mode, ratio, sampling)
        return GenerationRequest(prefill, self._stop_strings(body.stop))

    def _max_tokens(self, segments: PromptSegments, max_tokens: int | None) -> int:
        """The generation limit: the request's, or the default within the context.

        Raises:
            PromptTooLongError: the prompt leaves no room to generate.
            InvalidRequestError: max_tokens beyond the room the prompt leaves.
        """
        num_prompt, limit = segments.num_tokens, self.defaults.max_model_len
        if num_prompt >= limit:
            raise PromptTooLongError(num_prompt, limit)
        room = limit - num_prompt
        if max_tokens is None:
            return min(self.defaults.default_max_tokens, room)
        if max_tokens > room:
            raise InvalidRequestError(
                f"max_tokens is {max_tokens}, more than the {room} tokens the model's context "
                f"of {limit} leaves after the prompt's {num_prompt}"
            )
        return max_tokens

    def _stop_strings(self, stop: str | list[str] | None) -> tuple[str, ...]:
        stops = [stop] if isinstance(stop, str) else list(stop or [])
        self.limits.check_stop(stops)
        return tuple(s for s in stops if s)


def _refuse_unsupported(body: SamplingBody) -> None:
    if body.n != 1:
        raise InvalidRequestError(f"only n=1 is supported (got n={body.n})")
    if body.presence_penalty or body.frequency_penalty or body.logit_bias:
        raise InvalidRequestError("presence/frequency penalties and logit_bias are not supported")
