"""Text of a sequence as its tokens arrive: incremental detokenization and stop strings. Numpy-free.

`TextAssembler` turns token ids into text piece by piece at a cost that does not grow with
the text already generated:

- Detokenization: only a short window is decoded after each push, the tokens of the last
  piece shown (context, so byte-level merges and leading spaces come out as in a decode of
  the whole sequence) plus the new ones; the new text is the window's text minus its
  context's. Text ending in U+FFFD (a UTF-8 sequence cut between tokens) waits for the token
  that completes it (at most MAX_PENDING tokens, then it is shown as decoded).
- Stop strings: text that could be the start of a stop string is held back (at most the
  longest stop string minus one character); the search for a stop string runs over that held
  tail plus the new text only, so matching is linear in the generated text. Once a stop
  string appears the text ends before it (`stopped`; the stop string itself is never shown).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence

MAX_PENDING = 8  # tokens a cut UTF-8 sequence may wait for its end (a character needs at most 4 bytes)


class TextAssembler:
    """The shown text of one sequence (decode: token ids -> str), with stop strings; see the module doc."""

    def __init__(self, decode: Callable[[list[int]], str], stop: Sequence[str] = ()):
        self.decode = decode
        self.stop = tuple(s for s in stop if s)
        self.stopped = False
        self._ids: list[int] = []
        self._prefix = 0  # _ids[_prefix:_read]: the context, already turned into text
        self._read = 0
        self._held = ""  # decoded text not shown yet: it may be the start of a stop string
        self._shown: list[str] = []
        self._new: list[str] = []  # shown since the last take()

    @property
    def text(self) -> str:
        """The text shown so far."""
        return "".join(self._shown)

    def push(self, tokens: Sequence[int]) -> str:
        """Add tokens; the new text that can be shown now."""
        if self.stopped or not tokens:
            return ""
        self._ids += [int(t) for t in tokens]
        return self._show(self._decode_new(final=False))

    def finish(self) -> str:
        """The text still held back, at the end of the sequence."""
        if self.stopped:
            return ""
        new = self._decode_new(final=True)
        rest, self._held = self._held + new, ""
        return self._emit(rest)

    def take(self) -> str:
        """The text shown since the last take() (what push and finish returned meanwhile)."""
        out, self._new = "".join(self._new), []
        return out

    def _decode_new(self, final: bool) -> str:
        context = self.decode(self._ids[self._prefix:self._read]) if self._read > self._prefix else ""
        window = self.decode(self._ids[self._prefix:])
        waiting = len(self._ids) - self._read
        if not final and window.endswith("\ufffd") and waiting < MAX_PENDING:
            return ""
        new = window[len(context):]
        self._prefix, self._read = self._read, len(self._ids)
        return new

    def _show(self, new: str) -> str:
        if not new:
            return ""
        tail = self._held + new
        if not self.stop:
            self._held = ""
            return self._emit(tail)
        cut = min((i for i in (tail.find(s) for s in self.stop) if i >= 0), default=-1)
        if cut >= 0:
            self.stopped, self._held = True, ""
            return self._emit(tail[:cut])
        keep = self._partial_stop(tail)
        self._held = tail[len(tail) - keep:] if keep else ""
        return self._emit(tail[: len(tail) - keep])

    def _partial_stop(self, tail: str) -> int:
        """Length of the longest end of `tail` that is a proper start of some stop string."""
        best = 0
        for s in self.stop:
            first = s[0]
            j = tail.find(first, max(0, len(tail) - len(s) + 1))
            while j >= 0 and len(tail) - j > best:
                if s.startswith(tail[j:]):
                    best = len(tail) - j
                    break
                j = tail.find(first, j + 1)
        return best

    def _emit(self, text: str) -> str:
        if text:
            self._shown.append(text)
            self._new.append(text)
        return text


def text_pieces(stream: Iterable, decode, row: int = 0) -> Iterator[str]:
    """The new text of one row as its tokens are decided (decode: token ids -> str); see TextAssembler."""
    text = TextAssembler(decode)
    for i, piece in stream:
        if i == row and piece:
            new = text.push(piece)
            if new:
                yield new
    rest = text.finish()
    if rest:
        yield rest
