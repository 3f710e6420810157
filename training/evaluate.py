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

3. Repository-level infilling (`--repo-cases N`): hidden lines of held-out files that use a
   name defined in a sibling file of their package (top-level function, class or variable of
   exactly one other module in the same folder, not defined in the file itself), in a session
   where that sibling was recently edited: the editor's context ring (inference/prompts/ring.py)
   holds the edited region around the definition and two other edited regions of the package,
   recorded in random order. Each line is completed with the sibling closed and no ring (the
   prompt has no other file), with the sibling open (its head as context, what the server gave
   before the ring), with the ring alone (the sibling closed after its edit), and with both, all
   within the server's prompt budget; exact match and similarity as above, and how often the
   definition reached the prompt.

Prints a table to stdout, then one JSON line with every number.

    python training/evaluate.py                       # the built-in model, 300 cases
    python training/evaluate.py --token-healing both  # with and without healing, same cases
    python training/evaluate.py --model /path/to/checkpoint --cases 100 --ppl-max-tokens 50000
    python training/evaluate.py --repo-cases 300 --cases 0 --ppl-max-tokens 0   # the ring only
"""
from __future__ import annotations

import argparse
import ast
import bisect
import builtins
import dataclasses
import difflib
import json
import keyword
import math
import posixpath
import random
import re
import sys
import time
from collections import Counter, defaultdict
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
    ap.add_argument("--linear", default="auto",
                    help="the linear layers' kernel (q8: int8 weights, the inputs rounded to int8 too)")
    ap.add_argument("--kv-dtype", default="auto",
                    help="the KV cache's dtype (auto: float16 for int8 weights on a CPU); the "
                         "perplexity pass runs through a cache in it too")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--dump", type=Path, default=None,
                    help="write every case (file, line, setting, target, each method's line) as JSON lines")
    ap.add_argument("--repo-cases", type=int, default=0,
                    help="repository-level infilling cases (lines using a sibling module's names, "
                         "with and without the context ring); 0: none")
    return ap.parse_args(argv)


@torch.no_grad()
def held_out_perplexity(loaded, files: list[tuple[str, str]], max_tokens: int | None,
                        kv_dtype: torch.dtype | None = None) -> dict:
    """Cross-entropy of each file's text + eos, in consecutive windows of max_positions tokens
    (each window starts fresh, so every token is predicted with 0..max_positions-1 tokens of
    context, as in training), through a KV cache in kv_dtype (what the engine keeps: its
    rounding counts; None: the compute dtype)."""
    model, tok = loaded.model, loaded.tokenizer
    window = loaded.config.max_positions
    nll, tokens, chars = 0.0, 0, 0
    for _, text in files:
        ids = tok.encode(text, parse_special=False) + [tok.eos_ids[0]]
        if max_tokens is not None:
            ids = ids[: max_tokens - tokens + 1]       # n + 1 ids give n predictions
        for start in range(0, len(ids) - 1, window):
            piece = torch.tensor([ids[start:start + window + 1]], device=loaded.device)
            cache = model.new_cache(piece.shape[1], dtype=kv_dtype)
            logits = model(piece[:, :-1], cache)                 # [1, T, V] float32
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


def hidden_line(lines: list[str], line_index: int, setting: str) -> tuple[list[str], int, str, str]:
    """(document, cursor index in the line, typed text, target) for hiding line `line_index`.
    What the user has typed of it: its indentation (where auto-indent leaves the cursor), or
    that and the first half of its text ("mid-line")."""
    content = lines[line_index].rstrip("\r\n")
    target = content.strip()
    indent = content[: len(content) - len(content.lstrip())]
    typed = "" if setting == "line start" else target[: len(target) // 2]
    document = lines[:line_index] + [indent + typed + "\n"] + lines[line_index + 1:]
    return document, len(indent + typed), typed, target


def complete_line(backend, completer, pending, heal: bool = True) -> tuple[str, str]:
    """(the model's first line, the same after the server's post-processing) for `pending`:
    single-line infilling, stopping at the newline whatever the cursor position allows."""
    request = dataclasses.replace(pending.request, stop=("\n",), max_lines=None,
                                  time_budget_s=None, token_healing=heal)
    result = backend.generate(request)
    shown = completer.finish(pending, result)
    return result.text.split("\n")[0], (shown.text.split("\n")[0] if shown else "")


# -- repository-level cases ------------------------------------------------------------------

_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_COMMON_NAMES = frozenset(dir(builtins)) | frozenset(keyword.kwlist)
REPO_METHODS = ("no other file", "sibling open (its head)", "ring (sibling closed)",
                "sibling open + ring")


@dataclasses.dataclass(frozen=True)
class RepoCase:
    path: str           # the held-out file
    line: int           # the hidden line
    name: str           # the sibling's name it uses
    sibling: str        # the sibling's path
    definition: int     # the definition's line in the sibling


def top_level_definitions(text: str) -> dict[str, int]:
    """Names a module defines at its top level (functions, classes, assigned names) -> line."""
    try:
        tree = ast.parse(text)
    except (SyntaxError, ValueError):
        return {}
    found: dict[str, int] = {}
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            found.setdefault(node.name, node.lineno - 1)
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            for target in targets:
                if isinstance(target, ast.Name):
                    found.setdefault(target.id, node.lineno - 1)
    return found


def names_bound(text: str) -> set[str]:
    """Names a module binds itself anywhere (definitions, assignments, arguments); names it
    imports are not its own."""
    try:
        tree = ast.parse(text)
    except (SyntaxError, ValueError):
        return set()
    bound = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            bound.add(node.name)
        elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
            bound.add(node.id)
        elif isinstance(node, ast.arg):
            bound.add(node.arg)
    return bound


def repository_cases(sources: list[tuple[str, str]], held_files: list[tuple[str, str]], n: int,
                     seed: int) -> list[RepoCase]:
    """Lines of held-out files using a name that exactly one sibling module (same folder)
    defines at its top level and the file does not bind itself; n drawn at random."""
    folders: dict[str, dict[str, str]] = defaultdict(dict)
    for path, text in sources:
        folders[posixpath.dirname(path)][path] = text
    eligible = []
    for path, text in held_files:
        siblings = {p: t for p, t in folders[posixpath.dirname(path)].items() if p != path}
        defined: dict[str, list[tuple[str, int]]] = defaultdict(list)
        for sibling, sibling_text in siblings.items():
            for name, line in top_level_definitions(sibling_text).items():
                defined[name].append((sibling, line))
        own = names_bound(text)
        usable = {name: where[0] for name, where in defined.items()
                  if len(where) == 1 and len(name) >= 4 and name not in own
                  and name not in _COMMON_NAMES}
        for i, line in enumerate(text.splitlines()):
            if not line.strip() or line.lstrip().startswith("#"):
                continue
            names = [word for word in _NAME.findall(line) if word in usable]
            if names:
                sibling, definition = usable[names[0]]
                eligible.append(RepoCase(path, i, names[0], sibling, definition))
    rng = random.Random(seed)
    return sorted(rng.sample(eligible, min(n, len(eligible))), key=lambda c: (c.path, c.line))


def session_ring(case: RepoCase, folder: dict[str, str], rng: random.Random):
    """The context ring of a session that edited the sibling around the definition and two other
    places of the package, in random order."""
    from stablelm_lsp.inference.prompts.ring import EditRing

    edits = [(case.sibling, case.definition)]
    others = sorted(p for p in folder if p != case.path)
    for _ in range(2):
        other = rng.choice(others)
        edits.append((other, rng.randrange(len(folder[other].splitlines()) or 1)))
    rng.shuffle(edits)
    ring = EditRing()
    for path, line in edits:
        ring.record(f"file:///{path}", "python", folder[path].splitlines(keepends=True), line)
    return ring


def evaluate_repository(backend, completer, sources, held_files, n: int, seed: int) -> dict:
    """The repository-level cases, each line completed with each of REPO_METHODS' contexts."""
    from stablelm_lsp.inference.prompts.fim import ContextFile
    from stablelm_lsp.lsp.documents import Cursor

    folders: dict[str, dict[str, str]] = defaultdict(dict)
    for path, text in sources:
        folders[posixpath.dirname(path)][path] = text
    cases = repository_cases(sources, held_files, n, seed)
    exact = {setting: Counter() for setting in SETTINGS}
    sim = {setting: Counter() for setting in SETTINGS}
    reached = {setting: Counter() for setting in SETTINGS}
    fim_prefix = backend.info.special.fim_prefix or ""
    started = time.time()
    for k, case in enumerate(cases):
        folder = folders[posixpath.dirname(case.path)]
        lines = folder[case.path].splitlines(keepends=True)
        sibling_lines = folder[case.sibling].splitlines(keepends=True)
        definition = sibling_lines[case.definition].strip()
        ring = session_ring(case, folder, random.Random(seed * 1_000_003 + k))
        for setting in SETTINGS:
            document, index, typed, target = hidden_line(lines, case.line, setting)
            chunks = ring.select(f"file:///{case.path}", "python", document, case.line)
            ring_files = [c.context_file(c.uri.removeprefix("file:///")) for c in chunks]
            head = ContextFile(case.sibling, sibling_lines)
            contexts = dict(zip(REPO_METHODS, ([], [head], ring_files, [head, *ring_files])))
            for name, files in contexts.items():
                pending = completer.prepare(document, Cursor(case.line, index), path=case.path,
                                            context_files=files)
                _, shown = complete_line(backend, completer, pending)
                guess = (typed + shown).strip()
                exact[setting][name] += guess == target
                sim[setting][name] += similarity(guess, target)
                context = pending.prompt.text.split(fim_prefix)[0] if fim_prefix else ""
                reached[setting][name] += bool(definition) and definition in context
    done = max(len(cases), 1)
    return {
        "cases": len(cases), "files": len({c.path for c in cases}),
        "packages": len({posixpath.dirname(c.path) for c in cases}),
        "seconds": round(time.time() - started, 1),
        **{setting.replace(" ", "_").replace("-", "_"): {
            "exact_match": {m: round(exact[setting][m] / done, 4) for m in REPO_METHODS},
            "similarity": {m: round(sim[setting][m] / done, 4) for m in REPO_METHODS},
            "definition_in_prompt": {m: round(reached[setting][m] / done, 4) for m in REPO_METHODS},
        } for setting in SETTINGS},
    }


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
        backend = LocalBackend.load(model_path, device=args.device, dtype=args.dtype,
                                    kv_dtype=args.kv_dtype, linear=args.linear)
    except ModelError as exc:
        print(f"evaluate: {exc}", file=sys.stderr)
        return 2
    started = time.time()

    ppl = held_out_perplexity(backend.loaded, held_files, args.ppl_max_tokens, backend.engine.kv_dtype) \
        if args.ppl_max_tokens != 0 else None
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
        for setting in SETTINGS:
            document, index, typed, target = hidden_line(lines, line_index, setting)
            pending = completer.prepare(document, Cursor(line_index, index), path=path)
            guesses = []
            for heal in healing:
                raw, shown = complete_line(backend, completer, pending, heal)
                guesses += [typed + raw, typed + shown]
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
    repo = evaluate_repository(backend, completer, sources, held_files, args.repo_cases, args.seed) \
        if args.repo_cases else None
    backend.close()
    if dump:
        dump.close()

    def rate(counter: Counter, name: str) -> float:
        return counter[name] / max(done, 1)

    info = backend.info
    print(f"model: {info.name} ({info.path}), {info.model_type}, {info.device} {info.dtype}, "
          f"KV cache {str(backend.engine.kv_dtype).removeprefix('torch.')}, linear {args.linear}")
    print(f"held-out files: {len(held_files)} of {len(sources)} (by-file split, {args.held_out:.0%})")
    if ppl is not None:
        print(f"perplexity over {ppl['tokens']} held-out tokens: {ppl['perplexity']:.2f} "
              f"(loss {ppl['loss']:.3f}, {ppl['bits_per_char']:.3f} bits/char), {ppl_s:.0f} s")
    if done:
        print(f"single-line infilling, {done} hidden lines from held-out files, each with the cursor "
              f"at the line start (after the indentation) and mid-line (half its text typed); "
              f"{gen_s:.0f} s, {1000 * gen_s / max(done * len(SETTINGS) * len(healing), 1):.0f} ms/completion")
        print(f"  {'method':<32}" + "".join(f" {setting + ' exact':>17} {'similarity':>10}" for setting in SETTINGS))
        for name in methods:
            print(f"  {name:<32}" + "".join(f" {rate(exact[s], name):>17.1%} {rate(sim[s], name):>10.3f}"
                                            for s in SETTINGS))
    if repo is not None:
        print(f"repository-level infilling: {repo['cases']} hidden lines of {repo['files']} held-out "
              f"files in {repo['packages']} packages, each using a name a sibling module defines; "
              f"the sibling edited around the definition, with two other edits, in the context "
              f"ring; prompt budget {completer.context_tokens} tokens; {repo['seconds']:.0f} s")
        print(f"  {'context':<26}" + "".join(f" {setting + ' exact':>17} {'similarity':>10} "
                                            f"{'definition':>10}" for setting in SETTINGS))
        for name in REPO_METHODS:
            row = [repo[setting.replace(" ", "_").replace("-", "_")] for setting in SETTINGS]
            print(f"  {name:<26}" + "".join(
                f" {r['exact_match'][name]:>17.1%} {r['similarity'][name]:>10.3f}"
                f" {r['definition_in_prompt'][name]:>10.0%}" for r in row))
    summary = {
        "model": info.name, "path": info.path, "held_out_files": len(held_files),
        **({"perplexity": round(ppl["perplexity"], 3), "loss": round(ppl["loss"], 4),
            "bits_per_char": round(ppl["bits_per_char"], 4), "perplexity_tokens": ppl["tokens"]}
           if ppl is not None else {}),
        "cases": done, "seed": args.seed, "token_healing": args.token_healing,
        **{setting.replace(" ", "_").replace("-", "_"): {
            "exact_match": {name: round(rate(exact[setting], name), 4) for name in methods},
            "similarity": {name: round(rate(sim[setting], name), 4) for name in methods},
        } for setting in SETTINGS},
        "ms_per_completion": round(1000 * gen_s / max(done * len(SETTINGS) * len(healing), 1), 1),
        **({"repository": repo} if repo is not None else {}),
    }
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
