"""Attention kernel selection (on CPU), the own CPU decode kernel against SDPA, and the flash-attn
kernel against SDPA (CUDA only)."""
from __future__ import annotations

import dataclasses
import random

import pytest
import torch

from stablelm_lsp.inference.api import GenerationError
from stablelm_lsp.inference import cpu_kernels
from stablelm_lsp.inference.attention import (FLASH_PAGE, AttentionChoice, CpuDecodeAttention, choose,
                                              cpu_problems, flash_installed, flash_problems,
                                              ring_capacity, select_attention)
from stablelm_lsp.inference.engine import Engine
from stablelm_lsp.inference.errors import AttentionUnavailable
from stablelm_lsp.models import load_model
from stablelm_lsp.models.decoder import attend, sdpa_attention

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
    with pytest.raises(AttentionUnavailable, match="choose from auto, sdpa, flash, cpu"):
        choose("xformers", [])


def test_cpu_engine_runs_the_own_kernel_or_sdpa_and_refuses_flash(stablelm_checkpoint):
    loaded = load_model(stablelm_checkpoint, device="cpu", dtype="float32")
    choice = select_attention("auto", loaded.device, loaded.dtype, loaded.config)
    # CI and the README's set-up run where a C compiler is: the own kernel must build there.
    assert choice.name == "cpu", choice.reason
    assert select_attention("auto", loaded.device, torch.bfloat16, loaded.config).name == "sdpa"
    with pytest.raises(AttentionUnavailable, match="own CPU attention kernel.*CPUs"):
        select_attention("cpu", CUDA, torch.float32, loaded.config)
    with pytest.raises(AttentionUnavailable) as info:
        Engine(loaded, attention="flash")
    assert isinstance(info.value, GenerationError)
    with Engine(loaded) as engine:
        assert engine.attention.name == "cpu" and isinstance(loaded.model.attention, CpuDecodeAttention)
        assert len(engine.generate([7, 8, 9], max_new_tokens=3).token_ids) == 3
    loaded = load_model(stablelm_checkpoint, device="cpu", dtype="float32")
    with Engine(loaded, attention="sdpa") as engine:
        assert engine.attention.name == "sdpa" and loaded.model.attention is sdpa_attention


def test_without_a_compiler_the_cpu_falls_back_to_sdpa(monkeypatch, tmp_path, stablelm_checkpoint):
    monkeypatch.setenv("CC", "no-such-cc")
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.setenv("STABLELM_LSP_CACHE", str(tmp_path / "cache"))
    cpu_kernels.reset_for_tests()
    try:
        loaded = load_model(stablelm_checkpoint, device="cpu", dtype="float32")
        choice = select_attention("auto", loaded.device, loaded.dtype, loaded.config)
        assert choice.name == "sdpa" and "no C compiler" in choice.reason
        with pytest.raises(AttentionUnavailable, match="no C compiler"):
            select_attention("cpu", loaded.device, loaded.dtype, loaded.config)
    finally:
        cpu_kernels.reset_for_tests()


@pytest.mark.parametrize("threads", [1, 2])
def test_own_cpu_kernel_matches_sdpa(threads):
    kernel, problems = cpu_problems(torch.device("cpu"), torch.float32)
    assert kernel is not None, problems
    attention = CpuDecodeAttention(kernel)
    torch.set_num_threads(threads)
    g = torch.Generator().manual_seed(5)
    try:
        # MHA one query; GQA with a draft under a mask; head sizes on and off 16 lanes; a key
        # count that is not a multiple of the kernel's 64-key blocks; a row where a large score
        # comes late (the running maximum is rescaled)
        for heads, kv_heads, t, s, dim in [(12, 12, 1, 1500, 64), (8, 2, 5, 300, 80), (4, 4, 3, 37, 24),
                                           (6, 2, 16, 129, 16), (2, 1, 1, 200, 256)]:
            for dtype in (torch.float32, torch.float16):     # the cache's (Engine kv_dtype)
                cache_k = torch.randn(1, kv_heads, s + 40, dim, generator=g)
                cache_v = torch.randn(1, kv_heads, s + 40, dim, generator=g)
                cache_k[:, :, s - 1] *= 8
                key, value = cache_k[:, :, :s].to(dtype), cache_v[:, :, :s].to(dtype)
                q = torch.randn(1, t, heads, dim, generator=g).transpose(1, 2)     # not contiguous
                mask = None
                if t > 1:
                    mask = torch.rand(t, s, generator=g) > 0.4
                    mask[:, 0] = True
                attn = type("Attn", (), {"mask": mask, "is_causal": False})()
                want = torch.nn.functional.scaled_dot_product_attention(
                    q, key.float(), value.float(), attn_mask=mask, enable_gqa=heads != kv_heads)
                got = attention(q, key, value, 0, None, attn)
                torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-4)
                # SDPA's path reads such a cache in the queries' dtype
                torch.testing.assert_close(attend(q, key, value, mask, False), want, atol=2e-5, rtol=1e-4)
    finally:
        torch.set_num_threads(1)


