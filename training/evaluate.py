"""Evaluate a completion checkpoint on the held-out stdlib files (the split train_builtin.py uses).

Two measurements, with baselines computed in the same run:

1. Held-out perplexity: token-level cross-entropy of the model over every held-out file (plain
   text, windows of the model's context length), reported as perplexity and bits per character.
2. Single-line infilling: hide one non-empty line of a held-out file and build the prompt exactly
   as the language server does (`lsp.completion.Completer`: prefix, suffix, `<fim_middle>` + the
   cursor line's text), complete greedily up to the newline and compare with the hidden line,
   both stripped. Two cursor positions per line: at the line start (after the indentation, where
   an editor's auto-indent leaves it) and mid-line (the first half of its text typed). Reported
   raw (the model's first line) and after the server's post-processing, with exact match and
   difflib similarity; with token healing as the server does it, without, or both
   (`--token-healing`). Baselines: the nearest non-empty line above, the one below, and the most
   frequent line of the training files that starts with the typed text; a baseline line that
   contradicts the typed text adds nothing to it.

Prints a table to stdout, then one JSON line with every number.

    python training/evaluate.py                       # the built-in model, 300 cases
    python training/evaluate.py --token-healing both  # with and without healing, same cases
    python training/evaluate.py --model /path/to/checkpoint --cases 100 --ppl-max-tokens 50000
"""
from __future__ import annotations

import argparse
import bisect
import dataclasses
import difflib
import json
import math
import random
import sys
import time
from collections import Counter
from pathlib import Path

import torch

from train_builtin import collect_sources, split_sources, stdlib_root


SETTINGS = ("line start", "mid-line")


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--model", default=None, help="checkpoint folder or Hub id (default: the built-in model)")
    ap.add_argument("--data-root", type=Path, default=None, help="source tree (default: the stdlib)")
    ap.add_argument("--held-out", type=float, default=0.05, help="held-out fraction used in training")
    ap.add_argument("--max-files", type=int, default=None, help="use only the first N files (tests)")
    ap.add_argument("--cases", type=int, default=300, help="single-line infilling cases")
    ap.add_argument("--seed", type=int, default=0, help="draws the infilling cases")
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--context-tokens", type=int, default=1536,
                    help="prompt budget (clamped to the model's positions, as in the server)")
    ap.add_argument("--token-healing", choices=["on", "off", "both"], default="on",
                    help="complete with token healing (as the server does), without, or both ways")
    ap.add_argument("--template", default=None,
                    help="prompt template, as the server's `template` setting (default: the model's FIM layout)")
    ap.add_argument("--ppl-max-tokens", type=int, default=None,
                    help="stop the perplexity pass after this many tokens (default: all held-out files)")
    ap.add_argument("--time-limit-s", type=float, default=None,
                    help="stop drawing infilling cases after this long (reports how many ran)")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--dump", type=Path, default=None,
                    help="write every case (file, line, setting, target, each method's line) as JSON lines")
    return ap.parse_args(argv)


@torch.no_grad()
def held_out_perplexity(loaded, files: list[tuple[str, str]], max_tokens: int | None) -> dict:
    """Cross-entropy of each file's text + eos, in consecutive windows of max_positions tokens
    (each window starts fresh, so every token is predicted with 0..max_positions-1 tokens of
    context, as in training)."""
    model, tok = loaded.model, loaded.tokenizer
    window = loaded.config.max_positions
    nll, tokens, chars = 0.0, 0, 0
    for _, text in files:
        ids = tok.encode(text, parse_special=False) + [tok.eos_ids[0]]
        if max_tokens is not None:
            ids = ids[: max_tokens - tokens + 1]       # n + 1 ids give n predictions
        for start in range(0, len(ids) - 1, window):
            piece = torch.tensor([ids[start:start + window + 1]], device=loaded.device)
            logits = model(piece[:, :-1])                        # [1, T, V] float32
            nll += torch.nn.functional.cross_entropy(logits[0], piece[0, 1:], reduction="sum").item()
            tokens += piece.shape[1] - 1
        chars += len(tok.decode(ids))
        if max_tokens is not None and tokens >= max_tokens:
            break
    return {"tokens": tokens, "loss": nll / tokens, "perplexity": math.exp(nll / tokens),
            "bits_per_char": nll / math.log(2) / chars}


