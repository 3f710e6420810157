"""The decode step run as one captured unit: CUDA graphs or torch.compile (opt-in).

A decode step runs a few hundred small kernels for one token; on a GPU launching them costs
more than running them. models.Decoder.decode_static is a step whose shapes do not depend on the
position (the position is a device tensor, attention covers the cache's whole capacity under a
mask), so it can be

- "cuda-graph": captured once per KV cache into a torch.cuda.CUDAGraph and replayed (CUDA only;
  a cache that grows gets a new graph);
- "compile": compiled with torch.compile (inductor; CUDA, or a CPU with a C++ compiler);
- "static": run as is, uncompiled (the same math; what the tests check the others against);
- "off" (default): the ordinary step, Decoder.forward.

Only single-token steps go through it; prefill chunks and draft verification use Decoder.forward.
Both write the same cache, so they mix freely.
"""
from __future__ import annotations

import shutil

import torch

from .errors import InvalidParameter
from .linear import KernelLinear

MODES = ("off", "static", "compile", "cuda-graph")
_MAX_GRAPHS = 8         # captured graphs kept (one per KV cache in use); the oldest is dropped


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

    def __init__(self, model, mode: str, device: torch.device):
        problems = decode_step_problems(mode, device)
        if problems:
            raise InvalidParameter("cannot use this decode step: " + "; ".join(problems))
        if mode == "compile" and any(isinstance(m, KernelLinear) and not all(i.traced for _, i in m.table)
                                     for m in model.modules()):
            raise InvalidParameter("cannot compile the decode step of a model whose linear layers "
                                   "run oneDNN or the own kernels (load it again)")
        self.model, self.mode, self.device = model, mode, torch.device(device)
        self._fn = model.decode_static
        if mode == "compile":
            # the undecorated body: the engine already runs in inference mode
            self._fn = torch.compile(model.decode_static_body, fullgraph=True, dynamic=False,
                                     mode="reduce-overhead" if self.device.type == "cuda" else None)
        self._graphs: dict[int, _Graph] = {}
        self._pool = None

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
        graph = self._graphs.get(id(cache))
        if graph is None or not graph.matches(cache):
            if len(self._graphs) >= _MAX_GRAPHS:
                self._graphs.pop(next(iter(self._graphs)))
            if self._pool is None:
                self._pool = torch.cuda.graph_pool_handle()
            graph = self._graphs[id(cache)] = _Graph(self.model, cache, self.device, self._pool)
        return graph.replay(cache, token)


class _Graph:
    """decode_static captured for one KV cache (its tensors' addresses and capacity)."""

    def __init__(self, model, cache, device: torch.device, pool):
        self.ids = torch.zeros((1, 1), dtype=torch.long, device=device)
        self.position = torch.zeros(1, dtype=torch.long, device=device)
        self.key = _cache_key(cache)
        # Warm-up and capture write the keys/values of position `cache.length`, the one the
        # first replay writes again: nothing the cache holds is disturbed.
        self.position.fill_(cache.length)
        stream = torch.cuda.Stream(device)
        stream.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(stream):
            for _ in range(2):
                model.decode_static(self.ids, self.position, cache)
        torch.cuda.current_stream(device).wait_stream(stream)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph, pool=pool):
            self.logits = model.decode_static(self.ids, self.position, cache)

    def matches(self, cache) -> bool:
        return self.key == _cache_key(cache)

    def replay(self, cache, token: int) -> torch.Tensor:
        self.ids.fill_(token)
        self.position.fill_(cache.length)
        self.graph.replay()
        return self.logits[0, -1]


def _cache_key(cache) -> tuple:
    return (cache.capacity, cache.k.data_ptr(), cache.v.data_ptr(), cache.positions.data_ptr())
