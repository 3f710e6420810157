"""The CPU linear kernels: oneDNN-packed layers and the project's own kernel (built here with the
machine's C compiler) give the plain model's logits, and the choice between kernels follows the
device, the dtype, the request and what the machine has (a compiler, a torch with oneDNN)."""
from __future__ import annotations

import random

import pytest
import torch
from torch import nn

from stablelm_lsp.inference.engine import Engine
from stablelm_lsp.inference.errors import InvalidParameter
from stablelm_lsp.inference import cpu_kernels
from stablelm_lsp.inference.linear import (PackedLinear, RowsLinear, onednn_problems, pack_linears,
                                           rows_linears, rows_problems, select_linear)
from stablelm_lsp.models import load_model

CPU, CUDA = torch.device("cpu"), torch.device("cuda")
needs_onednn = pytest.mark.skipif(bool(onednn_problems(CPU, torch.float32)),
                                  reason="packed oneDNN linear layers unavailable in this torch build")
# CI and the README's set-up run where a C compiler is: the own kernel must build there.
ROWS = cpu_kernels.load_rows_linear()


def test_selection_follows_device_dtype_and_request():
    assert select_linear("torch", CPU, torch.float32).name == "torch"
    for device, dtype in [(CUDA, torch.float32), (CPU, torch.bfloat16), (CUDA, torch.float16)]:
        assert onednn_problems(device, dtype)
        assert select_linear("auto", device, dtype).name == "torch"
        with pytest.raises(InvalidParameter, match="cannot use packed oneDNN"):
            select_linear("onednn", device, dtype)
    compiled = select_linear("auto", CPU, torch.float32, compiled=True)
    assert compiled.name == "torch" and "torch.compile" in compiled.reason
    with pytest.raises(InvalidParameter, match="compiled with torch.compile"):
        select_linear("onednn", CPU, torch.float32, compiled=True)
    with pytest.raises(InvalidParameter, match="unknown linear kernel"):
        select_linear("fast", CPU, torch.float32)
    with pytest.raises(InvalidParameter, match="cannot use the 'rows' linear kernel"):
        select_linear("rows", CPU, torch.float32, compiled=True)
    for device, dtype in [(CUDA, torch.float32), (CPU, torch.bfloat16)]:
        with pytest.raises(InvalidParameter, match="cannot use the own linear kernel"):
            select_linear("rows", device, dtype)
    assert not isinstance(ROWS, str), ROWS
    auto = select_linear("auto", CPU, torch.float32)
    assert auto.name == "rows" and isinstance(auto.kernel, cpu_kernels.RowsKernel)
    assert select_linear("onednn", CPU, torch.float32).name == (
        "torch" if onednn_problems(CPU, torch.float32) else "onednn")


def test_without_a_compiler_auto_falls_back_with_the_reason(monkeypatch, tmp_path, caplog):
    monkeypatch.setenv("CC", "no-such-cc")
    monkeypatch.setenv("PATH", str(tmp_path))      # no cc, gcc or clang either
    monkeypatch.setenv("STABLELM_LSP_CACHE", str(tmp_path / "cache"))
    cpu_kernels.reset_for_tests()
    try:
        kernel, problems = rows_problems(CPU, torch.float32)
        assert kernel is None and problems == ["no C compiler (cc, gcc or clang) on PATH"]
        auto = select_linear("auto", CPU, torch.float32)
        assert auto.name == ("torch" if onednn_problems(CPU, torch.float32) else "onednn")
        assert "no C compiler" in auto.reason
        with pytest.raises(InvalidParameter, match="no C compiler"):
            select_linear("rows", CPU, torch.float32)
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


@pytest.mark.parametrize("threads", [1, 2])
def test_own_kernel_matches_f_linear_for_every_pass_length(threads):
    torch.set_num_threads(threads)
    try:
        g = torch.Generator().manual_seed(3)
        for n, k in [(1, 1), (5, 16), (67, 83), (300, 257)]:   # K below, at and off 16-multiples
            w, b = torch.randn(n, k, generator=g), torch.randn(n, generator=g)
            layer = RowsLinear(w, b, ROWS, max_m=1 << 30)
            assert layer.max_m == ROWS.max_m == 16
            for m in (1, 2, 7, 8, 9, 16, 17, 40):     # up to 16 on the kernel, then F.linear
                x = torch.randn(2, m, k, generator=g)[1:]    # a batch dim, a non-zero offset
                want = torch.nn.functional.linear(x, w, b)
                assert torch.allclose(layer(x), want, atol=1e-4, rtol=1e-4), (n, k, m)
                x_t = torch.randn(k, m, generator=g).t()     # not contiguous
                assert torch.allclose(layer(x_t), torch.nn.functional.linear(x_t, w, b), atol=1e-4, rtol=1e-4)
    finally:
        torch.set_num_threads(1)


@pytest.mark.parametrize("kernel", ["onednn", "rows"])
def test_replaced_layers_give_the_same_logits(any_checkpoint, kernel):
    if kernel == "onednn" and onednn_problems(CPU, torch.float32):
        pytest.skip("packed oneDNN linear layers unavailable in this torch build")
    replace, layer_type = ((pack_linears, PackedLinear) if kernel == "onednn" else
                           (lambda m: rows_linears(m, ROWS), RowsLinear))
    variant, path = any_checkpoint
    plain = load_model(path, device="cpu", dtype="float32").model
    model = load_model(path, device="cpu", dtype="float32").model
    tied = plain.tied
    layers = sum(isinstance(m, nn.Linear) for m in plain.modules()) + tied
    before = sum(p.nbytes for p in model.parameters())
    assert replace(model) == layers
    assert not any(isinstance(m, nn.Linear) for m in model.modules())
    assert isinstance(model.lm_head, layer_type) and model.tied == tied
    assert replace(model) == 0              # replacing twice changes nothing
    if kernel == "rows":                    # the same weights, no copy (a tied head included)
        assert sum(p.nbytes for p in model.parameters()) == before
        if tied:
            assert model.lm_head.weight.data_ptr() == model.embed.weight.data_ptr()
    ids = torch.tensor([random.Random(0).sample(range(7, plain.cfg.vocab_size), 20)])
    for t in (1, 5, 20):        # a decode step, a draft verification, a prefill
        want, got = plain(ids[:, :t]), model(ids[:, :t])
        assert torch.allclose(got, want, atol=1e-5, rtol=1e-4), (variant, t, (got - want).abs().max())


def test_engine_tokens_do_not_depend_on_the_kernel(stablelm_checkpoint):
    ids = random.Random(1).sample(range(7, 500), 40)
    results = {}
    kernels = ("torch", "rows") + (() if onednn_problems(CPU, torch.float32) else ("onednn",))
    for kernel in kernels:
        loaded = load_model(stablelm_checkpoint, device="cpu", dtype="float32")
        with Engine(loaded, linear=kernel) as engine:
            assert engine.linear.name == kernel
            results[kernel] = engine.generate(ids, max_new_tokens=24).token_ids
    assert all(results[k] == results["torch"] for k in kernels), results
