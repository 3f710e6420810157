"""The linear layers' kernels (inference/linear.py): what can run where, and that every
implementation, float32 and int8, gives the plain model's logits and the same engine tokens,
without a second copy of the weights. The own kernels are built here with the machine's C
compiler."""
from __future__ import annotations

import random

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from stablelm_lsp.inference import cpu_kernels
from stablelm_lsp.inference.engine import Engine
from stablelm_lsp.inference.errors import InvalidParameter
from stablelm_lsp.inference.linear import (KERNELS, KernelLinear, candidates, forced, forced_table,
                                           install)
from stablelm_lsp.models import load_model
from stablelm_lsp.models.quantize import dequantize, q8_linear_reference

CPU, CUDA = torch.device("cpu"), torch.device("cuda")
# CI and the README's set-up run where a C compiler is: the own kernels must build there.
ROWS = cpu_kernels.load_rows_linear()
FLOAT32 = [i.name for i in candidates(CPU, torch.float32, int8=False).impls]
INT8 = [i.name for i in candidates(CPU, torch.float32, int8=True).impls]


def test_candidates_follow_device_dtype_and_weights():
    assert not isinstance(ROWS, str), ROWS
    assert {"rows", "torch"} <= set(FLOAT32) and set(FLOAT32) <= set(KERNELS)
    assert {"rows", "q8", "widen"} <= set(INT8) and "onednn" not in INT8 and "q8" not in FLOAT32
    with pytest.raises(InvalidParameter, match="cannot use the 'q8' linear kernel: .*int8 weights"):
        forced("q8", candidates(CPU, torch.float32, int8=False))
    half = candidates(CPU, torch.bfloat16, int8=False)
    assert [i.name for i in half.impls] == ["torch", "widen"]
    gpu = candidates(CUDA, torch.bfloat16, int8=False)
    assert [i.name for i in gpu.impls] == ["torch"]
    with pytest.raises(InvalidParameter, match="cannot use the 'rows' linear kernel: .*float32 or int8"):
        forced("rows", half)
    with pytest.raises(InvalidParameter, match="cannot use the 'onednn' linear kernel: .*float32"):
        forced("onednn", candidates(CPU, torch.float32, int8=True))
    with pytest.raises(InvalidParameter, match="cannot use the 'widen' linear kernel"):
        forced("widen", candidates(CPU, torch.float32, int8=False))
    with pytest.raises(InvalidParameter, match="unknown linear kernel"):
        forced("fast", half)
    int8_gpu = candidates(CUDA, torch.bfloat16, int8=True)
    assert "rows" not in [i.name for i in int8_gpu.impls] and "CPUs" in int8_gpu.problems["rows"]


def test_without_a_compiler_the_own_kernels_are_not_candidates(monkeypatch, tmp_path):
    monkeypatch.setenv("CC", "no-such-cc")
    monkeypatch.setenv("PATH", str(tmp_path))      # no cc, gcc or clang either
    monkeypatch.setenv("STABLELM_LSP_CACHE", str(tmp_path / "cache"))
    cpu_kernels.reset_for_tests()
    try:
        for int8 in (False, True):
            found = candidates(CPU, torch.float32, int8)
            assert not {"rows", "q8"} & {i.name for i in found.impls}
            assert found.problems["rows"] == "no C compiler (cc, gcc or clang) on PATH"
            if int8:
                assert found.problems["q8"] == found.problems["rows"]
            with pytest.raises(InvalidParameter, match="no C compiler"):
                forced("rows", found)
    finally:
        cpu_kernels.reset_for_tests()


def test_the_kernel_is_built_once_per_source_and_machine(monkeypatch, tmp_path):
    monkeypatch.setenv("STABLELM_LSP_CACHE", str(tmp_path))
    cpu_kernels.reset_for_tests()
    try:
        first = cpu_kernels.load_rows_linear()
        assert not isinstance(first, str), first
        assert first.path.parent == tmp_path / "kernels"
        built = sorted(p.name for p in first.path.parent.iterdir())
        assert built == [first.path.name]           # no temporary files left behind
        mtime = first.path.stat().st_mtime_ns
        cpu_kernels.reset_for_tests()
        again = cpu_kernels.load_rows_linear()
        assert again.path == first.path and again.path.stat().st_mtime_ns == mtime
    finally:
        cpu_kernels.reset_for_tests()