def test_grouped_query_attention_folds_query_groups_instead_of_enable_gqa():
    """attend(): the H / K query heads of a kv head folded into the query rows give SDPA's
    enable_gqa results, with a mask (draft verification, rings, the captured step), for one
    query, and causal (a prefill from position 0)."""
    g = torch.Generator().manual_seed(3)
    for heads, kv_heads, t, s, masked, causal in [(8, 2, 5, 40, True, False), (6, 3, 1, 33, False, False),
                                                  (6, 3, 1, 33, True, False), (4, 1, 12, 12, False, True),
                                                  (4, 4, 4, 20, True, False)]:
        q = torch.randn(2, t, heads, 16, generator=g).transpose(1, 2)
        key, value = torch.randn(2, kv_heads, s, 16, generator=g), torch.randn(2, kv_heads, s, 16, generator=g)
        mask = None
        if masked:
            mask = torch.rand(t, s, generator=g) > 0.5
            mask[:, 0] = True
        want = torch.nn.functional.scaled_dot_product_attention(
            q, key, value, attn_mask=mask, is_causal=causal, enable_gqa=heads != kv_heads)
        torch.testing.assert_close(attend(q, key, value, mask, causal), want, atol=1e-5, rtol=1e-5)


def test_an_old_or_kernel_less_flash_attn_falls_back_with_the_reason(monkeypatch, stablelm_checkpoint):
    """flash_attn too old for paged caches, one whose CUDA extension does not load, and one whose
    kernels fail on this GPU (its self-check at load): auto runs SDPA and says why; asking for
    flash is an error naming the reason."""
    import sys
    import types

    from stablelm_lsp.inference import attention

    def fake_flash(version):
        module = types.ModuleType("flash_attn")
        module.__version__ = version
        module.flash_attn_func = module.flash_attn_with_kvcache = lambda *a, **k: None
        return module

    monkeypatch.setitem(sys.modules, "flash_attn", fake_flash("2.3.6"))
    assert "2.3.6 is too old" in attention.flash_package_problem()
    kernel_less = types.ModuleType("flash_attn")             # its CUDA extension did not load
    monkeypatch.setitem(sys.modules, "flash_attn", kernel_less)
    assert "does not load" in attention.flash_package_problem()
    monkeypatch.setitem(sys.modules, "flash_attn", None)      # not installed
    assert attention.flash_package_problem() is False
    monkeypatch.setitem(sys.modules, "flash_attn", fake_flash("2.8.3"))
    assert attention.flash_package_problem() is None
    assert attention._version_tuple("2.8.3.post1") == (2, 8, 3)

    config = load_model(stablelm_checkpoint, device="cpu", dtype="float32").config
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    monkeypatch.setattr(attention, "flash_self_check",
                        lambda device, dtype, cfg: "flash-attn failed its self-check (no kernel image)")
    config = dataclasses.replace(config, head_dim=64)   # a head size flash-attn takes
    choice = select_attention("auto", CUDA, torch.bfloat16, config)
    assert choice.name == "sdpa" and "no kernel image" in choice.reason
    with pytest.raises(AttentionUnavailable, match="no kernel image"):
        select_attention("flash", CUDA, torch.bfloat16, config)
    monkeypatch.setattr(attention, "flash_self_check", lambda device, dtype, cfg: None)
    assert select_attention("auto", CUDA, torch.bfloat16, config).name == "flash"


def test_engine_tokens_do_not_depend_on_the_attention_kernel(checkpoint_factory):
    """Decode steps, drafts and sliding-window rings through the own kernel give SDPA's tokens."""
    for variant in ("stablelm-2-12b", "starcoder2"):    # GQA + qk-norm; GQA + a wrapping ring
        path = checkpoint_factory(variant)
        prompt = random.Random(2).sample(range(7, 500), 60)
        results = {}
        for kernel in ("sdpa", "cpu"):
            with Engine(load_model(path, device="cpu", dtype="float32"), attention=kernel) as engine:
                first = engine.generate(prompt, max_new_tokens=40, key="doc")
                # the same document again: the previous completion is the draft
                again = engine.generate(prompt + first.token_ids[:3], max_new_tokens=30, key="doc")
                results[kernel] = (first.token_ids, again.token_ids, again.accepted_tokens > 0)
        assert results["cpu"] == results["sdpa"], variant
        assert results["cpu"][2], "the second request verified no draft"


