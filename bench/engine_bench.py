"""Benchmark (not a test): keystroke latency, decode speed, the kernels chosen and their
alternatives, int8 weights, llama.cpp as a peer, and sliding-window KV memory of the engine.

Everything is measured in one run, on the CPU in float32 unless --device/--dtype say otherwise
(the GPU checks of a lent machine, scripts/cuda_checks.sh, run it with --device cuda --dtype
bfloat16), against baselines measured in the same run; the device's name (the CPU model, or the
GPU's) comes first. --decode-step goes to every engine made here (inference/captured.py; "off"
by default); a configuration the engine refuses with it (a forced implementation with "compile")
is listed as not measured. Below, "float32" stands for the --dtype given; int8 weights compute
in what the model loader's "auto" picks (float32 on a CPU; on a GPU the checkpoint's dtype,
float32 for the one built here).

1. The kernels the engine chose on this machine (inference/tuning.py) for the 160M checkpoint
   below, float32 and int8: per group of layers the implementation per range of pass lengths,
   the attention kernel, which passes run every layer in one C call (inference/native_layers.py),
   the draft length and the measured cost of a pass of m positions.
2. Keystroke replay on a random StableLM-style checkpoint of about 160M parameters (hidden 768,
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
3. Decode time per token at 1500 tokens of context (one pass per token, no drafts) and the
   keystroke replay (--compare-keystrokes), for the measured choice ("auto") and every linear
   implementation forced, float32 and int8 weights; transformers; llama.cpp (llama-cpp-python,
   when importable) on the same weights converted to GGUF f32 and Q8_0 with the
   convert_hf_to_gguf.py of its source distribution. Targets: auto <= 1.05x the best forced
   choice; float32 decode <= 0.5x transformers; int8 decode <= 0.4x float32 auto and <= llama.cpp
   Q8_0. A forced choice runs its implementation on every pass of up to 16 positions (all that
   is timed) and its fallback on longer ones (the untimed prefill of the prompt: torch's int8
   kernel would take minutes there). "int8 q8" (the own kernel rounding the inputs to int8 as
   Q8_0 does; never chosen by auto) is reported against llama.cpp Q8_0 too, and left out of
   auto's "best forced". Measured in rounds (--rounds decode runs, --compare-keystrokes
   keystrokes): each decode run and each keystroke goes through every configuration in turn,
   the order reversed every other time, so load from other processes falls on all alike; a
   configuration's figure is its median, and every ratio between two of them is paired: the
   median of the ratios of two runs in the same round (two replays of the same keystroke),
   taken seconds apart, so the VM's drift between rounds cancels. Each engine's draft length
   (from its own measured pass costs and the acceptance it measured) is printed beside it. Decode is also stated against the floor set by the
   machine's memory bandwidth (a large tensor copy): (weight bytes read per token + KV bytes
   read) / bandwidth.
4. A StarCoder2-style checkpoint with a 256-token sliding window on a 4096-token prompt: the KV
   bytes the engine holds, against the window's own bound and a linear cache.

On a GPU (--device cuda[:N]) the same, with these differences: the bandwidth is that of the GPU's
memory (a copy there, synchronized); nothing is measured in 1. (float layers run torch's
kernels, so no table; int8 layers torch's int8 kernel when the build has one, else widening);
only the "auto" configurations run in 3. (the forced implementations are what a CPU's engine
measures against each other; inference/linear.py's candidates() says what exists for the
device), int8 where candidates() has an implementation for it there; llama.cpp is not measured
(a CPU peer). transformers runs on the same device in the same dtype.

Prints tables and one JSON line with the numbers and ratios.

    python bench/engine_bench.py [--threads N] [--keystrokes 20] [--compare-keystrokes 10]
        [--scratch-keystrokes 5] [--rounds 7] [--llama-sdist PATH] [--no-llama] [--no-int8]
        [--device cpu|cuda[:N]] [--dtype float32|bfloat16|float16]
        [--decode-step off|static|compile|cuda-graph]
"""
from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import torch

from linear_bench import cpu_model  # bench/ is on sys.path when run as a script
from load_bench import build as build_stablelm_160m
from stablelm_lsp.inference.prefix_cache import common_prefix_len

ROOT = Path(__file__).resolve().parents[1]
PROMPT_TOKENS = 1500
NEW_TOKENS = 16
DECODE_STEPS = 32
SPECIALS = 7            # ids below this are the tokenizer's special tokens: keep prompts clear of them
WINDOW, LONG_PROMPT = 256, 4096
STARCODER2_SIZES = dict(hidden_size=384, intermediate_size=1536, num_hidden_layers=6,
                        num_attention_heads=6, num_key_value_heads=2, sliding_window=WINDOW,
                        max_position_embeddings=8192)
SHORT_PASS = 16         # forced choices run their implementation up to here (see the docstring)


