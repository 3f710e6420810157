"""Benchmark (not a test): load time and peak memory of loading a checkpoint, against its size.

Builds a random StableLM-style checkpoint of about 160M parameters (hidden 768, 12 layers, 12
heads, intermediate 2048, vocab 50304) in float32 with transformers' save_pretrained, then loads
it in fresh processes: with this project's loader in float32 and as int8 (quantized tensor by
tensor while loading), and with transformers' from_pretrained as the baseline measured in the
same run. Peak resident memory is measured above the process's own baseline after imports
(VmHWM reset through /proc/self/clear_refs). Targets: float32 peak <= 1.3x the checkpoint's
bytes; int8 peak <= 0.45x.

Then, per linear kernel choice (auto and each one forced, float32 and int8), an engine is set up
on the loaded model (its kernels measured once beforehand, so the measurement is reused; torch's
one-time set-up paid on the small built-in model first): the resident memory after set-up,
above the baseline, against the weights' bytes, target <= 1.1x (no choice holds a second copy).

Last, the time the first engine on this machine spends measuring the kernels (inference/
tuning.py), float32 and int8, on 1 and 2 threads: fresh processes with an empty measurement
cache (the compiled kernels copied in: compiling is not measuring). Target: about 3 s.

    python bench/load_bench.py [--out DIR] [--repeat 2]
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

CONFIG = dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, num_key_value_heads=12,
              intermediate_size=2048, vocab_size=50304, max_position_embeddings=4096)

_MEASURE = r"""
import json, sys, time
def status(key):
    for line in open("/proc/self/status"):
        if line.startswith(key):
            return int(line.split()[1]) * 1024
import torch
which, path = sys.argv[1], sys.argv[2]
if which in ("ours", "ours-int8"):
    from stablelm_lsp.models import load_model
    load = lambda: load_model(path, device="cpu", dtype="int8" if which == "ours-int8" else "float32")
else:
    import transformers
    load = lambda: transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
base = status("VmRSS:")
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")  # reset the peak-RSS counter to the current RSS
t0 = time.perf_counter()
model = load()
seconds = time.perf_counter() - t0
peak = status("VmHWM:") - base
ids = torch.ones(1, 8, dtype=torch.long)
with torch.no_grad():  # touch every weight: memory-mapped loaders only pay for pages when read
    (model if which == "transformers" else model.model)(ids)
print(json.dumps({"seconds": seconds, "peak_above_base": peak,
                  "after_forward": status("VmRSS:") - base}))
"""


_ENGINE = r"""
import json, sys
def status(key):
    for line in open("/proc/self/status"):
        if line.startswith(key):
            return int(line.split()[1]) * 1024
import torch
from stablelm_lsp.inference.engine import Engine
from stablelm_lsp.models import builtin_model_path, load_model
path, dtype, linear = sys.argv[1:4]
# torch's and oneDNN's one-time set-up (thread pools, kernels) is paid on the small built-in model
Engine(load_model(builtin_model_path(), device="cpu", dtype=dtype), linear=linear).close()
base = status("VmRSS:")
loaded = load_model(path, device="cpu", dtype=dtype)
weights = sum(p.nbytes for p in loaded.model.parameters())
engine = Engine(loaded, linear=linear)
print(json.dumps({"weights": weights, "after_setup": status("VmRSS:") - base,
                  "source": engine.kernels.source}))
"""


def engine_memory(path: Path, dtype: str, linear: str) -> dict:
    run = lambda: subprocess.run([sys.executable, "-c", _ENGINE, str(path), dtype, linear],  # noqa: E731
                                 check=True, capture_output=True, text=True)
    run()       # the kernels measured once (kept on disk): the second set-up reuses them
    return json.loads(run().stdout.strip().splitlines()[-1])


_TUNING = r"""
import json, sys, torch
torch.set_num_threads(int(sys.argv[3]))
from stablelm_lsp.inference.engine import Engine
from stablelm_lsp.models import load_model
with Engine(load_model(sys.argv[1], device="cpu", dtype=sys.argv[2])) as engine:
    print(json.dumps({"seconds": engine.kernels.timings["seconds"], "source": engine.kernels.source}))
