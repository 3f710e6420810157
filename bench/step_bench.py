"""Benchmark (not a test): where a decode step's time goes, for whoever speeds it up next.

On the 160M StableLM-style checkpoint of bench/load_bench.py (built here unless --model names
one), with 1500 cached positions, the model is called directly (no engine, no sampling) for
passes of 1 position (a decode step) and 4 (a draft verification), for float32 and int8 weights
with the engine's own kernel choice and KV cache dtype, two ways through the layers:

- native: every layer in one C call (inference/native_layers.py; where the engine's plan runs
  that pass length natively, else the blocks);
- blocks: the decoder's blocks, torch's small ops between the kernels (native_layers=False);

each the best of three runs of 20 passes, in milliseconds; and "glue": what a pass costs each
way besides its kernels (the whole model with kernels that do nothing: native_layers.measure_glue).

Then the own decode-attention kernel alone over 12 layers x 12 heads x 1500 keys x 64 with a
float32 and a float16 cache, for 1 and 4 queries: milliseconds and, for one query, the bytes
read per second (compare with the copy bandwidth engine_bench prints). Prints the CPU model
first.

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
LENGTHS = (1, 4)


def step_times(path: Path, dtype: str, native: bool) -> dict:
    from stablelm_lsp.inference import cpu_kernels
    from stablelm_lsp.inference.engine import Engine
    from stablelm_lsp.inference.native_layers import measure_glue
    from stablelm_lsp.models import load_model

    loaded = load_model(path, device="cpu", dtype=dtype)
    engine = Engine(dataclasses.replace(loaded, tokenizer=None), draft_tokens=0, native_layers=native)
    model = engine.model
    ids = [random.Random(0).randrange(7, loaded.config.vocab_size) for _ in range(CONTEXT + 16)]
    cache = model.new_cache(CONTEXT + 16, dtype=engine.kv_dtype, zeroed=False)
    out = {"kv_dtype": str(engine.kv_dtype).removeprefix("torch."),
           "native_lengths": engine.native_layers.lengths if engine.native_layers else []}
    with torch.inference_mode():
        for i in range(0, CONTEXT, 256):
            model(torch.tensor([ids[i:min(i + 256, CONTEXT)]]), cache, last_only=True)

        def best(m: int) -> float:
            runs = []
            for _ in range(3):
                t0 = time.perf_counter()
                for j in range(20):
                    model(torch.tensor([ids[CONTEXT:CONTEXT + m]]), cache, last_only=True)
                    cache.truncate(CONTEXT)
                runs.append((time.perf_counter() - t0) / 20)
            return min(runs) * 1e3

        for m in LENGTHS:
            best(m)
            out[m] = best(m)
        kernel = cpu_kernels.load_decode_layers()
        if not isinstance(kernel, str):
            glue = measure_glue(model, kernel, (1,), kv_dtype=engine.kv_dtype, repeats=10)
            out["glue_ms"] = glue["native" if native and 1 in out["native_lengths"] else "blocks"][1] / 1e3
    engine.close()
    return out


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
        for t in LENGTHS:
            q = torch.randn(1, heads, t, d)
            o = torch.empty_like(q)
            mask = (torch.arange(s)[None, :] <= torch.arange(s - t, s)[:, None]).view(torch.uint8)
            best = float("inf")
            for _ in range(15):
                t0 = time.perf_counter()
                for k, v in zip(ks, vs):
                    k, v = k[:, :, :s], v[:, :, :s]
                    kernel(q, k, v, None if t == 1 else mask, o, heads, heads, t, s, d, k.stride(1), d ** -0.5)
                best = min(best, time.perf_counter() - t0)
            nbytes = 2 * layers * heads * s * d * ks[0].element_size()
            out[(str(dtype).removeprefix("torch."), t)] = {"ms": best * 1e3, "gbps": nbytes / best / 1e9}
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
        print(f"passes after {CONTEXT} cached positions (the model called directly), ms")
        print(f"  {'weights':<8} {'way':<7} " + " ".join(f"{m:>2} pos." for m in LENGTHS)
              + "   glue (1 pos.)   KV cache   native pass lengths")
        for dtype in ("float32", "int8"):
            results = {}
            for native in (True, False):
                r = results[native] = step_times(path, dtype, native)
                glue = f"{r['glue_ms']:6.2f}" if "glue_ms" in r else "     -"
                print(f"  {dtype:<8} {'native' if native else 'blocks':<7} "
                      + " ".join(f"{r[m]:6.2f}" for m in LENGTHS)
                      + f"   {glue}          {r['kv_dtype']:<10} {r['native_lengths'] or '-'}")
            print(f"  {dtype:<8} native / blocks: "
                  + ", ".join(f"{m} pos. {results[True][m] / results[False][m]:.3f}" for m in LENGTHS))
    att = attention_times()
    print(f"own attention kernel, 12 layers x 12 heads x {CONTEXT} keys x 64")
    for key, r in att.items():
        if key == "skipped":
            print(f"  skipped: {r}")
            continue
        dtype, t = key
        rate = f"   {r['gbps']:5.1f} GB/s read" if t == 1 else ""
        print(f"  {dtype:<8} {t} quer{'y' if t == 1 else 'ies'}  {r['ms']:6.2f} ms{rate}")


if __name__ == "__main__":
    main()
