"""inference.lru.LRU: the one least-recently-used mapping the caches share."""
import pytest

from stablelm_lsp.inference.lru import LRU


def test_lru_keeps_the_most_recently_used_entries():
    lru: LRU[str, int] = LRU(2)
    lru.put("a", 1)
    lru.put("b", 2)
    assert lru.get("a") == 1          # "a" is now the most recent
    lru.put("c", 3)                   # so "b" goes
    assert "b" not in lru and lru.get("b") is None and lru.get("b", 0) == 0
    assert lru.get("a") == 1 and lru.get("c") == 3 and len(lru) == 2
    lru.put("a", 4)                   # replacing refreshes too
    lru.put("d", 5)
    assert "c" not in lru and lru.get("a") == 4 and lru.get("d") == 5


def test_lru_needs_room_for_one():
    with pytest.raises(ValueError):
        LRU(0)
