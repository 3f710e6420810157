"""The engine on real tiny checkpoints: prefix reuse never changes results, bounded sliding-window
caches, cancellation leaves reusable state, supersede, bad input."""
from __future__ import annotations

import random
import threading
import time

import pytest
import torch

from stablelm_lsp.inference.api import PRIORITY_BACKGROUND, GenerationError
from stablelm_lsp.inference.engine import Engine
from stablelm_lsp.inference.errors import (BudgetTooSmall, EmptyPrompt, InvalidParameter,
                                           PromptTooLong, TokenOutOfRange)
from stablelm_lsp.inference.sampling import SamplingParams
from stablelm_lsp.models import load_model

CHUNK = 24  # small prefill chunks, so that prompts take several steps and rings wrap


@pytest.fixture(scope="module")
def stablelm(stablelm_checkpoint):
    return load_model(stablelm_checkpoint, device="cpu", dtype="float32")


@pytest.fixture(scope="module")
def starcoder2(starcoder2_checkpoint):  # sliding window 16
    return load_model(starcoder2_checkpoint, device="cpu", dtype="float32")


@pytest.fixture(scope="module")
def reference_engine(stablelm):
    """Recomputes everything: its cache is cleared before each request."""
    with Engine(stablelm, prefill_chunk=CHUNK) as engine:
        yield engine


def fresh(engine: Engine, ids, **kw):
    engine.clear_cache()
    return engine.generate(ids, **kw)


def random_ids(rng: random.Random, n: int, vocab: int) -> list[int]:
    return [rng.randrange(7, vocab) for _ in range(n)]  # 0..6 are the special tokens


def slots_consistent(engine: Engine) -> None:
    for slot in engine.prefix_cache.slots:
        assert len(slot.tokens) == slot.cache.length


@pytest.mark.parametrize("budget", [None, 450], ids=["roomy", "tiny-budget"])
def test_reuse_gives_the_same_tokens_as_recomputing(stablelm, reference_engine, budget):
    """Random edits over three documents: appends, deletions at the end and in the middle,
    document switches; with a tiny budget also evictions."""
    rng = random.Random(budget or 1)
    vocab = stablelm.config.vocab_size
    docs = {f"doc{i}": random_ids(rng, rng.randrange(40, 160), vocab) for i in range(3)}
    docs["doc1"][:30] = docs["doc0"][:30]  # documents sharing a header
    reused = 0
    with Engine(stablelm, prefill_chunk=CHUNK, budget_tokens=budget) as engine:
        key = "doc0"
        for step in range(24):
            op = rng.choice(["append", "append", "trim", "middle", "switch", "switch"])
            doc = docs[key]
            if op == "append":
                doc += random_ids(rng, rng.randrange(1, 6), vocab)
            elif op == "trim":
                del doc[-rng.randrange(1, 10):]
            elif op == "middle":
                at = rng.randrange(5, len(doc) - 5)
                doc[at:at + rng.randrange(1, 5)] = random_ids(rng, rng.randrange(0, 3), vocab)
            else:
                key = rng.choice(sorted(docs))
            ids = docs[key]
            got = engine.generate(ids, max_new_tokens=6, key=key)
            want = fresh(reference_engine, ids, max_new_tokens=6)
            assert got.token_ids == want.token_ids, f"step {step} ({op})"
            assert want.reused_tokens == 0 and got.prompt_tokens == len(ids)
            reused += got.reused_tokens
            slots_consistent(engine)
            assert engine.prefix_cache.used_tokens <= engine.prefix_cache.budget_tokens
        assert reused > 500  # reuse really happened
        if budget:
            assert engine.prefix_cache.evictions > 0


def test_sampled_output_with_reuse_matches_recomputing(stablelm, reference_engine):
    ids = random_ids(random.Random(3), 90, stablelm.config.vocab_size)
    params = SamplingParams(temperature=0.9, top_k=40, top_p=0.95, seed=11)
    with Engine(stablelm, prefill_chunk=CHUNK) as engine:
        engine.generate(ids[:60], max_new_tokens=4)
        got = engine.generate(ids, max_new_tokens=12, sampling=params)
    assert got.reused_tokens == 60
    assert got.token_ids == fresh(reference_engine, ids, max_new_tokens=12, sampling=params).token_ids


