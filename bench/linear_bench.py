"""Benchmark (not a test): the CPU linear kernels (inference/linear.py) on decode-sized passes.

For passes of M positions through a stack of distinct float32 layers too large for the caches
(as a decode step meets them), the time per layer of torch's F.linear, of oneDNN on packed
weights and of the "rows" layers (the project's own kernel up to 16 positions, oneDNN on the
plain weights beyond), with the weight bytes read per second; and the machine's plain read
bandwidth (a large tensor sum) as the ceiling. Everything is measured in the same run.

    python bench/linear_bench.py [--threads N] [--out 2048] [--in 768] [--layers 100]
"""
from __future__ import annotations

import argparse
import json
import time

import torch
import torch.nn.functional as F


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

    from stablelm_lsp.inference.cpu_kernels import load_rows_linear
    from stablelm_lsp.inference.linear import ROWS_MAX_M, PackedLinear, RowsLinear, onednn_problems

    g = torch.Generator().manual_seed(0)
    weights = [torch.randn(args.out, args.in_, generator=g) for _ in range(args.layers)]
    nbytes = weights[0].nbytes
    big = torch.ones(1 << 28)
    read = big.nbytes / _per_call(lambda: big.sum(), 1)
    del big
    kernels = {"F.linear": [lambda x, w=w: F.linear(x, w) for w in weights]}
    onednn = not onednn_problems(torch.device("cpu"), torch.float32)
    if onednn:
        kernels["oneDNN packed"] = [PackedLinear(w, None) for w in weights]
    own = load_rows_linear()
    if isinstance(own, str):
        print(f"own kernel unavailable: {own}")
    else:
        # as the engine installs it: the own kernel up to ROWS_MAX_M positions, then oneDNN on
        # the plain weight (or F.linear without oneDNN)
        kernels["rows (as installed)"] = [RowsLinear(w, None, own, ROWS_MAX_M, onednn) for w in weights]

    print(f"{args.layers} layers of {args.out}x{args.in_} float32 ({nbytes / 2**20:.1f} MiB each), "
          f"{torch.get_num_threads()} threads; read bandwidth (sum) {read / 1e9:.1f} GB/s")
    names = list(kernels)
    print(f"{'positions':>9}  " + "  ".join(f"{n:>22}" for n in names))
    rows = []
    with torch.inference_mode():
        for m in (int(v) for v in args.positions.split(",")):
            x = torch.randn(1, m, args.in_, generator=g)
            times = {n: _per_call(lambda fs=fs: [f(x) for f in fs], len(fs)) for n, fs in kernels.items()}
            print(f"{m:>9}  " + "  ".join(f"{times[n] * 1e6:>9.1f} us {nbytes / times[n] / 1e9:>5.1f} GB/s"
                                          for n in names))
            rows.append({"positions": m, **{n: round(t * 1e6, 1) for n, t in times.items()}})
    print(json.dumps({"bench": "linear", "threads": torch.get_num_threads(),
                      "read_gbps": round(read / 1e9, 2), "us_per_layer": rows}))


if __name__ == "__main__":
    main()
