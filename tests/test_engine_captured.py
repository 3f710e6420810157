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


@needs_cuda
@pytest.mark.parametrize("mode", ["cuda-graph", "compile"])
@pytest.mark.parametrize("variant", ["stablelm-3b", "starcoder2"])
def test_captured_step_on_cuda_gives_the_same_tokens(checkpoint_factory, variant, mode):
    loaded = load_model(checkpoint_factory(variant), device="cuda", dtype="float32")
    prompts = edit_session(loaded.config.vocab_size)
    want = engine_tokens(loaded, prompts, draft_tokens=0)
    assert engine_tokens(loaded, prompts, draft_tokens=0, decode_step=mode) == want
    assert engine_tokens(loaded, prompts, decode_step=mode) == want
