"""Incremental detokenization: turn a growing list of token ids into text pieces.

Decoding tokens one by one breaks in two ways: a character split over several byte tokens
decodes to U+FFFD until its last byte arrives, and SentencePiece tokenizers drop the leading
space of the first token in a decoded sequence. So each step decodes a short window that starts
a few tokens back (the last prompt tokens at first) and emits only what the window gained,
holding text back while it ends in U+FFFD (the approach of Hugging Face TGI and vLLM).

`StopStringMatcher` is the second stage: it finds stop strings that may span several pieces
and holds back any tail of the text that could still become one.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

REPLACEMENT_CHAR = "\ufffd"


class IncrementalDetokenizer:
    """Feed token ids with `add`; each call returns the newly completed text (maybe "").

    `context_ids` are the tokens before the first generated one (the prompt); only their last
    `context_window` are decoded, to give the first generated token its correct leading space.
    The concatenation of every `add` result and `flush()` is the generated text.
    """

    def __init__(
        self,
        tokenizer: Any,
        context_ids: Sequence[int] = (),
        *,
        context_window: int = 5,
        skip_special_tokens: bool = True,
    ) -> None:
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self._ids: list[int] = list(context_ids[-context_window:]) if context_window > 0 else []
        self._prefix_offset = 0  # start of the decoded window
        self._read_offset = len(self._ids)  # tokens before this are already emitted

    def _decode(self, ids: list[int]) -> str:
        if not ids:
            return ""
        return self.tokenizer.decode(
            ids, skip_special_tokens=self.skip_special_tokens, clean_up_tokenization_spaces=False
        )

    def _gained(self, final: bool) -> str:
        prefix_text = self._decode(self._ids[self._prefix_offset : self._read_offset])
        full_text = self._decode(self._ids[self._prefix_offset :])
        if len(full_text) <= len(prefix_text):
            return ""
        if full_text.endswith(REPLACEMENT_CHAR) and not final:
            return ""  # an incomplete multi-byte character: wait for its remaining bytes
        self._prefix_offset = self._read_offset
        self._read_offset = len(self._ids)
        return full_text[len(prefix_text) :]

    def add(self, token_id: int) -> str:
        self._ids.append(int(token_id))
        return self._gained(final=False)

    def flush(self) -> str:
        """Whatever is still held back (even an incomplete character): the sequence is over."""
        if self._read_offset == len(self._ids):
            return ""
        return self._gained(final=True)


class StopStringMatcher:
    """Accumulates text, cuts it at the first stop string, and holds back possible stop prefixes.

    `feed(piece)` returns the text that is safe to emit now; `stopped` becomes True once a stop
    string has appeared, after which the text is final and excludes the stop string.
    """

    def __init__(self, stop: Sequence[str]) -> None:
        self.stop = [s for s in stop if s]
        self._max_len = max((len(s) for s in self.stop), default=0)
        self.text = ""  # everything fed so far (cut at the stop string once found)
        self.emitted = 0  # length of self.text handed out
        self.stopped = False

    def feed(self, piece: str) -> str:
        if self.stopped or not piece:
            return ""
        start = max(0, len(self.text) - self._max_len + 1)
        self.text += piece
        if not self.stop:
            return self._emit(len(self.text))
        hits = [i for i in (self.text.find(s, start) for s in self.stop) if i >= 0]
        if hits:
            self.text = self.text[: min(hits)]
            self.stopped = True
            return self._emit(len(self.text))
        return self._emit(len(self.text) - self._held_back())

    def flush(self) -> str:
        """The held-back tail: the text ended without completing a stop string."""
        return self._emit(len(self.text))

    def _held_back(self) -> int:
        """Length of the longest tail of the text that is a proper prefix of a stop string."""
        for n in range(min(self._max_len - 1, len(self.text)), 0, -1):
            tail = self.text[-n:]
            if any(s.startswith(tail) for s in self.stop):
                return n
        return 0

    def _emit(self, upto: int) -> str:
        upto = max(upto, self.emitted)
        piece = self.text[self.emitted : upto]
        self.emitted = upto
        return piece
