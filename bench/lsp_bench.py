"""Benchmark (not a test): typing replayed through the real language server over stdio.

A real source file is opened with a few of its lines removed; the lines are then typed back one
character at a time: a `textDocument/didChange` for the character, then a
`textDocument/inlineCompletion` at the new cursor, timed from sending the change to receiving the
answer. The server runs a random StableLM-style checkpoint of about 160M parameters (hidden 768,
12 layers, 12 heads, intermediate 2048, vocab 50304; built here with transformers and
save_pretrained, float32, CPU unless --device says otherwise), once with the engine's prefix cache
and once without it (`--no-prefix-cache`, every prompt computed from scratch), in the same run.

Reported: p50 and p95 keystroke-to-response for each, their ratio, and the share of prompt tokens
whose KV came from the cache (from `stablelm.status` after each answer), separately for
keystrokes inside a line and for line breaks. Targets (issue 4): >= 95% reused while typing
inside a line; p50 with the cache <= 0.2x p50 without. Debounce is 0: the model's time is measured,
not the server's waiting. Answers served by type-through (no model run) are counted, not timed
in the reuse share.

The baseline of issue 14: transformers doing the same work, in the same process as this script:
for each keystroke of the run with the cache, a DynamicCache cropped to as many tokens as the
server reused, the rest of the prompt computed and as many tokens generated greedily as the
server generated (none where the server ran no model); p50 with the cache <= 0.4x its p50.

Prints the CPU model, a table and one JSON line.

    python bench/lsp_bench.py [--file PATH] [--line N] [--lines 2] [--off-keystrokes 6]
        [--dtype float32|int8] [--linear auto|...]
"""
from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

from lsprotocol import types
from pygls.lsp.client import LanguageClient

from engine_bench import HFContinuation, load_transformers, random_ids  # bench/ is on sys.path
from linear_bench import cpu_model
from load_bench import build as build_stablelm_160m

ROOT = Path(__file__).resolve().parents[1]


def default_source() -> Path:
    """A real, stable source file present on every machine: the standard library's textwrap."""
    import textwrap

    return Path(textwrap.__file__)


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))
    return ordered[index]


async def replay(model: Path, source: str, first_line: int, count: int, keystrokes: int | None,
                 flags: list[str], state: Path) -> dict:
    """Type lines [first_line, first_line + count) of `source` back into it; returns timings."""
    lines = source.split("\n")
    typed = "\n".join(lines[first_line:first_line + count]) + "\n"
    start_text = "\n".join(lines[:first_line] + lines[first_line + count:])
    client = LanguageClient("lsp-bench", "1")
    await client.start_io(sys.executable, "-m", "stablelm_lsp.lsp", "--stdio", "--model", str(model),
                          "--debounce-ms", "0", "--timeout-ms", "600000", "--stats-file",
                          str(state / "stats.json"), *flags)
    try:
        await client.initialize_async(types.InitializeParams(
            capabilities=types.ClientCapabilities(), root_uri=(state / "proj").as_uri()))
        client.initialized(types.InitializedParams())
        while (await _status(client))["state"] == "loading":
            await asyncio.sleep(0.1)
        uri = (state / "proj" / "replay.py").as_uri()
        client.text_document_did_open(types.DidOpenTextDocumentParams(types.TextDocumentItem(
            uri=uri, language_id="python", version=1, text=start_text)))
        # Warm-up: the first request pays for the whole prompt in both runs.
        await _inline(client, uri, first_line, 0)
        last_run = (await _status(client))["lastRun"]["run"]

        line, column, version = first_line, 0, 1
        records = []
        for char in typed[:keystrokes]:
            version += 1
            t0 = time.perf_counter()
            client.text_document_did_change(types.DidChangeTextDocumentParams(
                text_document=types.VersionedTextDocumentIdentifier(uri=uri, version=version),
                content_changes=[types.TextDocumentContentChangePartial(
                    range=types.Range(types.Position(line, column), types.Position(line, column)),
                    text=char)]))
            if char == "\n":
                line, column = line + 1, 0
            else:
                column += len(char.encode("utf-16-le")) // 2
            await _inline(client, uri, line, column)
            elapsed = time.perf_counter() - t0
            run = (await _status(client))["lastRun"]
            ran_model = run["run"] != last_run
            last_run = run["run"]
            records.append({"seconds": elapsed, "newline": char == "\n", "model": ran_model,
                            "prompt": run["promptTokens"] if ran_model else None,
                            "reused": run["reusedTokens"] if ran_model else None,
                            "generated": run["generatedTokens"] if ran_model else None})
        return {"records": records}
    finally:
        await client.shutdown_async(None)
        client.exit(None)
        await client.stop()


