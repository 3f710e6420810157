"""Attention kernel selection (on CPU) and the flash-attn kernel against SDPA (CUDA only)."""
from __future__ import annotations

import random

import pytest
import torch

from stablelm_lsp.inference.api import GenerationError
from stablelm_lsp.inference.attention import (FLASH_PAGE, AttentionChoice, choose, flash_installed,
                                              flash_problems, ring_capacity, select_attention)
from stablelm_lsp.inference.engine import Engine
from stablelm_lsp.inference.errors import AttentionUnavailable
from stablelm_lsp.models import load_model
from stablelm_lsp.models.decoder import sdpa_attention

CUDA = torch.device("cuda")
READY = dict(installed=True, capability=(9, 0))


def test_flash_is_chosen_only_where_it_can_run():
    assert flash_problems(CUDA, torch.bfloat16, 128, **READY) == []
    assert choose("auto", []) == AttentionChoice("flash", "CUDA, half precision, flash_attn installed")
    for device, dtype, head_dim, env, expected in [
        (torch.device("cpu"), torch.bfloat16, 128, READY, "needs a CUDA device"),
        (CUDA, torch.float32, 128, READY, "float16 or bfloat16"),
        (CUDA, torch.float16, 128, dict(installed=True, capability=(7, 5)), "Ampere"),
        (CUDA, torch.float16, 80 + 4, READY, "multiple of 8"),
        (CUDA, torch.float16, 128, dict(installed=False, capability=(8, 0)), "pip install"),
    ]:
        problems = flash_problems(device, dtype, head_dim, **env)
        assert len(problems) == 1 and expected in problems[0]
        auto = choose("auto", problems)
        assert auto.name == "sdpa" and expected in auto.reason
        with pytest.raises(AttentionUnavailable, match=expected):
            choose("flash", problems)
    assert choose("sdpa", []) == AttentionChoice("sdpa", "requested")
    with pytest.raises(AttentionUnavailable, match="choose from auto, sdpa, flash"):
        choose("xformers", [])


def test_cpu_engine_runs_sdpa_and_refuses_flash(stablelm_checkpoint):
    loaded = load_model(stablelm_checkpoint, device="cpu", dtype="float32")
    choice = select_attention("auto", loaded.device, loaded.dtype, loaded.config)
    assert choice.name == "sdpa" and "CUDA" in choice.reason
    with pytest.raises(AttentionUnavailable) as info:
        Engine(loaded, attention="flash")
    assert isinstance(info.value, GenerationError)
    with Engine(loaded) as engine:
        assert engine.attention.name == "sdpa" and loaded.model.attention is sdpa_attention
        assert len(engine.generate([7, 8, 9], max_new_tokens=3).token_ids) == 3


def test_every_layer_calls_the_installed_kernel(stablelm_checkpoint):
    loaded = load_model(stablelm_checkpoint, device="cpu", dtype="float32")
    ids = torch.tensor([[7, 8, 9, 10, 11]])
    expected = loaded.model(ids)
    calls = []

    def recording(q, key, value, layer, cache, attn):
        calls.append(layer)
        return sdpa_attention(q, key, value, layer, cache, attn)

    loaded.model.attention = recording
    torch.testing.assert_close(loaded.model(ids), expected, rtol=0, atol=0)
    assert calls == list(range(loaded.config.num_layers))


def test_ring_sizes():
    assert ring_capacity(4096, 256, "sdpa") == 4096 + 255
    assert ring_capacity(4096, 256, "flash") == 4096 + 256
    assert ring_capacity(16, 4, "flash") == FLASH_PAGE


needs_flash = pytest.mark.skipif(not (torch.cuda.is_available() and flash_installed()),
                                 reason="needs CUDA and flash_attn")


@pytest.mark.cuda
@needs_flash
@pytest.mark.parametrize("variant", ["stablelm-3b", "stablelm-2-12b", "starcoder2"])
def test_flash_kernel_matches_sdpa_on_cuda(checkpoint_factory, variant):
    """Chunked prefill and decode through flash_attn_with_kvcache (linear caches, and the paged
    ring for StarCoder2, wrapped several times) against SDPA on the same steps."""
    from stablelm_lsp.inference.attention import FlashAttention

    loaded = load_model(checkpoint_factory(variant), device="cuda", dtype="float16")
    model, cfg = loaded.model, loaded.config
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(7, cfg.vocab_size, (1, 480), generator=g).cuda()
    step = 64
    capacity = ring_capacity(cfg.sliding_window, step, "flash") if cfg.sliding_window else 512
    logits = {}
    for name, kernel in (("sdpa", sdpa_attention), ("flash", FlashAttention(cfg))):
        model.attention = kernel
        cache = model.new_cache(capacity)
        out = [model(chunk, cache) for chunk in ids[:, :448].split(step, dim=1)]
        out += [model(ids[:, t:t + 1], cache) for t in range(448, 480)]
        logits[name] = torch.cat(out, dim=1)
    model.attention = sdpa_attention
    torch.testing.assert_close(logits["flash"], logits["sdpa"], atol=3e-2, rtol=3e-2)


@pytest.mark.cuda
@needs_flash
def test_engine_with_flash_gives_the_tokens_of_sdpa_on_cuda(starcoder2_checkpoint):
    loaded = load_model(starcoder2_checkpoint, device="cuda", dtype="bfloat16")
    rng = random.Random(0)
    ids = [rng.randrange(7, loaded.config.vocab_size) for _ in range(400)]
    results = {}
    for kernel in ("sdpa", "flash"):
        with Engine(loaded, attention=kernel, prefill_chunk=64) as engine:
            engine.generate(ids[:300], max_new_tokens=4)
            results[kernel] = engine.generate(ids, max_new_tokens=16)
    assert results["flash"].reused_tokens == results["sdpa"].reused_tokens
    # bf16 kernels round differently: allow them to part ways after a near tie, late
    assert results["flash"].token_ids[:8] == results["sdpa"].token_ids[:8]
