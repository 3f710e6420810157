"""Benchmark (not a test): keystroke latency, decode speed and sliding-window KV memory of the engine.

Everything is measured in one run, on the CPU in float32 unless --device/--dtype say otherwise (the
GPU checks of a lent machine run it with --device cuda), against baselines measured in the same run:

1. Keystroke replay on a random StableLM-style checkpoint of about 160M parameters (hidden 768,
   12 layers, 12 heads, intermediate 2048, vocab 50304; built here with transformers and
   save_pretrained): a 1500-token prompt, then keystrokes each appending one token, 16 greedy
   tokens after each. Median latency of this engine; of transformers' `generate` from scratch; and
   of transformers' `generate` continuing a DynamicCache cropped back to the common prefix before
   each keystroke. Targets: <= 0.4x the cropped-cache figure, <= 0.1x the from-scratch one.
   The typed tokens are random, so no previous completion is typed; the engine still drafts from
   n-grams of the sequence, which a random model's repetitive output makes easy: the engine
   without drafts is measured too.
   The same replay where each keystroke types the first token of the completion just shown
   (the user accepts the suggestion by typing it): the rest of it is the engine's draft.
2. Decode time per token at 1500 tokens of context, against transformers' (target <= 0.5x), and
   as a fraction of the floor set by the machine's memory bandwidth (measured here with a large
   tensor copy): (weight bytes read per token + KV bytes read) / bandwidth. One pass per token
   (no drafts), with the engine's default kernels (on a CPU the project's own linear and
   attention kernels, inference/csrc/) and with torch's (F.linear, SDPA).
3. A StarCoder2-style checkpoint with a 256-token sliding window on a 4096-token prompt: the KV
   bytes the engine holds, against the window's own bound and a linear cache.

Prints a table and one JSON line with the ratios.

    python bench/engine_bench.py [--keystrokes 20] [--scratch-keystrokes 5] [--threads N]
                                 [--device cpu|cuda[:N]] [--dtype float32|bfloat16|float16]
                                 [--decode-step off|static|compile|cuda-graph]
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from load_bench import build as build_stablelm_160m  # bench/ is on sys.path when run as a script
from stablelm_lsp.inference.prefix_cache import common_prefix_len

ROOT = Path(__file__).resolve().parents[1]
PROMPT_TOKENS = 1500
NEW_TOKENS = 16
DECODE_STEPS = 32
SPECIALS = 7            # ids below this are the tokenizer's special tokens: keep prompts clear of them
WINDOW, LONG_PROMPT = 256, 4096
# Engine options of every run that does not set them itself (--decode-step).
ENGINE_DEFAULTS: dict = {}
STARCODER2_SIZES = dict(hidden_size=384, intermediate_size=1536, num_hidden_layers=6,
                        num_attention_heads=6, num_key_value_heads=2, sliding_window=WINDOW,
                        max_position_embeddings=8192)


def memory_bandwidth(device: torch.device, gib: float = 1.0, repeats: int = 5) -> float:
    """Bytes per second moved by a large tensor copy (each byte read once and written once)."""
    src = torch.ones(int(gib * (1 << 30)) // 4, device=device)
    dst = torch.empty_like(src)
    dst.copy_(src)
    best = min(_timed(lambda: dst.copy_(src), device) for _ in range(repeats))
    return 2 * src.nbytes / best


def _timed(fn, device: torch.device) -> float:
    _sync(device)
    t0 = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - t0


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def device_name(device: torch.device) -> str:
    """The GPU's name, or the CPU's model as /proc/cpuinfo gives it."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform

    return platform.processor() or "unknown CPU"


def random_ids(n: int, vocab: int, seed: int) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(SPECIALS, vocab, (n,), generator=g).tolist()


class HFContinuation:
    """transformers' generate continuing one DynamicCache cropped to the common prefix."""

    def __init__(self, model):
        import transformers

        self.model = model
        self.cache = transformers.DynamicCache(config=model.config)
        self.held: list[int] = []   # the tokens whose keys/values the cache holds

    def generate(self, prompt: list[int], steps: int) -> list[int]:
        keep = min(common_prefix_len(self.held, prompt), len(prompt) - 1)
        if len(self.held) > keep:
            self.cache.crop(keep - len(self.held))  # a negative count removes that many
        new = hf_generate(self.model, prompt, steps, self.cache)
        self.held = prompt + new[:-1]   # generate does not run its last token
        return new


