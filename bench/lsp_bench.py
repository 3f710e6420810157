"""Benchmark (not a test): editing replayed through the real language server over stdio.

The server runs a random StableLM-style checkpoint of about 160M parameters (hidden 768, 12
layers, 12 heads, intermediate 2048, vocab 50304; built here with transformers and
save_pretrained, float32, CPU unless --device says otherwise). Scenarios (`--scenarios`, comma
separated), each with its baseline in the same run; every request is timed from sending it (or
the edit before it) to receiving the answer:

typing: a real source file is opened with a few of its lines removed; the lines are then typed
  back one character at a time (a `textDocument/didChange`, then a `textDocument/inlineCompletion`
  at the new cursor), once with the engine's prefix cache and once without it
  (`--no-prefix-cache`, every prompt computed from scratch), and once with the cache but without
  anticipation (`--no-anticipate`: what the background work between keystrokes costs the
  keystrokes). Reported: p50 and p95
  keystroke-to-response, their ratio, and the share of prompt tokens whose KV came from the cache
  (from `stablelm.status` after each answer), separately for keystrokes inside a line and for
  line breaks. Targets (issue 4): >= 95% reused while typing inside a line; p50 with the cache
  <= 0.2x p50 without. Answers served by type-through (no model run) are counted, not timed in
  the reuse share.

  The baseline of issue 14: transformers doing the same work, in the same process as this script:
  for each keystroke of the run with the cache, a DynamicCache cropped to as many tokens as the
  server reused, the rest of the prompt computed and as many tokens generated greedily as the
  server generated (none where the server ran no model); p50 with the cache <= 0.4x its p50.

warm: a document of about 1500 prompt tokens is opened and the editor reports where the cursor
  rests (`stablelm/didFocus`, as both editor clients do on switching to a document); after
  `--rest-s` (2 s) of rest, a completion is asked for at that position ("at the cursor"), or
  after typing one character there ("after a keystroke"); and, to show what the rest buys once
  it is long enough, after the server's background work is done ("once prepared"). Baseline:
  the same request right after opening (cold). Each document starts with its own line, so
  nothing is reused between them, and is closed after its request. Target (issue 13): the
  request after the rest <= 0.3x the cold one.

accept: lines of a real file are typed back as in `typing`; at each line, after a few
  characters, the suggestion shown is accepted after `--read-ms` of reading (the edit inserting
  it, then `stablelm.accepted`, as the editors do), a completion is asked for right after it, and
  typing goes on on a new line. Reported: the share of the requests right after an accept that
  were answered without running the model (from `stablelm.status` counters), and their p50,
  with anticipation and without it (`--no-anticipate`) in the same run, and with anticipation
  when the reading lasts until the server's background work is done (what a slower reader or a
  faster machine gets). Target (issue 13): >= 80% answered without running the model.

Debounce is 0: the model's time is measured, not the server's waiting. Prints the CPU model, a
table per scenario and one JSON line.

    python bench/lsp_bench.py [--scenarios typing,warm,accept] [--file PATH] [--line N]
        [--lines 2] [--off-keystrokes 6] [--rest-s 2] [--read-ms 500] [--model PATH]
        [--dtype float32|int8] [--linear auto|...]
"""
from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from lsprotocol import types
from pygls.lsp.client import LanguageClient

# bench/ is on sys.path when run as a script
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


@contextlib.asynccontextmanager
async def running_server(model: Path, flags: list[str], state: Path):
    """A client of a fresh server, initialized, its model loaded."""
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
        yield client
    finally:
        await client.shutdown_async(None)
        client.exit(None)
        await client.stop()


def _open(client: LanguageClient, uri: str, text: str) -> None:
    client.text_document_did_open(types.DidOpenTextDocumentParams(types.TextDocumentItem(
        uri=uri, language_id="python", version=1, text=text)))


def _change(client: LanguageClient, uri: str, version: int, start: tuple[int, int],
            end: tuple[int, int], text: str) -> None:
    client.text_document_did_change(types.DidChangeTextDocumentParams(
        text_document=types.VersionedTextDocumentIdentifier(uri=uri, version=version),
        content_changes=[types.TextDocumentContentChangePartial(
            range=types.Range(types.Position(*start), types.Position(*end)), text=text)]))


def _after(start: tuple[int, int], text: str) -> tuple[int, int]:
    """The cursor after typing `text` at `start` (columns in UTF-16 code units)."""
    lines = text.split("\n")
    width = len(lines[-1].encode("utf-16-le")) // 2
    return (start[0] + len(lines) - 1, (start[1] if len(lines) == 1 else 0) + width)


