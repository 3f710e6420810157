"""Every layer of a short pass in one C call (inference/native_layers.py, csrc/decode_layers.c):
the blocks' logits and KV cache on every variant (float32 and int8 weights, float32 and float16
caches, a ring that wraps), the same engine tokens with and without it, the tuner weighing it by
what each way costs besides its kernels, and a self-check that catches a wrong kernel. Built
here with the machine's C compiler."""
from __future__ import annotations

import json
import random

import pytest
import torch

from stablelm_lsp.inference import cpu_kernels, native_layers, tuning
from stablelm_lsp.inference.engine import Engine
from stablelm_lsp.inference.linear import TORCH, Impl, KernelLinear
from stablelm_lsp.models import load_model

KERNEL = cpu_kernels.load_decode_layers()


def test_the_kernel_builds_and_passes_its_self_check_here():
    # CI and the README's set-up run where a C compiler is
    assert not isinstance(KERNEL, str), KERNEL


def _ids(n: int, vocab: int, seed: int = 0) -> torch.Tensor:
    return torch.tensor([random.Random(seed).sample(range(7, vocab), n)])


@pytest.mark.parametrize("kv_dtype", ["float32", "float16"])
@pytest.mark.parametrize("dtype", ["float32", "int8"])
def test_the_blocks_logits_and_cache_on_every_variant(any_checkpoint, dtype, kv_dtype):
    variant, path = any_checkpoint
    loaded = load_model(path, device="cpu", dtype=dtype)
    # the own kernels for every short pass, and the blocks (native_layers=False) to compare with
    with Engine(loaded, linear="rows", attention="cpu", native_layers=False) as engine:
        model = engine.model
        assert model.run_layers is None and engine.native_layers is None
        native = native_layers.NativeLayers(KERNEL, model, model.attention)
        assert native.lengths == list(range(1, 17))
        ids = _ids(50, model.cfg.vocab_size)
        kv = getattr(torch, kv_dtype)
        for t in (1, 2, 5, 16):
            got = {}
            for name, hook in (("blocks", None), ("native", native)):
                # 40 positions: StarCoder2's window is 16, so its ring (40 slots) wraps
                cache = model.new_cache(40, dtype=kv)
                cache.ensure_capacity(30 + t)       # linear caches (rings never grow)
                model.run_layers = None
                model(ids[:, :30], cache)
                model.run_layers = hook
                calls = []
                if hook is not None:    # it really ran (and the blocks did not)
                    hook_call = hook.__call__
                    model.run_layers = lambda *a: calls.append(1) or hook_call(*a)
                logits = model(ids[:, 30:30 + t], cache)
                model.run_layers = None
                assert calls == ([1] if hook is not None else [])
                got[name] = (logits, cache.k.float(), cache.v.float(), cache.length, cache.positions.clone())
            want, mine = got["blocks"], got["native"]
            # float rounding; in a float16 cache a half may round the other way (2^-11)
            tol = 1e-5 if kv == torch.float32 else 2e-3
            err = ((mine[0] - want[0]).abs().max() / want[0].abs().max()).item()
            assert err < (1e-5 if kv == torch.float32 else 1e-3), (variant, t, err)
            assert torch.allclose(mine[1], want[1], atol=tol, rtol=tol), (variant, t)
            assert torch.allclose(mine[2], want[2], atol=tol, rtol=tol), (variant, t)
            assert mine[3] == want[3] and torch.equal(mine[4], want[4])


