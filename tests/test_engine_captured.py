"""The captured decode step: Decoder.decode_static is the ordinary step with position-free
shapes; compiled or captured (CUDA graphs) it gives the same tokens."""
from __future__ import annotations

import random

import pytest
import torch

from stablelm_lsp.inference.captured import MODES, DecodeStep, decode_step_problems
from stablelm_lsp.inference.engine import Engine
from stablelm_lsp.inference.errors import InvalidParameter
from stablelm_lsp.models import load_model

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def random_ids(rng: random.Random, n: int, vocab: int) -> list[int]:
    return [rng.randrange(7, vocab) for _ in range(n)]


@pytest.mark.parametrize("variant", ["stablelm-3b", "stablelm-2-12b", "persimmon", "starcoder2"])
def test_static_step_matches_the_ordinary_step(checkpoint_factory, variant):
    """Token by token past a ring's wrap (StarCoder2: window 16), after a cut-back, both steps
    on twin caches: same logits, same cache contents."""
    model = load_model(checkpoint_factory(variant), device="cpu", dtype="float32").model
    ids = random_ids(random.Random(0), 50, model.cfg.vocab_size)
    a, b = model.new_cache(64), model.new_cache(64)
    model(torch.tensor([ids[:20]]), a)
    model(torch.tensor([ids[:20]]), b)
    for step, t in enumerate(ids[20:]):
        if step == 12:              # a refused draft: both cut back by two positions
            a.truncate(a.length - 2)
            b.truncate(b.length - 2)
        want = model(torch.tensor([[t]]), a)[0, -1]
        got = model.decode_static(torch.tensor([[t]]), torch.tensor([b.length]), b)[0, -1]
        b.advance_static()
        assert torch.allclose(got, want, atol=1e-5, rtol=1e-4), (variant, step)
        assert a.length == b.length and a.oldest_position == b.oldest_position
        assert torch.equal(a.positions, b.positions)


def test_unknown_or_impossible_modes_are_clear_errors():
    assert set(MODES) == {"off", "static", "compile", "cuda-graph"}
    assert decode_step_problems("cuda-graph", torch.device("cpu")) == [
        "CUDA graphs need a CUDA device (this is cpu)"]
    assert "unknown decode step" in decode_step_problems("fast", torch.device("cpu"))[0]
    assert decode_step_problems("static", torch.device("cpu")) == []
    with pytest.raises(InvalidParameter, match="CUDA graphs need a CUDA device"):
        DecodeStep(None, "cuda-graph", torch.device("cpu"))


def engine_tokens(loaded, prompts, **options) -> list[list[int]]:
    with Engine(loaded, prefill_chunk=24, **options) as engine:
        return [engine.generate(p, max_new_tokens=20, key="d").token_ids for p in prompts]


def edit_session(vocab: int) -> list[list[int]]:
    rng = random.Random(3)
    doc = random_ids(rng, 40, vocab)
    prompts = []
    for _ in range(6):
        doc = doc + random_ids(rng, rng.randrange(1, 4), vocab) if rng.random() < 0.7 else doc[:-3]
        prompts.append(list(doc))
    return prompts


@pytest.mark.parametrize("variant", ["stablelm-3b", "starcoder2"])
def test_engine_with_the_static_step_gives_the_same_tokens(checkpoint_factory, variant):
    loaded = load_model(checkpoint_factory(variant), device="cpu", dtype="float32")
    prompts = edit_session(loaded.config.vocab_size)
    want = engine_tokens(loaded, prompts, draft_tokens=0, linear="torch")
    assert engine_tokens(loaded, prompts, draft_tokens=0, decode_step="static", linear="torch") == want
    assert engine_tokens(loaded, prompts, decode_step="static") == want   # mixed with drafts
    # a float16 cache: the static step reads it converted over the whole (zeroed) capacity
    half = dict(draft_tokens=0, linear="torch", kv_dtype="float16")
    assert engine_tokens(loaded, prompts, decode_step="static", **half) == engine_tokens(loaded, prompts, **half)