"""


def tuning_time(path: Path, dtype: str, threads: int) -> dict:
    """The kernel measurement of a first start, in a fresh process and measurement cache."""
    from stablelm_lsp.inference import cpu_kernels

    with tempfile.TemporaryDirectory() as cache:
        (Path(cache) / "kernels").mkdir()
        for built in cpu_kernels.cache_dir().glob("*.so"):
            shutil.copy(built, Path(cache) / "kernels")
        out = subprocess.run([sys.executable, "-c", _TUNING, str(path), dtype, str(threads)],
                             check=True, capture_output=True, text=True,
                             env={**os.environ, "STABLELM_LSP_CACHE": cache})
    return json.loads(out.stdout.strip().splitlines()[-1])


def build(out: Path) -> Path:
    code = (
        "import sys, torch, transformers\n"
        "sys.path.insert(0, 'tests')\n"
        "from checkpoints import build_tokenizer\n"
        f"cfg = transformers.StableLmConfig(**{CONFIG!r})\n"
        "torch.manual_seed(0)\n"
        "m = transformers.StableLmForCausalLM(cfg)\n"
        f"m.save_pretrained({str(out)!r})\n"
        f"build_tokenizer(__import__('pathlib').Path({str(out)!r}))\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).resolve().parents[1],
                   stderr=subprocess.DEVNULL)
    return out


def measure(which: str, path: Path) -> dict:
    out = subprocess.run([sys.executable, "-c", _MEASURE, which, str(path)], check=True,
                         capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=None, help="where to build the checkpoint")
    ap.add_argument("--repeat", type=int, default=2)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        path = build(args.out or Path(tmp) / "stablelm-160m")
        ckpt_bytes = sum(f.stat().st_size for f in path.glob("*.safetensors"))
        rows = {}
        for which in ("ours", "ours-int8", "transformers"):
            runs = [measure(which, path) for _ in range(args.repeat)]
            rows[which] = min(runs, key=lambda r: r["seconds"]) | {
                "peak_above_base": min(r["peak_above_base"] for r in runs),
                "after_forward": min(r["after_forward"] for r in runs)}
        from stablelm_lsp.inference.linear import candidates

        import torch

        engines = {}
        for dtype in ("float32", "int8"):
            for linear in ["auto"] + [i.name for i in candidates(torch.device("cpu"), torch.float32,
                                                                   dtype == "int8").impls]:
                engines[f"{dtype} {linear}"] = engine_memory(path, dtype, linear)
        tuning = {f"{dtype}, {threads} thread{'s' if threads > 1 else ''}": tuning_time(path, dtype, threads)
                  for threads in (1, 2) for dtype in ("float32", "int8")}
    mib = 1024 * 1024
    from linear_bench import cpu_model  # bench/ is on sys.path when run as a script

    print(f"CPU: {cpu_model()}")
    print(f"checkpoint: {ckpt_bytes / mib:.0f} MiB ({ckpt_bytes / 4 / 1e6:.0f}M float32 parameters)")
    print(f"{'loader':<14}{'seconds':>9}{'peak MiB':>10}{'peak/ckpt':>11}{'after 1 forward/ckpt':>22}")
    for which, r in rows.items():
        print(f"{which:<14}{r['seconds']:>9.2f}{r['peak_above_base'] / mib:>10.0f}"
              f"{r['peak_above_base'] / ckpt_bytes:>11.2f}{r['after_forward'] / ckpt_bytes:>22.2f}")
    print(f"\nresident after an engine's set-up (model loaded, kernels installed) / the weights' bytes")
    for name, r in engines.items():
        print(f"  {name:<24}{r['after_setup'] / r['weights']:>6.2f}   ({r['weights'] / mib:.0f} MiB weights)")
    print("\nkernel measurement at a first start (fresh measurement cache), seconds (target about 3)")
    for name, r in tuning.items():
        print(f"  {name:<24}{r['seconds']:>6.1f}   ({r['source']})")
    print(json.dumps({
        "bench": "load", "cpu": cpu_model(), "checkpoint_bytes": ckpt_bytes,
        "tuning_seconds": {n: r["seconds"] for n, r in tuning.items()},
        "ours_int8_seconds": round(rows["ours-int8"]["seconds"], 3),
        "ours_int8_peak_ratio": round(rows["ours-int8"]["peak_above_base"] / ckpt_bytes, 3),
        "engine_after_setup_vs_weights": {n: round(r["after_setup"] / r["weights"], 3)
                                          for n, r in engines.items()},
        "target_int8_peak_ratio": 0.45, "target_after_setup_vs_weights": 1.1,
        "ours_seconds": round(rows["ours"]["seconds"], 3),
        "ours_peak_ratio": round(rows["ours"]["peak_above_base"] / ckpt_bytes, 3),
        "transformers_seconds": round(rows["transformers"]["seconds"], 3),
        "transformers_peak_ratio": round(rows["transformers"]["peak_above_base"] / ckpt_bytes, 3),
        "ours_after_forward_ratio": round(rows["ours"]["after_forward"] / ckpt_bytes, 3),
        "transformers_after_forward_ratio": round(rows["transformers"]["after_forward"] / ckpt_bytes, 3),
        "target_peak_ratio": 1.3,
    }))


if __name__ == "__main__":
    main()