def test_passes_it_does_not_take_run_the_blocks(stablelm_checkpoint):
    """Longer than 16, a fresh cache (plain causal attention), no cache, a bfloat16 cache, a
    batch of two: the hook says None and the blocks run."""
    with Engine(load_model(stablelm_checkpoint, device="cpu"), linear="rows", attention="cpu") as engine:
        model = engine.model
        native = model.run_layers
        assert isinstance(native, native_layers.NativeLayers)
        ids = _ids(40, model.cfg.vocab_size)
        taken = []
        model.run_layers = lambda *a: taken.append(native(*a) is not None) or None
        model(ids[:, :20], model.new_cache(64))                 # 20 positions
        model(ids[:, :5], model.new_cache(64))                  # a fresh cache: causal
        model(ids[:, :5])                                       # no cache
        cache = model.new_cache(64, dtype=torch.bfloat16)
        model(ids[:, :8], cache)
        model(ids[:, 8:9], cache)                               # a bfloat16 cache
        cache = model.new_cache(64, batch=2)
        model(ids[:, :16].view(2, 8), cache)
        model(ids[:, 16:18].view(2, 1), cache)                  # a batch
        assert taken == [False] * 7
        cache = model.new_cache(64)
        model(ids[:, :8], cache)
        model(ids[:, 8:9], cache)
        assert taken[-2:] == [False, True]


@pytest.mark.parametrize("dtype", ["float32", "int8"])
def test_engine_tokens_are_the_same_with_and_without_it(checkpoint_factory, dtype):
    for variant in ("stablelm-2-12b", "starcoder2"):
        path = checkpoint_factory(variant)
        ids = random.Random(2).sample(range(7, 500), 40)
        runs = {}
        for native in (False, True):
            with Engine(load_model(path, device="cpu", dtype=dtype), linear="rows", attention="cpu",
                        native_layers=native, draft_tokens=3) as engine:
                assert (engine.native_layers is not None) == native
                if native:      # it pays here: the blocks' Python dwarfs a tiny model's kernels
                    assert engine.native_layers.lengths, engine.kernels.describe()["layers"]
                    assert engine.kernels.describe()["layers"][0][1] == "native"
                runs[native] = [engine.generate(ids, max_new_tokens=20).token_ids,
                                engine.generate(ids + [9, 10], max_new_tokens=20).token_ids]
        assert runs[True] == runs[False], (variant, runs)


def test_it_calls_the_int8_x_int8_kernel_where_that_is_forced(stablelm_checkpoint):
    with Engine(load_model(stablelm_checkpoint, device="cpu", dtype="int8"), linear="q8",
                attention="cpu") as engine:
        assert engine.native_layers is not None and engine.native_layers.lengths
        ids = random.Random(1).sample(range(7, 500), 30)
        first = engine.generate(ids, max_new_tokens=16).token_ids
        engine.clear_cache()
        assert engine.generate(ids, max_new_tokens=16).token_ids == first


def test_status_and_the_stored_plan_say_which_passes_run_it(stablelm_checkpoint):
    with Engine(load_model(stablelm_checkpoint, device="cpu")) as engine:
        described = engine.kernels.describe()
        json.dumps(described)
        layers = described["layers"]
        assert layers[-1] == [None, "blocks"]           # prefill chunks: the blocks
        lengths = [t for t in range(1, 17)
                   if next(c for b, c in layers if b is None or t <= b) == "native"]
        taken = engine.native_layers.lengths if engine.native_layers else []
        assert taken == lengths
        glue = engine.kernels.timings["glue"]
        assert set(glue) == {"blocks", "native"} and set(glue["blocks"]) == set(tuning.POINTS)
    with Engine(load_model(stablelm_checkpoint, device="cpu"), native_layers=False) as engine:
        assert engine.model.run_layers is None and engine.kernels.layers == ()
        assert "glue" not in engine.kernels.timings


def test_measuring_the_glue_puts_the_kernels_back(stablelm_checkpoint):
    with Engine(load_model(stablelm_checkpoint, device="cpu"), native_layers=False) as engine:
        model = engine.model
        layers = [m for m in model.modules() if isinstance(m, KernelLinear)]
        tables, attention = [layer.table for layer in layers], model.attention
        us = native_layers.measure_glue(model, KERNEL, (1, 4))
        assert set(us) == {"blocks", "native"}
        assert all(us[way][t] > 0 for way in us for t in (1, 4))
        assert [layer.table for layer in layers] == tables and model.attention is attention
        assert model.run_layers is None


