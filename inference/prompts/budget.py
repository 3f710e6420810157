"""Token budgets for prompts: counting prompt pieces, and taking whole lines while a budget lasts.

Both prompt formats spend their budgets here: the FIM prompt (fim.py) takes the lines before the
cursor backwards and the lines after it forwards, in chunks; the chat prompt (chat.py) takes a
selection's leading lines and an excerpt of the file around it. Lines are counted one by one, so
a `TokenCounter` answers the same lines from its cache on the next keystroke or turn, and a line
longer than MAX_CHARS_PER_TOKEN characters per remaining token is refused without being counted
(a minified file costs no tokenizing).
"""
from __future__ import annotations

from typing import Callable, Sequence

from ..api import PromptPart, join_parts
from ..lru import LRU

MAX_CHARS_PER_TOKEN = 16   # text looked at per token of budget: bounds work on huge lines

# Counts the tokens of prompt parts: `Backend.count_tokens`, or a TokenCounter in front of it.
CountTokens = Callable[[Sequence[PromptPart]], int]
# Counts the tokens of document or message text (one plain part).
CountText = Callable[[str], int]


class TokenCounter:
    """Token counts of prompt pieces, cached: the same lines are counted on every keystroke.
    Not thread-safe: one per thread (a chat request builds its prompt with its own)."""

    def __init__(self, count: CountTokens, max_entries: int = 1 << 16):
        self._count = count
        self._cache: LRU[tuple[PromptPart, ...], int] = LRU(max_entries)

    def __call__(self, parts: Sequence[PromptPart]) -> int:
        key = join_parts(parts)
        if not key:
            return 0
        cached = self._cache.get(key)
        if cached is not None:
            return cached
        tokens = self._count(key)
        self._cache.put(key, tokens)
        return tokens


def text_counter(count_tokens: CountTokens) -> CountText:
    """Tokens of document or message text (a plain part), from a counter of parts."""
    return lambda text: count_tokens((PromptPart(text),)) if text else 0


def lines_cost(lines: Sequence[str], budget: int, count: CountText) -> int | None:
    """Tokens of `lines` (summed per line, so cached counts are reused), None when over `budget`."""
    total = 0
    for line in lines:
        if len(line) > (budget - total) * MAX_CHARS_PER_TOKEN:
            return None
        total += count(line)
        if total > budget:
            return None
    return total


def take_backwards(lines: Sequence[str], end: int, budget: int, count: CountText,
                   step: int = 1) -> tuple[int, int]:
    """Smallest `start` (a multiple of `step`, or any line if `step` is 1) with the tokens of
    lines[start:end] within `budget`. Returns (start, tokens)."""
    start, used = end, 0
    while start > 0:
        chunk_start = ((start - 1) // step) * step
        cost = lines_cost(lines[chunk_start:start], budget - used, count)
        if cost is None:
            break
        start, used = chunk_start, used + cost
    if start == end and step > 1:
        return take_backwards(lines, end, budget, count, 1)
    return start, used


def take_forwards(lines: Sequence[str], begin: int, budget: int, count: CountText,
                  step: int = 1) -> tuple[int, int]:
    """Largest `end` (a multiple of `step` or the end of the list) with the tokens of
    lines[begin:end] within `budget`. Returns (end, tokens)."""
    end, used = begin, 0
    last = len(lines)
    while end < last:
        chunk_end = min(((end // step) + 1) * step, last)
        cost = lines_cost(lines[end:chunk_end], budget - used, count)
        if cost is None:
            break
        end, used = chunk_end, used + cost
    return end, used


def excerpt(lines: Sequence[str], center: int, budget: int, count: CountText) -> tuple[int, int]:
    """lines[lo:hi] around `center`, grown a line below then a line above while the budget lasts;
    a side that no longer fits stops growing and leaves the rest to the other."""
    center = min(max(center, 0), len(lines) - 1)
    lo, hi = center, center
    down = up = True
    while (down or up) and budget > 0:
        if down:
            cost = lines_cost(lines[hi:hi + 1], budget, count) if hi < len(lines) else None
            if cost is None:
                down = False
            else:
                hi, budget = hi + 1, budget - cost
        if up:
            cost = lines_cost(lines[lo - 1:lo], budget, count) if lo > 0 else None
            if cost is None:
                up = False
            else:
                lo, budget = lo - 1, budget - cost
    return lo, hi
