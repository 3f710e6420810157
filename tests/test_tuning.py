"""Kernel choice by measurement (inference/tuning.py): with synthetic candidates of known
relative speed the faster one wins each pass length; results are stored and reused, but not
from another CPU or another build of the kernels; the draft length follows the measured cost of
a pass. No timing is asserted: the synthetic candidates differ by sleeps far longer than their
arithmetic."""
from __future__ import annotations

import time

import pytest
import torch
import torch.nn.functional as F

from stablelm_lsp.inference import cpu_kernels, tuning
from stablelm_lsp.inference.engine import Engine
from stablelm_lsp.inference.linear import TORCH, Impl, KernelLinear
from stablelm_lsp.models import load_model

SLOW = 0.005    # seconds a synthetic candidate sleeps where it is meant to be slow


def sleepy(name: str, slow_from: int, slow_up_to: int, max_m: int | None = None) -> Impl:
    """F.linear that sleeps SLOW per call for pass lengths in [slow_from, slow_up_to]."""
    def run(layer, x):
        if slow_from <= x.shape[0] <= slow_up_to:
            time.sleep(SLOW)
        return F.linear(x, layer.weight, layer.bias)

    return Impl(name, run, max_m=max_m)


def synthetic_layers() -> tuple[list[KernelLinear], object]:
    g = torch.Generator().manual_seed(0)
    layers = [KernelLinear(torch.randn(32, 16, generator=g), None) for _ in range(3)]
    head = KernelLinear(torch.randn(64, 16, generator=g), None)
    return layers + [head], head


def test_the_faster_candidate_wins_each_pass_length():
    layers, head = synthetic_layers()
    groups = tuning.groups_of(layers, head)
    assert [g.name for g in groups] == ["32x16", "64x16 head"]
    short = sleepy("short", 3, 1 << 30)          # fast for 1-2 positions
    long = sleepy("long", 1, 2)                  # fast from 3 on
    capped = sleepy("capped", 1 << 30, 1 << 30, max_m=4)    # always fast, takes up to 4
    timings = tuning.measure_linear(layers, groups, [short, long], chunk=64, dtype=torch.float32,
                                    clock=tuning.Clock(1, None))
    us = timings["32x16"]["us"]
    # "short" is timed where it sleeps (from 4 positions on) until its time at a shorter pass (a
    # pass is never faster for more positions) is far behind "long": not at the prefill chunk
    assert timings["32x16"]["layers"] == 3 and {1, 2, 4} <= set(us["short"])
    assert 64 not in us["short"] and {8, 16, 64} <= set(us["long"])
    assert 64 not in timings["64x16 head"]["us"]["short"]     # the head never runs prefill chunks
    for name in ("32x16", "64x16 head"):
        table = tuning.choose_table(timings[name]["us"], [short, long], TORCH)
        assert [(bound, impl.name) for bound, impl in table] == [(2, "short"), (None, "long")]
    later = sleepy("later", 1, 4)                # fast from 5 on
    timings = tuning.measure_linear(layers, groups, [later, capped], chunk=64, dtype=torch.float32,
                                    clock=tuning.Clock(1, None))
    for name in ("32x16", "64x16 head"):
        table = tuning.choose_table(timings[name]["us"], [later, capped], TORCH)
        # capped wins where it runs; longer passes go to the fastest that takes any length
        assert [(bound, impl.name) for bound, impl in table] == [(4, "capped"), (None, "later")]
    for layer in layers:        # the layers run what the table says
        layer.table = table
        assert layer.impl_for(4).name == "capped" and layer.impl_for(5).name == "later"


def test_a_candidate_far_behind_at_a_shorter_pass_is_not_run_at_longer_ones():
    """torch's int8 kernel takes about a second per layer at a prefill chunk: once a candidate's
    time at a shorter pass is ABORT_FACTOR behind the best at this one, it is not run again."""
    layers, head = synthetic_layers()
    groups = tuning.groups_of(layers, head)
    calls: list[int] = []

    def counted(layer, x):
        calls.append(x.shape[0])
        time.sleep(SLOW)
        return F.linear(x, layer.weight, layer.bias)

    slow = Impl("slow", counted)
    timings = tuning.measure_linear(layers, groups, [slow, TORCH], chunk=64,
                                    dtype=torch.float32, clock=tuning.Clock(1, None))
    # at one position both run (nothing measured before); from then on "slow" runs first only
    # where it has no time yet: at most its first layer of a group, before it falls behind
    assert 1 in calls and 64 not in calls and len(calls) < 12
    assert set(timings["32x16"]["us"]["torch"]) == {1, 2, 4, 8, 16, 64}
    table = tuning.choose_table(timings["32x16"]["us"], [slow, TORCH], TORCH)
    assert [impl.name for _, impl in table] == ["torch"]


