"""Following each row of a batch token by token: text as it becomes final, stop strings, stop reasons.

Text is produced by decoding a short window of the latest tokens with the tokenizer's own `decode` (so it
works for tiktoken and SentencePiece alike): a new piece is the part of the window's text beyond what the
window's earlier tokens gave, and it waits while the text ends in U+FFFD (a character whose bytes are split
over tokens). Text that might be the start of a stop string is held back until it is known not to be. The
pieces handed out therefore concatenate to exactly the final text.
"""

from dataclasses import dataclass, field
from typing import Callable, List, NamedTuple, Optional, Sequence

# Why a row ended.
STOP_TOKEN = "stop_token"  # the model produced a stop token (<|eot_id|>, ...); it is not part of the output
STOP_STRING = "stop_string"  # the text reached one of the stop strings; the text ends before it
LENGTH = "length"  # max_gen_len tokens were generated, or the row reached max_seq_len


class StreamEvent(NamedTuple):
    """One step of one row. A token event carries the token id and the text it completed (maybe ""); each
    row ends with one event whose token is None, with any text still held back and the stop reason."""

    row: int  # the row in the batch: with n samples per prompt, prompt i's sample j is row i * n + j
    token: Optional[int]
    text: str
    stop_reason: Optional[str] = None


class TextStream:
    """The text of one generation, built one token at a time."""

    def __init__(self, decode: Callable[[Sequence[int]], str], stop: Sequence[str] = ()):
        self._decode = decode
        self._tokens: List[int] = []
        # Tokens before read_offset are in `text`; decoding from prefix_offset (a little earlier) gives them
        # the context that decides their first character (SentencePiece drops a text's leading space).
        self._prefix_offset = 0
        self._read_offset = 0
        self._stop = list(stop)
        self._longest_stop = max((len(s) for s in self._stop), default=0)
        self.text = ""  # everything decoded so far; cut before the stop string once one is found
        self.emitted = 0  # how many characters of `text` were handed out
        self.stopped = False  # a stop string was found

    def push(self, token: int) -> str:
        """Add one token; return the text that became final (possibly "")."""
        self._tokens.append(token)
        return self._extend(self._new_text(final=False), final=False)

    def flush(self) -> str:
        """End of the generation: a character left incomplete becomes U+FFFD (as in a one-shot decode);
        return the text still held back."""
        if self.stopped:
            return ""
        return self._extend(self._new_text(final=True), final=True)

    def _new_text(self, final: bool) -> str:
        before = self._decode(self._tokens[self._prefix_offset : self._read_offset])
        now = self._decode(self._tokens[self._prefix_offset :])
        if len(now) <= len(before) or (now.endswith("\ufffd") and not final):
            return ""  # nothing yet, or a character still missing bytes
        new = now[len(before) :]
        # The next window starts at the new tokens only if their text holds more than spaces: SentencePiece
        # drops the spaces a text starts with, and a window of spaces alone would also drop those of the
        # tokens after it (found by hypothesis: <0x00>, "▁", "▁a" streamed one space fewer than decode).
        if new.strip():
            self._prefix_offset = self._read_offset
        self._read_offset = len(self._tokens)
        return new

    def _extend(self, new: str, final: bool) -> str:
        # A stop string that ends in the new text starts at most longest_stop - 1 characters before it.
        search_from = max(0, len(self.text) - self._longest_stop + 1)
        self.text += new
        cut = self._find_stop(search_from)
        if cut is not None:
            self.text = self.text[:cut]
            self.stopped = True
            ready = cut
        elif final:
            ready = len(self.text)
        else:
            ready = len(self.text) - self._partial_stop_length()
        ready = max(ready, self.emitted)
        delta = self.text[self.emitted : ready]
        self.emitted = ready
        return delta

    def _find_stop(self, search_from: int) -> Optional[int]:
        """Where the stop string found at or after `search_from` begins, or None. The one that ends first
        wins, as if the new characters had come one at a time (then the one that starts first)."""
        found = [(i + len(s), i) for s, i in ((s, self.text.find(s, search_from)) for s in self._stop) if i >= 0]
        return min(found)[1] if found else None

    def _partial_stop_length(self) -> int:
        """The length of the longest end of `text` that is the beginning of a stop string."""
        for k in range(min(len(self.text), self._longest_stop - 1), 0, -1):
            tail = self.text[-k:]
            if any(s.startswith(tail) for s in self._stop):
                return k
        return 0


@dataclass
class RowState:
    """What one row has produced so far."""

    prompt_len: int
    end: int  # one past the last position the row may fill: min(prompt_len + max_gen_len, total_len)
    text: TextStream
    tokens: List[int] = field(default_factory=list)  # generated ids, without a final stop token
    stop_reason: Optional[str] = None


class RowTracker:
    """Host-side state of every row of one generate call, advanced once per decode step."""

    def __init__(
        self,
        decode: Callable[[Sequence[int]], str],
        prompt_lens: Sequence[int],
        ends: Sequence[int],
        stop_tokens: Sequence[int],
        stop: Sequence[str],
    ):
        self.rows = [RowState(p, e, TextStream(decode, stop)) for p, e in zip(prompt_lens, ends)]
        self.stop_tokens = set(stop_tokens)

    @property
    def done(self) -> List[bool]:
        return [row.stop_reason is not None for row in self.rows]

    def step(self, positions: Sequence[int], new_tokens: Sequence[int]) -> List[StreamEvent]:
        """Take the token just written in each row and the position it went to (one loop keeps every row
        at the same position, another each at its own); rows still inside their prompt and rows already
        finished ignore theirs."""
        events = []
        for i, row in enumerate(self.rows):
            cur_pos = positions[i]
            if row.stop_reason is not None or cur_pos < row.prompt_len:
                continue
            token = new_tokens[i]
            if token in self.stop_tokens:
                events.append(self._finish(i, STOP_TOKEN))
                continue
            row.tokens.append(token)
            events.append(StreamEvent(i, token, row.text.push(token)))
            if row.text.stopped:
                events.append(self._finish(i, STOP_STRING))
            elif cur_pos + 1 >= row.end:
                events.append(self._finish(i, LENGTH))
        return events

    def finish_all(self) -> List[StreamEvent]:
        """End the rows still running (the batch ran out of positions)."""
        return [self._finish(i, LENGTH) for i, row in enumerate(self.rows) if row.stop_reason is None]

    def _finish(self, i: int, reason: str) -> StreamEvent:
        row = self.rows[i]
        row.stop_reason = reason
        return StreamEvent(i, None, row.text.flush(), reason)
