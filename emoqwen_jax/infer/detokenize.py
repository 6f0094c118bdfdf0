"""Incremental detokenization with stop strings, for streaming.

Each new token's text is the decode of a short window of ids (from the previous emit point) minus the
window's old text, so the cost per token stays constant; a window that ends inside a multi-byte character
(decodes to a trailing U+FFFD) waits for the next token. Stop strings: the text ends before the first one
found, and while none is found the last ``len(longest stop) - 1`` characters are held back, so no delta ever
has to be taken back. The deltas handed out join to ``text``.
"""

from __future__ import annotations

from typing import Callable, Sequence


class Detokenizer:
    def __init__(self, decode: Callable[[Sequence[int]], str], stop: Sequence[str] = ()):
        self.decode, self.stop = decode, tuple(stop)
        self.hold = max((len(s) for s in self.stop), default=1) - 1
        self.ids: list[int] = []
        self.text = ""  # the text so far (complete characters; cut at a stop string once one is found)
        self.stopped = False  # a stop string was found
        self._prefix = self._read = 0  # the window: ids[_prefix:_read] produced text already in `text`
        self._sent = 0  # characters handed out
        self._searched = 0  # characters searched for stop strings

    def _advance(self) -> None:
        old = self.decode(self.ids[self._prefix:self._read])
        new = self.decode(self.ids[self._prefix:])
        if len(new) > len(old) and not new.endswith("\ufffd"):
            self.text += new[len(old):]
            self._prefix, self._read = self._read, len(self.ids)

    def add(self, token: int, check_stop: bool = True) -> str:
        """Appends one token; returns the text that is now final (may be '')."""
        self.ids.append(int(token))
        self._advance()
        if self.stop and check_stop:
            start = max(0, self._searched - self.hold)
            hits = [i for i in (self.text.find(s, start) for s in self.stop) if i >= 0]
            self._searched = len(self.text)
            if hits:
                self.text, self.stopped = self.text[:min(hits)], True
                return self.flush()
        safe = len(self.text) - (self.hold if self.stop else 0)
        if safe <= self._sent:
            return ""
        delta, self._sent = self.text[self._sent:safe], safe
        return delta

    def flush(self) -> str:
        """The held-back rest of the text at the end of a request, an unfinished character included (as
        U+FFFD, as a full decode of the ids shows it)."""
        if not self.stopped:
            old = self.decode(self.ids[self._prefix:self._read])
            new = self.decode(self.ids[self._prefix:])
            self.text += new[len(old):] if new.startswith(old) else ""
            self._prefix = self._read = len(self.ids)
        delta, self._sent = self.text[self._sent:], len(self.text)
        return delta