@dataclasses.dataclass(frozen=True)
class Target:
    """Where and how everything here runs (--device, --dtype, --decode-step); set once in main."""
    device: torch.device = torch.device("cpu")
    float_dtype: str = "float32"    # float32 | bfloat16 | float16: the float configurations' dtype
    decode_step: str = "off"        # off | static | compile | cuda-graph, for every Engine made here

    @property
    def torch_dtype(self) -> torch.dtype:
        return getattr(torch, self.float_dtype)


TARGET = Target()


def element_size(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def memory_bandwidth(gib: float = 1.0, repeats: int = 5) -> float:
    """Bytes per second moved by a large tensor copy on TARGET's device (each byte read once and
    written once)."""
    src = torch.ones(int(gib * (1 << 30)) // 4, device=TARGET.device)
    dst = torch.empty_like(src)
    dst.copy_(src)
    best = min(_timed(lambda: dst.copy_(src)) for _ in range(repeats))
    return 2 * src.nbytes / best


def _timed(fn) -> float:
    _sync()
    t0 = time.perf_counter()
    fn()
    _sync()
    return time.perf_counter() - t0


def _sync() -> None:
    if TARGET.device.type == "cuda":
        torch.cuda.synchronize(TARGET.device)


def device_name(device: torch.device) -> str:
    """The GPU's name, or the CPU's model."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return cpu_model()


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


def load_transformers(path: Path):
    """transformers' model of the checkpoint on TARGET's device in its float dtype."""
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=TARGET.torch_dtype)
    model = model.to(TARGET.device).eval()
    model.generation_config.eos_token_id = None   # exactly `steps` tokens, like the engine here
    model.generation_config.pad_token_id = 0
    return model


def hf_generate(model, prompt: list[int], steps: int, cache=None) -> list[int]:
    ids = torch.tensor([prompt], device=model.device)
    with torch.inference_mode():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), past_key_values=cache,
                             max_new_tokens=steps, do_sample=False)
    return out[0, len(prompt):].tolist()


# -- our engine, in each configuration ---------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Config:
    dtype: str          # TARGET.float_dtype (float32 | bfloat16 | float16) | int8
    linear: str         # auto, or the implementation forced

    @property
    def name(self) -> str:
        return f"{self.dtype} {self.linear}"


def open_engine(path: Path, config: Config, loaded=None, **options):
    """An Engine sampling from the model's whole vocabulary, as transformers does (the
    checkpoints here come with a small stand-in tokenizer, which the engine would otherwise take
    as the limit of what may be sampled), on TARGET's device with its decode step. A forced
    choice runs its implementation on passes of up to SHORT_PASS positions and its fallback
    beyond (see the module's docstring)."""
    from stablelm_lsp.inference.engine import Engine
    from stablelm_lsp.inference.linear import KernelLinear, candidates
    from stablelm_lsp.models import load_model

    if loaded is None:
        loaded = load_model(path, device=TARGET.device, dtype=config.dtype)
    engine = Engine(dataclasses.replace(loaded, tokenizer=None), linear=config.linear,
                    **{"decode_step": TARGET.decode_step, **options})
    if config.linear != "auto":
        # the fallback runs on every layout (plain, packed, int8)
        fallback = candidates(loaded.device, loaded.dtype, config.dtype == "int8").fallback
        for layer in engine.model.modules():
            if isinstance(layer, KernelLinear):
                layer.table = ((SHORT_PASS, layer.impl_for(1)), (None, fallback))
    return engine


def keystroke_prompts(vocab: int, keystrokes: int) -> tuple[list[int], list[list[int]]]:
    base = random_ids(PROMPT_TOKENS, vocab, seed=0)
    typed = random_ids(keystrokes, vocab, seed=1)
    return base, [base + typed[:k + 1] for k in range(keystrokes)]


def run_engine(engine, base: list[int], prompts: list[list[int]]) -> dict:
    """The keystroke replay on one engine (median seconds, tokens, reuse and drafts)."""
    times, out, reused, drafted, accepted = [], [], [], 0, 0
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


def keystroke_replay(path: Path, hf, vocab: int, keystrokes: int, scratch_keystrokes: int) -> dict:
    """Each keystroke appends a random token (the user types something the model did not
    suggest): the engine reuses the cache, drafts only from n-grams of the sequence."""
    base, prompts = keystroke_prompts(vocab, keystrokes)
    auto = Config(TARGET.float_dtype, "auto")
    with open_engine(path, auto) as engine:
        ours = run_engine(engine, base, prompts)
    with open_engine(path, auto, draft_tokens=0) as engine:
        plain = run_engine(engine, base, prompts)
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


def typing_the_suggestion(path: Path, hf, vocab: int, keystrokes: int) -> dict:
    """Each keystroke appends the first token of the completion just shown (the user types what
    was suggested): the rest of the previous completion is the engine's draft."""
    auto = Config(TARGET.float_dtype, "auto")
    base = random_ids(PROMPT_TOKENS, vocab, seed=4)
    with open_engine(path, auto, draft_tokens=0) as engine:   # the prompts, fixed in advance
        prompts, seq = [], base
        for _ in range(keystrokes + 1):
            seq = seq + engine.generate(seq, max_new_tokens=1).token_ids
            prompts.append(seq)
    with open_engine(path, auto) as engine:
        ours = run_engine(engine, base, prompts[1:])
    cropped, cropped_out = run_cropped(hf, base, prompts[1:])
    return {"ours_s": ours["median_s"], "cropped_s": statistics.median(cropped),
            "keystrokes": keystrokes, "drafted": ours["drafted"], "accepted": ours["accepted"],
            "same_tokens": ours["out"] == cropped_out}


def int8_compute_dtype(path: Path) -> torch.dtype:
    """The dtype int8 weights compute in on TARGET's device (what load_model's "auto" picks)."""
    from stablelm_lsp.models.checkpoint import pick_dtype
    from stablelm_lsp.models.config import ModelConfig

    return pick_dtype("int8", TARGET.device, ModelConfig.from_file(path / "config.json"))


def configurations(path: Path, int8: bool) -> tuple[list[Config], dict[str, str]]:
    """The configurations measured on TARGET's device, and those not measured with why (label ->
    reason). Every linear implementation inference/linear.py has for the device is forced where
    the engine chooses among them by measurement (a CPU); elsewhere "auto" alone runs."""
    from stablelm_lsp.inference.linear import candidates

    device, skipped = TARGET.device, {}
    weights = [(TARGET.float_dtype, TARGET.torch_dtype, False)]
    if int8:
        weights.append(("int8", int8_compute_dtype(path), True))
    configs = []
    for name, compute, quantized in weights:
        found = candidates(device, compute, quantized)
        if not found.impls:
            skipped[name] = f"no linear implementation for these weights on {device}: " + "; ".join(
                f"{impl}: {why}" for impl, why in found.problems.items())
            continue
        configs.append(Config(name, "auto"))
        if device.type == "cpu":
            configs += [Config(name, i.name) for i in found.impls]
        else:
            skipped[f"{name} forced"] = (
                f"forced implementations are what a CPU's engine measures against each other; on "
                f"{device.type} nothing is measured (candidates: {', '.join(i.name for i in found.impls)})")
    return configs, skipped


class EngineRunner:
    """One configuration of this engine: a decode engine (no drafts) and a replay engine
    (drafts on), both on one loaded model."""

    def __init__(self, path: Path, config: Config):
        from stablelm_lsp.models import load_model

        self.name = config.name
        loaded = load_model(path, device=TARGET.device, dtype=config.dtype)
        self.decode_engine = open_engine(path, config, loaded, draft_tokens=0)
        self.replay_engine = open_engine(path, config, loaded)
        self.plan = self.replay_engine.kernels

    def prepare(self, decode_prompt: list[int], base: list[int]) -> None:
        self.decode_prompt = decode_prompt
        self.decode_engine.generate(decode_prompt, max_new_tokens=1, key="decode")
        self.replay_engine.generate(base, max_new_tokens=NEW_TOKENS, key="doc")

    def decode(self, run: int) -> tuple[float, list[int]]:
        # everything but the last prompt token comes from the cache: DECODE_STEPS + 1 passes of
        # one token each. The same key every run: the slot is cut back to the prompt, as the
        # peers crop theirs (a new key would copy the 1500 positions into a new slot: 24 ms a
        # run); the decode engine has no drafts, so the previous completion is not drafted from
        r = self.decode_engine.generate(self.decode_prompt, max_new_tokens=DECODE_STEPS + 1, key="decode")
        return r.elapsed_s, r.token_ids

    def keystroke(self, prompt: list[int]) -> list[int]:
        return self.replay_engine.generate(prompt, max_new_tokens=NEW_TOKENS, key="doc").token_ids

    def close(self) -> None:
        self.decode_engine.close()
        self.replay_engine.close()


class TransformersRunner:
    name = "transformers"

    def __init__(self, hf):
        self.decode_cont, self.replay_cont = HFContinuation(hf), HFContinuation(hf)

    def prepare(self, decode_prompt: list[int], base: list[int]) -> None:
        self.decode_prompt = decode_prompt
        self.decode_cont.generate(decode_prompt, 1)
        self.replay_cont.generate(base, NEW_TOKENS)

    def decode(self, run: int) -> tuple[float, list[int]]:
        t0 = time.perf_counter()
        out = self.decode_cont.generate(self.decode_prompt, DECODE_STEPS + 1)
        return time.perf_counter() - t0, out

    def keystroke(self, prompt: list[int]) -> list[int]:
        return self.replay_cont.generate(prompt, NEW_TOKENS)

    def close(self) -> None:
        pass


def in_turn(runners: list, round_: int) -> list:
    """The runners in the order round `round_` takes them: reversed every other round, so no
    configuration always runs right after the same neighbour (a cache it left warm or cold)."""
    return runners if round_ % 2 == 0 else runners[::-1]


def paired(ours: list[float], theirs: list[float]) -> float:
    """The median of the ratios of times taken in the same round (decode) or on the same
    keystroke: each pair ran seconds apart, so a drift in the machine's speed between rounds
    (other processes, the VM's neighbours) cancels in the ratio, where a ratio of two medians
    or minima taken at different times keeps it."""
    return statistics.median(a / b for a, b in zip(ours, theirs, strict=True))


def compare(path: Path, hf, vocab: int, keystrokes: int, rounds: int, configs: list[Config],
            llama: dict) -> dict:
    """Decode and keystroke replay for every configuration, transformers and llama.cpp, in
    rounds: each decode round and each keystroke goes through every runner in turn (the order
    reversed every other time), so load from other processes falls on all of them alike; a
    runner's figures are the median over the rounds and keystrokes, and every ratio between
    two runners is `paired`. A configuration the engine refuses (a forced implementation with
    a compiled decode step, say) is left out with the reason."""
    from stablelm_lsp.inference.errors import InvalidParameter

    decode_prompt = random_ids(PROMPT_TOKENS, vocab, seed=2)
    base, prompts = keystroke_prompts(vocab, keystrokes)
    runners, refused = [], {}
    for config in configs:
        try:
            runners.append(EngineRunner(path, config))
        except InvalidParameter as exc:
            refused[config.name] = str(exc)
    runners.append(TransformersRunner(hf))
    runners += [LlamaRunner(name, gguf) for name, gguf in llama.get("files", {}).items()]
    try:
        for runner in runners:
            runner.prepare(decode_prompt, base)
        decode = {r.name: [] for r in runners}      # seconds per token, one a round
        tokens, replay = {}, {r.name: [] for r in runners}
        keystroke_out = {r.name: [] for r in runners}
        for run in range(rounds):
            for runner in in_turn(runners, run):
                seconds, tokens[runner.name] = runner.decode(run)
                decode[runner.name].append(seconds / (DECODE_STEPS + 1))
        for k, prompt in enumerate(prompts):
            for runner in in_turn(runners, k):
                t0 = time.perf_counter()
                keystroke_out[runner.name].append(runner.keystroke(prompt))
                replay[runner.name].append(time.perf_counter() - t0)
        plans = {r.name.split()[0]: r.plan for r in runners
                 if isinstance(r, EngineRunner) and r.name.endswith(" auto")}
        drafts = {r.name: r.replay_engine.draft_tokens for r in runners if isinstance(r, EngineRunner)}
    finally:
        for runner in runners:
            runner.close()
    rows = {name: {"decode_s": statistics.median(decode[name]), "decode_rounds": decode[name],
                   "keystroke_s": statistics.median(replay[name]), "keystroke_each": replay[name],
                   "keystroke_out": keystroke_out[name], "draft_tokens": drafts.get(name)}
            for name in decode}
    return {"rows": rows, "plans": plans, "tokens": tokens, "refused": refused}


# -- llama.cpp (llama-cpp-python) ------------------------------------------------------------

def llama_available() -> str | None:
    """Why llama.cpp cannot be a peer here (None: it can)."""
    try:
        import llama_cpp  # noqa: F401
    except ImportError as exc:
        return f"llama_cpp is not importable ({exc}); pip install llama-cpp-python"
    return None


def llama_converter(sdist: Path | None, cache: Path) -> Path:
    """vendor/llama.cpp of llama-cpp-python's source distribution (the installed version),
    unpacked into `cache`; from `sdist` (a .tar.gz or an unpacked folder) or pip download."""
    import llama_cpp

    version = llama_cpp.__version__
    if sdist is None:
        cache.mkdir(parents=True, exist_ok=True)
        subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--no-binary",
                        ":all:", f"llama-cpp-python=={version}", "-d", str(cache)], check=True,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        sdist = next(cache.glob("llama_cpp_python-*.tar.gz"))
    if sdist.is_dir():
        root = sdist
    else:
        with tarfile.open(sdist) as tar:
            tar.extractall(cache, filter="data")
        root = next(p for p in cache.iterdir() if p.is_dir() and p.name.startswith("llama_cpp_python-"))
    llama = root / "vendor" / "llama.cpp"
    if not (llama / "convert_hf_to_gguf.py").exists():
        raise FileNotFoundError(f"{llama}/convert_hf_to_gguf.py not found")
    return llama


# convert_hf_to_gguf.py refuses BPE tokenizers whose pre-tokenizer it has not seen; the checkpoint
# here has a byte-level (gpt-2 style) BPE tokenizer trained for the tests, and llama.cpp is fed
# token ids, not text: an unrecognised pre-tokenizer is taken as gpt-2's.
_CONVERT = r"""
import runpy, sys
from pathlib import Path
llama = Path(sys.argv[1])
sys.path[:0] = [str(llama), str(llama / "gguf-py")]
import conversion.base as base
recognised = base.TextModel.get_vocab_base_pre
def pre(self, tokenizer):
    try:
        return recognised(self, tokenizer)
    except NotImplementedError:
        return "gpt-2"
base.TextModel.get_vocab_base_pre = pre
sys.argv = [str(llama / "convert_hf_to_gguf.py"), *sys.argv[2:]]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def convert_to_gguf(llama: Path, checkpoint: Path, out: Path, outtype: str) -> Path:
    target = out / f"{checkpoint.name}-{outtype}.gguf"
    subprocess.run([sys.executable, "-c", _CONVERT, str(llama), str(checkpoint), "--outfile",
                    str(target), "--outtype", outtype], check=True, capture_output=True)
    return target


class LlamaRunner:
    """llama.cpp through llama-cpp-python on a GGUF of the same weights; its own prefix reuse
    (the longest common prefix with what its context holds), greedy sampling."""

    def __init__(self, name: str, gguf: Path):
        from llama_cpp import Llama

        self.name = name
        threads = torch.get_num_threads()

        def open_llama():
            return Llama(model_path=str(gguf), n_ctx=2048, n_batch=256, n_threads=threads,
                         n_threads_batch=threads, verbose=False)

        self.decode_llm, self.replay_llm = open_llama(), open_llama()

    @staticmethod
    def _generate(llm, prompt: list[int], n: int) -> list[int]:
        return list(itertools.islice(llm.generate(prompt, top_k=1, top_p=1.0, temp=0.0,
                                                  repeat_penalty=1.0), n))

    def prepare(self, decode_prompt: list[int], base: list[int]) -> None:
        self.decode_prompt = decode_prompt
        self._generate(self.decode_llm, decode_prompt, 1)
        self._generate(self.replay_llm, base, NEW_TOKENS)

    def decode(self, run: int) -> tuple[float, list[int]]:
        # keep the prompt but its last token cached, drop what was generated
        self.decode_llm.n_tokens = len(self.decode_prompt) - 1
        t0 = time.perf_counter()
        out = self._generate(self.decode_llm, self.decode_prompt, DECODE_STEPS + 1)
        return time.perf_counter() - t0, out

    def keystroke(self, prompt: list[int]) -> list[int]:
        return self._generate(self.replay_llm, prompt, NEW_TOKENS)

    def close(self) -> None:
        self.decode_llm.close()
        self.replay_llm.close()


# -- memory: the sliding window --------------------------------------------------------------

def sliding_window_memory(out: Path) -> dict:
    import transformers

    from stablelm_lsp.inference.engine import Engine
    from stablelm_lsp.models import load_model

    sys.path.insert(0, str(ROOT / "tests"))
    from checkpoints import build_tiny_checkpoint

    path = build_tiny_checkpoint("starcoder2", out, **STARCODER2_SIZES)
    loaded = load_model(path, device=TARGET.device, dtype=TARGET.float_dtype)
    prompt = random_ids(LONG_PROMPT, loaded.config.vocab_size, seed=3)
    with Engine(dataclasses.replace(loaded, tokenizer=None), decode_step=TARGET.decode_step) as engine:
        result = engine.generate(prompt, max_new_tokens=NEW_TOKENS)
        held = engine.prefix_cache.nbytes
        ring = engine.prefix_cache.ring_capacity
    per_token = loaded.config.kv_bytes_per_token * element_size(loaded.dtype)
    hf = load_transformers(path)
    cache = transformers.DynamicCache(config=hf.config)
    hf_tokens = hf_generate(hf, prompt, NEW_TOKENS, cache)
    hf_bytes = sum(layer.keys.nbytes + layer.values.nbytes for layer in cache.layers)
    return {"held_bytes": held, "ring_positions": ring, "window_bytes": WINDOW * per_token,
            "linear_bytes": (LONG_PROMPT + NEW_TOKENS) * per_token, "transformers_bytes": hf_bytes,
            "same_tokens": result.token_ids == hf_tokens}


def decode_floor(path: Path, bandwidth: float, int8: bool) -> dict:
    """(weight bytes read per token + KV bytes read) / bandwidth on TARGET's device, in its float
    dtype and (int8) with int8 weights: the weights but the input embedding (one row is
    gathered), plus the head (the embedding when tied); the KV cache in the engine's default
    dtype (float16 for int8 weights on a CPU, else the compute dtype)."""
    from stablelm_lsp.inference.engine import kv_cache_dtype
    from stablelm_lsp.models import load_model

    floors = {}
    for dtype in (TARGET.float_dtype,) + (("int8",) if int8 else ()):
        loaded = load_model(path, device=TARGET.device, dtype=dtype)
        model = loaded.model
        weights = sum(p.nbytes for n, p in model.named_parameters() if not n.startswith("embed."))
        if model.tied:
            weights += model.embed.weight.nbytes + getattr(model.embed, "scale", torch.empty(0)).nbytes
        context = PROMPT_TOKENS + DECODE_STEPS // 2   # mean context over the measured steps
        kv_dtype = kv_cache_dtype("auto", torch.device(loaded.device), loaded.dtype, dtype == "int8")
        kv = context * model.cfg.kv_bytes_per_token * element_size(kv_dtype)
        floors[dtype] = {"floor_s": (weights + kv) / bandwidth, "weight_bytes": weights, "kv_bytes": kv}
        del loaded, model
    return floors


# -- report ----------------------------------------------------------------------------------

def describe_plan(label: str, plan) -> list[str]:
    draft = "the device's default" if plan.draft_tokens is None else plan.draft_tokens
    cost = ", ".join(f"{m}: {c:.2f}" for m, c in plan.pass_cost.items()) or "not measured"
    lines = [f"  {label}: {plan.source}; draft length {draft}; cost of a pass of m "
             "positions / one: " + cost]
    groups = plan.timings.get("linear", {})
    for name, table in plan.linear.items():
        choice = ", ".join(f"{'<= ' + str(b) if b else 'longer'}: {i.name}" for b, i in table)
        lines.append(f"    {name + ' x' + str(groups.get(name, {}).get('layers', '?')):<24}{choice}")
    att = ", ".join(f"{'<= ' + str(b) if b else 'longer'}: {n}" for b, n in plan.attention)
    lines.append(f"    {'attention':<24}{att or 'not measured'}")
    layers = ", ".join(f"{'<= ' + str(b) if b else 'longer'}: {n}" for b, n in plan.layers)
    glue = plan.timings.get("glue")
    if glue:    # what a pass of one position costs each way besides its kernels
        layers += f" (one position besides the kernels: blocks {glue['blocks'][1] / 1e3:.2f} ms, " \
                  f"native {glue['native'][1] / 1e3:.2f} ms)"
    lines.append(f"    {'layers':<24}{layers or 'the blocks (no C call for every layer here)'}")
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--keystrokes", type=int, default=20)
    ap.add_argument("--compare-keystrokes", type=int, default=10,
                    help="keystrokes replayed per configuration in the comparison (3.)")
    ap.add_argument("--rounds", type=int, default=7,
                    help="decode runs per configuration in the comparison (3.), in rounds")
    ap.add_argument("--scratch-keystrokes", type=int, default=5,
                    help="keystrokes timed for generate-from-scratch (each recomputes 1500 tokens)")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    ap.add_argument("--no-int8", action="store_true", help="skip the int8 configurations")
    ap.add_argument("--no-llama", action="store_true", help="skip llama.cpp even when importable")
    ap.add_argument("--llama-sdist", type=Path, default=None,
                    help="llama-cpp-python's source distribution (.tar.gz or folder) for "
                         "convert_hf_to_gguf.py (default: pip download of the installed version)")
    ap.add_argument("--device", default="cpu", help="cpu (default), cuda or cuda:N")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                    help="the float configurations' dtype, transformers' too (default: float32)")
    ap.add_argument("--decode-step", default="off", choices=["off", "static", "compile", "cuda-graph"],
                    help="how every engine here runs single-token steps (inference/captured.py)")
    args = ap.parse_args()
    from stablelm_lsp.inference.captured import decode_step_problems

    try:
        device = torch.device(args.device)
    except RuntimeError as exc:
        ap.error(f"--device {args.device}: {exc}")
    if device.type not in ("cpu", "cuda"):
        ap.error(f"--device {args.device}: cpu, cuda or cuda:N")
    if device.type == "cuda" and not torch.cuda.is_available():
        ap.error(f"--device {args.device}: torch sees no CUDA device")
    if problems := decode_step_problems(args.decode_step, device):
        ap.error(f"--decode-step {args.decode_step}: " + "; ".join(problems))
    global TARGET
    TARGET = Target(device, args.dtype, args.decode_step)
    fd = args.dtype     # the float configurations' dtype name
    if args.threads:
        torch.set_num_threads(args.threads)
    threads = torch.get_num_threads()

    bandwidth = memory_bandwidth()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        path = build_stablelm_160m(tmp / "stablelm-160m")
        configs, not_measured = configurations(path, not args.no_int8)
        int8 = any(c.dtype == "int8" for c in configs)
        int8_dtype = int8_compute_dtype(path) if int8 else None
        llama: dict = {"skipped": "--no-llama"} if args.no_llama else {}
        if not args.no_llama and device.type != "cpu":
            llama["skipped"] = (f"a CPU peer here (llama-cpp-python's CPU build), not run against "
                                f"this engine on {device.type}")
        elif not args.no_llama:
            why = llama_available()
            if why:
                llama["skipped"] = why
            else:
                try:
                    converter = llama_converter(args.llama_sdist, tmp / "llama-src")
                    llama["files"] = {f"llama.cpp {t}": convert_to_gguf(converter, path, tmp, t)
                                      for t in ("f32", "q8_0")}
                except (OSError, StopIteration, subprocess.CalledProcessError, tarfile.TarError) as exc:
                    llama["skipped"] = f"no GGUF of the checkpoint ({type(exc).__name__}: {exc})"
        hf = load_transformers(path)
        vocab = hf.config.vocab_size
        params = sum(p.numel() for p in hf.parameters())
        keys = keystroke_replay(path, hf, vocab, args.keystrokes, args.scratch_keystrokes)
        typing = typing_the_suggestion(path, hf, vocab, args.keystrokes)
        comparison = compare(path, hf, vocab, args.compare_keystrokes, args.rounds, configs, llama)
        floors = decode_floor(path, bandwidth, int8)
        del hf
        window = sliding_window_memory(tmp / "starcoder2-w256")

    rows, plans, tokens = comparison["rows"], comparison["plans"], comparison["tokens"]
    not_measured |= comparison["refused"]
    ms, mib = 1e3, 1 << 20
    auto = f"{fd} auto"
    measured = [d for d in (fd, "int8") if f"{d} auto" in rows]     # weights whose auto row exists

    def best_forced(dtype: str, what: str) -> tuple[str, float] | None:
        # among the choices "auto" has: the layers' own arithmetic ("q8" rounds the inputs too)
        forced = {n: r[what] for n, r in rows.items()
                  if n.startswith(dtype + " ") and not n.endswith((" auto", " q8"))}
        if not forced:      # only auto runs (a GPU), or the engine refused the forced ones
            return None
        name = min(forced, key=forced.get)
        return name, forced[name]

    series = {"decode_s": "decode_rounds", "keystroke_s": "keystroke_each"}

    def between(ours: str, theirs: str, what: str) -> float:
        """ours / theirs in `what` (decode_s, keystroke_s), paired round by round (keystroke by
        keystroke): see `paired`."""
        return paired(rows[ours][series[what]], rows[theirs][series[what]])

    ratios = {
        "keystroke_vs_cropped": keys["ours_s"] / keys["cropped_s"],
        "keystroke_vs_scratch": keys["ours_s"] / keys["scratch_s"],
        "keystroke_no_drafts_vs_cropped": keys["no_drafts_s"] / keys["cropped_s"],
        "typing_suggestion_vs_cropped": typing["ours_s"] / typing["cropped_s"],
        "decode_vs_transformers": between(auto, "transformers", "decode_s"),
        "decode_floor_fraction": floors[fd]["floor_s"] / rows[auto]["decode_s"],
        "transformers_decode_floor_fraction": floors[fd]["floor_s"] / rows["transformers"]["decode_s"],
        "window_kv_vs_linear": window["held_bytes"] / window["linear_bytes"],
    }
    for dtype in measured:
        for what in ("decode_s", "keystroke_s"):
            best = best_forced(dtype, what)
            if best is not None:
                ratios[f"{dtype}_auto_vs_best_forced_{what[:-2]}"] = between(f"{dtype} auto", best[0], what)
                # the same as a ratio of the two medians (not paired), for comparison
                ratios[f"{dtype}_auto_vs_best_forced_{what[:-2]}_unpaired"] = rows[f"{dtype} auto"][what] / best[1]
    if "int8" in measured:
        ratios[f"int8_decode_vs_{fd}"] = between("int8 auto", auto, "decode_s")
        if "int8 q8" in rows:
            ratios[f"int8_q8_decode_vs_{fd}"] = between("int8 q8", auto, "decode_s")
        ratios["int8_decode_floor_fraction"] = floors["int8"]["floor_s"] / rows["int8 auto"]["decode_s"]
    for peer, ours in (("llama.cpp f32", "float32 auto"), ("llama.cpp q8_0", "int8 auto"),
                       ("llama.cpp q8_0", "int8 q8")):
        if peer in rows and ours in rows:
            for what in ("decode_s", "keystroke_s"):
                ratios[f"{ours.replace(' ', '_')}_vs_{peer.replace(' ', '_')}_{what[:-2]}"] = \
                    between(ours, peer, what)

    print(f"{device_name(device)} ({device}), {fd}, {threads} thread{'s' if threads > 1 else ''}, decode step "
          f"{args.decode_step}; {params / 1e6:.0f}M-parameter StableLM-style checkpoint; copy bandwidth "
          f"{bandwidth / 1e9:.1f} GB/s")
    print("\nkernels chosen on this machine (inference/tuning.py)")
    for dtype, plan in plans.items():
        print("\n".join(describe_plan(dtype, plan)))
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
    print(f"\ndecode per token at {PROMPT_TOKENS} tokens of context (one pass per token; median of "
          f"{args.rounds} rounds) and keystroke replay (median of {args.compare_keystrokes}, drafts on), "
          f"per configuration, all in rounds; ratios below are paired (the median of the ratios within "
          f"a round or keystroke)")
    print(f"  {'':<28}{'decode ms':>10}{'keystroke ms':>14}{'drafts':>8}   same tokens as {auto} (decode)")
    want = tokens[auto]
    for name, r in rows.items():
        draft = "" if r["draft_tokens"] is None else r["draft_tokens"]
        print(f"  {name:<28}{r['decode_s'] * ms:>10.1f}{r['keystroke_s'] * ms:>14.0f}{draft:>8}   "
              f"{sum(a == b for a, b in zip(tokens[name], want))}/{len(want)}")
    for name, why in not_measured.items():
        print(f"  {name}: not measured ({why})")
    if int8 and int8_dtype != TARGET.torch_dtype:
        print(f"  int8 weights compute in {str(int8_dtype).removeprefix('torch.')} here (load_model's choice)")
    for dtype in measured:
        for what in ("decode", "keystroke"):
            best = best_forced(dtype, what + "_s")
            if best is not None:
                print(f"  {dtype} auto / best forced ({best[0]}), {what}: "
                      f"{ratios[f'{dtype}_auto_vs_best_forced_{what}']:.3f} (target <= 1.05; ratio of "
                      f"the medians, not paired: {ratios[f'{dtype}_auto_vs_best_forced_{what}_unpaired']:.3f})")
    print(f"  {auto} / transformers, decode: {ratios['decode_vs_transformers']:.2f} (target <= 0.5); "
          f"{ratios['decode_floor_fraction']:.0%} of the bandwidth floor "
          f"({floors[fd]['floor_s'] * ms:.1f} ms: {floors[fd]['weight_bytes'] / mib:.0f} MiB "
          f"weights + {floors[fd]['kv_bytes'] / mib:.0f} MiB KV; transformers "
          f"{ratios['transformers_decode_floor_fraction']:.0%})")
    if "int8" in measured:
        print(f"  int8 auto / {auto}, decode: {ratios[f'int8_decode_vs_{fd}']:.2f} (target <= 0.4); "
              f"{ratios['int8_decode_floor_fraction']:.0%} of its floor "
              f"({floors['int8']['floor_s'] * ms:.1f} ms: {floors['int8']['weight_bytes'] / mib:.0f} MiB weights + "
              f"{floors['int8']['kv_bytes'] / mib:.0f} MiB KV)")
    for key, value in ratios.items():
        if "llama.cpp" in key:
            print(f"  {key.replace('_', ' ')}: {value:.2f} (target <= 1.0)")
    if "skipped" in llama:
        print(f"  llama.cpp: not measured ({llama['skipped']})")
    print(f"\nStarCoder2-style, window {WINDOW}, {LONG_PROMPT}-token prompt: KV bytes held")
    print(f"  {'this engine (ring of ' + str(window['ring_positions']) + ' positions)':<42}"
          f"{window['held_bytes'] / mib:>9.2f} MiB")
    print(f"  {'the window itself':<42}{window['window_bytes'] / mib:>9.2f} MiB")
    print(f"  {'a linear cache':<42}{window['linear_bytes'] / mib:>9.2f} MiB")
    print(f"  {'transformers DynamicCache':<42}{window['transformers_bytes'] / mib:>9.2f} MiB")
    print(f"  same tokens as transformers: {window['same_tokens']}")
    print(json.dumps({
        "bench": "engine", "device": device_name(device), "torch_device": str(device), "dtype": fd,
        "decode_step": args.decode_step, "cpu": cpu_model(), "threads": threads,
        "bandwidth_gbps": round(bandwidth / 1e9, 2),
        "kernels": {dtype: plan.describe() | {"microseconds": None} for dtype, plan in plans.items()},
        "keystroke_ms": {k: round(keys[k + "_s"] * ms, 1) for k in ("ours", "no_drafts", "cropped", "scratch")},
        "typing_suggestion_ms": {k: round(typing[k + "_s"] * ms, 1) for k in ("ours", "cropped")},
        "drafts": {"keystroke": [keys["accepted"], keys["drafted"]],
                   "typing_suggestion": [typing["accepted"], typing["drafted"]]},
        "configurations_ms": {n: {"decode": round(r["decode_s"] * ms, 2), "keystroke": round(r["keystroke_s"] * ms, 1),
                                  "draft_tokens": r["draft_tokens"]}
                              for n, r in rows.items()},
        "floor_ms": {d: round(f["floor_s"] * ms, 2) for d, f in floors.items()},
        "window_kv_bytes": {k: window[k] for k in ("held_bytes", "window_bytes", "linear_bytes",
                                                    "transformers_bytes")},
        "same_tokens": keys["same_tokens"] and typing["same_tokens"] and window["same_tokens"],
        "ratios": {k: round(v, 3) for k, v in ratios.items()},
        "targets": {"keystroke_vs_cropped": 0.4, "keystroke_vs_scratch": 0.1, "decode_vs_transformers": 0.5,
                    "auto_vs_best_forced": 1.05, "int8_decode_vs_float32": 0.4, "vs_llama.cpp": 1.0},
        "llama_cpp": llama.get("skipped", "measured"),
        "not_measured": not_measured,
    }))


if __name__ == "__main__":
    main()
