"""Benchmark (not a test): weights and KV cache on 2 MiB pages (models/pages.py) against 4 KiB ones.

Two engines on the same checkpoint, one loaded as the server loads it (its weights and KV caches
advised onto transparent huge pages), one with the advice switched off; in rounds, each round
running both in turn (the order alternating): decode at 1500 tokens of context (one pass per
token, no drafts) and one pass of the own float32 rows kernel over every weight matrix but the
input embedding. Prints the CPU model, how much of each model is on huge pages, the medians and
the paired ratio (the median of the per-round ratios).

    python bench/pages_bench.py [--threads N] [--model PATH] [--rounds 12] [--dtype float32|int8]

Without --model, the random 160M StableLM-style checkpoint of load_bench.py is built in a
temporary folder.
"""
from __future__ import annotations

import argparse
import dataclasses
import statistics
import tempfile
import time
from pathlib import Path

import torch

from linear_bench import cpu_model  # bench/ is on sys.path when run as a script
from load_bench import build as build_stablelm_160m

PROMPT_TOKENS, STEPS = 1500, 33


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--model", type=Path, default=None)
    ap.add_argument("--rounds", type=int, default=12)
    ap.add_argument("--dtype", default="float32", choices=["float32", "int8"])
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        path = args.model or build_stablelm_160m(Path(tmp) / "stablelm-160m")
        run(path, args)


def run(path: Path, args) -> None:
    from stablelm_lsp.inference import cpu_kernels
    from stablelm_lsp.inference.engine import Engine
    from stablelm_lsp.models import checkpoint, decoder, load_model, pages

    g = torch.Generator().manual_seed(2)
    engines, models, covered = {}, {}, {}
    for huge in (True, False):
        if not huge:    # the advice off for what is allocated from here on
            checkpoint.advise_huge_pages = decoder.advise_huge_pages = lambda t: False
        loaded = load_model(path, device="cpu", dtype=args.dtype)
        prompt = torch.randint(7, loaded.config.vocab_size, (PROMPT_TOKENS,), generator=g).tolist()
        engine = Engine(dataclasses.replace(loaded, tokenizer=None), draft_tokens=0)
        engine.generate(prompt, max_new_tokens=1, key="decode")     # the KV cache, allocated
        engines[huge], models[huge] = engine, loaded.model
        weights = [p for p in loaded.model.parameters() if p.nbytes >= pages.HUGE_PAGE]
        covered[huge] = sum(min(pages.huge_page_bytes(p) or 0, p.nbytes) for p in weights) / \
            sum(p.nbytes for p in weights)

    rows = cpu_kernels.load_rows_linear()
    float_weights = args.dtype == "float32" and not isinstance(rows, str)

    def read_weights(model) -> None:
        for p in model.parameters():
            if p.dim() == 2 and p is not model.embed.weight:
                n, k = p.shape
                rows(torch.ones(1, k), p, None, None, torch.empty(1, n), 1, n, k)

    decode, weights = {True: [], False: []}, {True: [], False: []}
    for r in range(args.rounds):
        for huge in (False, True) if r % 2 == 0 else (True, False):
            result = engines[huge].generate(prompt, max_new_tokens=STEPS, key="decode")
            decode[huge].append(result.elapsed_s / STEPS)
            if float_weights:
                t0 = time.perf_counter()
                read_weights(models[huge])
                weights[huge].append(time.perf_counter() - t0)
    for engine in engines.values():
        engine.close()

    print(f"{cpu_model()}, {torch.get_num_threads()} thread(s), {args.dtype}; tensors of 2 MiB or "
          f"more on huge pages: {covered[True]:.0%} advised, {covered[False]:.0%} not")
    for name, times in (("decode per token", decode), ("rows kernel over the weights", weights)):
        if not times[True]:
            continue
        huge, small = statistics.median(times[True]), statistics.median(times[False])
        paired = statistics.median(a / b for a, b in zip(times[True], times[False]))
        print(f"  {name:<30} huge pages {huge * 1e3:7.2f} ms   4 KiB pages {small * 1e3:7.2f} ms   "
              f"paired ratio {paired:.3f} ({args.rounds} rounds)")


if __name__ == "__main__":
    main()
