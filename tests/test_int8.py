"""int8 weights (`dtype="int8"`, models/quantize.py): per-row symmetric quantization within its
error bound, loading that quantizes exactly what the float checkpoint holds without ever holding
the float weights (peak memory measured in a subprocess), every int8 kernel within the bound of
the float layer (the int8 x int8 kernel "q8" within that bound plus the inputs' rounding), and the
GPU's torch path (CUDA only)."""
from __future__ import annotations

import json
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from stablelm_lsp.inference.engine import Engine
from stablelm_lsp.inference.linear import KernelLinear, candidates, forced_table
from stablelm_lsp.models import load_model
from stablelm_lsp.models.quantize import (Int8Embedding, Int8Linear, dequantize, q8_input_error_bound,
                                          q8_linear_reference, quantize_rows)

CPU = torch.device("cpu")
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def quantized(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    q, scale = torch.empty(w.shape, dtype=torch.int8), torch.empty(w.shape[0])
    quantize_rows(w, q, scale)
    return q, scale


def test_rows_are_quantized_within_half_a_step():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(64, 300, generator=g) * torch.logspace(-3, 2, 64)[:, None]   # rows of every scale
    w[5] = 0                                                                        # and a zero row
    q, scale = quantized(w)
    assert q.dtype == torch.int8 and q.abs().max() <= 127
    assert torch.equal(q.abs().amax(dim=1)[torch.arange(64) != 5], torch.full((63,), 127, dtype=torch.int8))
    assert scale[5] == 0 and not q[5].any()
    err = (dequantize(q, scale, torch.float32) - w).abs()
    assert (err <= scale[:, None] / 2 * (1 + 1e-5) + 1e-12).all()


@pytest.mark.parametrize("threads", [1, 2])
def test_every_int8_kernel_is_within_the_bound_of_the_float_layer(threads):
    """|y - x W^T| <= sum_k |x_k| * scale_n / 2 (each weight off by at most half a step), plus
    float rounding; and every kernel agrees with the dequantized layer to float rounding."""
    found = candidates(CPU, torch.float32, int8=True)
    g = torch.Generator().manual_seed(1)
    torch.set_num_threads(threads)
    try:
        for n, k in [(40, 83), (300, 768)]:
            w, b = torch.randn(n, k, generator=g), torch.randn(n, generator=g)
            q, scale = quantized(w)
            layer = KernelLinear(q, b, scale)
            for m in (1, 3, 16, 40):
                x = torch.randn(m, k, generator=g)
                bound = x.abs().sum(dim=1, keepdim=True) * scale / 2 * (1 + 1e-4) + 1e-4
                exact = F.linear(x, w, b)
                for impl in found.impls:
                    layer.table = forced_table(impl, found.fallback)
                    y = layer(x)
                    if impl.quantizes_inputs and impl.takes(m):
                        # and the inputs' rounding: its own bound, on top; to float rounding the
                        # arithmetic it implements
                        both = bound + q8_input_error_bound(x, q, scale).float() * (1 + 1e-4)
                        assert ((y - exact).abs() <= both).all(), (impl.name, n, k, m)
                        weight_only = F.linear(x, dequantize(q, scale, torch.float32), b)
                        assert not torch.allclose(y, weight_only, atol=1e-6, rtol=1e-6), "inputs not rounded"
                        assert torch.allclose(y.double(), q8_linear_reference(x, q, scale, b),
                                              atol=1e-4, rtol=1e-4), (impl.name, m)
                        continue
                    assert ((y - exact).abs() <= bound).all(), (impl.name, n, k, m)
                    assert torch.allclose(y, F.linear(x, dequantize(q, scale, torch.float32), b),
                                          atol=1e-4, rtol=1e-4), (impl.name, m)
    finally:
        torch.set_num_threads(1)


def test_loading_quantizes_exactly_the_checkpoints_weights(any_checkpoint):
    """Every int8 tensor is the quantization of the float one (fused q/k/v, Persimmon's
    interleaved heads and a tied head included); the logits are the float model's on the
    dequantized weights."""
    variant, path = any_checkpoint
    plain = load_model(path, device="cpu", dtype="float32").model
    loaded = load_model(path, device="cpu", dtype="int8")
    model = loaded.model
    assert loaded.quantization == "int8" and loaded.dtype == torch.float32 and model.dtype == torch.float32
    assert model.tied == plain.tied and model.new_cache(8).k.dtype == torch.float32
    float_modules = dict(plain.named_modules())
    int8_modules = [(n, m) for n, m in model.named_modules() if isinstance(m, (Int8Linear, Int8Embedding))]
    assert {n for n, _ in int8_modules} >= {"embed", "lm_head"}
    for name, module in int8_modules:
        source = float_modules.get(name) if name != "lm_head" or not plain.tied else plain.embed
        q, scale = quantized(source.weight.detach())
        assert torch.equal(module.weight, q) and torch.equal(module.scale, scale), (variant, name)
        source.weight.data = dequantize(q, scale, torch.float32)
    if plain.tied:
        assert model.lm_head.weight.data_ptr() == model.embed.weight.data_ptr()
    floats = {n: p for n, p in plain.named_parameters()}
    for name, p in model.named_parameters():     # norms and biases stay float, unchanged
        if p.dtype != torch.int8 and not name.endswith("scale"):
            assert torch.equal(p, floats[name]), name
    ids = torch.tensor([random.Random(0).sample(range(7, plain.cfg.vocab_size), 20)])
    assert torch.allclose(model(ids), plain(ids), atol=1e-4, rtol=1e-4), variant


_PEAK = r"""
import json, sys
def status(key):
    for line in open("/proc/self/status"):
        if line.startswith(key):
            return int(line.split()[1]) * 1024
import torch
from stablelm_lsp.models import load_model
load_model(sys.argv[3], device="cpu", dtype=sys.argv[2])   # torch's one-time set-up, not measured
base = status("VmRSS:")
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")        # the peak-RSS counter starts again from here
loaded = load_model(sys.argv[1], device="cpu", dtype=sys.argv[2])
peak = status("VmHWM:") - base
weights = sum(p.nbytes for p in loaded.model.parameters())
print(json.dumps({"peak": peak, "weights": weights}))
"""


def _peak(path: Path, dtype: str, warm_up: Path) -> dict:
    out = subprocess.run([sys.executable, "-c", _PEAK, str(path), dtype, str(warm_up)], check=True,
                         capture_output=True, text=True, timeout=300)
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux's /proc")
def test_loading_int8_never_holds_the_float_weights(checkpoint_factory, stablelm_checkpoint):
    """A checkpoint of 105 MB in float32 (embedding 16 MiB in one tensor, larger than the
    quantizer's chunks): loading it as int8 peaks at most 0.45x its bytes above the process's
    baseline (after a tiny checkpoint's load has paid torch's one-time set-up); float32 as a
    contrast holds them all."""
    path = checkpoint_factory("stablelm-3b", hidden_size=512, intermediate_size=1408,
                              num_hidden_layers=8, num_attention_heads=8, num_key_value_heads=8,
                              vocab_size=8192)
    ckpt = sum(f.stat().st_size for f in path.glob("*.safetensors"))
    assert ckpt > 100e6
    int8 = _peak(path, "int8", stablelm_checkpoint)
    assert int8["weights"] < 0.27 * ckpt
    assert int8["peak"] <= 0.45 * ckpt, (int8, ckpt)
    assert _peak(path, "float32", stablelm_checkpoint)["peak"] >= 0.95 * ckpt


@needs_cuda
@pytest.mark.cuda
def test_int8_on_cuda_matches_the_cpu(stablelm_checkpoint):
    """The GPU's int8 path (torch's int8 weight kernel where the build has one, else widening
    each layer's weights per pass) gives the CPU int8 model's logits, and the same tokens with
    each of its kernels."""
    cpu = load_model(stablelm_checkpoint, device="cpu", dtype="int8")
    gpu = load_model(stablelm_checkpoint, device="cuda", dtype="int8")
    assert gpu.model.embed.weight.dtype == torch.int8 and gpu.model.embed.weight.is_cuda
    ids = torch.tensor([random.Random(0).sample(range(7, 500), 24)])
    want = cpu.model(ids)
    got = gpu.model(ids.cuda()).cpu()
    assert torch.allclose(got, want, atol=1e-3, rtol=1e-3), (got - want).abs().max()
    found = candidates(torch.device("cuda"), gpu.dtype, int8=True)
    tokens = {}
    for impl in found.impls:
        with Engine(load_model(stablelm_checkpoint, device="cuda", dtype="int8"), linear=impl.name) as engine:
            assert engine.kernels.linear and all(t[0][1].name == impl.name for t in engine.kernels.linear.values())
            tokens[impl.name] = engine.generate(list(range(7, 40)), max_new_tokens=16).token_ids
    assert len(tokens) >= 1 and len(set(map(tuple, tokens.values()))) == 1, tokens