def _layer(n: int, k: int, int8: bool, g: torch.Generator) -> tuple[KernelLinear, torch.Tensor]:
    """A layer and the float weight it computes with (dequantized for int8)."""
    w, b = torch.randn(n, k, generator=g), torch.randn(n, generator=g)
    if not int8:
        return KernelLinear(w, b), w
    from stablelm_lsp.models.quantize import quantize_rows

    q, scale = torch.empty(n, k, dtype=torch.int8), torch.empty(n)
    quantize_rows(w, q, scale)
    return KernelLinear(q, b, scale), dequantize(q, scale, torch.float32)


def _want(layer: KernelLinear, impl, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """F.linear on the layer's (dequantized) weights; for "q8" on the passes it runs (longer ones
    go to the fallback), the arithmetic it implements: the inputs rounded to int8 per block."""
    if impl.quantizes_inputs and impl.takes(x.numel() // x.shape[-1]):
        x2 = x.reshape(-1, x.shape[-1])
        y = q8_linear_reference(x2, layer.weight, layer.scale, layer.bias)
        return y.float().view(*x.shape[:-1], -1)
    return F.linear(x, w, layer.bias)


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("int8", [False, True])
def test_every_implementation_matches_f_linear_for_every_pass_length(threads, int8):
    found = candidates(CPU, torch.float32, int8)
    torch.set_num_threads(threads)
    try:
        g = torch.Generator().manual_seed(3)
        for n, k in [(1, 1), (5, 16), (67, 83), (300, 257)]:   # K below, at and off the vector width
            layer, w = _layer(n, k, int8, g)
            for impl in found.impls:
                layer.table = forced_table(impl, found.fallback)
                if impl.packed:
                    layer.pack()
                for m in (1, 2, 7, 8, 9, 16, 17, 40):
                    x = torch.randn(2, m, k, generator=g)[1:]    # a batch dim, a non-zero offset
                    want = _want(layer, impl, x, w)
                    assert torch.allclose(layer(x), want, atol=1e-4, rtol=1e-4), (impl.name, n, k, m)
                    x_t = torch.randn(k, m, generator=g).t()     # not contiguous
                    assert torch.allclose(layer(x_t), _want(layer, impl, x_t, w), atol=1e-4, rtol=1e-4)
                layer.unpack()
    finally:
        torch.set_num_threads(1)


@pytest.mark.parametrize("int8", [False, True])
def test_installed_layers_give_the_same_logits_on_the_same_weights(any_checkpoint, int8):
    variant, path = any_checkpoint
    dtype = "int8" if int8 else "float32"
    plain = load_model(path, device="cpu", dtype=dtype).model
    model = load_model(path, device="cpu", dtype=dtype).model
    tied = plain.tied
    before = {p.data_ptr() for p in model.parameters()}
    nbytes = sum(p.nbytes for p in model.parameters())
    layers = install(model)
    linears = sum(type(m) is nn.Linear or type(m).__name__ == "Int8Linear" for m in plain.modules())
    assert len(layers) == linears + (tied and not int8)
    assert model.tied == tied and isinstance(model.lm_head, KernelLinear)
    assert install(model) == layers                  # installing twice changes nothing
    # the same tensors, no copy (a tied head reads the embedding table itself)
    assert {p.data_ptr() for p in model.parameters()} == before
    assert sum(p.nbytes for p in model.parameters()) == nbytes
    if tied:
        assert model.lm_head.weight.data_ptr() == model.embed.weight.data_ptr()
    ids = torch.tensor([random.Random(0).sample(range(7, plain.cfg.vocab_size), 20)])
    found = candidates(CPU, torch.float32, int8)
    for impl in found.impls:
        for layer in layers:
            layer.table = ((None, found.fallback),) if impl.packed and not layer.can_pack else \
                forced_table(impl, found.fallback)
            if impl.packed and layer.can_pack:
                layer.pack()
        for t in (1, 5, 20):        # a decode step, a draft verification, a prefill
            want, got = plain(ids[:, :t]), model(ids[:, :t])
            if impl.quantizes_inputs and t <= impl.max_m:
                # the inputs' rounding (1/254 of each block's largest, at most) carried through
                # the layers: close, not equal
                err = ((got - want).abs().max() / want.abs().max()).item()
                assert err < 0.05, (variant, t, err)
            else:
                assert torch.allclose(got, want, atol=1e-5, rtol=1e-4), (variant, impl.name, t)
        for layer in layers:
            layer.unpack()


@pytest.mark.parametrize("dtype", ["float32", "int8"])
def test_engine_tokens_do_not_depend_on_the_kernel(stablelm_checkpoint, dtype):
    """Every kernel forced, and the measured choice: the same tokens; int8 tokens are the same
    in a second run (deterministic)."""
    ids = random.Random(1).sample(range(7, 500), 40)
    results = {}
    # the layers' own arithmetic ("q8" rounds the inputs too: test_q8_tokens_are_deterministic)
    names = FLOAT32 if dtype == "float32" else [n for n in INT8 if n != "q8"]
    for kernel in ["auto", *names, names[0]]:
        loaded = load_model(stablelm_checkpoint, device="cpu", dtype=dtype)
        with Engine(loaded, linear=kernel) as engine:
            if kernel != "auto":
                used = {impl.name for table in engine.kernels.linear.values() for _, impl in table}
                assert kernel in used, used
            first = engine.generate(ids, max_new_tokens=24).token_ids
            results.setdefault(kernel, []).append(first)
    want = results["torch"][0]
    assert all(run == want for runs in results.values() for run in runs), results


def test_q8_runs_where_forced_and_never_by_measurement(stablelm_checkpoint):
    """The int8 x int8 kernel rounds the inputs: "auto" never picks it (it chooses among kernels
    computing the layers' own arithmetic), forced it runs every short pass, and its tokens are
    the same run after run."""
    ids = random.Random(1).sample(range(7, 500), 40)
    with Engine(load_model(stablelm_checkpoint, device="cpu", dtype="int8")) as engine:
        used = {impl.name for table in engine.kernels.linear.values() for _, impl in table}
        assert "q8" not in used and "q8" not in engine.kernels.timings["key"]["impls"], used
    runs = []
    for _ in range(2):
        with Engine(load_model(stablelm_checkpoint, device="cpu", dtype="int8"), linear="q8") as engine:
            assert all(table == engine.kernels.linear[next(iter(engine.kernels.linear))]
                       for table in engine.kernels.linear.values())
            assert [(b, i.name) for b, i in next(iter(engine.kernels.linear.values()))] == [(16, "q8"), (None, "widen")]
            runs.append(engine.generate(ids, max_new_tokens=24).token_ids)
    assert runs[0] == runs[1] and len(runs[0]) == 24


def test_onednn_packs_every_layer_but_a_tied_head(checkpoint_factory):
    if "onednn" not in FLOAT32:
        pytest.skip("oneDNN unavailable in this torch build")
    loaded = load_model(checkpoint_factory("starcoder2"), device="cpu", dtype="float32")
    nbytes = sum(p.nbytes for p in loaded.model.parameters())
    with Engine(loaded, linear="onednn") as engine:
        layers = [m for m in loaded.model.modules() if isinstance(m, KernelLinear)]
        head = loaded.model.lm_head
        assert loaded.model.tied and head.packed_weight is None and head.table[0][1].name == "onednn-plain"
        assert all(layer.packed_weight is not None for layer in layers if layer is not head)
        # the packed weights replaced the plain ones: only the embedding (and norms) are left
        left = sum(p.nbytes for p in loaded.model.parameters())
        assert left < nbytes and left == nbytes - sum(l.packed_weight.numel() * 4 for l in layers
                                                      if l is not head)
        assert len(engine.generate([7, 8, 9], max_new_tokens=4).token_ids) == 4