async def replay(model: Path, source: str, first_line: int, count: int, keystrokes: int | None,
                 flags: list[str], state: Path) -> dict:
    """Type lines [first_line, first_line + count) of `source` back into it; returns timings."""
    lines = source.split("\n")
    typed = "\n".join(lines[first_line:first_line + count]) + "\n"
    start_text = "\n".join(lines[:first_line] + lines[first_line + count:])
    async with running_server(model, flags, state) as client:
        uri = (state / "proj" / "replay.py").as_uri()
        _open(client, uri, start_text)
        # Warm-up: the first request pays for the whole prompt in both runs.
        await _inline(client, uri, first_line, 0)
        last_run = (await _status(client))["lastRun"]["run"]

        cursor, version = (first_line, 0), 1
        records = []
        for char in typed[:keystrokes]:
            version += 1
            t0 = time.perf_counter()
            _change(client, uri, version, cursor, cursor, char)
            cursor = _after(cursor, char)
            await _inline(client, uri, *cursor)
            elapsed = time.perf_counter() - t0
            run = (await _status(client))["lastRun"]
            ran_model = run["run"] != last_run
            last_run = run["run"]
            records.append({"seconds": elapsed, "newline": char == "\n", "model": ran_model,
                            "prompt": run["promptTokens"] if ran_model else None,
                            "reused": run["reusedTokens"] if ran_model else None,
                            "generated": run["generatedTokens"] if ran_model else None})
        return {"records": records}


async def warm(model: Path, source: str, line: int, rounds: int, rest_s: float, flags: list[str],
               state: Path) -> dict:
    """Cold requests right after opening a document, and requests after the editor reported the
    cursor there and `rest_s` passed (at the cursor, and after typing a character there); each
    document distinct from the others from its first line on."""
    column = len(source.split("\n")[line].encode("utf-16-le")) // 2
    cursor = (line + 1, column)          # the added first line moves the text down by one
    times: dict[str, list[float]] = {"cold": [], "at the cursor": [], "after a keystroke": [],
                                     "once prepared": []}
    prompts = []
    async with running_server(model, flags, state) as client:
        for i in range(rounds):
            for kind in times:
                uri = (state / "proj" / f"warm_{i}_{kind.replace(' ', '_')}.py").as_uri()
                _open(client, uri, f"# {kind} {i}\n" + source)
                at = cursor
                if kind != "cold":
                    client.protocol.notify("stablelm/didFocus", {
                        "uri": uri, "position": {"line": cursor[0], "character": cursor[1]}})
                    await asyncio.sleep(rest_s)
                    if kind == "once prepared":       # the rest lasts until the work is done
                        await _idle(client)
                t0 = time.perf_counter()
                if kind == "after a keystroke":
                    _change(client, uri, 2, cursor, cursor, "x")
                    at = _after(cursor, "x")
                await _inline(client, uri, *at)
                times[kind].append(time.perf_counter() - t0)
                if kind == "cold":
                    prompts.append((await _status(client))["lastRun"]["promptTokens"])
                # closed, so that the next document's prompt has no other file as context
                client.text_document_did_close(types.DidCloseTextDocumentParams(
                    types.TextDocumentIdentifier(uri)))
                await _idle(client)
        counters = (await _status(client))["counters"]
    return {"times": times, "prompt_tokens": prompts, "counters": counters}


async def accept(model: Path, source: str, first_line: int, count: int, prefix_chars: int,
                 read_s: float, until_prepared: bool, flags: list[str], state: Path) -> dict:
    """At each of `count` lines removed from `source`: type its first `prefix_chars`
    characters (a request after each), accept the suggestion shown after `read_s` (and, with
    `until_prepared`, once the server's background work is done), ask right after the accept,
    and go on on a new line."""
    lines = source.split("\n")
    targets = lines[first_line:first_line + count]
    text = "\n".join(lines[:first_line] + [""] + lines[first_line + count:])
    records = []
    async with running_server(model, flags, state) as client:
        uri = (state / "proj" / "accept.py").as_uri()
        _open(client, uri, text)
        await _inline(client, uri, first_line, 0)        # warm-up: the whole prompt, once
        cursor, version = (first_line, 0), 1
        for target in targets:
            # Type the line's first characters, and on until a suggestion shows.
            items = []
            for n, char in enumerate(target.lstrip() or " "):
                version += 1
                _change(client, uri, version, cursor, cursor, char)
                cursor = _after(cursor, char)
                items = _items(await _inline(client, uri, *cursor))
                if n + 1 >= prefix_chars and items:
                    break
            if items:
                item = items[0]
                await asyncio.sleep(read_s)
                if until_prepared:
                    await _idle(client)
                start = (item.range.start.line, item.range.start.character) if item.range else cursor
                end = (item.range.end.line, item.range.end.character) if item.range else cursor
                version += 1
                t0 = time.perf_counter()
                _change(client, uri, version, start, end, item.insert_text)
                await client.workspace_execute_command_async(types.ExecuteCommandParams(
                    item.command.command, item.command.arguments))
                cursor = _after(start, item.insert_text)
                before = (await _status(client))["counters"]
                await _inline(client, uri, *cursor)
                elapsed = time.perf_counter() - t0
                after = (await _status(client))["counters"]
                assert after["requests"] == before["requests"] + 1, (before, after)
                records.append({"seconds": elapsed,
                                "without_model": after["modelRuns"] == before["modelRuns"]})
            version += 1
            _change(client, uri, version, cursor, cursor, "\n")
            cursor = (cursor[0] + 1, 0)
    return {"records": records}