def test_another_documents_prompt_is_copied_not_destroyed(stablelm):
    rng = random.Random(4)
    vocab = stablelm.config.vocab_size
    a = random_ids(rng, 120, vocab)
    b = a[:80] + random_ids(rng, 40, vocab)
    with Engine(stablelm, prefill_chunk=CHUNK) as engine:
        engine.generate(a, max_new_tokens=2, key="a")
        assert engine.generate(b, max_new_tokens=2, key="b").reused_tokens == 80
        assert len(engine.prefix_cache.slots) == 2
        # both documents are still cached in full
        assert engine.generate(a + [9], max_new_tokens=2, key="a").reused_tokens == 120
        assert engine.generate(b + [9], max_new_tokens=2, key="b").reused_tokens == 120
        # the same document edited in the middle continues its own slot in place
        edited = a[:50] + [11, 12] + a[50:]
        assert engine.generate(edited, max_new_tokens=2, key="a").reused_tokens == 50
        assert len(engine.prefix_cache.slots) == 2


def test_typing_through_the_suggestion_reuses_the_generated_tokens(stablelm):
    ids = random_ids(random.Random(5), 70, stablelm.config.vocab_size)
    with Engine(stablelm, prefill_chunk=CHUNK) as engine:
        first = engine.generate(ids, max_new_tokens=8, key="d")
        # the user accepts three suggested tokens: their keys and values are already cached
        assert engine.generate(ids + first.token_ids[:3], max_new_tokens=4, key="d").reused_tokens == 72


def hf_greedy(path, ids: list[int], steps: int) -> list[int]:
    transformers = pytest.importorskip("transformers")
    model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    seq = torch.tensor([ids])
    with torch.no_grad():
        for _ in range(steps):
            nxt = model(seq).logits[0, -1].argmax()
            seq = torch.cat([seq, nxt.view(1, 1)], dim=1)
    return seq[0, len(ids):].tolist()


def test_chunked_prefill_reuse_and_decode_match_transformers(stablelm, stablelm_checkpoint):
    ids = random_ids(random.Random(13), 3 * CHUNK + 5, stablelm.config.vocab_size)
    with Engine(stablelm, prefill_chunk=CHUNK) as engine:
        engine.generate(ids[:50], max_new_tokens=3)
        got = engine.generate(ids, max_new_tokens=12)
    assert got.reused_tokens == 50
    assert got.token_ids == hf_greedy(stablelm_checkpoint, ids, 12)


def test_sliding_window_beyond_the_window_matches_transformers(starcoder2, starcoder2_checkpoint):
    window = starcoder2.config.sliding_window
    rng = random.Random(6)
    ids = random_ids(rng, 6 * window, starcoder2.config.vocab_size)
    with Engine(starcoder2, prefill_chunk=8) as engine:
        first = engine.generate(ids, max_new_tokens=12)
        assert first.token_ids == hf_greedy(starcoder2_checkpoint, ids, 12)
        (slot,) = engine.prefix_cache.slots
        assert slot.cache.capacity == window + window // 4 - 1  # bounded, 107 positions went by
        # the ring holds positions 88..106; continuing at 104 needs keys from 89 on: an edit
        # there (after accepting 8 suggested tokens) reuses the ring, exactly
        edited = ids + first.token_ids[:8] + [42]
        second = engine.generate(edited, max_new_tokens=12)
        assert second.reused_tokens == len(ids) + 8
        assert second.token_ids == hf_greedy(starcoder2_checkpoint, edited, 12)
        # an edit further back than the ring holds is recomputed from scratch, exactly
        early = ids[:2 * window] + [42]
        third = engine.generate(early, max_new_tokens=12)
        assert third.reused_tokens == 0
        assert third.token_ids == hf_greedy(starcoder2_checkpoint, early, 12)


def test_sliding_window_kv_memory_does_not_grow_with_the_prompt(starcoder2):
    with Engine(starcoder2, prefill_chunk=CHUNK) as engine:
        sizes = []
        for n in (40, 400):
            engine.clear_cache()
            engine.generate(random_ids(random.Random(n), n, starcoder2.config.vocab_size), max_new_tokens=2)
            sizes.append(engine.prefix_cache.nbytes)
    assert sizes[0] == sizes[1]


def test_a_ring_cut_back_and_not_refilled_is_not_reused_past_what_it_holds(starcoder2, starcoder2_checkpoint):
    """Cutting a ring back frees slots without bringing back the positions they overwrote."""
    ids = random_ids(random.Random(7), 100, starcoder2.config.vocab_size)
    with Engine(starcoder2, prefill_chunk=8) as engine:
        engine.generate(ids, max_new_tokens=5)           # the ring holds positions 85..103
        # out of time before its first step: the ring is cut back to 100 positions, nothing run
        assert engine.generate(ids + [9], max_new_tokens=5, time_budget_s=1e-9).finish_reason == "time"
        probe = ids[:97] + [9]  # position 97 needs keys from 82 on, which the ring lost
        got = engine.generate(probe, max_new_tokens=6)
        assert got.reused_tokens == 0
        assert got.token_ids == hf_greedy(starcoder2_checkpoint, probe, 6)


