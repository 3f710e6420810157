"""Faults a GPU meets, checked on the CPU: running out of memory (simulated), NaN logits under
sampling, and the KV budget shared by the engines of a process."""
from __future__ import annotations

import gc
import random

import pytest
import torch

from stablelm_lsp.inference.api import GenerationError
from stablelm_lsp.inference.engine import Engine
from stablelm_lsp.inference.errors import NonFiniteLogits, OutOfMemory
from stablelm_lsp.inference.kv_budget import CUDA_SHARE, DeviceBudget
from stablelm_lsp.inference.sampling import Sampler, SamplingParams
from stablelm_lsp.models import load_model

OOM_TEXT = "CUDA out of memory. Tried to allocate 2.00 GiB (GPU 0; 79.11 GiB total capacity)"


@pytest.fixture()
def stablelm(stablelm_checkpoint):
    return load_model(stablelm_checkpoint, device="cpu", dtype="float32")


def prompt(seed: int, vocab: int, n: int = 60) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(7, vocab) for _ in range(n)]


class FailingForward:
    """The model's forward, raising `error()` on the calls numbered in `fail` (1-based), or on
    every call from `fail_from` on."""

    def __init__(self, model, fail=(), fail_from=None, error=lambda: torch.OutOfMemoryError(OOM_TEXT)):
        self.forward, self.calls = model.forward, 0
        self.fail, self.fail_from, self.error = set(fail), fail_from, error

    def __call__(self, *args, **kwargs):
        self.calls += 1
        if self.calls in self.fail or (self.fail_from is not None and self.calls >= self.fail_from):
            raise self.error()
        return self.forward(*args, **kwargs)


def consistent(engine: Engine) -> None:
    for slot in engine.prefix_cache.slots:
        assert len(slot.tokens) == slot.cache.length and not slot.in_use


def test_out_of_memory_drops_idle_caches_and_runs_the_request_again(stablelm, monkeypatch):
    vocab = stablelm.config.vocab_size
    a, b = prompt(1, vocab), prompt(2, vocab)
    with Engine(stablelm, draft_tokens=0) as reference:
        want = reference.generate(b, max_new_tokens=8).token_ids
    with Engine(stablelm, draft_tokens=0) as engine:
        engine.generate(a, max_new_tokens=4, key="a")         # an idle cached prompt
        failing = FailingForward(stablelm.model, fail={1})
        monkeypatch.setattr(stablelm.model, "forward", failing)
        result = engine.generate(b, max_new_tokens=8, key="b")
        assert result.token_ids == want and failing.calls > 1
        assert [s.key for s in engine.prefix_cache.slots] == ["b"]     # a's cache was given back
        consistent(engine)


def test_out_of_memory_that_persists_is_a_clear_error_and_the_engine_stays_usable(stablelm, monkeypatch):
    vocab = stablelm.config.vocab_size
    a, b = prompt(1, vocab), prompt(2, vocab)
    with Engine(stablelm, draft_tokens=0) as reference:
        want = reference.generate(b, max_new_tokens=8).token_ids
    with Engine(stablelm, draft_tokens=0, prefill_chunk=16) as engine:
        engine.generate(a, max_new_tokens=4, key="a")
        monkeypatch.setattr(stablelm.model, "forward", FailingForward(stablelm.model, fail_from=2))
        with pytest.raises(OutOfMemory) as info:
            engine.generate(b, max_new_tokens=8, key="b")
        message = str(info.value)
        assert isinstance(info.value, GenerationError) and "\n" not in message
        assert "ran out of memory" in message and "maxNewTokens" in message and OOM_TEXT in message
        consistent(engine)                   # what b held was dropped with the failure
        monkeypatch.undo()
        assert engine.generate(b, max_new_tokens=8, key="b").token_ids == want
        consistent(engine)


