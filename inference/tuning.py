"""Kernel choice by measurement on the machine the engine runs on, kept on disk.

When a model is first loaded on a machine, every implementation of its linear layers that can run
here (inference/linear.py) is timed on the model's own layers, and the own decode-attention
kernel against SDPA (inference/attention.py), at the pass lengths the engine runs: 1 (a decode
step), 2-16 (draft verifications: POINTS) and a prefill chunk. For each group of layers of one
shape the fastest implementation wins each range of pass lengths: a pass of m positions uses the
choice measured at the smallest point >= m (the chunk's beyond 16). The packed oneDNN layout can
only serve all pass lengths of a layer (it is the layer's one copy of the weights): it is chosen
for a group when its mean slowdown against the best at each point is lower than that of the
best plain-layout choices.

Timing follows the model: each sweep runs the layers in model order (as a decode step meets
them: weights streamed from memory, not from a cache that one layer alone would fit; per group
the first layers holding SWEEP_BYTES, the time scaled to all of them), timing each call; a candidate more than ABORT_FACTOR times slower than the best so far on a group stops
being timed there. Candidates alternate within each repeat, so a burst of load from another
process falls on all of them. Prefill chunks are bound by arithmetic: one layer per group is
timed there, on its first CHUNK_ROWS output rows (all of them for oneDNN's packed layout). The
output head never runs prefill chunks (the engine asks for the last position's
logits only).

The result (timings; the choices follow from them) is stored beside the kernel cache
(cpu_kernels.cache_dir()), named by a digest of everything it depends on: CPU model and flags,
threads, torch version, dtype, the layers' shapes, the candidates and the kernel build. A later
load with the same key reuses it at once; anything else measures again. Timings taken while
other processes kept the CPUs busy (load average) are used, and replaced at the first start that
finds the machine quiet.

The draft length of speculation (engine.py) follows from the same numbers: the cost of a pass
of k + 1 positions against one, and the chance that a draft token is taken: ACCEPTANCE at first,
then what the engine measures while serving (speculation.Acceptance).
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

from . import cpu_kernels
from .linear import Impl, KernelLinear, Table, release_freed_memory

log = logging.getLogger(__name__)

VERSION = 1
POINTS = (1, 2, 4, 8, 16)   # pass lengths measured up to the longest draft verification
REPEATS = 2
ABORT_FACTOR = 1.5
# Chance a looked-up draft token is taken, for choosing the draft length until the engine has
# measured it (bench/engine_bench.py's n-gram drafts: about 0.8 of them; the previous
# completion's, typed by the user, nearly all, are not what the length is chosen for).
ACCEPTANCE = 0.75
MAX_DRAFT = POINTS[-1] - 1
ATTENTION_CONTEXT = 1024    # keys attended while timing attention (fewer if the model has fewer)
# Weights timed per group and sweep: the first layers holding this much (more than the last-level
# caches here, so weights stream from memory as in a decode step), the time scaled to them all
SWEEP_BYTES = 48 << 20
# At a prefill chunk (bound by arithmetic: time grows with the rows) a layer is timed on its first
# CHUNK_ROWS output rows (a view, no copy), the time scaled to all of them: torch's int8 kernel
# takes ~1 s for a whole 4096x768 layer there
CHUNK_ROWS = 256

Progress = Callable[[float, str], None]


@dataclass
class Group:
    """Linear layers of one shape (the output head on its own)."""
    name: str                   # "NxK", "NxK head"
    layers: list[KernelLinear]
    head: bool

    @property
    def can_pack(self) -> bool:
        return all(layer.can_pack for layer in self.layers)


@dataclass
class Plan:
    """What was chosen, from what timings, for logs, status and benchmarks."""
    linear: dict[str, Table]                        # group name -> table
    attention: tuple = ()                           # ((longest step, "cpu"|"sdpa"), ...)
    draft_tokens: int | None = None                 # None: not measured (the device default)
    pass_cost: dict[int, float] = field(default_factory=dict)   # m -> cost of m positions / one
    layers: tuple = ()                              # ((longest pass, "native"|"blocks"), ...)
    timings: dict = field(default_factory=dict)     # as stored: microseconds per call
    source: str = ""                                # how the plan was made

    def describe(self) -> dict:
        groups = self.timings.get("linear", {})
        return {
            "source": self.source,
            "linear": {name: {"layers": groups.get(name, {}).get("layers"),
                              "choice": [[b, i.name] for b, i in table]}
                       for name, table in self.linear.items()},
            "attention": [list(x) for x in self.attention],
            "layers": [list(x) for x in self.layers],
            "draftTokens": self.draft_tokens,
            "passCost": {str(m): round(c, 3) for m, c in self.pass_cost.items()},
            "microseconds": self.timings,
        }


def groups_of(layers: list[KernelLinear], head: object) -> list[Group]:
    groups: dict[str, Group] = {}
    for layer in layers:
        is_head = layer is head
        name = f"{layer.out_features}x{layer.in_features}" + (" head" if is_head else "")
        groups.setdefault(name, Group(name, [], is_head)).layers.append(layer)
    return list(groups.values())


# -- the disk cache -------------------------------------------------------------------------

def cache_file(key: dict) -> Path:
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    return cpu_kernels.cache_dir() / f"tuning-{digest}.json"


def machine_key() -> dict:
    """What every measurement here depends on besides the model and the kernels' build: the
    CPU, the threads, torch."""
    return {"version": VERSION, "cpu": cpu_kernels.cpu_id(), "threads": torch.get_num_threads(),
            "torch": torch.__version__}


def load_cached(key: dict) -> dict | None:
    """The timings stored under `key` (pass lengths as ints again), or None."""
    path = cache_file(key)
    try:
        stored = json.loads(path.read_text())
        if not isinstance(stored, dict) or stored.get("key") != key:
            return None
        for per_impl in [g["us"] for g in stored["linear"].values()] + [stored["attention"]["us"]] \
                + ([stored["glue"]] if stored.get("glue") else []):
            for name, per_m in per_impl.items():
                per_impl[name] = {int(m): float(v) for m, v in per_m.items()}
        return stored
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None


def store(key: dict, timings: dict) -> None:
    path = cache_file(key)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile("w", dir=path.parent, delete=False, suffix=".tmp") as f:
            json.dump({"key": key, **timings}, f)
        os.replace(f.name, path)    # atomic: a concurrent tuning of the same key is harmless
    except OSError as exc:
        log.info("could not store the kernel measurements in %s: %s", path, exc)


def busy() -> bool:
    """Whether other processes keep the CPUs busy (the 1-minute load average within half a CPU
    of their count): timings taken now may mislead."""
    try:
        return os.getloadavg()[0] > (os.cpu_count() or 1) - 0.5
    except OSError:
        return False


def measured(key: dict, measure: Callable[[], dict]) -> tuple[dict, str]:
    """The timings stored under `key`, else measure() stored under it; and how they were had.
    Timings taken on a busy machine are used until a start finds it quiet and measures again."""
    timings = load_cached(key)
    quiet = not busy()
    if timings is not None and not (timings.get("busy") and quiet):
        return timings, f"measured before ({cache_file(key).name})"
    t0 = time.perf_counter()
    timings = measure()
    timings["seconds"] = round(time.perf_counter() - t0, 3)
    timings["busy"] = not quiet
    store(key, timings)
    return timings, f"measured in {timings['seconds']:.1f} s" + ("" if quiet else " (machine busy)")


# -- measuring ------------------------------------------------------------------------------

class Clock:
    """Counts sweeps for the progress callback."""

    def __init__(self, total: int, progress: Progress | None):
        self.done, self.total, self.progress = 0, max(1, total), progress

    def tick(self, what: str) -> None:
        self.done += 1
        if self.progress is not None:
            self.progress(min(1.0, self.done / self.total), f"measuring kernels: {what}")


def _inputs(groups: list[Group], m: int, dtype: torch.dtype) -> dict[int, torch.Tensor]:
    g = torch.Generator().manual_seed(m)
    ks = {layer.in_features for group in groups for layer in group.layers}
    return {k: torch.randn(m, k, generator=g).to(dtype) for k in sorted(ks)}


def _timed_layers(groups: list[Group], order: dict[int, int], first_only: bool):
    """(group, layer) pairs to time, in model order: of each group its first layers up to
    SWEEP_BYTES of weights (all of them when they hold less), or its first layer only."""
    pairs = []
    for group in groups:
        held = 0
        for layer in group.layers:
            if first_only and held or held >= SWEEP_BYTES:
                break
            pairs.append((group, layer))
            held += layer.in_features * layer.out_features * _itemsize(layer)
    return sorted(pairs, key=lambda gl: order[id(gl[1])])


def _first_rows(layer: KernelLinear) -> KernelLinear:
    """A layer computing the first CHUNK_ROWS outputs of `layer` (views of its tensors)."""
    r = min(CHUNK_ROWS, layer.out_features)
    if r == layer.out_features:
        return layer
    return KernelLinear(layer.weight[:r], None if layer.bias is None else layer.bias[:r],
                        None if layer.scale is None else layer.scale[:r])


def _itemsize(layer: KernelLinear) -> int:
    return torch.empty((), dtype=layer.weight_dtype).element_size()


def _sweep(pairs, impl: Impl, xs: dict[int, torch.Tensor], best: dict[str, float],
           floor: dict[str, float]) -> tuple[dict[str, float], dict[str, float]]:
    """(seconds per group for one pass through its timed layers, inf where the candidate fell
    ABORT_FACTOR behind the best so far (`best`: the same measure); for the groups it ran, the
    time, or where it was stopped, the time of the layers it ran per layer times the group's
    timed layers (they share one shape)). A group where `floor` (the least it can take: its time
    at a shorter pass) already is that far behind is not run."""
    count = {}
    for group, _ in pairs:
        count[group.name] = count.get(group.name, 0) + 1
    spent = {name: 0.0 for name in count}
    least: dict[str, float] = {}
    for name, seconds in floor.items():
        if name in spent and seconds > best.get(name, float("inf")) * ABORT_FACTOR:
            spent[name] = float("inf")
    timed = dict.fromkeys(count, 0)
    for group, layer in pairs:
        name = group.name
        if spent[name] == float("inf"):
            continue
        x = xs[layer.in_features]
        t0 = time.perf_counter()
        impl.run(layer, x)
        spent[name] += time.perf_counter() - t0
        timed[name] += 1
        least[name] = spent[name] * count[name] / timed[name]   # the group's layers: one shape
        if spent[name] > best.get(name, float("inf")) * ABORT_FACTOR * timed[name] / count[name]:
            spent[name] = float("inf")
    return spent, least


def measure_linear(layers: list[KernelLinear], groups: list[Group], impls: list[Impl], *,
                   chunk: int, dtype: torch.dtype, clock: Clock) -> dict:
    """{group: {"layers": n, "us": {impl: {m: microseconds per pass through all its layers}}}}.
    layers: all of them in model order."""
    order = {id(layer): i for i, layer in enumerate(layers)}
    points = list(POINTS) + ([chunk] if chunk > POINTS[-1] else [])
    us: dict[str, dict[str, dict[int, float]]] = {g.name: {} for g in groups}
    # the least a pass through a group takes per candidate and length (seconds, all its layers):
    # its time, or, where it fell behind and was stopped, extrapolated from the layers it ran
    # (the least of the repeats: a pause in one does not hide a candidate); where it was never
    # run at that length, its floor from the length before
    least: dict[str, dict[str, dict[int, float]]] = {g.name: {} for g in groups}

    def run(impls_here: list[Impl], groups_here: list[Group], sliced: bool) -> None:
        previous = None     # the pass length measured before this one
        for m in points:
            long = m > POINTS[-1]
            here = [g for g in groups_here if not (long and g.head)]
            runnable = [i for i in impls_here if i.takes(m)]
            if not here or not runnable:
                continue
            pairs = _timed_layers(here, order, first_only=long)
            # a group's time is scaled from its timed layers to all of them
            scale = {g.name: len(g.layers) / sum(1 for h, _ in pairs if h is g) for g in here}
            if long and sliced:     # and from the rows timed to all of them
                pairs = [(g, _first_rows(layer)) for g, layer in pairs]
                for g, layer in pairs:
                    scale[g.name] *= g.layers[0].out_features / layer.out_features
            xs = _inputs(here, m, dtype)
            best: dict[str, float] = {}
            # A pass of m positions takes at least as long as a shorter one: a candidate whose
            # time at the previous length is already ABORT_FACTOR behind the best at this one is
            # not run (torch's int8 kernel takes ~1 s per layer at a prefill chunk). The fastest
            # at the previous length go first, so that the best is known early.
            floors = {i.name: {g.name: least[g.name][i.name][previous] / scale[g.name]
                               for g in here if previous in least[g.name].get(i.name, {})}
                      for i in runnable}
            runnable.sort(key=lambda i: sum(floors[i.name].values())
                          if len(floors[i.name]) == len(here) else float("inf"))
            previous = m
            for _ in range(REPEATS):
                for impl in runnable:
                    spent, took = _sweep(pairs, impl, xs, best, floors[impl.name])
                    clock.tick(f"{impl.name}, {m} position{'s' if m > 1 else ''}")
                    for name, seconds in took.items():
                        mine = least[name].setdefault(impl.name, {})
                        mine[m] = min(mine.get(m, float("inf")), seconds * scale[name])
                    for name, seconds in spent.items():
                        if seconds == float("inf"):     # fell behind: left out (not stored)
                            continue
                        best[name] = min(best.get(name, float("inf")), seconds)
                        mine = us[name].setdefault(impl.name, {})
                        mine[m] = min(mine.get(m, float("inf")), seconds * scale[name] * 1e6)
            for impl in runnable:       # not run anywhere here: its floor holds for longer passes
                for name, seconds in floors[impl.name].items():
                    least[name].setdefault(impl.name, {}).setdefault(m, seconds * scale[name])

    run([i for i in impls if not i.packed], groups, sliced=True)
    packed = [i for i in impls if i.packed]
    packable = [g for g in groups if g.can_pack]
    if packed and packable:
        timed = [layer for _, layer in _timed_layers(packable, order, first_only=False)]
        for layer in timed:     # one layer's copy at a time: packing releases the plain weight
            layer.pack()
        try:
            run(packed, packable, sliced=False)
        finally:
            for layer in timed:
                layer.unpack()
            release_freed_memory()
    return {g.name: {"layers": len(g.layers), "us": us[g.name]} for g in groups}


def sweeps(groups: list[Group], impls: list[Impl], chunk: int, attention: bool, glue: bool = False) -> int:
    """How many sweeps measuring takes (for progress)."""
    points = list(POINTS) + ([chunk] if chunk > POINTS[-1] else [])
    linear = sum(1 for m in points for i in impls if i.takes(m)) * REPEATS
    return linear + len(POINTS) * (2 if attention else 1) * REPEATS + (len(POINTS) if glue else 0)


def measure_attention(model, kernel, *, points=POINTS, clock: Clock,
                      kv_dtype: torch.dtype | None = None) -> dict:
    """{"us": {"cpu"|"sdpa": {t: microseconds for all layers}}, "context": S} for steps of t
    positions over S cached ones (in kv_dtype; None: the compute dtype); kernel: the own one
    (None: SDPA alone)."""
    cfg = model.cfg
    s = min(ATTENTION_CONTEXT, cfg.max_positions - points[-1])
    cache = model.new_cache(s + points[-1], dtype=kv_dtype)
    g = torch.Generator().manual_seed(0)
    cache.k.copy_(torch.randn(cache.k.shape, generator=g))
    cache.v.copy_(torch.randn(cache.v.shape, generator=g))
    from .attention import CpuDecodeAttention

    own = CpuDecodeAttention(kernel) if kernel is not None else None
    heads, kv_heads, dim = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    us: dict[str, dict[int, float]] = {"sdpa": {}, **({"cpu": {}} if own else {})}
    for t in points:
        q = torch.randn(1, heads, t, dim, generator=g, dtype=model.dtype)
        mask = None if t == 1 else (torch.arange(s + t)[None, :] <= torch.arange(s, s + t)[:, None])
        # SDPA reads a cache of another dtype in the queries' (models/decoder.py attend)
        runs = {"sdpa": lambda k, v: F.scaled_dot_product_attention(
            q, k.to(q.dtype), v.to(q.dtype), attn_mask=mask, enable_gqa=heads != kv_heads)}
        if own is not None:
            runs["cpu"] = lambda k, v: own.run_own(q, k, v, mask)
        for _ in range(REPEATS):
            for name, fn in runs.items():
                t0 = time.perf_counter()
                for layer in range(cfg.num_layers):
                    fn(cache.k[layer][:, :, :s + t], cache.v[layer][:, :, :s + t])
                spent = (time.perf_counter() - t0) * 1e6
                us[name][t] = min(us[name].get(t, float("inf")), spent)
                clock.tick(f"attention, {t} position{'s' if t > 1 else ''}")
    del cache
    return {"us": us, "context": s}


# -- choosing -------------------------------------------------------------------------------

def _ranges(points: list[int], names: list[str]) -> list[tuple[int | None, str]]:
    """Per measured point, the winner, merged into ranges; the last range open-ended."""
    table: list[tuple[int | None, str]] = []
    for i, (m, name) in enumerate(zip(points, names)):
        bound = None if i == len(points) - 1 else m
        if table and table[-1][1] == name:
            table[-1] = (bound, name)
        else:
            table.append((bound, name))
    return table


def choose_table(us: dict[str, dict[int, float]], impls: list[Impl], fallback: Impl,
                 force: dict[int, str] | None = None) -> Table:
    """The fastest implementation per measured pass length (see the module's docstring);
    force: {pass length: implementation} where that is decided already (then no packed
    layout: it would serve those lengths too)."""
    by_name = {i.name: i for i in [fallback, *impls]}
    inf = float("inf")
    force = force or {}
    points = sorted({m for t in us.values() for m, v in t.items() if v < inf})
    plain = {n: t for n, t in us.items() if not by_name[n].packed}
    if not points or not plain:
        return ((None, fallback),)
    winners = [force.get(m) or min(plain, key=lambda n: plain[n].get(m, inf)) for m in points]
    table = _ranges(points, winners)
    if by_name[table[-1][1]].max_m is not None:
        # the last winner takes short passes only (the head is measured up to 16 positions):
        # longer ones go to the fastest there that takes any length
        m = points[-1]
        any_length = {n: t[m] for n, t in plain.items() if by_name[n].max_m is None and m in t}
        table[-1] = (m, table[-1][1])
        table.append((None, min(any_length, key=any_length.get) if any_length else fallback.name))
    best = {m: min(t.get(m, inf) for t in us.values()) for m in points}
    plain_slowdown = sum(plain[w].get(m, inf) / best[m] for m, w in zip(points, winners))
    for name, t in us.items():      # a packed layout: one choice for every pass length
        if by_name[name].packed and all(m in t for m in points) and not force:
            if sum(t[m] / best[m] for m in points) < plain_slowdown:
                table = [(None, name)]
    return tuple((b, by_name[n]) for b, n in table)


def choose_attention(us: dict[str, dict[int, float]], force: dict[int, str] | None = None) -> tuple:
    """((longest step, "cpu" | "sdpa"), ...): the faster per measured step length (or the one
    `force` names for it)."""
    force = force or {}
    points = sorted({t for per_t in us.values() for t in per_t})
    winners = [force.get(t) or min(us, key=lambda n: us[n].get(t, float("inf"))) for t in points]
    return tuple(_ranges(points, winners))


def choice_at(table, m: int):
    """What a ((longest pass, choice), ...) table names for a pass of m positions."""
    return next(c for b, c in table if b is None or m <= b)


def choose_layers(timings: dict, groups: list[Group], tables: dict[str, Table], attention: tuple,
                  *, linear_auto: bool) -> list[int]:
    """The measured pass lengths (POINTS) that run faster through decode_layers (every non-head
    layer on the own kernel, the own attention: inference/native_layers.py) than through the
    blocks with the kernels chosen so far: each way's kernels plus what it costs besides them
    (timings["glue"], with kernels that do nothing). Forced linear kernels stay as they are:
    then only lengths where they are the own ones can go native."""
    from .native_layers import IMPLS

    glue = timings.get("glue")
    att = timings.get("attention", {}).get("us", {})
    if not glue or "cpu" not in att:
        return []
    inf = float("inf")
    native_points = []
    for m in POINTS:
        blocks = glue["blocks"].get(m, inf) + att[choice_at(attention, m)].get(m, inf)
        native = glue["native"].get(m, inf) + att["cpu"].get(m, inf)
        for group in groups:
            us = timings["linear"][group.name]["us"]
            impl = choice_at(tables[group.name], m)
            here = us.get(impl.name, {}).get(m, inf)
            blocks += here
            if group.head:
                native += here
            elif linear_auto:
                native += us.get("rows", {}).get(m, inf)
            else:
                native += here if impl.name in IMPLS else inf
        if native < blocks:
            native_points.append(m)
    return native_points


def pass_cost(timings: dict, tables: dict[str, Table], attention: tuple,
              native: list[int] = ()) -> dict[int, float]:
    """Cost of a pass of m positions relative to one, m in POINTS, from the chosen kernels and
    what the chosen way through the layers costs besides them (where measured)."""
    total = {}
    glue = timings.get("glue")
    for m in POINTS:
        cost = 0.0
        for name, table in tables.items():
            impl = choice_at(table, m)
            cost += timings["linear"][name]["us"].get(impl.name, {}).get(m, float("nan"))
        att = timings.get("attention")
        if att:
            cost += att["us"][choice_at(attention, m)][m]
        if glue:
            cost += glue["native" if m in native else "blocks"][m]
        total[m] = cost
    one = total[1]
    return {m: c / one for m, c in total.items()} if one > 0 else {}


def draft_length(cost: dict[int, float], acceptance: float = ACCEPTANCE) -> int:
    """The k (0..MAX_DRAFT) that maximizes expected tokens per unit of time for a pass of
    k + 1 positions: (1 + a + ... + a^k) / cost(k + 1), cost interpolated between points."""
    points = sorted(cost)
    if not points or any(c != c for c in cost.values()):       # nan: something not measured
        return 0

    def at(m: int) -> float:
        for lo, hi in zip(points, points[1:]):
            if lo <= m <= hi:
                return cost[lo] + (cost[hi] - cost[lo]) * (m - lo) / (hi - lo)
        return cost[points[-1]] * m / points[-1]

    best_k, best_rate = 0, 1.0 / at(1)
    for k in range(1, MAX_DRAFT + 1):
        rate = sum(acceptance ** i for i in range(k + 1)) / at(k + 1)
        if rate > best_rate * 1.001:
            best_k, best_rate = k, rate
    return best_k


# -- the plan for one engine ----------------------------------------------------------------

def plan(model, *, device: torch.device, dtype: torch.dtype, int8: bool, linear: str,
         attention, attention_requested: str, chunk: int, compiled: bool,
         progress: Progress | None = None, kv_dtype: torch.dtype | None = None,
         native_layers: bool = True) -> Plan:
    """Install the linear layers' kernels and set the attention table for `model` (on a CPU
    by measurement, kept on disk); returns what was chosen. attention: the installed
    attention.AttentionChoice ("cpu" brings the own kernel; auto measures it against SDPA).
    native_layers: also weigh running short passes through decode_layers (choose_layers; the
    engine installs it afterwards: inference/native_layers.py)."""
    from .linear import candidates, forced, forced_table, install

    if compiled:
        return Plan({}, source="the decode step is compiled with torch.compile: torch's kernels")
    if device.type != "cpu" and not int8:
        if linear != "auto":    # only "torch" runs there: anything else is an error
            forced(linear, candidates(device, dtype, int8))
        return Plan({}, source=f"{device.type}: torch's kernels")
    layers = install(model)
    for layer in layers:    # a model an earlier engine packed: measured and chosen afresh
        layer.unpack()
    found = candidates(device, dtype, int8)
    groups = groups_of(layers, model.lm_head)
    if linear == "auto":     # the layers' own arithmetic (not "q8", which rounds the inputs)
        impls = [i for i in found.impls if not i.quantizes_inputs]
    else:
        impls = [forced(linear, found)]
        if impls[0].max_m is not None or impls[0].packed:
            impls.append(found.fallback)
    if device.type != "cpu":    # int8 on a GPU: torch's int8 kernel when it has one
        impl = impls[0] if linear != "auto" else (found.named("torch") or found.fallback)
        table = forced_table(impl, found.fallback)
        for layer in layers:
            layer.table = table
        return Plan({g.name: table for g in groups}, source=f"{device.type}: not measured")

    own_attention = attention.kernel if attention.name == "cpu" else None
    kernel_names = (["int8_linear", "q8_linear"] if int8 else ["rows_linear"]) + ["decode_attention"]
    layers_kernel = None
    if native_layers and own_attention is not None and dtype == torch.float32:
        layers_kernel = cpu_kernels.load_decode_layers()
        if isinstance(layers_kernel, str):
            log.debug("decode_layers not available: %s", layers_kernel)
            layers_kernel = None
        else:
            kernel_names.append("decode_layers")
    key = {**machine_key(), "kernels": cpu_kernels.build_ids(kernel_names),
           "dtype": str(dtype), "int8": int8, "chunk": chunk, "impls": [i.name for i in impls],
           "groups": [[g.name, len(g.layers)] for g in groups],
           "attention": [model.cfg.num_heads, model.cfg.num_kv_heads, model.cfg.head_dim,
                         model.cfg.num_layers, model.cfg.max_positions, own_attention is not None,
                         str(kv_dtype or dtype)]}

    def measure() -> dict:
        clock = Clock(sweeps(groups, impls, chunk, own_attention is not None, layers_kernel is not None),
                      progress)
        with torch.inference_mode():
            timings = {"linear": measure_linear(layers, groups, impls, chunk=chunk, dtype=dtype, clock=clock),
                       "attention": measure_attention(model, own_attention, clock=clock, kv_dtype=kv_dtype)}
            if layers_kernel is not None:
                from .native_layers import measure_glue

                timings["glue"] = measure_glue(model, layers_kernel, POINTS, kv_dtype=kv_dtype,
                                               tick=clock.tick)
            return timings

    timings, source = measured(key, measure)
    att_us = timings["attention"]["us"]
    attention_auto = own_attention is not None and attention_requested == "auto"

    def choose(native: list[int]) -> tuple[dict[str, Table], tuple]:
        tables = {}
        for group in groups:
            us = timings["linear"][group.name]["us"]
            if linear == "auto":
                force = {m: "rows" for m in native} if not group.head else None
                table = choose_table(us, impls, found.fallback, force)
            elif impls[0].packed and not group.can_pack:
                table = ((None, found.fallback),)
            else:
                table = forced_table(impls[0], found.fallback)
            tables[group.name] = table
        if attention_auto:
            attention_table = choose_attention(att_us, {m: "cpu" for m in native})
        else:
            attention_table = ((None, attention.name if attention.name == "cpu" else "sdpa"),)
        return tables, attention_table

    tables, attention_table = choose([])
    native = choose_layers(timings, groups, tables, attention_table, linear_auto=linear == "auto")
    if native:
        tables, attention_table = choose(native)
    for group in groups:
        for layer in group.layers:
            layer.table = tables[group.name]
            if layer.table[0][1].packed:
                layer.pack()
    release_freed_memory()
    if own_attention is not None:
        model.attention.set_table(attention_table)
    cost = pass_cost(timings, tables, attention_table, native)
    layers_table = tuple(_ranges(list(POINTS) + [POINTS[-1] + 1],     # longer: the blocks
                                 ["native" if m in native else "blocks" for m in POINTS] + ["blocks"])) \
        if layers_kernel is not None else ()
    result = Plan(tables, attention_table, draft_length(cost), cost, timings=timings, source=source,
                  layers=layers_table)
    log.debug("kernels (%s): %s", source, json.dumps(result.describe()["linear"]))
    return result