def test_a_prefill_chunk_is_timed_on_the_first_rows_and_scaled(monkeypatch):
    """At the chunk one layer per group runs, on its first CHUNK_ROWS output rows (views of its
    weights), and the time is scaled to all rows and layers: a candidate sleeping a fixed time
    per call at the chunk is charged that time x (rows / CHUNK_ROWS) x layers."""
    monkeypatch.setattr(tuning, "CHUNK_ROWS", 8)
    layers, head = synthetic_layers()       # three 32x16 layers
    seen: list[tuple[int, int]] = []

    def run(layer, x):
        if x.shape[0] == 64:
            seen.append((layer.out_features, layer.weight.data_ptr()))
            time.sleep(SLOW)
        return F.linear(x, layer.weight, layer.bias)

    timings = tuning.measure_linear(layers, tuning.groups_of(layers, head), [Impl("sliced", run)],
                                    chunk=64, dtype=torch.float32, clock=tuning.Clock(1, None))
    assert seen == [(8, layers[0].weight.data_ptr())] * tuning.REPEATS    # no copy
    charged = timings["32x16"]["us"]["sliced"][64] / 1e6
    assert 3 * 4 * SLOW <= charged < 3 * 4 * SLOW * 3, charged


def test_stored_results_are_reused_for_the_same_key(monkeypatch, tmp_path):
    monkeypatch.setenv("STABLELM_LSP_CACHE", str(tmp_path))
    monkeypatch.setattr(tuning, "busy", lambda: False)
    key = {**tuning.machine_key(), "model": "synthetic"}
    calls = []

    def measure():
        calls.append(1)
        layers, head = synthetic_layers()
        return {"linear": tuning.measure_linear(layers, tuning.groups_of(layers, head),
                                                [sleepy("a", 2, 1 << 30), sleepy("b", 1, 1)],
                                                chunk=32, dtype=torch.float32,
                                                clock=tuning.Clock(1, None)),
                "attention": {"us": {"sdpa": {1: 1.0}}}}

    first, source = tuning.measured(key, measure)
    assert source.startswith("measured in") and calls == [1]
    again, source = tuning.measured(key, measure)
    assert source == f"measured before ({tuning.cache_file(key).name})" and calls == [1]
    assert again["linear"] == first["linear"]       # pass lengths are ints again
    other, source = tuning.measured({**key, "cpu": "another CPU"}, measure)
    assert source.startswith("measured in") and calls == [1, 1]
    assert len(list((tmp_path / "kernels").glob("tuning-*.json"))) == 2
    # taken on a busy machine: used while it stays busy, measured again once it is quiet
    busy_key = {**key, "model": "measured while busy"}
    monkeypatch.setattr(tuning, "busy", lambda: True)
    _, source = tuning.measured(busy_key, measure)
    assert source.endswith("(machine busy)") and calls == [1, 1, 1]
    assert tuning.measured(busy_key, measure)[1].startswith("measured before") and len(calls) == 3
    monkeypatch.setattr(tuning, "busy", lambda: False)
    assert tuning.measured(busy_key, measure)[1].startswith("measured in") and len(calls) == 4
    assert tuning.measured(busy_key, measure)[1].startswith("measured before") and len(calls) == 4


def test_the_engine_reuses_its_measurements_but_not_another_cpus_or_builds(
        monkeypatch, tmp_path, stablelm_checkpoint):
    monkeypatch.setenv("STABLELM_LSP_CACHE", str(tmp_path))
    monkeypatch.setattr(tuning, "busy", lambda: False)
    cpu_kernels.reset_for_tests()
    try:
        def source(**options) -> str:
            reports = []
            loaded = load_model(stablelm_checkpoint, device="cpu", dtype="float32")
            with Engine(loaded, progress=lambda f, m: reports.append((f, m)), **options) as engine:
                plan = engine.kernels
                assert set(plan.linear) == set(plan.describe()["linear"]) and plan.linear
                if plan.source.startswith("measured in"):
                    fractions = [f for f, _ in reports]
                    assert fractions == sorted(fractions) and 0 < fractions[-1] <= 1
                    assert all(m.startswith("measuring kernels: ") for _, m in reports)
                else:
                    assert reports == []
                return plan.source

        assert source().startswith("measured in")
        assert source().startswith("measured before")
        assert source(linear="torch").startswith("measured in")      # other candidates
        real_cpu = cpu_kernels.cpu_id()
        monkeypatch.setattr(cpu_kernels, "cpu_id", lambda: real_cpu + " (another stepping)")
        assert source().startswith("measured in")
        monkeypatch.setattr(cpu_kernels, "cpu_id", lambda: real_cpu)
        assert source().startswith("measured before")
        real_ids = cpu_kernels.build_ids
        monkeypatch.setattr(cpu_kernels, "build_ids",
                            lambda names: {n: v + ".rebuilt" for n, v in real_ids(names).items()})
        assert source().startswith("measured in")
    finally:
        cpu_kernels.reset_for_tests()