def load_transformers(path: Path, device: torch.device = torch.device("cpu"),
                      dtype: torch.dtype = torch.float32):
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(device).eval()
    model.generation_config.eos_token_id = None   # exactly `steps` tokens, like the engine here
    model.generation_config.pad_token_id = 0
    return model


def token_engine(loaded, **options):
    """An Engine sampling from the model's whole vocabulary, as transformers does: the
    checkpoints here come with a small stand-in tokenizer, which the engine would otherwise
    take as the limit of what may be sampled."""
    from stablelm_lsp.inference.engine import Engine

    return Engine(dataclasses.replace(loaded, tokenizer=None), **{**ENGINE_DEFAULTS, **options})


def hf_generate(model, prompt: list[int], steps: int, cache=None) -> list[int]:
    ids = torch.tensor([prompt], device=model.device)
    with torch.inference_mode():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), past_key_values=cache,
                             max_new_tokens=steps, do_sample=False)
    return out[0, len(prompt):].tolist()


def keystroke_replay(loaded, hf, keystrokes: int, scratch_keystrokes: int) -> dict:
    """Each keystroke appends a random token (the user types something the model did not
    suggest): the engine reuses the cache, drafts only from n-grams of the sequence."""
    vocab = loaded.config.vocab_size
    base = random_ids(PROMPT_TOKENS, vocab, seed=0)
    typed = random_ids(keystrokes, vocab, seed=1)
    prompts = [base + typed[:k + 1] for k in range(keystrokes)]
    ours = run_engine(loaded, base, prompts)
    plain = run_engine(loaded, base, prompts, draft_tokens=0)
    cropped, cropped_out = run_cropped(hf, base, prompts)

    scratch, scratch_out = [], []
    for p in prompts[:scratch_keystrokes]:
        t0 = time.perf_counter()
        scratch_out.append(hf_generate(hf, p, NEW_TOKENS))
        scratch.append(time.perf_counter() - t0)

    return {
        "ours_s": ours["median_s"], "no_drafts_s": plain["median_s"], "cropped_s": statistics.median(cropped),
        "scratch_s": statistics.median(scratch), "keystrokes": keystrokes,
        "scratch_keystrokes": len(scratch), "reused_median": ours["reused_median"],
        "drafted": ours["drafted"], "accepted": ours["accepted"],
        "same_tokens": ours["out"] == cropped_out == plain["out"] and ours["out"][:len(scratch_out)] == scratch_out,
    }


def typing_the_suggestion(loaded, hf, keystrokes: int) -> dict:
    """Each keystroke appends the first token of the completion just shown (the user types what
    was suggested): the rest of the previous completion is the engine's draft."""
    base = random_ids(PROMPT_TOKENS, loaded.config.vocab_size, seed=4)
    with token_engine(loaded, draft_tokens=0) as engine:   # the prompts, fixed in advance
        prompts, seq = [], base
        for _ in range(keystrokes + 1):
            seq = seq + engine.generate(seq, max_new_tokens=1).token_ids
            prompts.append(seq)
    ours = run_engine(loaded, base, prompts[1:])
    cropped, cropped_out = run_cropped(hf, base, prompts[1:])
    return {"ours_s": ours["median_s"], "cropped_s": statistics.median(cropped),
            "keystrokes": keystrokes, "drafted": ours["drafted"], "accepted": ours["accepted"],
            "same_tokens": ours["out"] == cropped_out}


def run_engine(loaded, base: list[int], prompts: list[list[int]], **options) -> dict:
    times, out, reused, drafted, accepted = [], [], [], 0, 0
    with token_engine(loaded, **options) as engine:
        engine.generate(base, max_new_tokens=NEW_TOKENS, key="doc")  # the state before typing
        for p in prompts:
            t0 = time.perf_counter()
            r = engine.generate(p, max_new_tokens=NEW_TOKENS, key="doc")
            times.append(time.perf_counter() - t0)
            out.append(r.token_ids)
            reused.append(r.reused_tokens)
            drafted += r.drafted_tokens
            accepted += r.accepted_tokens
    return {"median_s": statistics.median(times), "out": out, "reused_median": statistics.median(reused),
            "drafted": drafted, "accepted": accepted}


