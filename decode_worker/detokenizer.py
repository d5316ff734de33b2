"""Incremental detokenization with stop strings: token ids in, safe-to-send text deltas out."""

from __future__ import annotations

from collections.abc import Sequence

from kvfuse.model.tokenizer import Tokenizer

# What a byte-level BPE decode shows for a character whose bytes have not all arrived yet.
_INCOMPLETE = "\ufffd"


class TextStream:
    """Turns one sequence's generated tokens into text deltas, cut at the first stop string.

    Decoding re-reads only a short window of recent tokens (vLLM's prefix/read offsets), so a
    token costs O(1) however long the sequence. Text is held back while it ends in an
    incomplete UTF-8 character or in a prefix of a stop string, so no client ever sees text
    that is later retracted. Concatenating every delta gives exactly the final text. Not
    thread-safe: one owner at a time.
    """

    def __init__(self, tokenizer: Tokenizer, stop: Sequence[str] = ()) -> None:
        self.tokenizer = tokenizer
        self.stop = tuple(s for s in stop if s)
        self.token_ids: list[int] = []
        self.text = ""  # everything decoded so far (may run past a stop string)
        self.num_sent_chars = 0
        self.stopped = False
        self._prefix_offset = 0  # window start: tokens decoded only for context
        self._read_offset = 0  # tokens before this are in `self.text`

    def push(self, token_id: int) -> str:
        """Adds a token; returns the text that became safe to send (maybe "").

        Sets `stopped` when a stop string appeared; the text is cut before it and later
        tokens are ignored.
        """
        if self.stopped:
            return ""
        self.token_ids.append(token_id)
        self._decode_window(final=False)
        return self._release(final=False)

    def flush(self) -> str:
        """Returns everything still held back (the sequence ended for another reason)."""
        if self.stopped:
            return ""
        self._decode_window(final=True)
        return self._release(final=True)

    def _decode_window(self, final: bool) -> None:
        ids = self.token_ids
        prefix_text = self.tokenizer.decode(ids[self._prefix_offset : self._read_offset])
        new_text = self.tokenizer.decode(ids[self._prefix_offset :])
        complete = len(new_text) > len(prefix_text) and not new_text.endswith(_INCOMPLETE)
        if complete or (final and len(new_text) > len(prefix_text)):
            self.text += new_text[len(prefix_text) :]
            self._prefix_offset, self._read_offset = self._read_offset, len(ids)

    def _release(self, final: bool) -> str:
        start = max(0, self.num_sent_chars - max((len(s) for s in self.stop), default=0))
        hits = [idx for idx in (self.text.find(s, start) for s in self.stop) if idx >= 0]
        end = len(self.text)
        if hits:
            end, self.stopped = min(hits), True
        elif not final:
            end -= self._held_back()
        delta = self.text[self.num_sent_chars : end]
        self.num_sent_chars = max(self.num_sent_chars, end)
        return delta

    def _held_back(self) -> int:
        """Length of the longest tail of the text that could begin a stop string."""
        longest = 0
        for stop in self.stop:
            for size in range(min(len(stop) - 1, len(self.text)), longest, -1):
                if self.text.endswith(stop[:size]):
                    longest = size
                    break
        return longest
