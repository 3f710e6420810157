"""Benchmark (not a test): where a decode step's time goes, for whoever speeds it up next.

On the 160M StableLM-style checkpoint of bench/load_bench.py (built here unless --model names
one), with 1500 cached positions, the model is called directly (no engine, no sampling) one token
at a time, for float32 and int8 weights with the engine's own kernel choice and KV cache dtype:

- step: milliseconds per decode step, the best of three runs of 20 steps;
- glue: the same with every linear layer and the own attention kernel replaced by no-ops of the
  same shapes (what Python and torch's small ops cost between the kernels);
- kernels: step minus glue.

Then the own decode-attention kernel alone over 12 layers x 12 heads x 1500 keys x 64 with a
float32 and a float16 cache: milliseconds and the bytes read per second (compare with the copy
bandwidth engine_bench prints). Prints the CPU model first.

    python bench/step_bench.py [--threads 1] [--model DIR]
"""
from __future__ import annotations

import argparse
import dataclasses
import random
import tempfile
import time
from pathlib import Path

import torch

from linear_bench import cpu_model  # bench/ is on sys.path when run as a script
from load_bench import build as build_stablelm_160m

CONTEXT = 1500


def step_times(path: Path, dtype: str) -> dict:
    from stablelm_lsp.inference import attention as A
    from stablelm_lsp.inference import linear as L
    from stablelm_lsp.inference.engine import Engine
    from stablelm_lsp.models import load_model

    loaded = load_model(path, device="cpu", dtype=dtype)
    engine = Engine(dataclasses.replace(loaded, tokenizer=None), draft_tokens=0)
    model = engine.model
    ids = [random.Random(0).randrange(7, loaded.config.vocab_size) for _ in range(CONTEXT)]
    cache = model.new_cache(CONTEXT + 8, dtype=engine.kv_dtype)
    with torch.inference_mode():
        for i in range(0, CONTEXT, 256):
            model(torch.tensor([ids[i:i + 256]]), cache, last_only=True)

        def best() -> float:
            runs = []
            for _ in range(3):
                t0 = time.perf_counter()
                for j in range(20):
                    model(torch.tensor([[ids[j]]]), cache, last_only=True)
                    cache.truncate(CONTEXT)
                runs.append((time.perf_counter() - t0) / 20)
            return min(runs)

        best()
        step = best()
        forward, run_own = L.KernelLinear.forward, A.CpuDecodeAttention.run_own
        L.KernelLinear.forward = lambda self, x: x.new_zeros(*x.shape[:-1], self.out_features)
        A.CpuDecodeAttention.run_own = lambda self, q, key, value, mask: torch.empty_like(q)
        try:
            glue = best()
        finally:
            L.KernelLinear.forward, A.CpuDecodeAttention.run_own = forward, run_own
    engine.close()
    return {"step_ms": step * 1e3, "glue_ms": glue * 1e3, "kv_dtype": str(engine.kv_dtype)}


def attention_times() -> dict:
    from stablelm_lsp.inference.cpu_kernels import kernel_for

    kernel, why = kernel_for("decode_attention", "the own attention kernel", torch.device("cpu"),
                             torch.float32)
    if kernel is None:
        return {"skipped": "; ".join(why)}
    layers, heads, s, d = 12, 12, CONTEXT, 64
    out = {}
    for dtype in (torch.float32, torch.float16):
        ks = [torch.randn(1, heads, s + 8, d).to(dtype) for _ in range(layers)]
        vs = [torch.randn(1, heads, s + 8, d).to(dtype) for _ in range(layers)]
        q = torch.randn(1, heads, 1, d)
        o = torch.empty_like(q)
        best = float("inf")
        for _ in range(15):
            t0 = time.perf_counter()
            for k, v in zip(ks, vs):
                k, v = k[:, :, :s], v[:, :, :s]
                kernel(q, k, v, None, o, heads, heads, 1, s, d, k.stride(1), d ** -0.5)
            best = min(best, time.perf_counter() - t0)
        nbytes = 2 * layers * heads * s * d * ks[0].element_size()
        out[str(dtype).removeprefix("torch.")] = {"ms": best * 1e3, "gbps": nbytes / best / 1e9}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--model", type=Path, default=None, help="a checkpoint folder (default: built here)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    print(f"{cpu_model()}, {args.threads} thread{'s' if args.threads > 1 else ''}")
    with tempfile.TemporaryDirectory() as tmp:
        path = args.model or build_stablelm_160m(Path(tmp) / "stablelm-160m")
        print(f"decode step at {CONTEXT} cached positions (the model called directly)")
        for dtype in ("float32", "int8"):
            r = step_times(path, dtype)
            print(f"  {dtype:<8} step {r['step_ms']:6.2f} ms   kernels {r['step_ms'] - r['glue_ms']:6.2f} ms   "
                  f"glue {r['glue_ms']:5.2f} ms ({r['glue_ms'] / r['step_ms']:.0%})   KV cache "
                  f"{r['kv_dtype'].removeprefix('torch.')}")
    att = attention_times()
    print(f"own attention kernel, 12 layers x 12 heads x {CONTEXT} keys x 64, one query")
    for name, r in att.items():
        print(f"  {name:<8} {r}" if name == "skipped" else
              f"  {name:<8} {r['ms']:6.2f} ms   {r['gbps']:5.1f} GB/s read")


if __name__ == "__main__":
    main()
