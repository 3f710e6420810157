"""The decode step run as one captured unit: CUDA graphs or torch.compile (opt-in).

A decode step runs a few hundred small kernels for one token; on a GPU launching them costs
more than running them. models.Decoder.decode_static is a step whose shapes do not depend on the
position (the position is a device tensor, attention covers the cache's whole capacity under a
mask), so it can be

- "cuda-graph": captured once per KV cache into a torch.cuda.CUDAGraph and replayed (CUDA only;
  a cache that grows gets a new graph);
- "compile": compiled with torch.compile (inductor; CUDA, or a CPU with a C++ compiler), with
  dynamic shapes: one compilation serves every cache capacity, and it happens when the engine is
  made (the load), not inside a completion;
- "static": run as is, uncompiled (the same math; what the tests check the others against);
- "off" (default): the ordinary step, Decoder.forward.

Only single-token steps go through it; prefill chunks and draft verification use Decoder.forward.
Both write the same cache, so they mix freely.

Captures are made on the model's device (cuda:N included), on a stream of this step's own, in
thread-local capture mode and one at a time in the process: the server calls CUDA from other
threads (a chat model's engine, the event loop) while a graph is captured. A graph holds the
tensors it was captured on, so their memory cannot be handed to another cache while the graph
can be replayed; it is dropped with its cache.
"""
from __future__ import annotations

import shutil
import threading
import weakref

import torch

from .errors import InvalidParameter
from .linear import KernelLinear

MODES = ("off", "static", "compile", "cuda-graph")
_MAX_GRAPHS = 8         # captured graphs kept (one per KV cache in use); the oldest is dropped
_CAPTURE_LOCK = threading.Lock()    # one capture at a time in the process
_WARM_CAPACITY = 64     # the scratch cache the compiled step is compiled on


def decode_step_problems(mode: str, device: torch.device) -> list[str]:
    """What stops `mode` from running on `device` (empty: nothing)."""
    if mode not in MODES:
        return [f"unknown decode step {mode!r} (choose from {', '.join(MODES)})"]
    problems = []
    if mode == "cuda-graph" and device.type != "cuda":
        problems.append(f"CUDA graphs need a CUDA device (this is {device.type})")
    if mode == "compile" and device.type == "cpu" and shutil.which("c++") is None \
            and shutil.which("g++") is None:
        problems.append("torch.compile on a CPU needs a C++ compiler (none on PATH)")
    return problems


class DecodeStep:
    """Runs one token through the model after what `cache` holds -> float32 logits [V]."""

    def __init__(self, model, mode: str, device: torch.device, kv_dtype: torch.dtype | None = None):
        problems = decode_step_problems(mode, device)
        if problems:
            raise InvalidParameter("cannot use this decode step: " + "; ".join(problems))
        if mode == "compile" and any(isinstance(m, KernelLinear) and not all(i.traced for _, i in m.table)
                                     for m in model.modules()):
            raise InvalidParameter("cannot compile the decode step of a model whose linear layers "
                                   "run oneDNN or the own kernels (load it again)")
        self.model, self.mode, self.device = model, mode, torch.device(device)
        self.kv_dtype = kv_dtype        # the caches' (the engine's), for the warm-up's
        self._fn = model.decode_static
        if mode == "compile":
            # The undecorated body (the engine already runs in inference mode). No CUDA graphs
            # inside torch.compile ("reduce-overhead"): inductor keeps them per thread and fails
            # when the engine's worker thread is not the one that compiled (seen on an H200).
            # Dynamic shapes: the body reads the capacity from tensor shapes only, so caches of
            # every capacity share one compilation.
            self._fn = torch.compile(model.decode_static_body, fullgraph=True, dynamic=True)
        self._graphs = GraphCache()
        self._pool = None
        self._stream = torch.cuda.Stream(self.device) if mode == "cuda-graph" else None

    def warm_up(self) -> None:
        """Compile now ("compile"), on a scratch cache, so no completion waits for it."""
        if self.mode != "compile":
            return
        # the RoPE tables exist before the first compile, as they do at every later step
        self.model.rope_tables(self.model.cfg.max_positions, self.device)
        self(self.model.new_cache(_WARM_CAPACITY, dtype=self.kv_dtype), 0)

    @torch.inference_mode()     # always: the compiled step is guarded on the grad mode
    def __call__(self, cache, token: int) -> torch.Tensor:
        if self.mode == "cuda-graph":
            logits = self._replay(cache, token)
        else:
            ids = torch.tensor([[token]], device=self.device)
            position = torch.tensor([cache.length], device=self.device)
            logits = self._fn(ids, position, cache)[0, -1]
        cache.advance_static()
        return logits

    def _replay(self, cache, token: int) -> torch.Tensor:
        with torch.cuda.device(self.device):
            graph = self._graphs.get(cache, self._capture)
            return graph.replay(cache, token)

    def _capture(self, cache) -> "_Graph":
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        return _Graph(self.model, cache, self.device, self._pool, self._stream)


