"""The decoder against transformers' reference implementation, for all six variants (float32)."""
from __future__ import annotations

import pytest
import torch

from stablelm_lsp.models import KVCache, load_model

transformers = pytest.importorskip("transformers")


def reference(path):
    model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    return model


def prompt_ids(loaded, n: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(1, loaded.config.vocab_size, (1, n), generator=g)


def greedy(loaded, ids: torch.Tensor, steps: int, capacity: int | None = None) -> list[int]:
    cache = loaded.model.new_cache(capacity or ids.shape[1] + steps)
    logits = loaded.model(ids, cache, last_only=True)
    out = []
    for _ in range(steps):
        nxt = int(logits[0, -1].argmax())
        out.append(nxt)
        logits = loaded.model(torch.tensor([[nxt]]), cache, last_only=True)
    return out


def test_full_forward_logits_match_transformers(any_checkpoint):
    variant, path = any_checkpoint
    loaded = load_model(path, device="cpu", dtype="float32")
    ids = prompt_ids(loaded, 48)  # longer than the StarCoder2 variants' window of 16
    with torch.no_grad():
        expected = reference(path)(ids).logits
    got = loaded.model(ids)
    assert got.shape == expected.shape
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)


def test_prefill_then_decode_equals_full_forward(any_checkpoint):
    variant, path = any_checkpoint
    loaded = load_model(path, device="cpu", dtype="float32")
    ids = prompt_ids(loaded, 48, seed=1)
    full = loaded.model(ids)
    # capacity 20 makes the StarCoder2 ring (window 16) wrap twice; linear caches just fit
    cache = loaded.model.new_cache(20 if loaded.config.sliding_window else 48)
    steps = [loaded.model(ids[:, :24], cache)]
    for t in range(24, 48):
        steps.append(loaded.model(ids[:, t: t + 1], cache))
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=1e-5, rtol=1e-5)
    assert cache.length == 48
    if loaded.config.sliding_window:
        assert cache.capacity == 20  # memory stayed bounded by the window


def test_64_greedy_tokens_match_transformers_generate(any_checkpoint):
    variant, path = any_checkpoint
    loaded = load_model(path, device="cpu", dtype="float32")
    ids = prompt_ids(loaded, 12, seed=2)
    with torch.no_grad():
        expected = reference(path).generate(ids, max_new_tokens=64, do_sample=False)[0, 12:].tolist()
    cap = 24 if loaded.config.sliding_window else None
    assert greedy(loaded, ids, 64, capacity=cap) == expected


def test_ring_cache_truncate_rules(starcoder2_checkpoint):
    loaded = load_model(starcoder2_checkpoint, device="cpu")
    cache: KVCache = loaded.model.new_cache(20)  # window 16
    loaded.model(prompt_ids(loaded, 40), cache)
    assert cache.oldest_position == 20
    assert cache.can_truncate(40) and cache.can_truncate(35)   # needs keys from 20 (resp. 20)
    assert not cache.can_truncate(34)                           # would need key 19, overwritten
    cache.truncate(36)
    assert cache.length == 36 and int((cache.positions >= 36).sum()) == 0


@pytest.mark.parametrize("device", [
    "cpu", pytest.param("cuda", marks=[pytest.mark.cuda, pytest.mark.skipif(
        not torch.cuda.is_available(), reason="needs CUDA")])])
def test_bfloat16_matches_transformers_bfloat16(any_checkpoint, device):
    """Half precision: same rounding points as the reference, so close to its bf16 logits."""
    variant, path = any_checkpoint
    loaded = load_model(path, device=device, dtype="bfloat16")
    assert loaded.model.embed.weight.dtype == torch.bfloat16
    ids = prompt_ids(loaded, 32).to(device)
    ref = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16).to(device).eval()
    with torch.no_grad():
        expected = ref(ids).logits.float()
    got = loaded.model(ids)
    assert (got - expected).abs().max() <= 0.05 * expected.abs().max()
    assert (got.argmax(-1) == expected.argmax(-1)).float().mean() >= 0.9


def test_auto_dtype_is_float32_on_cpu(stablelm_checkpoint):
    loaded = load_model(stablelm_checkpoint)
    assert loaded.device.type == ("cuda" if torch.cuda.is_available() else "cpu")
    if loaded.device.type == "cpu":
        assert loaded.dtype == torch.float32


def _thp_mode() -> str | None:
    """The kernel's transparent huge page mode (always / madvise / never), None off Linux."""
    try:
        text = open("/sys/kernel/mm/transparent_hugepage/enabled").read()
    except OSError:
        return None
    return text.split("[", 1)[1].split("]", 1)[0]


def test_weights_and_kv_caches_are_asked_onto_huge_pages(stablelm_checkpoint, monkeypatch):
    from stablelm_lsp.models import checkpoint, decoder, pages

    if _thp_mode() in (None, "never"):
        pytest.skip(f"no transparent huge pages here (mode: {_thp_mode()})")
    assert not pages.advise_huge_pages(torch.empty(1000))     # smaller than one huge page
    # above glibc's largest mmap threshold (32 MiB): fresh pages, never a reused part of the heap
    # (pages already faulted in stay small: with a smaller tensor the suite's earlier tests
    # decide whether the advice can take effect)
    big = torch.empty(64 << 20, dtype=torch.uint8)
    assert pages.advise_huge_pages(big)
    assert pages.advised(big) and not pages.advised(torch.empty(64 << 20, dtype=torch.uint8))
    big.fill_(1)                        # faulted in after the advice: huge pages where the kernel
    assert pages.huge_page_bytes(big) >= 0    # finds free ones (fragmentation may leave none)
    # the loader advises every parameter before writing it, the cache its keys and values
    advised = []
    real = pages.advise_huge_pages
    monkeypatch.setattr(checkpoint, "advise_huge_pages", lambda t: advised.append(t) or real(t))
    loaded = load_model(stablelm_checkpoint, device="cpu", dtype="float32")
    assert {id(p) for p in loaded.model.parameters()} <= {id(t) for t in advised}
    reference = load_model(stablelm_checkpoint, device="cpu", dtype="float32")
    for a, b in zip(loaded.model.parameters(), reference.model.parameters()):
        assert torch.equal(a, b)
    cached = []
    monkeypatch.setattr(decoder, "advise_huge_pages", lambda t: cached.append(t) or real(t))
    cache = loaded.model.new_cache(64)
    assert [id(t) for t in cached] == [id(cache.k), id(cache.v)]
    assert not cache.k.any() and not cache.v.any()             # still zeroed after the advice