def test_cancel_mid_generation_then_a_new_request_is_like_a_fresh_engine(stablelm, reference_engine):
    ids = random_ids(random.Random(8), 100, stablelm.config.vocab_size)
    cancel = threading.Event()
    seen = []

    def on_token(token):
        seen.append(token)
        if len(seen) == 5:
            cancel.set()

    with Engine(stablelm, prefill_chunk=CHUNK) as engine:
        stopped = engine.generate(ids, max_new_tokens=50, on_token=on_token, cancel=cancel)
        assert stopped.finish_reason == "cancelled" and len(stopped.token_ids) == 5
        slots_consistent(engine)
        follow = ids + [17, 18]
        got = engine.generate(follow, max_new_tokens=10)
        assert got.reused_tokens == 100
        assert got.token_ids == fresh(reference_engine, follow, max_new_tokens=10).token_ids


def test_cancel_mid_prefill_keeps_the_chunks_already_computed(stablelm, reference_engine):
    ids = random_ids(random.Random(9), 5 * CHUNK + 3, stablelm.config.vocab_size)
    cancel, calls = threading.Event(), []

    def after_forward(module, args, output):
        calls.append(args[0].shape[1])
        if len(calls) == 3:
            cancel.set()

    with Engine(stablelm, prefill_chunk=CHUNK) as engine:
        hook = stablelm.model.register_forward_hook(after_forward)
        try:
            stopped = engine.generate(ids, max_new_tokens=5, cancel=cancel)
        finally:
            hook.remove()
        assert stopped.finish_reason == "cancelled" and stopped.token_ids == []
        assert calls == [CHUNK] * 3
        (slot,) = engine.prefix_cache.slots
        assert slot.tokens == ids[:3 * CHUNK] and slot.cache.length == 3 * CHUNK
        got = engine.generate(ids, max_new_tokens=8)
        assert got.reused_tokens == 3 * CHUNK
        assert got.token_ids == fresh(reference_engine, ids, max_new_tokens=8).token_ids


def test_newer_request_for_the_same_key_supersedes_the_running_one(stablelm):
    ids = random_ids(random.Random(10), 60, stablelm.config.vocab_size)
    with Engine(stablelm, prefill_chunk=CHUNK) as engine:
        newer: list = []
        started = []

        def on_token(token):
            if not started:
                started.append(threading.Thread(target=lambda: newer.append(
                    engine.generate(ids + [20], max_new_tokens=3, key="doc"))))
                started[0].start()
                while engine.scheduler.pending < 2:
                    threading.Event().wait(0.002)
            return None

        old = engine.generate(ids, max_new_tokens=40, key="doc", on_token=on_token)
        started[0].join(10)
        assert old.finish_reason == "superseded" and len(old.token_ids) == 1
        assert newer[0].finish_reason == "length" and newer[0].reused_tokens == 60


def test_stop_ids_time_budget_and_position_limit(stablelm):
    ids = random_ids(random.Random(11), 30, stablelm.config.vocab_size)
    with Engine(stablelm, prefill_chunk=CHUNK) as engine:
        free = engine.generate(ids, max_new_tokens=10)
        stop_at = free.token_ids[3]
        first = free.token_ids.index(stop_at)
        stopped = engine.generate(ids, max_new_tokens=10, stop_ids=[stop_at])
        assert stopped.finish_reason == "eos" and stopped.token_ids == free.token_ids[:first + 1]
        timed = engine.generate(ids, max_new_tokens=500, time_budget_s=1e-9)
        assert timed.finish_reason == "time" and len(timed.token_ids) <= 1
        # a prompt that fills all positions but one may still generate exactly two tokens
        max_pos = stablelm.config.max_positions
        long = engine.generate(random_ids(random.Random(12), max_pos - 1, stablelm.config.vocab_size),
                               max_new_tokens=50)
        assert long.finish_reason == "length" and len(long.token_ids) == 2