def test_stopping_in_progress_stops_the_engine(monkeypatch, tmp_path, stablelm_checkpoint):
    monkeypatch.setenv("STABLELM_LSP_CACHE", str(tmp_path))

    class Stop(Exception):
        pass

    def progress(fraction, message):
        raise Stop

    loaded = load_model(stablelm_checkpoint, device="cpu", dtype="float32")
    with pytest.raises(Stop):
        Engine(loaded, progress=progress)


def test_the_draft_length_follows_the_cost_of_a_pass():
    # free positions: as long as allowed; weight-bound, 16 cost little more than one: long drafts
    assert tuning.draft_length(dict.fromkeys(tuning.POINTS, 1.0)) == tuning.MAX_DRAFT
    assert tuning.draft_length({1: 1.0, 2: 1.02, 4: 1.05, 8: 1.1, 16: 1.2}) >= 8
    # every position costs as much as a pass of one: never worth verifying a draft
    assert tuning.draft_length({1: 1.0, 2: 2.0, 4: 4.0, 8: 8.0, 16: 16.0}) == 0
    # in between: a few tokens
    assert 1 <= tuning.draft_length({1: 1.0, 2: 1.2, 4: 1.6, 8: 2.0, 16: 3.4}) < tuning.MAX_DRAFT


def test_the_engine_drafts_as_far_as_measured(stablelm_checkpoint):
    loaded = load_model(stablelm_checkpoint, device="cpu", dtype="float32")
    with Engine(loaded) as engine:
        plan = engine.kernels
        assert set(plan.pass_cost) == set(tuning.POINTS) and plan.pass_cost[1] == 1.0
        assert engine.draft_tokens == plan.draft_tokens == tuning.draft_length(plan.pass_cost)
    with Engine(load_model(stablelm_checkpoint, device="cpu", dtype="float32"), draft_tokens=3) as engine:
        assert engine.draft_tokens == 3


def test_the_draft_length_follows_the_acceptance_measured_while_serving(stablelm_checkpoint):
    from stablelm_lsp.inference.speculation import Acceptance

    rate = Acceptance(0.75, weight=16, window=64)
    assert rate.rate == 0.75
    for _ in range(4):
        rate.add(1, 8)                          # 1 taken, then a refusal
    assert rate.rate == pytest.approx((12 + 4) / (12 + 4 + 4 + 4))
    for _ in range(100):
        rate.add(8, 8)                          # taken whole: no refusal
    assert rate.rate > 0.95 and rate.taken + rate.refused <= 64   # older counts fade

    cheap = {1: 1.0, 2: 1.01, 4: 1.03, 8: 1.07, 16: 1.15}       # positions nearly free
    assert tuning.draft_length(cheap, 0.3) < 8 < tuning.draft_length(cheap, 0.99) == tuning.MAX_DRAFT
    repeating = [11, 12, 13, 14, 15] * 8        # n-gram drafts, whatever the random model says

    loaded = load_model(stablelm_checkpoint, device="cpu", dtype="float32")
    with Engine(loaded) as engine:
        engine.kernels.pass_cost = cheap
        for _ in range(300):
            engine.acceptance.add(0, 4)          # every draft refused at once
        engine.generate([20, 21, 22], max_new_tokens=2)
        assert 1 <= engine.draft_tokens == max(1, tuning.draft_length(cheap, engine.acceptance.rate)) < 8
        for _ in range(300):
            engine.acceptance.add(8, 8)
        engine.generate([20, 21, 22], max_new_tokens=2)
        assert engine.draft_tokens == tuning.MAX_DRAFT
        # the engine's own looked-up drafts are counted, taken or refused
        before = (engine.acceptance.taken, engine.acceptance.refused)
        first = engine.generate(repeating, max_new_tokens=12, key="doc")
        assert first.drafted_tokens > 0 and (engine.acceptance.taken, engine.acceptance.refused) != before
        # the rest of the previous completion (the same request again) is not: nearly always taken
        before = (engine.acceptance.taken, engine.acceptance.refused)
        again = engine.generate(repeating, max_new_tokens=12, key="doc")
        assert again.token_ids == first.token_ids and again.accepted_tokens == 11
        assert (engine.acceptance.taken, engine.acceptance.refused) == before
    with Engine(load_model(stablelm_checkpoint, device="cpu", dtype="float32"), draft_tokens=3) as engine:
        for _ in range(300):
            engine.acceptance.add(0, 4)
        engine.generate(repeating, max_new_tokens=4)
        assert engine.draft_tokens == 3         # a length given is kept
