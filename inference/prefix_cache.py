"""KV caches kept between requests, and the choice of which one a new request continues.

A slot is one `KVCache` plus the token ids whose keys/values it holds (`slot.tokens` always
matches the cache: `len(slot.tokens) == slot.cache.length`). A request continues the slot sharing
the longest prefix with it; only the rest is computed. Memory is counted in cached positions
(`cache.capacity`, summed over slots) against a budget; the least recently used slots not in use
are dropped to make room.

When the best slot holds another sequence's prompt beyond the shared prefix (another document),
the shared prefix is copied into a new slot if the budget allows, so that sequence stays cached;
otherwise, or when only a stale state of the same sequence would be lost (same key, or nothing
past the shared prefix but generated tokens), the slot is cut back and continued in place.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Sequence

from .errors import BudgetTooSmall

# Fresh linear caches get room for this many positions beyond the request (or a quarter more,
# whichever is larger), so a run of keystrokes appending to one prompt does not reallocate.
_HEADROOM = 256


@dataclass(eq=False)
class Slot:
    cache: "KVCache"            # models.decoder.KVCache
    tokens: list[int] = field(default_factory=list)
    key: str | None = None      # the scheduling key of the request that last used it
    prompt_len: int = 0         # prompt tokens of that request (the rest of `tokens` was generated)
    last_used: int = 0
    in_use: bool = False


def common_prefix_len(a: Sequence[int], b: Sequence[int]) -> int:
    n = min(len(a), len(b))
    if a[:n] == b[:n]:
        return n
    lo, hi = 0, n           # a[:lo] == b[:lo] and a[:hi] != b[:hi]: bisect with C-speed compares
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if a[lo:mid] == b[lo:mid]:
            lo = mid
        else:
            hi = mid
    return lo


class PrefixCache:
    def __init__(self, new_cache: Callable[[int], "KVCache"], budget_tokens: int | Callable[[], int],
                 max_positions: int, ring_capacity: int | None = None):
        """new_cache(capacity) -> an empty KVCache; budget_tokens: positions all slots may hold
        together, or a function giving them (a share of a device budget that changes as engines
        come and go: kv_budget.py); ring_capacity: the fixed capacity of every cache of a
        sliding-window model (None for linear caches, which grow)."""
        self._new_cache = new_cache
        self._budget = budget_tokens
        self.max_positions = max_positions
        self.ring_capacity = ring_capacity
        self.slots: list[Slot] = []
        self.evictions = 0          # slots dropped to make room, since creation
        self._clock = 0

    @property
    def budget_tokens(self) -> int:
        return self._budget() if callable(self._budget) else self._budget

    @property
    def used_tokens(self) -> int:
        return sum(s.cache.capacity for s in self.slots)

    @property
    def nbytes(self) -> int:
        return sum(s.cache.nbytes for s in self.slots)

    def min_capacity(self, needed: int) -> int:
        """The least capacity a cache must have to serve `needed` positions."""
        return self.ring_capacity if self.ring_capacity is not None else needed

    def check_fits(self, needed: int) -> None:
        """Raises BudgetTooSmall when one request of `needed` positions can never fit."""
        least = self.min_capacity(needed)
        if least > self.budget_tokens:
            raise BudgetTooSmall(
                f"the KV-cache budget of {self.budget_tokens} positions cannot hold one request "
                f"needing {least}; raise the budget or shorten the prompt / max_new_tokens")

    def acquire(self, tokens: Sequence[int], needed: int, key: str | None) -> tuple[Slot, int]:
        """A slot holding the longest reusable prefix of `tokens`, cut back to it, with room for
        `needed` positions, marked in use; and how many prompt tokens it already holds.

        At most len(tokens) - 1 are reused: the last prompt token is always run to get logits.
        """
        self.check_fits(needed)
        self._clock += 1
        best, reuse, best_rank = None, 0, None
        for slot in self.slots:
            if slot.in_use:
                continue
            r = min(common_prefix_len(slot.tokens, tokens), len(tokens) - 1)
            if r > 0 and not slot.cache.can_truncate(r):
                r = 0   # a sliding-window ring that has moved past what position r needs
            # Longest reuse first; among equals, the slot whose cut loses least: the same
            # document's, then one holding nothing past r but generated tokens, then the newest.
            rank = (r, key is not None and slot.key == key, r >= slot.prompt_len, slot.last_used)
            if r > 0 and (best_rank is None or rank > best_rank):
                best, reuse, best_rank = slot, r, rank
        if best is None:
            slot = self._fresh_slot(needed, keep=())
        else:
            slot = None
            if reuse < best.prompt_len and (key is None or best.key != key):
                # best holds another sequence's prompt past the shared part: keep it if room can
                # be made without dropping anything used more recently than it.
                slot = self._fresh_slot(needed, keep=(best,), older_than=best.last_used)
            if slot is not None:
                slot.cache.copy_prefix_from(best.cache, reuse)
                slot.tokens = list(tokens[:reuse])
            else:
                slot = best
                slot.cache.truncate(reuse)
                del slot.tokens[reuse:]
                self._grow(slot, needed)
        slot.key, slot.prompt_len = key, len(tokens)
        slot.last_used, slot.in_use = self._clock, True
        return slot, reuse

    def release(self, slot: Slot) -> None:
        slot.in_use = False

    def drop(self, slot: Slot) -> None:
        self.slots.remove(slot)

    def clear(self) -> None:
        self.slots = [s for s in self.slots if s.in_use]

    def _capacity_for(self, needed: int) -> int:
        if self.ring_capacity is not None:
            return self.ring_capacity
        wanted = needed + max(_HEADROOM, needed // 4)
        return max(needed, min(wanted, self.max_positions, self.budget_tokens))

    def _fresh_slot(self, needed: int, keep: Sequence[Slot],
                    older_than: int | None = None) -> Slot | None:
        """A new empty slot, or None when `older_than` is given and room cannot be made."""
        capacity = self._capacity_for(needed)
        if not self._make_room(capacity, keep, older_than):
            if older_than is not None:
                return None
            raise BudgetTooSmall(f"the KV-cache budget of {self.budget_tokens} positions is held "
                                 f"by requests in progress; {capacity} more are needed")
        slot = Slot(self._new_cache(capacity))
        self.slots.append(slot)
        return slot

    def _grow(self, slot: Slot, needed: int) -> None:
        """Reallocate a linear slot too small for `needed`, keeping what it holds."""
        if slot.cache.capacity >= needed:
            return
        capacity = self._capacity_for(needed)
        self._make_room(capacity - slot.cache.capacity, keep=(slot,))
        grown = self._new_cache(capacity)
        grown.copy_prefix_from(slot.cache, slot.cache.length)
        slot.cache = grown

    def _make_room(self, tokens: int, keep: Sequence[Slot], older_than: int | None = None) -> bool:
        """Frees budget for `tokens` more positions by dropping least recently used idle slots
        (only those used before `older_than`, when given). Drops nothing if that cannot succeed."""
        idle = sorted((s for s in self.slots if not s.in_use and s not in keep
                       and (older_than is None or s.last_used < older_than)),
                      key=lambda s: s.last_used)
        free = self.budget_tokens - self.used_tokens
        victims = []
        while free < tokens and idle:
            victims.append(idle.pop(0))
            free += victims[-1].cache.capacity
        if free < tokens:
            return False
        for victim in victims:
            self.slots.remove(victim)
        self.evictions += len(victims)
        return True