def draw_cases(files: list[tuple[str, str]], n: int, seed: int) -> list[tuple[int, int]]:
    """(file index, line index) of n distinct non-empty lines, uniformly over all held-out lines."""
    eligible = [(f, i) for f, (_, text) in enumerate(files)
                for i, line in enumerate(text.splitlines()) if line.strip()]
    return sorted(random.Random(seed).sample(eligible, min(n, len(eligible))))


def nearest_nonempty(lines: list[str], i: int, step: int) -> str:
    j = i + step
    while 0 <= j < len(lines) and not lines[j].strip():
        j += step
    return lines[j].strip() if 0 <= j < len(lines) else ""


class FrequentLines:
    """The most frequent training line (stripped) that starts with a given text."""

    def __init__(self, lines):
        counts = Counter(line for line in lines if line)
        self.lines = sorted(counts)
        self.counts = [counts[line] for line in self.lines]
        self.top = max(self.lines, key=counts.__getitem__, default="")

    def most_common_with_prefix(self, prefix: str) -> str:
        if not prefix:
            return self.top
        lo = bisect.bisect_left(self.lines, prefix)
        hi = bisect.bisect_left(self.lines, prefix + "\U0010ffff")
        if lo == hi:
            return ""
        return self.lines[max(range(lo, hi), key=self.counts.__getitem__)]


def similarity(a: str, b: str) -> float:
    return difflib.SequenceMatcher(None, a, b).ratio()