def run_cropped(hf, base: list[int], prompts: list[list[int]]) -> tuple[list[float], list[list[int]]]:
    cont = HFContinuation(hf)
    cont.generate(base, NEW_TOKENS)
    times, out = [], []
    for p in prompts:
        t0 = time.perf_counter()
        out.append(cont.generate(p, NEW_TOKENS))
        times.append(time.perf_counter() - t0)
    return times, out


def decode_speed(loaded, loaded_torch_linear, hf, bandwidth: float) -> dict:
    """Seconds per generated token with PROMPT_TOKENS of context already cached: one pass per
    token (no drafts: the same request repeated would otherwise be drafted whole), with the
    engine's default linear kernel and with torch's, and transformers'."""
    prompt = random_ids(PROMPT_TOKENS, loaded.config.vocab_size, seed=2)
    steps = DECODE_STEPS + 1

    def engine_per_token(model, **options) -> tuple[float, list[int]]:
        with token_engine(model, **options) as engine:
            engine.generate(prompt, max_new_tokens=1)
            # everything but the last prompt token comes from the cache: steps forward passes of
            # one token each (without drafts), the first at position 1499. A new key each run:
            # no previous completion of the same document to draft from.
            runs = [engine.generate(prompt, max_new_tokens=steps, key=f"run{i}") for i in range(3)]
        return min(r.elapsed_s for r in runs) / steps, runs[0]

    ours, _ = engine_per_token(loaded, draft_tokens=0)
    ours_torch_linear, _ = engine_per_token(loaded_torch_linear, linear="torch", attention="sdpa",
                                            draft_tokens=0)
    # with drafts from the sequence itself (per generated token; depends on how repetitive the
    # model's output is: a random model repeats itself a lot)
    ours_drafts, drafted = engine_per_token(loaded)

    cont = HFContinuation(hf)
    cont.generate(prompt, 1)
    hf_runs = []
    for _ in range(3):
        t0 = time.perf_counter()
        cont.generate(prompt, steps)
        hf_runs.append(time.perf_counter() - t0)
    theirs = min(hf_runs) / steps

    cfg = loaded.config
    # weights read per token: everything but the input embedding (one row is gathered), plus the
    # output head (the embedding itself when tied)
    model = loaded_torch_linear.model    # unpacked: its parameters are the weights read
    weights = sum(p.nbytes for n, p in model.named_parameters() if not n.startswith("embed."))
    if model.tied:
        weights += model.embed.weight.nbytes
    context = PROMPT_TOKENS + DECODE_STEPS // 2   # mean context over the measured steps
    kv = context * cfg.kv_bytes_per_token * model.embed.weight.element_size()
    floor = (weights + kv) / bandwidth
    return {"ours_s": ours, "ours_torch_linear_s": ours_torch_linear, "ours_drafts_s": ours_drafts,
            "drafted": drafted.drafted_tokens, "accepted": drafted.accepted_tokens, "transformers_s": theirs,
            "floor_s": floor, "weight_bytes": weights, "kv_bytes": kv}


