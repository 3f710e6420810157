"""When generation ends: token-level limits (stop ids, max new tokens, time budget) and text-level
ones (stop strings that may span tokens, a maximum number of lines).

The text-level part sees decoded text deltas (from `streaming.Utf8StreamDecoder`) and decides what
may be shown: text that could be the start of a stop string is held back until the next delta
proves it is not, so a streaming client never sees a stop string or part of one.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Iterable

from .errors import InvalidParameter


@dataclass(frozen=True)
class TokenStops:
    """Limits checked on every sampled token id."""

    max_new_tokens: int
    stop_ids: frozenset[int] = frozenset()
    deadline: float | None = None   # time.monotonic() value after which generation stops

    def __post_init__(self) -> None:
        if self.max_new_tokens <= 0:
            raise InvalidParameter(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")

    @classmethod
    def build(cls, max_new_tokens: int, stop_ids: Iterable[int] = (),
              time_budget_s: float | None = None) -> "TokenStops":
        if time_budget_s is not None and not time_budget_s > 0:
            raise InvalidParameter(f"time_budget_s must be > 0, got {time_budget_s}")
        deadline = None if time_budget_s is None else time.monotonic() + time_budget_s
        return cls(max_new_tokens, frozenset(stop_ids), deadline)

    def time_reason(self) -> str | None:
        if self.deadline is not None and time.monotonic() >= self.deadline:
            return "time"
        return None

    def limit_reason(self, generated: int) -> str | None:
        """"length" or "time" once `generated` new tokens exhaust a limit (stop ids are checked
        by the caller, before any text is made of the token)."""
        if generated >= self.max_new_tokens:
            return "length"
        return self.time_reason()


class StopStringMatcher:
    """Finds the first occurrence of any stop string in a stream of text deltas."""

    def __init__(self, stops: Iterable[str]):
        self.stops = tuple(s for s in stops if s)
        if any(not isinstance(s, str) for s in self.stops):
            raise InvalidParameter("stop strings must be str")
        self._pending = ""      # text received but not yet released

    def feed(self, delta: str) -> tuple[str, bool]:
        """Returns (text safe to release, whether a stop string was found).

        On a match the released text ends just before the stop string and the rest is dropped.
        Otherwise the longest tail that is a proper prefix of some stop string is held back.
        A stop string cannot straddle released and pending text: any such start would have been
        a held-back tail.
        """
        if not self.stops:
            return delta, False
        self._pending += delta
        hits = [i for i in (self._pending.find(s) for s in self.stops) if i >= 0]
        if hits:
            released = self._pending[:min(hits)]
            self._pending = ""
            return released, True
        held = self._held_tail_len(self._pending)
        cut = len(self._pending) - held
        released, self._pending = self._pending[:cut], self._pending[cut:]
        return released, False

    def flush(self) -> str:
        """The held-back text, released when generation ends without a match."""
        released, self._pending = self._pending, ""
        return released

    def _held_tail_len(self, text: str) -> int:
        longest = 0
        for stop in self.stops:
            for n in range(min(len(stop) - 1, len(text)), longest, -1):
                if text.endswith(stop[:n]):
                    longest = n
                    break
        return longest


class TextStops:
    """Stop strings, then the first-line rule, then a line limit, over a stream of decoded text
    deltas. The first-line rule (`continued_by`, see api.GenerationRequest): the first newline
    stops generation unless `line_before` + the first line, trailing whitespace ignored, ends
    with one of `continued_by`."""

    def __init__(self, stop_strings: Iterable[str] = (), max_lines: int | None = None,
                 continued_by: Iterable[str] | None = None, line_before: str = ""):
        if max_lines is not None and max_lines <= 0:
            raise InvalidParameter(f"max_lines must be >= 1, got {max_lines}")
        if isinstance(continued_by, str):
            raise InvalidParameter("continued_by must be a sequence of strings, not one string")
        self.matcher = StopStringMatcher(stop_strings)
        self.max_lines = max_lines
        self.continued_by = None if continued_by is None else tuple(continued_by)
        self._first_line = line_before      # until the first newline is seen; then None
        self._lines = 0         # newlines released so far

    def feed(self, delta: str) -> tuple[str, str | None]:
        """Returns (text to show, finish reason or None)."""
        released, matched = self.matcher.feed(delta)
        released, first_line_stop = self._first_line_rule(released)
        if first_line_stop:
            return released, "stop"
        released, line_stop = self._limit_lines(released)
        if line_stop:
            return released, "max_lines"
        return released, "stop" if matched else None

    def finish(self) -> str:
        """Text still held back when generation ends for another reason."""
        released, stop = self._first_line_rule(self.matcher.flush())
        if stop:
            return released
        released, _ = self._limit_lines(released)
        return released

    def _first_line_rule(self, text: str) -> tuple[str, bool]:
        """Cuts `text` before the first newline when the line it ends does not go on."""
        if self.continued_by is None or self._first_line is None:
            return text, False
        nl = text.find("\n")
        if nl < 0:
            self._first_line += text
            return text, False
        line = (self._first_line + text[:nl]).rstrip()
        self._first_line = None
        if line.endswith(self.continued_by):
            return text, False
        return text[:nl], True

    def _limit_lines(self, text: str) -> tuple[str, bool]:
        """Cuts `text` just after the newline that completes line `max_lines`."""
        if self.max_lines is None:
            return text, False
        start = 0
        while True:
            nl = text.find("\n", start)
            if nl < 0:
                return text, False
            self._lines += 1
            if self._lines >= self.max_lines:
                return text[:nl + 1], True
            start = nl + 1