def test_a_float16_kv_cache(checkpoint_factory):
    """kv_dtype: "auto" keeps float32 models' cache in float32 (exact) and int8 ones' in float16
    on a CPU; a float16 cache holds half the bytes, the own kernel and SDPA read it alike (the
    same tokens, drafts and a wrapping ring included), and its logits stay near the float32
    cache's; another dtype than the model's is refused off the CPU."""
    from stablelm_lsp.inference.engine import kv_cache_dtype
    from stablelm_lsp.inference.errors import InvalidParameter

    cpu = torch.device("cpu")
    assert kv_cache_dtype("auto", cpu, torch.float32, int8=False) == torch.float32
    assert kv_cache_dtype("auto", cpu, torch.float32, int8=True) == torch.float16
    assert kv_cache_dtype("auto", CUDA, torch.bfloat16, int8=True) == torch.bfloat16
    assert kv_cache_dtype("bfloat16", CUDA, torch.bfloat16, int8=False) == torch.bfloat16
    with pytest.raises(InvalidParameter, match="is for CPUs"):
        kv_cache_dtype("float16", CUDA, torch.bfloat16, int8=False)
    with pytest.raises(InvalidParameter, match="unknown KV cache dtype"):
        kv_cache_dtype("int4", cpu, torch.float32, int8=False)
    for variant in ("stablelm-2-12b", "starcoder2"):    # GQA; GQA + a wrapping ring
        path = checkpoint_factory(variant)
        prompt = random.Random(2).sample(range(7, 500), 60)
        results, held = {}, {}
        for kernel in ("sdpa", "cpu"):
            for kv in ("float32", "float16"):
                with Engine(load_model(path, device="cpu", dtype="float32"), attention=kernel,
                            kv_dtype=kv) as engine:
                    first = engine.generate(prompt, max_new_tokens=40, key="doc")
                    again = engine.generate(prompt + first.token_ids[:3], max_new_tokens=30, key="doc")
                    results[kernel, kv] = (first.token_ids, again.token_ids)
                    slots = engine.prefix_cache.slots
                    assert slots and all(slot.cache.k.dtype == getattr(torch, kv) for slot in slots)
                    held[kv] = sum(slot.cache.nbytes for slot in slots) / sum(
                        slot.cache.capacity for slot in slots)
        assert results["cpu", "float16"] == results["sdpa", "float16"], variant
        assert results["cpu", "float32"] == results["sdpa", "float32"], variant
        assert held["float16"] == held["float32"] / 2
        model = load_model(path, device="cpu", dtype="float32").model
        ids = torch.tensor([prompt])
        logits = {}
        for kv in (torch.float32, torch.float16):
            cache = model.new_cache(80, dtype=kv)
            model(ids[:, :50], cache)
            logits[kv] = model(ids[:, 50:], cache)
        err = (logits[torch.float16] - logits[torch.float32]).abs().max() / logits[torch.float32].abs().max()
        assert 0 < err < 1e-2, (variant, err)


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


@pytest.mark.cuda
@needs_flash
def test_flash_reads_a_ring_of_several_pages_in_bfloat16(checkpoint_factory):
    """A window of 300 makes a ring of two 256-position pages; 1200 tokens wrap it three times,
    chunked prefill and decode steps in bf16, through the engine: SDPA's tokens (up to a late
    near-tie) and the same reuse."""
    path = checkpoint_factory("starcoder2", sliding_window=300, max_position_embeddings=2048)
    loaded = load_model(path, device="cuda", dtype="bfloat16")
    model, cfg = loaded.model, loaded.config
    capacity = ring_capacity(cfg.sliding_window, 64, "flash")
    assert capacity == 2 * FLASH_PAGE
    from stablelm_lsp.inference.attention import FlashAttention

    ids = torch.randint(7, cfg.vocab_size, (1, 1200), generator=torch.Generator().manual_seed(1)).cuda()
    logits = {}
    for name, kernel in (("sdpa", sdpa_attention), ("flash", FlashAttention(cfg))):
        model.attention = kernel
        cache = model.new_cache(capacity)
        out = [model(chunk, cache) for chunk in ids[:, :1152].split(64, dim=1)]
        out += [model(ids[:, t:t + 1], cache) for t in range(1152, 1200)]
        logits[name] = torch.cat(out, dim=1)
    model.attention = sdpa_attention
    torch.testing.assert_close(logits["flash"], logits["sdpa"], atol=5e-2, rtol=5e-2)
    rng = random.Random(4)
    prompt = [rng.randrange(7, cfg.vocab_size) for _ in range(1100)]
    results = {}
    for kernel in ("sdpa", "flash"):
        with Engine(loaded, attention=kernel, prefill_chunk=64) as engine:
            engine.generate(prompt[:900], max_new_tokens=4)
            results[kernel] = engine.generate(prompt, max_new_tokens=16)
    assert results["flash"].reused_tokens == results["sdpa"].reused_tokens
    assert results["flash"].token_ids[:8] == results["sdpa"].token_ids[:8]