def test_out_of_memory_after_tokens_were_passed_on_is_not_run_again(stablelm, monkeypatch):
    """A retry would send the first tokens (chat deltas) twice: the request fails instead."""
    vocab = stablelm.config.vocab_size
    with Engine(stablelm, draft_tokens=0) as engine:
        engine.generate(prompt(1, vocab), max_new_tokens=4, key="a")
        seen = []
        monkeypatch.setattr(stablelm.model, "forward", FailingForward(stablelm.model, fail={4}))
        with pytest.raises(OutOfMemory):
            engine.generate(prompt(2, vocab), max_new_tokens=8, key="b",
                            on_token=lambda t: seen.append(t))
        assert len(seen) == 3
        consistent(engine)


def test_nan_logits_under_sampling_are_an_error_not_a_crash(stablelm, monkeypatch):
    sampler = Sampler(SamplingParams(temperature=0.8, seed=0))
    for bad in ([float("nan"), 1.0, 2.0], [float("inf"), 1.0, 2.0], [float("-inf")] * 3):
        with pytest.raises(NonFiniteLogits, match="NaN or infinite"):
            sampler(torch.tensor(bad))
    assert Sampler(SamplingParams())(torch.tensor([float("nan"), 1.0])) in (0, 1)  # greedy: no crash

    vocab = stablelm.config.vocab_size
    with Engine(stablelm, draft_tokens=0) as engine:
        want = engine.generate(prompt(3, vocab), max_new_tokens=6).token_ids
        forward = stablelm.model.forward
        monkeypatch.setattr(stablelm.model, "forward",
                            lambda *a, **k: forward(*a, **k) * float("nan"))
        with pytest.raises(NonFiniteLogits):
            engine.generate(prompt(4, vocab), max_new_tokens=6,
                            sampling=SamplingParams(temperature=1.0, seed=1))
        monkeypatch.undo()
        consistent(engine)
        assert engine.generate(prompt(3, vocab), max_new_tokens=6).token_ids == want


def test_the_engines_of_a_process_share_one_kv_budget(stablelm, stablelm_checkpoint):
    """A chat engine beside the completion engine, or a reload, halves the part of each instead
    of taking half of what the other left; one leaving gives its part back."""
    gc.collect()
    first = Engine(stablelm)
    alone = first.prefix_cache.budget_tokens
    second = Engine(load_model(stablelm_checkpoint, device="cpu", dtype="float32"))
    both = first.prefix_cache.budget_tokens
    assert both == second.prefix_cache.budget_tokens
    assert both < alone and abs(both * (DeviceBudget.for_device("cpu").engines)
                                - alone * (DeviceBudget.for_device("cpu").engines - 1)) <= 2
    second.close()
    assert first.prefix_cache.budget_tokens == alone
    first.close()
    with Engine(stablelm, budget_tokens=500) as fixed:   # an explicit budget is its own
        assert fixed.prefix_cache.budget_tokens == 500


def test_the_cuda_budget_counts_memory_weights_do_not_hold(monkeypatch):
    """Free memory, plus what torch's allocator keeps cached, plus what the process's KV caches
    hold: the same budget before and after a reload, whatever the caches held."""
    gib = 1 << 30
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device: (10 * gib, 80 * gib))
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device: 3 * gib)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device: 2 * gib)
    budget = DeviceBudget(torch.device("cuda:3"))
    completion = budget.join(1000, 16, lambda: 1 * gib)
    assert budget.limit_bytes == int(11 * gib * CUDA_SHARE)
    chat = budget.join(2000, 16, lambda: 0)     # counts the completion engine's 1 GiB too
    assert budget.limit_bytes == int(12 * gib * CUDA_SHARE)
    assert completion.tokens == budget.limit_bytes // 2 // 1000
    assert chat.tokens == budget.limit_bytes // 2 // 2000
    chat.close()
    assert completion.tokens == budget.limit_bytes // 1000
    assert DeviceBudget(torch.device("cuda:3")).join(10 ** 15, 300, lambda: 0).tokens == 300
