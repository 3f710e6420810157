"""Draft tokens for speculative decoding, looked up in what the request has already seen.

The engine verifies a draft of k tokens in one forward pass of k + 1 positions (the token just
sampled plus the draft) and keeps the longest prefix the model agrees with, plus the model's own
next token: never a different result, only fewer passes when the draft is right. On a GPU, and on
a CPU for a weight-bound model, a pass of a few positions costs little more than a pass of one.

Drafts come from n-gram lookup (as llama.cpp's lookup decoding and transformers'
`prompt_lookup_num_tokens` do): the last few tokens of the sequence are looked up

- in the previous sequence of the same document (its prompt and the completion the model gave):
  after a keystroke that types what was suggested, the rest of the suggestion is the draft, and
  it is verified in one pass instead of being generated token by token. While the sequence is
  still a prefix of the previous one, the draft is simply what follows there;
- in the sequence itself (prompt + generated so far): code repeats identifiers, calls and whole
  lines, and a model that repeats itself is drafted for free.

The longest matching n-gram wins; among equals, the previous sequence first, then the most recent
occurrence. A draft that runs into the end of the sequence continues by copying itself, so a
periodic run ("a, a, a, ") drafts as far as asked.
"""
from __future__ import annotations

from typing import Sequence

MAX_NGRAM = 3           # longest suffix looked up
MIN_NGRAM = 1
OWN_WINDOW = 4096       # prompt tokens indexed (the last ones)
PREVIOUS_WINDOW = 512   # tokens of the previous sequence indexed (the last ones)


class NgramIndex:
    """For each n-gram (n = MIN_NGRAM..MAX_NGRAM) of a token sequence, where its latest
    occurrence that is followed by at least one token ends."""

    def __init__(self, tokens: Sequence[int] = ()):
        self.tokens: list[int] = list(tokens)
        self._end: dict[tuple[int, ...], int] = {}
        seq, count = self.tokens, len(self.tokens)
        for n in range(MIN_NGRAM, MAX_NGRAM + 1):
            # the n-grams starting at 0 .. count - n - 1 (each followed by a token), and where
            # they end; built at C speed, later occurrences overwriting earlier ones
            grams = zip(*(seq[i:count - n + i] for i in range(n)))
            self._end.update(zip(grams, range(n, count)))

    def extend(self, tokens: Sequence[int]) -> None:
        seq, ends = self.tokens, self._end
        for t in tokens:
            i = len(seq)        # t lands at i: the n-grams ending at i - 1 are followed by it
            for n in range(MIN_NGRAM, MAX_NGRAM + 1):
                if i >= n:
                    ends[tuple(seq[i - n:i])] = i
            seq.append(t)

    def follow(self, gram: tuple[int, ...]) -> int | None:
        """Where the tokens after the latest followed occurrence of `gram` start, or None."""
        return self._end.get(gram)


class Drafter:
    """Drafts for one request: its own sequence plus the previous one of the same document."""

    def __init__(self, prompt: Sequence[int], previous: Sequence[int] | None = None):
        # Only the end of a long prompt is indexed (nearby text repeats most; a request's
        # set-up time stays flat), and of the previous sequence, its completion and what led to it.
        # Built at the first n-gram lookup: a request that follows its previous sequence all the
        # way (the same request again, typing the suggestion) never pays for them.
        self._own: NgramIndex | None = None
        self._previous: NgramIndex | None = None
        self._prompt = prompt
        self._previous_tokens = list(previous or ())
        self._pending: list[int] = []   # tokens appended since the last draft (indexed lazily)
        # While the sequence is a prefix of the previous one (the same request again, or the
        # user typed part of the suggestion), where it stands in it: the draft is what follows.
        self._aligned: int | None = None
        self.last_aligned = False   # whether the last draft was what followed there
        if previous and len(previous) > len(prompt) and list(previous[:len(prompt)]) == list(prompt):
            self._aligned = len(prompt)

    @property
    def own(self) -> NgramIndex:
        if self._own is None:
            self._own = NgramIndex(self._prompt[-OWN_WINDOW:])
        return self._own

    @property
    def previous(self) -> NgramIndex | None:
        if self._previous is None and self._previous_tokens:
            self._previous = NgramIndex(self._previous_tokens[-PREVIOUS_WINDOW:])
        return self._previous

    @property
    def aligned(self) -> bool:
        """Whether the sequence so far is a prefix of the previous one, with more to follow."""
        return self._aligned is not None and self._aligned < len(self._previous_tokens)

    def append(self, token: int) -> None:
        self._pending.append(token)
        if self._aligned is not None:
            prev = self._previous_tokens
            if self._aligned < len(prev) and prev[self._aligned] == token:
                self._aligned += 1
            else:
                self._aligned = None

    def draft(self, k: int) -> list[int]:
        """Up to k tokens likely to follow the sequence (empty when nothing matches)."""
        self.last_aligned = k > 0 and self.aligned
        if self.last_aligned:
            return self._previous_tokens[self._aligned:self._aligned + k]
        if self._pending:
            # the newest token is the suffix being looked up: index everything before it now,
            # so the lookup finds earlier occurrences only
            self.own.extend(self._pending[:-1])
            self._pending = self._pending[-1:]
        if k <= 0:
            return []
        seq = self.own.tokens + self._pending
        previous = self.previous
        for n in range(min(MAX_NGRAM, len(seq)), MIN_NGRAM - 1, -1):
            gram = tuple(seq[-n:])
            for source in (previous, self.own):
                if source is None:
                    continue
                start = source.follow(gram)
                if start is not None:
                    if source is previous:
                        return source.tokens[start:start + k]
                    return _copy_periodic(seq, start, k)
        return []


class Acceptance:
    """A running estimate of the chance that a looked-up draft token is taken, from the drafts
    verified so far. A draft is taken token by token up to the first one the model refuses, so
    the estimate is taken / (taken + refusals) (a draft taken whole has no refusal). It starts
    as `prior` counted as `weight` tokens; past `window` tokens the counts are halved, so the
    estimate follows what the user is writing now."""

    def __init__(self, prior: float, weight: float = 16.0, window: float = 256.0):
        self.taken, self.refused = prior * weight, (1.0 - prior) * weight
        self.window = window

    def add(self, kept: int, drafted: int) -> None:
        """One draft of `drafted` tokens whose first `kept` were taken."""
        self.taken += kept
        self.refused += kept < drafted
        if self.taken + self.refused > self.window:
            self.taken, self.refused = self.taken / 2, self.refused / 2

    @property
    def rate(self) -> float:
        return self.taken / (self.taken + self.refused)


def _copy_periodic(seq: list[int], start: int, k: int) -> list[int]:
    """seq[start:start + k]; past the end of seq, the run seq[start:] repeats itself."""
    out = seq[start:start + k]
    period = len(seq) - start
    while len(out) < k:
        out.append(out[-period])
    return out