@pytest.mark.parametrize("temperature", [0.0, 1.0], ids=["greedy", "sampled"])
def test_first_token_constraint_limits_only_the_first_token(stablelm, temperature):
    ids = random_ids(random.Random(13), 20, stablelm.config.vocab_size)
    sampling = SamplingParams(temperature=temperature, seed=3)
    with Engine(stablelm, prefill_chunk=CHUNK) as engine:
        free = engine.generate(ids, max_new_tokens=6, sampling=sampling)
        allowed = [t for t in range(7, 60) if t != free.token_ids[0]]
        constrained = engine.generate(ids, max_new_tokens=6, sampling=sampling, first_token_ids=allowed)
        assert constrained.token_ids[0] in allowed and len(constrained.token_ids) == 6
        # the same ids as a tensor (what a backend keeps for every request) choose the same
        as_tensor = engine.generate(ids, max_new_tokens=6, sampling=sampling,
                                    first_token_ids=torch.tensor(allowed))
        assert as_tensor.token_ids == constrained.token_ids
        if temperature == 0.0:
            # the best of the allowed ids, then the model's own continuation
            logits = stablelm.model(torch.tensor([ids]))[0, -1]
            assert constrained.token_ids[0] == allowed[int(torch.argmax(logits[allowed]))]
            rest = engine.generate(ids + constrained.token_ids[:1], max_new_tokens=5)
            assert constrained.token_ids[1:] == rest.token_ids


def test_bad_input_gives_specific_errors_and_the_engine_stays_usable(stablelm):
    vocab, max_pos = stablelm.config.vocab_size, stablelm.config.max_positions
    with Engine(stablelm, prefill_chunk=CHUNK, budget_tokens=max_pos) as engine:
        cases = [
            (EmptyPrompt, dict(prompt_ids=[], max_new_tokens=4)),
            (TokenOutOfRange, dict(prompt_ids=[5, vocab], max_new_tokens=4)),
            (TokenOutOfRange, dict(prompt_ids=[-1, 5], max_new_tokens=4)),
            (TokenOutOfRange, dict(prompt_ids=[5, 6.5], max_new_tokens=4)),
            (InvalidParameter, dict(prompt_ids=[5, 6], max_new_tokens=0)),
            (InvalidParameter, dict(prompt_ids=[5, 6], max_new_tokens=-2)),
            (PromptTooLong, dict(prompt_ids=[5] * (max_pos + 1), max_new_tokens=4)),
            (InvalidParameter, dict(prompt_ids=[5, 6], max_new_tokens=4, first_token_ids=[])),
            (TokenOutOfRange, dict(prompt_ids=[5, 6], max_new_tokens=4, first_token_ids=[vocab])),
            (TokenOutOfRange, dict(prompt_ids=[5, 6], max_new_tokens=4,
                                   first_token_ids=torch.tensor([3, vocab]))),
            (InvalidParameter, dict(prompt_ids=[5, 6], max_new_tokens=4,
                                    first_token_ids=torch.tensor([], dtype=torch.long))),
            (InvalidParameter, dict(prompt_ids=[5, 6], max_new_tokens=4,
                                    first_token_ids=torch.tensor([[3, 4]]))),
        ]
        for error, kwargs in cases:
            with pytest.raises(error) as info:
                engine.generate(kwargs.pop("prompt_ids"), **kwargs)
            assert isinstance(info.value, GenerationError) and str(info.value)
        assert engine.generate([5, 6, 7], max_new_tokens=3).finish_reason == "length"
    with Engine(stablelm, prefill_chunk=CHUNK, budget_tokens=16) as small:
        with pytest.raises(BudgetTooSmall, match="budget of 16"):
            small.generate([5] * 20, max_new_tokens=4)
        assert len(small.generate([5] * 10, max_new_tokens=4).token_ids) == 4


def test_a_completion_runs_between_the_steps_of_a_longer_chat_reply(stablelm, reference_engine):
    rng = random.Random(21)
    vocab = stablelm.config.vocab_size
    chat_ids, doc_ids = random_ids(rng, 50, vocab), random_ids(rng, 60, vocab)
    order: list[str] = []
    with Engine(stablelm, prefill_chunk=CHUNK) as engine:
        results = {}

        def completion():
            results["doc"] = engine.generate(doc_ids, max_new_tokens=5, key="doc",
                                             on_token=lambda t: order.append("doc") and None)

        thread = threading.Thread(target=completion)

        def on_chat_token(token):
            order.append("chat")
            if len(order) == 3:
                thread.start()
                while engine.scheduler.pending < 2:   # until the completion is in the queue
                    time.sleep(0.001)
            return None

        chat = engine.generate(chat_ids, max_new_tokens=12, key="chat:1", priority=1,
                               on_token=on_chat_token)
        thread.join(10)
        # the completion's 5 tokens came right after the chat's 3rd, not after its 12th
        assert order[:3] == ["chat"] * 3 and order[3:8] == ["doc"] * 5 and order.count("chat") == 12
        slots_consistent(engine)
    assert chat.token_ids == fresh(reference_engine, chat_ids, max_new_tokens=12).token_ids
    assert results["doc"].token_ids == fresh(reference_engine, doc_ids, max_new_tokens=5).token_ids