@pytest.mark.skipif(bool(decode_step_problems("compile", torch.device("cpu")))
                    or not torch.backends.mkldnn.is_available(),
                    reason="torch.compile on CPU needs a C++ compiler; the packing check, oneDNN")
def test_compiled_step_on_cpu_gives_the_same_tokens(checkpoint_factory):
    path = checkpoint_factory("starcoder2")
    loaded = load_model(path, device="cpu", dtype="float32")
    prompts = edit_session(loaded.config.vocab_size)[:3]
    got = engine_tokens(loaded, prompts, draft_tokens=0, decode_step="compile")
    assert got == engine_tokens(load_model(path, device="cpu", dtype="float32"), prompts, draft_tokens=0)
    # a model whose layers an earlier engine packed for oneDNN cannot be compiled
    Engine(loaded, linear="onednn").close()
    with pytest.raises(InvalidParameter, match="oneDNN or the own kernels"):
        Engine(loaded, decode_step="compile")


@pytest.mark.cuda
@needs_cuda
@pytest.mark.parametrize("mode", ["cuda-graph", "compile"])
@pytest.mark.parametrize("variant", ["stablelm-3b", "starcoder2"])
def test_captured_step_on_cuda_gives_the_same_tokens(checkpoint_factory, variant, mode):
    loaded = load_model(checkpoint_factory(variant), device="cuda", dtype="float32")
    prompts = edit_session(loaded.config.vocab_size)
    want = engine_tokens(loaded, prompts, draft_tokens=0)
    assert engine_tokens(loaded, prompts, draft_tokens=0, decode_step=mode) == want
    assert engine_tokens(loaded, prompts, decode_step=mode) == want


class FakeGraph:
    """Stands for a captured graph in the bookkeeping tests (capturing needs CUDA)."""

    def __init__(self, cache):
        self.cache_id = id(cache)

    def matches(self, cache):
        from stablelm_lsp.inference.captured import _Graph

        return _Graph.matches(self, cache)


def test_graphs_are_replayed_only_for_the_cache_and_tensors_they_were_captured_on(stablelm_checkpoint):
    """The bookkeeping of captured graphs, checked without CUDA: one graph per cache, a new one
    when the cache's tensors change (it grew), none left when the cache is dropped (so a new
    cache at the same address, or in the same memory, is captured anew), at most `limit`."""
    import gc

    from stablelm_lsp.inference.captured import GraphCache

    model = load_model(stablelm_checkpoint, device="cpu", dtype="float32").model
    graphs, captured = GraphCache(limit=3), []

    def capture(cache):
        captured.append(id(cache))
        return FakeGraph(cache)

    a = model.new_cache(32)
    first = graphs.get(a, capture)
    assert graphs.get(a, capture) is first and len(captured) == 1
    assert first.tensors[0] is a.k         # held: that memory goes to no other tensor meanwhile
    a.length = 20
    a.ensure_capacity(100)                 # new tensors: the old graph would write freed memory
    grown = graphs.get(a, capture)
    assert grown is not first and len(captured) == 2 and len(graphs) == 1
    del a, first, grown
    gc.collect()
    assert len(graphs) == 0                # dropped with its cache, tensors released
    b = model.new_cache(32)
    graphs.get(b, capture)
    assert len(captured) == 3
    others = [model.new_cache(16) for _ in range(3)]
    for cache in others:
        graphs.get(cache, capture)
    assert len(graphs) == 3                # the oldest (b's) was dropped
    graphs.get(b, capture)
    assert len(captured) == 7


@pytest.mark.skipif(bool(decode_step_problems("compile", torch.device("cpu"))),
                    reason="torch.compile on CPU needs a C++ compiler")