def _timings(rows: dict, torch_: dict, glue_blocks: float, glue_native: float) -> dict:
    points = tuning.POINTS
    return {"linear": {"32x16": {"layers": 3, "us": {"rows": rows, "torch": torch_}},
                       "64x16 head": {"layers": 1, "us": {"torch": {m: 10.0 for m in points}}}},
            "attention": {"us": {"cpu": {m: 20.0 for m in points},
                                 "sdpa": {m: 30.0 if m < 8 else 15.0 for m in points}}},
            "glue": {"blocks": {m: glue_blocks for m in points}, "native": {m: glue_native for m in points}}}


def test_the_tuner_weighs_it_by_what_each_way_costs_besides_its_kernels():
    g = torch.Generator().manual_seed(0)
    layers = [KernelLinear(torch.randn(32, 16, generator=g), None) for _ in range(3)]
    head = KernelLinear(torch.randn(64, 16, generator=g), None)
    groups = tuning.groups_of(layers + [head], head)
    rows = Impl("rows", lambda layer, x: x, max_m=16)
    impls = [rows, TORCH]
    # torch is 10 us faster everywhere, rows 200 us slower from 8 positions on; the blocks cost
    # 50 us more than decode_layers besides the kernels
    timings = _timings({1: 100, 2: 110, 4: 120, 8: 400, 16: 500},
                       {1: 90, 2: 100, 4: 110, 8: 200, 16: 300}, 60.0, 10.0)
    us = timings["linear"]["32x16"]["us"]
    tables = {"32x16": tuning.choose_table(us, impls, TORCH),
              "64x16 head": tuning.choose_table(timings["linear"]["64x16 head"]["us"], impls, TORCH)}
    assert [(b, i.name) for b, i in tables["32x16"]] == [(None, "torch")]
    attention = tuning.choose_attention(timings["attention"]["us"])
    assert attention == ((4, "cpu"), (None, "sdpa"))
    native = tuning.choose_layers(timings, groups, tables, attention, linear_auto=True)
    assert native == [1, 2, 4]
    forced = tuning.choose_table(us, impls, TORCH, {m: "rows" for m in native})
    assert [(b, i.name) for b, i in forced] == [(4, "rows"), (None, "torch")]
    assert tuning.choose_attention(timings["attention"]["us"], {1: "sdpa"}) == \
        ((1, "sdpa"), (4, "cpu"), (None, "sdpa"))
    # the cost of a pass counts each way's glue: 1 position natively, 8 through the blocks
    cost = tuning.pass_cost(timings, {"32x16": forced, "64x16 head": tables["64x16 head"]},
                            ((4, "cpu"), (None, "sdpa")), native)
    assert cost[8] == pytest.approx((200 + 10 + 15 + 60) / (100 + 10 + 20 + 10))
    # no gain besides the kernels: the faster kernels win
    same = _timings(timings["linear"]["32x16"]["us"]["rows"], us["torch"], 10.0, 10.0)
    assert tuning.choose_layers(same, groups, tables, attention, linear_auto=True) == []
    # forced kernels stay: torch forced never runs natively; rows forced does where it is faster
    torch_tables = {"32x16": ((None, TORCH),), "64x16 head": ((None, TORCH),)}
    assert tuning.choose_layers(timings, groups, torch_tables, attention, linear_auto=False) == []
    rows_tables = {"32x16": ((16, rows), (None, TORCH)), "64x16 head": ((None, TORCH),)}
    assert tuning.choose_layers(timings, groups, rows_tables, attention, linear_auto=False) == list(tuning.POINTS)
    # not measured (no kernel, or forced off): never
    del timings["glue"]
    assert tuning.choose_layers(timings, groups, tables, attention, linear_auto=True) == []


class _Wrong:
    """A decode_layers that returns without computing anything."""

    def __init__(self, real):
        self.noop_linear, self.noop_attention, self.work = real.noop_linear, real.noop_attention, real.work
        self.fn = lambda *args: 0


def test_the_self_check_catches_a_wrong_kernel():
    assert native_layers.check(KERNEL) is None
    problem = native_layers.check(_Wrong(KERNEL))
    assert problem and "disagrees with the decoder's blocks" in problem