class GraphCache:
    """Captured graphs by KV cache: at most `limit` (the oldest dropped first), each replayed
    only for the cache it was captured on, and only while that cache still has the tensors it
    was captured with (a grown cache has new ones). A graph holds those tensors, so no other
    tensor can take their memory while it lives; it is dropped when its cache is."""

    def __init__(self, limit: int = _MAX_GRAPHS):
        self.limit = limit
        self._graphs: dict[int, _Graph] = {}

    def __len__(self) -> int:
        return len(self._graphs)

    def get(self, cache, capture) -> "_Graph":
        """The graph for `cache`, captured by `capture(cache)` when there is none valid."""
        key = id(cache)
        graph = self._graphs.get(key)
        if graph is not None and graph.matches(cache):
            return graph
        self._graphs.pop(key, None)
        while len(self._graphs) >= self.limit:
            self._graphs.pop(next(iter(self._graphs)))
        graph = capture(cache)
        # The callback holds the dict, not the graph: nothing keeps a dropped graph alive.
        graph.owner = weakref.ref(cache, lambda ref, graphs=self._graphs: _forget(graphs, key, ref))
        graph.tensors = _cache_tensors(cache)
        self._graphs[key] = graph
        return graph


class _Graph:
    """decode_static captured for one KV cache (its tensors' addresses and capacity)."""

    # Set by GraphCache: the cache captured on, and the tensors the graph reads and writes, held
    # so that their memory is not reused by another tensor while the graph lives.
    owner: weakref.ref | None = None
    tensors: tuple[torch.Tensor, ...] = ()

    def __init__(self, model, cache, device: torch.device, pool, stream: torch.cuda.Stream):
        self.ids = torch.zeros((1, 1), dtype=torch.long, device=device)
        self.position = torch.zeros(1, dtype=torch.long, device=device)
        # Warm-up and capture write the keys/values of position `cache.length`, the one the
        # first replay writes again: nothing the cache holds is disturbed.
        self.position.fill_(cache.length)
        with _CAPTURE_LOCK:
            stream.wait_stream(torch.cuda.current_stream(device))
            with torch.cuda.stream(stream):
                for _ in range(2):
                    model.decode_static(self.ids, self.position, cache)
            torch.cuda.current_stream(device).wait_stream(stream)
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph, pool=pool, stream=stream,
                                  capture_error_mode="thread_local"):
                self.logits = model.decode_static(self.ids, self.position, cache)

    def matches(self, cache) -> bool:
        owner = self.owner() if self.owner is not None else None
        return owner is cache and all(a is b for a, b in zip(self.tensors, _cache_tensors(cache)))

    def replay(self, cache, token: int) -> torch.Tensor:
        self.ids.fill_(token)
        self.position.fill_(cache.length)
        self.graph.replay()
        return self.logits[0, -1]


def _forget(graphs: dict, key: int, owner: weakref.ref) -> None:
    graph = graphs.get(key)
    if graph is not None and graph.owner is owner:
        del graphs[key]


def _cache_tensors(cache) -> tuple[torch.Tensor, ...]:
    """Everything decode_static reads or writes of a cache (a grown cache has new tensors)."""
    return (cache.k, cache.v, cache.positions)