def test_compiled_step_compiles_once_at_load_for_every_capacity(checkpoint_factory):
    """The compiled step is compiled when the engine is made, and caches of other capacities
    (a linear cache grows with the prompt) do not compile it again."""
    from torch._dynamo.utils import counters

    loaded = load_model(checkpoint_factory("stablelm-3b"), device="cpu", dtype="float32")
    torch._dynamo.reset()
    counters.clear()
    with Engine(loaded, decode_step="compile", draft_tokens=0) as engine:
        compiled = counters["stats"]["unique_graphs"]
        assert compiled >= 1                  # at load
        step, model = engine.decode_step, loaded.model
        for capacity in (40, 97, 300):
            cache, plain = model.new_cache(capacity), model.new_cache(capacity)
            ids = random_ids(random.Random(capacity), 24, model.cfg.vocab_size)
            model(torch.tensor([ids[:20]]), cache)
            model(torch.tensor([ids[:20]]), plain)
            for t in ids[20:]:
                got = step(cache, t)
                want = model(torch.tensor([[t]]), plain)[0, -1]
                torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
        assert counters["stats"]["unique_graphs"] == compiled


@pytest.mark.cuda
@needs_cuda
@pytest.mark.parametrize("variant", ["stablelm-2-12b", "starcoder2"])
def test_cuda_graph_in_bfloat16_replays_the_static_step_exactly(checkpoint_factory, variant):
    """bf16 (what GPU users run): the captured graph gives the logits of the same step run
    uncaptured, bit for bit, through a cut-back and (StarCoder2) a ring's wrap."""
    model = load_model(checkpoint_factory(variant), device="cuda", dtype="bfloat16").model
    step = DecodeStep(model, "cuda-graph", torch.device("cuda"))
    ids = random_ids(random.Random(1), 60, model.cfg.vocab_size)
    a, b = model.new_cache(80), model.new_cache(80)
    model(torch.tensor([ids[:20]], device="cuda"), a)
    model(torch.tensor([ids[:20]], device="cuda"), b)
    with torch.inference_mode():
        for i, t in enumerate(ids[20:]):
            if i == 15:
                a.truncate(a.length - 3)
                b.truncate(b.length - 3)
            got = step(a, t)
            want = model.decode_static(torch.tensor([[t]], device="cuda"),
                                       torch.tensor([b.length], device="cuda"), b)[0, -1]
            b.advance_static()
            assert torch.equal(got, want), (variant, i)


def _side_by_side(loaded_a, loaded_b, mode: str):
    """Two engines (a completion and a chat model) generating at the same time from two
    threads, each capturing its own graphs: the tokens of each running alone."""
    import threading

    prompts_a = edit_session(loaded_a.config.vocab_size)
    prompts_b = edit_session(loaded_b.config.vocab_size)[::-1]
    alone = (engine_tokens(loaded_a, prompts_a, decode_step=mode),
             engine_tokens(loaded_b, prompts_b, decode_step=mode))
    results, errors = {}, []

    def run(name, loaded, prompts):
        try:
            results[name] = engine_tokens(loaded, prompts, decode_step=mode)
        except Exception as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=run, args=("a", loaded_a, prompts_a)),
               threading.Thread(target=run, args=("b", loaded_b, prompts_b))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    assert (results["a"], results["b"]) == alone


@pytest.mark.cuda
@needs_cuda
def test_two_engines_capture_and_replay_side_by_side(checkpoint_factory):
    _side_by_side(load_model(checkpoint_factory("stablelm-3b"), device="cuda", dtype="bfloat16"),
                  load_model(checkpoint_factory("starcoder2"), device="cuda", dtype="bfloat16"),
                  "cuda-graph")


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.device_count() < 2,
                    reason="needs two CUDA devices")
@pytest.mark.parametrize("mode", ["cuda-graph", "compile"])
def test_captured_step_on_a_second_device(checkpoint_factory, mode):
    """cuda:1: captured and replayed on that device (not on cuda:0, the current one)."""
    path = checkpoint_factory("starcoder2")
    loaded = load_model(path, device="cuda:1", dtype="float32")
    prompts = edit_session(loaded.config.vocab_size)
    want = engine_tokens(load_model(path, device="cuda:1", dtype="float32"), prompts, draft_tokens=0)
    assert engine_tokens(loaded, prompts, draft_tokens=0, decode_step=mode) == want
    _side_by_side(loaded, load_model(checkpoint_factory("stablelm-3b"), device="cuda:0",
                                     dtype="float32"), mode)
