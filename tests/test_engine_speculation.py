"""Speculative decoding: drafts verified in one pass never change what is generated, and they
are really used (typing the suggestion, a model that repeats itself)."""
from __future__ import annotations

import random
import threading

import pytest

from stablelm_lsp.inference.engine import Engine
from stablelm_lsp.inference.errors import InvalidParameter
from stablelm_lsp.inference.sampling import SamplingParams
from stablelm_lsp.inference.speculation import Drafter, NgramIndex
from stablelm_lsp.models import load_model

CHUNK = 24


@pytest.fixture(scope="module", params=["stablelm-3b", "starcoder2"])
def loaded(request, checkpoint_factory):
    """StableLM (linear cache) and StarCoder2 (window 16: ring caches, drafts bounded by the ring)."""
    return load_model(checkpoint_factory(request.param), device="cpu", dtype="float32")


def random_ids(rng: random.Random, n: int, vocab: int) -> list[int]:
    return [rng.randrange(7, vocab) for _ in range(n)]


def consistent(engine: Engine) -> None:
    for slot in engine.prefix_cache.slots:
        assert len(slot.tokens) == slot.cache.length


def test_drafts_come_from_the_previous_sequence_then_the_sequence_itself():
    d = Drafter([1, 2, 3, 4, 5, 9, 9, 1, 2])
    assert d.draft(3) == [3, 4, 5]             # the longest suffix (1, 2) seen before
    d.append(3)
    assert d.draft(2) == [4, 5]
    assert Drafter([7, 8, 7, 8]).draft(5) == [7, 8, 7, 8, 7]   # a periodic run continues itself
    assert Drafter([5, 6]).draft(4) == []
    prev = [1, 2, 3, 10, 11, 12]
    d = Drafter([1, 2, 3], previous=prev)
    assert d.draft(4) == [10, 11, 12]          # the rest of the previous completion
    d.append(10)
    assert d.draft(1) == [11]
    d.append(99)
    assert d.draft(4) == []
    assert NgramIndex([4, 4, 4]).follow((4, 4)) == 2
    # a prompt that is a prefix of the previous sequence follows it position by position,
    # whatever the n-grams say (the latest (5,) is followed by 6, the aligned one by 5)
    d = Drafter([1, 2], previous=[1, 2, 5, 5, 5, 6])
    assert d.draft(3) == [5, 5, 5]
    d.append(5)
    assert d.draft(3) == [5, 5, 6]
    d.append(7)                                # off the previous sequence: n-grams again
    assert d.draft(2) == []


def test_typing_the_suggestion_verifies_the_rest_of_it_in_one_pass(loaded):
    ids = random_ids(random.Random(5), 60, loaded.config.vocab_size)
    with Engine(loaded, prefill_chunk=CHUNK) as engine, \
            Engine(loaded, prefill_chunk=CHUNK, draft_tokens=0) as plain:
        first = engine.generate(ids, max_new_tokens=12, key="d")
        typed = ids + first.token_ids[:2]
        passes = []
        hook = engine.model.register_forward_hook(lambda *args: passes.append(1))
        got = engine.generate(typed, max_new_tokens=10, key="d")
        hook.remove()
        want = plain.generate(typed, max_new_tokens=10, key="d")
        assert got.token_ids == want.token_ids == first.token_ids[2:] + got.token_ids[10:]
        assert want.drafted_tokens == 0
        assert got.accepted_tokens >= 6, (got.drafted_tokens, got.accepted_tokens)
        if not engine.prefix_cache.ring_capacity:
            # the typed tokens and the rest of the suggestion run in one pass: 10 tokens out
            # (a ring of window 16 takes at most 4 positions a pass)
            assert len(passes) == 1 and got.accepted_tokens == 9
        consistent(engine)


@pytest.mark.parametrize("temperature", [0.0, 0.8], ids=["greedy", "sampled"])
def test_speculation_never_changes_the_tokens(loaded, temperature):
    """Random prompts with repeated stretches (so that drafts are found), edits between requests,
    stop ids inside accepted drafts: the same tokens as decoding one position per pass."""
    rng = random.Random(7)
    vocab = loaded.config.vocab_size
    drafted = accepted = 0
    with Engine(loaded, prefill_chunk=CHUNK) as engine, \
            Engine(loaded, prefill_chunk=CHUNK, draft_tokens=0) as plain:
        doc = random_ids(rng, 30, vocab)
        for step in range(14):
            piece = doc[-rng.randrange(2, 12):]
            doc = doc + (piece if rng.random() < 0.7 else random_ids(rng, 3, vocab))
            sampling = SamplingParams(temperature=temperature, top_k=50, seed=step)
            kw = dict(max_new_tokens=rng.randrange(4, 20), sampling=sampling, key="doc")
            want = plain.generate(doc, **kw)
            stop = [want.token_ids[len(want.token_ids) // 2]] if step % 3 == 0 else []
            if stop:
                want = plain.generate(doc, stop_ids=stop, **kw)
            got = engine.generate(doc, stop_ids=stop, **kw)
            assert got.token_ids == want.token_ids, f"step {step}"
            assert got.finish_reason == want.finish_reason
            drafted += got.drafted_tokens
            accepted += got.accepted_tokens
            consistent(engine)
            doc = doc + got.token_ids[:rng.randrange(0, len(got.token_ids) + 1)]
        # the same request again: the previous completion is the draft, also when sampling
        # (same seed, same distributions, so the same draws)
        kw = dict(max_new_tokens=16, sampling=SamplingParams(temperature=temperature, seed=99), key="doc")
        once, twice = engine.generate(doc, **kw), engine.generate(doc, **kw)
        assert once.token_ids == twice.token_ids == plain.generate(doc, **kw).token_ids
        assert twice.accepted_tokens >= 8, (twice.drafted_tokens, twice.accepted_tokens)
        drafted += once.drafted_tokens
    assert drafted > 0


def test_cancel_during_speculation_leaves_the_cache_consistent(loaded):
    ids = random_ids(random.Random(9), 40, loaded.config.vocab_size)
    ids = ids + ids + ids       # repetitive: drafts are found at once
    with Engine(loaded, prefill_chunk=CHUNK) as engine, \
            Engine(loaded, prefill_chunk=CHUNK, draft_tokens=0) as plain:
        cancel = threading.Event()
        seen = []

        def on_token(token: int):
            seen.append(token)
            if len(seen) == 5:
                cancel.set()

        r = engine.generate(ids, max_new_tokens=30, on_token=on_token, cancel=cancel, key="d")
        assert r.finish_reason == "cancelled" and len(r.token_ids) == 5
        consistent(engine)
        again = engine.generate(ids, max_new_tokens=16, key="d")
        assert again.token_ids == plain.generate(ids, max_new_tokens=16).token_ids
        consistent(engine)


def test_negative_draft_tokens_is_an_error(loaded):
    with pytest.raises(InvalidParameter, match="draft_tokens"):
        Engine(loaded, draft_tokens=-1)