async def _status(client: LanguageClient) -> dict:
    return await client.workspace_execute_command_async(types.ExecuteCommandParams("stablelm.status"))


async def _inline(client: LanguageClient, uri: str, line: int, character: int):
    return await client.text_document_inline_completion_async(types.InlineCompletionParams(
        context=types.InlineCompletionContext(trigger_kind=types.InlineCompletionTriggerKind.Automatic),
        text_document=types.TextDocumentIdentifier(uri=uri),
        position=types.Position(line=line, character=character)))


def transformers_same_work(model: Path, records: list[dict]) -> list[float]:
    """Seconds transformers takes for each keystroke's work (0 where the server ran no model): a
    DynamicCache cropped to the tokens the server reused, the rest of the prompt (random tokens:
    the counts are what matter) computed, as many tokens generated as the server generated."""
    import torch

    hf = load_transformers(model)
    cont = HFContinuation(hf)
    vocab = hf.config.vocab_size
    first = next((r for r in records if r["model"]), None)
    if first is not None:       # the state before typing: a prompt as long as the first one
        cont.generate(random_ids(first["prompt"], vocab, seed=0), 1)
    times = []
    for i, r in enumerate(records):
        if not r["model"] or not r["generated"]:
            times.append(0.0)
            continue
        kept = cont.held[:min(r["reused"], len(cont.held), r["prompt"] - 1)]
        prompt = kept + random_ids(r["prompt"] - len(kept), vocab, seed=i + 1)
        t0 = time.perf_counter()
        with torch.inference_mode():
            cont.generate(prompt, r["generated"])
        times.append(time.perf_counter() - t0)
    return times