def main(argv=None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    from stablelm_lsp.inference.backend import LocalBackend
    from stablelm_lsp.lsp.completion import Completer
    from stablelm_lsp.lsp.documents import Cursor
    from stablelm_lsp.lsp.settings import Settings
    from stablelm_lsp.models import ModelError, builtin_model_path

    root = args.data_root or stdlib_root()
    sources = collect_sources(root, args.max_files)
    train_files, held_files = split_sources(sources, args.held_out)
    if not held_files:
        print(f"evaluate: no held-out files under {root}", file=sys.stderr)
        return 2
    model_path = args.model or str(builtin_model_path())
    try:
        backend = LocalBackend.load(model_path, device=args.device, dtype=args.dtype)
    except ModelError as exc:
        print(f"evaluate: {exc}", file=sys.stderr)
        return 2
    started = time.time()

    ppl = held_out_perplexity(backend.loaded, held_files, args.ppl_max_tokens)
    ppl_s = time.time() - started

    settings = Settings(max_new_tokens=args.max_new_tokens, max_lines=1, temperature=0.0,
                        context_tokens=args.context_tokens, template=args.template)
    completer = Completer(backend, settings)
    frequent = FrequentLines(line.strip() for _, text in train_files for line in text.splitlines())

    healing = {"on": [True], "off": [False], "both": [True, False]}[args.token_healing]
    model_methods = [(name + ("" if heal else ", no healing"), heal)
                     for heal in healing for name in ("model", "model+postprocess")]
    methods = [name for name, _ in model_methods] + ["line above", "line below",
                                                     "most frequent training line"]
    exact = {setting: Counter() for setting in SETTINGS}
    sim = {setting: Counter() for setting in SETTINGS}
    done = 0
    dump = args.dump.open("w") if args.dump else None
    gen_started = time.time()
    for file_index, line_index in draw_cases(held_files, args.cases, args.seed):
        if args.time_limit_s is not None and time.time() - gen_started > args.time_limit_s:
            break
        path, text = held_files[file_index]
        lines = text.splitlines(keepends=True)
        content = [line.rstrip("\r\n") for line in lines]
        target_line = content[line_index]
        target = target_line.strip()
        indent = target_line[: len(target_line) - len(target_line.lstrip())]
        for setting in SETTINGS:
            # What the user has typed of the hidden line: its indentation (where auto-indent leaves
            # the cursor), or that and the first half of its text.
            typed = "" if setting == "line start" else target[: len(target) // 2]
            document = lines[:line_index] + [indent + typed + "\n"] + lines[line_index + 1:]
            pending = completer.prepare(document, Cursor(line_index, len(indent + typed)), path=path)
            guesses = []
            for heal in healing:
                # Single-line infilling: stop at the newline whatever the cursor position allows.
                request = dataclasses.replace(pending.request, stop=("\n",), max_lines=None,
                                              time_budget_s=None, token_healing=heal)
                result = backend.generate(request)
                shown = completer.finish(pending, result)
                guesses += [typed + result.text.split("\n")[0],
                            typed + (shown.text.split("\n")[0] if shown else "")]
            guesses += [
                # Baselines propose a whole line; one that contradicts the typed text adds nothing.
                *(guess if guess.startswith(typed) else typed for guess in (
                    nearest_nonempty(content, line_index, -1), nearest_nonempty(content, line_index, +1))),
                frequent.most_common_with_prefix(typed) or typed,
            ]
            for name, guess in zip(methods, guesses):
                exact[setting][name] += guess.strip() == target
                sim[setting][name] += similarity(guess.strip(), target)
            if dump:
                dump.write(json.dumps({"file": path, "line": line_index, "setting": setting,
                                       "typed": typed, "target": target,
                                       "guesses": {n: g.strip() for n, g in zip(methods, guesses)}}) + "\n")
        done += 1
    gen_s = time.time() - gen_started
    backend.close()
    if dump:
        dump.close()

    def rate(counter: Counter, name: str) -> float:
        return counter[name] / max(done, 1)

    info = backend.info
    print(f"model: {info.name} ({info.path}), {info.model_type}, {info.device} {info.dtype}")
    print(f"held-out files: {len(held_files)} of {len(sources)} (by-file split, {args.held_out:.0%})")
    print(f"perplexity over {ppl['tokens']} held-out tokens: {ppl['perplexity']:.2f} "
          f"(loss {ppl['loss']:.3f}, {ppl['bits_per_char']:.3f} bits/char), {ppl_s:.0f} s")
    print(f"single-line infilling, {done} hidden lines from held-out files, each with the cursor at the "
          f"line start (after the indentation) and mid-line (half its text typed); "
          f"{gen_s:.0f} s, {1000 * gen_s / max(done * len(SETTINGS) * len(healing), 1):.0f} ms/completion")
    print(f"  {'method':<32}" + "".join(f" {setting + ' exact':>17} {'similarity':>10}" for setting in SETTINGS))
    for name in methods:
        print(f"  {name:<32}" + "".join(f" {rate(exact[s], name):>17.1%} {rate(sim[s], name):>10.3f}"
                                        for s in SETTINGS))
    summary = {
        "model": info.name, "path": info.path, "held_out_files": len(held_files),
        "perplexity": round(ppl["perplexity"], 3), "loss": round(ppl["loss"], 4),
        "bits_per_char": round(ppl["bits_per_char"], 4), "perplexity_tokens": ppl["tokens"],
        "cases": done, "seed": args.seed, "token_healing": args.token_healing,
        **{setting.replace(" ", "_").replace("-", "_"): {
            "exact_match": {name: round(rate(exact[setting], name), 4) for name in methods},
            "similarity": {name: round(rate(sim[setting], name), 4) for name in methods},
        } for setting in SETTINGS},
        "ms_per_completion": round(1000 * gen_s / max(done * len(SETTINGS) * len(healing), 1), 1),
    }
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
