"""Benchmark (not a test): every linear-layer implementation (inference/linear.py) on decode-sized
passes, float32 and int8 weights.

For passes of M positions through a stack of distinct layers too large for the caches (as a
decode step meets them), the time per layer of each implementation that runs here: for float32
weights the own kernel ("rows"), F.linear ("torch"), oneDNN on the plain weights and on packed
ones; for int8 weights (per-row scales) the own int8 kernel, torch's `_weight_int8pack_mm` and
"widen" (dequantize per pass, then F.linear); with the weight bytes read per second, and the
machine's plain read bandwidth (a large tensor sum) as the ceiling. Everything in one run; the
CPU model is printed first.

    python bench/linear_bench.py [--threads N] [--out 2048] [--in 768] [--layers 100]
"""
from __future__ import annotations

import argparse
import json
import platform
import time

import torch


def cpu_model() -> str:
    """The CPU's name with its family, model and vector extensions: a VM often shows only a
    generic name ("AMD EPYC"), and the generation decides which kernel wins."""
    fields: dict[str, str] = {}
    try:
        for line in open("/proc/cpuinfo"):
            key, _, value = line.partition(":")
            key = key.strip()
            if not line.strip():
                break               # the first processor is enough
            fields.setdefault(key, value.strip())
    except OSError:
        pass
    name = fields.get("model name") or platform.processor() or platform.machine()
    if "cpu family" not in fields:
        return name
    flags = set(fields.get("flags", "").split())
    vector = ", ".join(f for f in ("avx2", "fma", "avx512f", "avx512_vnni", "amx_tile") if f in flags)
    return f"{name} (family {fields['cpu family']} model {fields.get('model', '?')}; {vector or 'no AVX2'})"


def _per_call(fn, calls: int, repeats: int = 3) -> float:
    fn()
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best / calls


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--out", type=int, default=2048)
    ap.add_argument("--in", dest="in_", type=int, default=768)
    ap.add_argument("--layers", type=int, default=100)
    ap.add_argument("--positions", default="1,2,4,8,9,12,16,17,64,256")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    from stablelm_lsp.inference.linear import KernelLinear, candidates, forced_table
    from stablelm_lsp.models.quantize import quantize_rows

    cpu = torch.device("cpu")
    g = torch.Generator().manual_seed(0)
    floats = [torch.randn(args.out, args.in_, generator=g) for _ in range(args.layers)]
    int8s = []
    for w in floats:
        q, scale = torch.empty(w.shape, dtype=torch.int8), torch.empty(w.shape[0])
        quantize_rows(w, q, scale)
        int8s.append((q, scale))
    big = torch.ones(1 << 28)
    read = big.nbytes / _per_call(lambda: big.sum(), 1)
    del big

    stacks = {}     # "float32 rows" -> (layers, weight bytes per layer)
    for int8 in (False, True):
        found = candidates(cpu, torch.float32, int8)
        for impl in found.impls:
            layers = [KernelLinear(q, None, s) for q, s in int8s] if int8 else \
                [KernelLinear(w, None) for w in floats]
            for layer in layers:
                layer.table = forced_table(impl, found.fallback)
                if impl.packed:
                    layer.pack()
            stacks[f"{'int8' if int8 else 'float32'} {impl.name}"] = (
                layers, args.out * args.in_ * (1 if int8 else 4), impl.max_m)

    print(f"CPU: {cpu_model()}; {torch.get_num_threads()} threads; read bandwidth (sum) "
          f"{read / 1e9:.1f} GB/s")
    print(f"{args.layers} layers of {args.out}x{args.in_}; microseconds per layer (GB/s of weights read)")
    names = list(stacks)
    print(f"{'positions':>9}  " + "  ".join(f"{n:>20}" for n in names))
    rows = []
    with torch.inference_mode():
        for m in (int(v) for v in args.positions.split(",")):
            x = torch.randn(1, m, args.in_, generator=g)
            times = {n: _per_call(lambda ls=layers: [f(x) for f in ls], len(layers))
                     for n, (layers, _, max_m) in stacks.items() if max_m is None or m <= max_m}
            print(f"{m:>9}  " + "  ".join(
                f"{times[n] * 1e6:>9.1f} ({stacks[n][1] / times[n] / 1e9:>5.1f})" + " " * 3 if n in times
                else f"{'-':>20}" for n in names))
            rows.append({"positions": m, **{n: round(t * 1e6, 1) for n, t in times.items()}})
    print(json.dumps({"bench": "linear", "cpu": cpu_model(), "threads": torch.get_num_threads(),
                      "read_gbps": round(read / 1e9, 2), "us_per_layer": rows}))


if __name__ == "__main__":
    main()