async def _idle(client: LanguageClient) -> None:
    """Until no background request runs in the server (between measurements)."""
    while (await _status(client))["counters"]["backgroundRunning"]:
        await asyncio.sleep(0.05)


def _items(result) -> list:
    if result is None:
        return []
    return list(result.items) if isinstance(result, types.InlineCompletionList) else list(result)


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


def typing_scenario(args, model: Path, tmp: Path, path: Path, source: str, flags: list[str]) -> dict:
    first_line = args.line if args.line is not None else len(source.split("\n")) // 2
    runs, records = {}, {}
    for name, extra, keystrokes in (("cache", [], args.keystrokes),
                                    ("no_anticipate", ["--no-anticipate"], args.keystrokes),
                                    ("no_cache", ["--no-prefix-cache"], args.off_keystrokes)):
        state = tmp / f"typing_{name}"
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
    print(f"transformers doing the same work (cropped DynamicCache): p50 {hf_p50:.1f} ms; with "
          f"cache / transformers: {hf_ratio:.3f} (target <= 0.4); keystrokes that ran the model: "
          f"p50 {statistics.median(ran) if ran else 0:.1f} ms vs "
          f"{statistics.median(hf_ran) if hf_ran else 0:.1f} ms")
    background = on["p50_ms"] / runs["no_anticipate"]["p50_ms"]
    print(f"p50 with anticipation (background work between keystrokes) / without: {background:.3f}")
    return {"typing_p50_ratio_cache_vs_none": round(ratio, 4),
            "typing_transformers_p50_ms": round(hf_p50, 2),
            "typing_p50_ratio_cache_vs_transformers": round(hf_ratio, 4),
            "typing_model_runs_p50_ms": round(statistics.median(ran), 2) if ran else None,
            "typing_transformers_model_runs_p50_ms": round(statistics.median(hf_ran), 2) if hf_ran else None,
            "typing_p50_ratio_anticipate_vs_not": round(background, 4), **{
        f"typing_{name}_{k}": (round(v, 4) if isinstance(v, float) else v)
        for name, r in runs.items() for k, v in r.items()}}


def warm_scenario(args, model: Path, tmp: Path, path: Path, source: str, flags: list[str]) -> dict:
    # The document: the file's first lines up to the one whose end is the cursor, the prompt then
    # about --context-tokens long (a bigger file's prompt is cut to that budget anyway).
    lines = source.split("\n")
    line = min(args.warm_line, len(lines) - 1)
    state = tmp / "warm"
    state.mkdir()
    result = asyncio.run(warm(model, "\n".join(lines[:line + 1]), line, args.rounds, args.rest_s,
                              flags, state))
    times = {kind: statistics.median(values) * 1000 for kind, values in result["times"].items()}
    prompt = statistics.median(result["prompt_tokens"])
    print(f"server counters: {result['counters']}")
    print(f"warm: {path.name} lines 0-{line} ({prompt:.0f} prompt tokens), rest {args.rest_s:g} s "
          f"after stablelm/didFocus, {args.rounds} rounds, medians")
    for kind, ms in times.items():
        ratio = ms / times["cold"]
        print(f"  {kind:<20} {ms:>9.1f} ms  {ratio:>6.3f}x cold"
              + ("" if kind == "cold" else "  (target <= 0.3x)"))
    return {"warm_prompt_tokens": prompt, "warm_rest_s": args.rest_s,
            **{f"warm_{kind.replace(' ', '_')}_ms": round(ms, 1) for kind, ms in times.items()},
            **{f"warm_{kind.replace(' ', '_')}_ratio": round(ms / times["cold"], 4)
               for kind, ms in times.items() if kind != "cold"}}