def summarize(records: list[dict]) -> dict:
    times = [r["seconds"] * 1000 for r in records]
    ran = [r for r in records if r["model"]]
    inside = [r for r in ran if not r["newline"]]

    def share(rows):
        prompt = sum(r["prompt"] for r in rows)
        return sum(r["reused"] for r in rows) / prompt if prompt else None

    return {
        "keystrokes": len(records), "model_runs": len(ran),
        "p50_ms": statistics.median(times), "p95_ms": percentile(times, 95),
        "reused_share_inside_line": share(inside), "reused_share_all": share(ran),
        "min_reused_share_inside_line": min((r["reused"] / r["prompt"] for r in inside), default=None),
        "mean_prompt_tokens": statistics.mean(r["prompt"] for r in ran) if ran else None,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--file", type=Path, default=None, help="source file to replay (default: textwrap.py)")
    ap.add_argument("--line", type=int, default=None, help="first line to type (default: mid-file)")
    ap.add_argument("--lines", type=int, default=2, help="lines typed back")
    ap.add_argument("--keystrokes", type=int, default=None, help="stop after this many (with cache)")
    ap.add_argument("--off-keystrokes", type=int, default=6,
                    help="keystrokes replayed without the cache (each costs a whole prompt)")
    ap.add_argument("--max-new-tokens", type=int, default=16)
    ap.add_argument("--context-tokens", type=int, default=1536)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32", help="the server's --dtype (float32, int8, ...)")
    ap.add_argument("--linear", default="auto", help="the server's --linear")
    ap.add_argument("--model", type=Path, default=None, help="use this checkpoint instead of building one")
    args = ap.parse_args()

    path = args.file or default_source()
    source = path.read_text(encoding="utf-8")
    first_line = args.line if args.line is not None else len(source.split("\n")) // 2
    flags = ["--max-new-tokens", str(args.max_new_tokens), "--context-tokens",
             str(args.context_tokens), "--device", args.device, "--dtype", args.dtype,
             "--linear", args.linear]
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        model = args.model or build_stablelm_160m(tmp / "stablelm-160m")
        runs, records = {}, {}
        for name, extra, keystrokes in (("cache", [], args.keystrokes),
                                        ("no_cache", ["--no-prefix-cache"], args.off_keystrokes)):
            state = tmp / name
            state.mkdir()
            result = asyncio.run(replay(model, source, first_line, args.lines, keystrokes,
                                        flags + extra, state))
            runs[name] = summarize(result["records"])
            records[name] = result["records"]
        hf_times = transformers_same_work(model, records["cache"])

    on, off = runs["cache"], runs["no_cache"]
    hf_p50 = statistics.median(hf_times) * 1000
    hf_ratio = on["p50_ms"] / hf_p50
    ran = [r["seconds"] * 1000 for r in records["cache"] if r["model"]]
    hf_ran = [t * 1000 for r, t in zip(records["cache"], hf_times) if r["model"]]
    print(f"CPU: {cpu_model()}")
    print(f"typing replay: {path.name} lines {first_line}-{first_line + args.lines - 1}, "
          f"{args.max_new_tokens} new tokens, context {args.context_tokens} tokens, {args.device}, "
          f"{args.dtype}, linear {args.linear}")
    print(f"{'':>10} {'keys':>5} {'runs':>5} {'p50 ms':>9} {'p95 ms':>9} {'reused in line':>15} "
          f"{'reused all':>11} {'prompt tok':>11}")
    for name, r in runs.items():
        fmt = lambda v: "-" if v is None else f"{100 * v:.1f}%"  # noqa: E731
        print(f"{name:>10} {r['keystrokes']:>5} {r['model_runs']:>5} {r['p50_ms']:>9.1f} "
              f"{r['p95_ms']:>9.1f} {fmt(r['reused_share_inside_line']):>15} "
              f"{fmt(r['reused_share_all']):>11} {r['mean_prompt_tokens'] or 0:>11.0f}")
    ratio = on["p50_ms"] / off["p50_ms"]
    print(f"p50 with cache / without: {ratio:.3f} (target <= 0.2); reused inside a line: "
          f"{100 * (on['reused_share_inside_line'] or 0):.1f}% (target >= 95%)")
    print(f"transformers doing the same work (cropped DynamicCache): p50 {hf_p50:.1f} ms; with cache "
          f"/ transformers: {hf_ratio:.3f} (target <= 0.4); keystrokes that ran the model: p50 "
          f"{statistics.median(ran) if ran else 0:.1f} ms vs {statistics.median(hf_ran) if hf_ran else 0:.1f} ms")
    print(json.dumps({"bench": "lsp_typing_replay", "cpu": cpu_model(), "file": path.name,
                      "device": args.device, "dtype": args.dtype, "linear": args.linear,
                      "p50_ratio_cache_vs_none": round(ratio, 4),
                      "transformers_p50_ms": round(hf_p50, 2),
                      "p50_ratio_cache_vs_transformers": round(hf_ratio, 4),
                      "model_runs_p50_ms": round(statistics.median(ran), 2) if ran else None,
                      "transformers_model_runs_p50_ms": round(statistics.median(hf_ran), 2) if hf_ran else None,
                      **{
                          f"{name}_{k}": (round(v, 4) if isinstance(v, float) else v)
                          for name, r in runs.items() for k, v in r.items()}}))


if __name__ == "__main__":
    main()
