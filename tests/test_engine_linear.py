"""The CPU linear kernel: oneDNN-packed layers give the unpacked model's logits, and the choice
between kernels follows the device, the dtype and what the torch build has."""
from __future__ import annotations

import random

import pytest
import torch
from torch import nn

from stablelm_lsp.inference.engine import Engine
from stablelm_lsp.inference.errors import InvalidParameter
from stablelm_lsp.inference.linear import PackedLinear, onednn_problems, pack_linears, select_linear
from stablelm_lsp.models import load_model

CPU, CUDA = torch.device("cpu"), torch.device("cuda")
needs_onednn = pytest.mark.skipif(bool(onednn_problems(CPU, torch.float32)),
                                  reason="packed oneDNN linear layers unavailable in this torch build")


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
    expected = "torch" if onednn_problems(CPU, torch.float32) else "onednn"
    assert select_linear("auto", CPU, torch.float32).name == expected


@needs_onednn
def test_packed_layers_give_the_same_logits(any_checkpoint):
    variant, path = any_checkpoint
    plain = load_model(path, device="cpu", dtype="float32").model
    packed = load_model(path, device="cpu", dtype="float32").model
    tied = plain.tied
    layers = sum(isinstance(m, nn.Linear) for m in plain.modules()) + tied
    assert pack_linears(packed) == layers
    assert not any(isinstance(m, nn.Linear) for m in packed.modules())
    assert isinstance(packed.lm_head, PackedLinear) and packed.tied == tied
    assert pack_linears(packed) == 0        # packing twice changes nothing
    ids = torch.tensor([random.Random(0).sample(range(7, plain.cfg.vocab_size), 20)])
    for t in (1, 5, 20):                    # a decode step, a draft verification, a prefill
        want, got = plain(ids[:, :t]), packed(ids[:, :t])
        assert torch.allclose(got, want, atol=1e-5, rtol=1e-4), (variant, t, (got - want).abs().max())


@needs_onednn
def test_engine_tokens_do_not_depend_on_the_kernel(stablelm_checkpoint):
    ids = random.Random(1).sample(range(7, 500), 40)
    results = {}
    for kernel in ("torch", "onednn"):
        loaded = load_model(stablelm_checkpoint, device="cpu", dtype="float32")
        with Engine(loaded, linear=kernel) as engine:
            assert engine.linear.name == kernel
            results[kernel] = engine.generate(ids, max_new_tokens=24).token_ids
    assert results["torch"] == results["onednn"]