def accept_scenario(args, model: Path, tmp: Path, path: Path, source: str, flags: list[str]) -> dict:
    first_line = args.line if args.line is not None else len(source.split("\n")) // 2
    rows = {}
    for name, extra, until_prepared in (("anticipate", [], False),
                                        ("no_anticipate", ["--no-anticipate"], False),
                                        ("anticipate_read_until_prepared", [], True)):
        state = tmp / f"accept_{name}"
        state.mkdir()
        records = asyncio.run(accept(model, source, first_line, args.accept_lines, args.prefix_chars,
                                     args.read_ms / 1000, until_prepared, flags + extra,
                                     state))["records"]
        rows[name] = {"accepts": len(records),
                      "without_model": sum(r["without_model"] for r in records),
                      "p50_ms": statistics.median(r["seconds"] for r in records) * 1000
                      if records else None}
    print(f"accept: {path.name} from line {first_line}, {args.accept_lines} lines, each: "
          f"{args.prefix_chars} characters typed, the suggestion accepted after {args.read_ms:g} ms "
          f"of reading, a request right after the accept")
    for name, r in rows.items():
        share = r["without_model"] / r["accepts"] if r["accepts"] else 0.0
        r["share"] = share
        print(f"  {name:<31} accepts {r['accepts']:>3}  answered without running the model "
              f"{r['without_model']:>3} ({100 * share:.0f}%; target >= 80%)  "
              f"p50 {r['p50_ms'] or 0:.1f} ms")
    return {f"accept_{name}_{k}": (round(v, 4) if isinstance(v, float) else v)
            for name, r in rows.items() for k, v in r.items()} | {"accept_read_ms": args.read_ms}


SCENARIOS = {"typing": typing_scenario, "warm": warm_scenario, "accept": accept_scenario}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--scenarios", default="typing",
                    help=f"comma-separated, of {', '.join(SCENARIOS)} (default: typing)")
    ap.add_argument("--file", type=Path, default=None, help="source file to replay (default: textwrap.py)")
    ap.add_argument("--line", type=int, default=None, help="first line to type (default: mid-file)")
    ap.add_argument("--lines", type=int, default=2, help="typing: lines typed back")
    ap.add_argument("--keystrokes", type=int, default=None, help="typing: stop after this many (with cache)")
    ap.add_argument("--off-keystrokes", type=int, default=6,
                    help="typing: keystrokes replayed without the cache (each costs a whole prompt)")
    ap.add_argument("--warm-line", type=int, default=170,
                    help="warm: the document is the file's lines up to this one, the cursor at its end")
    ap.add_argument("--rest-s", type=float, default=2.0, help="warm: rest after didFocus")
    ap.add_argument("--rounds", type=int, default=3, help="warm: documents per kind of request")
    ap.add_argument("--accept-lines", type=int, default=12, help="accept: lines typed and accepted")
    ap.add_argument("--prefix-chars", type=int, default=3,
                    help="accept: characters of each line typed before accepting")
    ap.add_argument("--read-ms", type=float, default=500,
                    help="accept: time between a suggestion's arrival and its accept")
    ap.add_argument("--max-new-tokens", type=int, default=16)
    ap.add_argument("--context-tokens", type=int, default=1536)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32", help="the server's --dtype (float32, int8, ...)")
    ap.add_argument("--linear", default="auto", help="the server's --linear")
    ap.add_argument("--model", type=Path, default=None, help="use this checkpoint instead of building one")
    args = ap.parse_args()
    scenarios = [name.strip() for name in args.scenarios.split(",") if name.strip()]
    unknown = [name for name in scenarios if name not in SCENARIOS]
    if unknown:
        ap.error(f"unknown scenario(s) {', '.join(unknown)}; known: {', '.join(SCENARIOS)}")

    path = args.file or default_source()
    source = path.read_text(encoding="utf-8")
    flags = ["--max-new-tokens", str(args.max_new_tokens), "--context-tokens",
             str(args.context_tokens), "--device", args.device, "--dtype", args.dtype,
             "--linear", args.linear]
    print(f"CPU: {cpu_model()}; load average {os.getloadavg()[0]:.2f}; {args.device}, {args.dtype}, "
          f"linear {args.linear}")
    summary = {"bench": "lsp", "file": path.name, "device": args.device, "dtype": args.dtype,
               "linear": args.linear, "cpu": cpu_model()}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        model = args.model or build_stablelm_160m(tmp / "stablelm-160m")
        for name in scenarios:
            summary |= SCENARIOS[name](args, model, tmp, path, source, flags)
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