def sliding_window_memory(out: Path, device: torch.device, dtype: torch.dtype) -> dict:
    import transformers

    from stablelm_lsp.models import load_model

    sys.path.insert(0, str(ROOT / "tests"))
    from checkpoints import build_tiny_checkpoint

    path = build_tiny_checkpoint("starcoder2", out, **STARCODER2_SIZES)
    loaded = load_model(path, device=device, dtype=dtype)
    prompt = random_ids(LONG_PROMPT, loaded.config.vocab_size, seed=3)
    with token_engine(loaded) as engine:
        result = engine.generate(prompt, max_new_tokens=NEW_TOKENS)
        held = engine.prefix_cache.nbytes
        ring = engine.prefix_cache.ring_capacity
    per_token = loaded.config.kv_bytes_per_token * loaded.model.embed.weight.element_size()
    hf = load_transformers(path, device, dtype)
    cache = transformers.DynamicCache(config=hf.config)
    hf_tokens = hf_generate(hf, prompt, NEW_TOKENS, cache)
    hf_bytes = sum(layer.keys.nbytes + layer.values.nbytes for layer in cache.layers)
    return {"held_bytes": held, "ring_positions": ring, "window_bytes": WINDOW * per_token,
            "linear_bytes": (LONG_PROMPT + NEW_TOKENS) * per_token, "transformers_bytes": hf_bytes,
            "same_tokens": result.token_ids == hf_tokens}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--keystrokes", type=int, default=20)
    ap.add_argument("--scratch-keystrokes", type=int, default=5,
                    help="keystrokes timed for generate-from-scratch (each recomputes 1500 tokens)")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    ap.add_argument("--device", default="cpu", help="cpu (default), cuda or cuda:N")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    ap.add_argument("--decode-step", default="off", choices=["off", "static", "compile", "cuda-graph"],
                    help="how this engine runs single-token steps (inference/captured.py)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    ENGINE_DEFAULTS["decode_step"] = args.decode_step

    from stablelm_lsp.models import load_model

    bandwidth = memory_bandwidth(device)
    with tempfile.TemporaryDirectory() as tmp:
        path = build_stablelm_160m(Path(tmp) / "stablelm-160m")
        loaded = load_model(path, device=device, dtype=dtype)
        loaded_torch_linear = load_model(path, device=device, dtype=dtype)
        hf = load_transformers(path, device, dtype)
        params = loaded_torch_linear.model.num_parameters()
        keys = keystroke_replay(loaded, hf, args.keystrokes, args.scratch_keystrokes)
        typing = typing_the_suggestion(loaded, hf, args.keystrokes)
        dec = decode_speed(loaded, loaded_torch_linear, hf, bandwidth)
        del loaded, loaded_torch_linear, hf
        window = sliding_window_memory(Path(tmp) / "starcoder2-w256", device, dtype)

    ratios = {
        "keystroke_vs_cropped": keys["ours_s"] / keys["cropped_s"],
        "keystroke_vs_scratch": keys["ours_s"] / keys["scratch_s"],
        "keystroke_no_drafts_vs_cropped": keys["no_drafts_s"] / keys["cropped_s"],
        "typing_suggestion_vs_cropped": typing["ours_s"] / typing["cropped_s"],
        "decode_torch_linear_vs_transformers": dec["ours_torch_linear_s"] / dec["transformers_s"],
        "decode_drafts_vs_transformers": dec["ours_drafts_s"] / dec["transformers_s"],
        "decode_vs_transformers": dec["ours_s"] / dec["transformers_s"],
        "decode_floor_fraction": dec["floor_s"] / dec["ours_s"],
        "transformers_decode_floor_fraction": dec["floor_s"] / dec["transformers_s"],
        "window_kv_vs_linear": window["held_bytes"] / window["linear_bytes"],
    }
    ms, mib = 1e3, 1 << 20
    print(f"{device_name(device)} ({device}), {args.dtype}, {torch.get_num_threads()} threads, decode step "
          f"{args.decode_step}; {params / 1e6:.0f}M-parameter StableLM-style checkpoint; copy bandwidth "
          f"{bandwidth / 1e9:.1f} GB/s")
    print(f"\nkeystroke replay: {PROMPT_TOKENS}-token prompt, +1 token per keystroke, {NEW_TOKENS} "
          f"greedy tokens (median of {keys['keystrokes']}; from scratch: of {keys['scratch_keystrokes']})")
    print(f"  {'this engine':<42}{keys['ours_s'] * ms:>9.0f} ms   (reused {keys['reused_median']:.0f} "
          f"prompt tokens; drafts: {keys['accepted']} of {keys['drafted']} tokens taken)")
    print(f"  {'this engine without drafts':<42}{keys['no_drafts_s'] * ms:>9.0f} ms   "
          f"ratio {ratios['keystroke_no_drafts_vs_cropped']:.2f}")
    print(f"  {'transformers, DynamicCache cropped':<42}{keys['cropped_s'] * ms:>9.0f} ms   "
          f"ratio {ratios['keystroke_vs_cropped']:.2f} (target <= 0.4)")
    print(f"  {'transformers, generate from scratch':<42}{keys['scratch_s'] * ms:>9.0f} ms   "
          f"ratio {ratios['keystroke_vs_scratch']:.3f} (target <= 0.1)")
    print(f"  same tokens from all four: {keys['same_tokens']}")
    print(f"\ntyping the suggestion: +1 token per keystroke, the first one of the completion shown "
          f"(median of {typing['keystrokes']})")
    print(f"  {'this engine':<42}{typing['ours_s'] * ms:>9.0f} ms   (drafts: {typing['accepted']} of "
          f"{typing['drafted']} tokens taken)")
    print(f"  {'transformers, DynamicCache cropped':<42}{typing['cropped_s'] * ms:>9.0f} ms   "
          f"ratio {ratios['typing_suggestion_vs_cropped']:.2f}")
    print(f"  same tokens: {typing['same_tokens']}")
    print(f"\ndecode per token at {PROMPT_TOKENS} tokens of context")
    print(f"  {'this engine (one pass per token)':<42}{dec['ours_s'] * ms:>9.1f} ms   "
          f"{ratios['decode_floor_fraction']:.0%} of the bandwidth floor")
    print(f"  {'this engine, drafts from its own sequence':<42}{dec['ours_drafts_s'] * ms:>9.1f} ms   ratio "
          f"{ratios['decode_drafts_vs_transformers']:.2f} ({dec['accepted']} of {dec['drafted']} draft "
          f"tokens taken)")
    print(f"  {'this engine, torch kernels (F.linear, SDPA)':<42}{dec['ours_torch_linear_s'] * ms:>9.1f} ms   ratio "
          f"{ratios['decode_torch_linear_vs_transformers']:.2f}")
    print(f"  {'transformers':<42}{dec['transformers_s'] * ms:>9.1f} ms   ratio "
          f"{ratios['decode_vs_transformers']:.2f} (target <= 0.5)")
    print(f"  {'floor: (weights + KV read) / bandwidth':<42}{dec['floor_s'] * ms:>9.1f} ms   "
          f"({dec['weight_bytes'] / mib:.0f} MiB weights + {dec['kv_bytes'] / mib:.0f} MiB KV)")
    print(f"\nStarCoder2-style, window {WINDOW}, {LONG_PROMPT}-token prompt: KV bytes held")
    print(f"  {'this engine (ring of ' + str(window['ring_positions']) + ' positions)':<42}"
          f"{window['held_bytes'] / mib:>9.2f} MiB")
    print(f"  {'the window itself':<42}{window['window_bytes'] / mib:>9.2f} MiB")
    print(f"  {'a linear cache':<42}{window['linear_bytes'] / mib:>9.2f} MiB")
    print(f"  {'transformers DynamicCache':<42}{window['transformers_bytes'] / mib:>9.2f} MiB")
    print(f"  same tokens as transformers: {window['same_tokens']}")
    print(json.dumps({
        "bench": "engine", "device": device_name(device), "dtype": args.dtype,
        "decode_step": args.decode_step, "threads": torch.get_num_threads(), "bandwidth_gbps": round(bandwidth / 1e9, 2),
        "keystroke_ms": {k: round(keys[k + "_s"] * ms, 1) for k in ("ours", "no_drafts", "cropped", "scratch")},
        "typing_suggestion_ms": {k: round(typing[k + "_s"] * ms, 1) for k in ("ours", "cropped")},
        "drafts": {"keystroke": [keys["accepted"], keys["drafted"]],
                   "typing_suggestion": [typing["accepted"], typing["drafted"]]},
        "decode_ms": {k: round(dec[k + "_s"] * ms, 2)
                      for k in ("ours", "ours_drafts", "ours_torch_linear", "transformers", "floor")},
        "window_kv_bytes": {k: window[k] for k in ("held_bytes", "window_bytes", "linear_bytes",
                                                    "transformers_bytes")},
        "same_tokens": keys["same_tokens"] and typing["same_tokens"] and window["same_tokens"],
        "ratios": {k: round(v, 3) for k, v in ratios.items()},
        "targets": {"keystroke_vs_cropped": 0.4, "keystroke_vs_scratch": 0.1, "decode_vs_transformers": 0.5},
    }))


if __name__ == "__main__":
    main()