def in_thread(results: dict, name: str, call) -> threading.Thread:
    """Runs `call()` in a new thread, its result going to `results[name]`."""
    thread = threading.Thread(target=lambda: results.__setitem__(name, call()))
    thread.start()
    return thread


class ForwardLog:
    """Records which request (by key) each forward pass of `engine` runs for, and holds the
    `hold_at`-th pass of `held_key` until released: a request can then be queued while that pass
    is in progress."""

    def __init__(self, engine: Engine, held_key: str, hold_at: int):
        self.keys: list[str] = []
        self.in_pass = threading.Event()
        self.release = threading.Event()
        forward = engine._forward

        def logged(slot, ids, all_rows=False):
            self.keys.append(slot.key)
            if slot.key == held_key and self.keys.count(held_key) == hold_at:
                self.in_pass.set()
                assert self.release.wait(10)
            return forward(slot, ids, all_rows)

        engine._forward = logged


@pytest.mark.parametrize("phase", ["prefill", "decode"])
def test_background_work_delays_a_request_by_at_most_the_pass_in_progress(stablelm, reference_engine,
                                                                           phase):
    rng = random.Random(31)
    vocab = stablelm.config.vocab_size
    # prefill: a long background prompt held in its 3rd chunk; decode: held in its 6th token
    bg_ids = random_ids(rng, 8 * CHUNK if phase == "prefill" else 20, vocab)
    fg_ids = random_ids(rng, 50, vocab)
    with Engine(stablelm, prefill_chunk=CHUNK, draft_tokens=0) as engine:
        log = ForwardLog(engine, "bg", 3 if phase == "prefill" else 6)
        results = {}
        background = in_thread(results, "bg", lambda: engine.generate(
            bg_ids, max_new_tokens=12, key="bg", priority=PRIORITY_BACKGROUND))
        assert log.in_pass.wait(10)
        foreground = in_thread(results, "fg", lambda: engine.generate(
            fg_ids, max_new_tokens=5, key="fg"))
        while engine.scheduler.pending < 2:     # the request is queued behind the held pass
            time.sleep(0.001)
        held = len(log.keys) - 1
        log.release.set()
        foreground.join(10)
        background.join(10)
        # right after the pass in progress, every pass of the request, then the background again
        fg_passes = [i for i, key in enumerate(log.keys) if key == "fg"]
        assert fg_passes[0] == held + 1 and fg_passes == list(range(held + 1, fg_passes[-1] + 1))
        assert log.keys[fg_passes[-1] + 1:] and set(log.keys[fg_passes[-1] + 1:]) == {"bg"}
        slots_consistent(engine)
    assert results["fg"].token_ids == fresh(reference_engine, fg_ids, max_new_tokens=5).token_ids
    assert results["bg"].token_ids == fresh(reference_engine, bg_ids, max_new_tokens=12).token_ids


def test_a_request_superseding_background_work_continues_its_prefill(stablelm, reference_engine):
    rng = random.Random(32)
    prompt = random_ids(rng, 8 * CHUNK, stablelm.config.vocab_size)
    with Engine(stablelm, prefill_chunk=CHUNK) as engine:
        log = ForwardLog(engine, "doc", 4)
        results = {}
        background = in_thread(results, "bg", lambda: engine.generate(
            prompt, max_new_tokens=8, key="doc", priority=PRIORITY_BACKGROUND))
        assert log.in_pass.wait(10)
        foreground = in_thread(results, "fg", lambda: engine.generate(
            prompt + [9], max_new_tokens=5, key="doc"))
        while not results.get("bg") and engine.scheduler.pending < 2:
            time.sleep(0.001)
        log.release.set()
        foreground.join(10)
        background.join(10)
        slots_consistent(engine)
    assert results["bg"].finish_reason == "superseded"
    # the four chunks the background request ran (the held one finished) are not run again
    assert results["fg"].reused_tokens == 4 * CHUNK
    assert results["fg"].token_ids == fresh(reference_engine, prompt + [9], max_new_tokens=5).token_ids
