"""The KV-cache memory of a device, shared by the process's engines on it.

A server runs more than one engine on a device: the completion model's, a chat model's, and
for a moment during a reload the old one's and the new one's. Each measuring "half of the free
memory" on its own would give the second engine half of what the first left, the third a quarter.
Here one budget per device is shared: its size is set from the memory not held by weights (on
CUDA, a share of what is free plus what the process's caches hold; on a CPU, a share of the
physical memory), and each live engine may use an equal part of it, in positions of its own
model. When an engine comes or goes the parts change; a cache over its new part gives back idle
slots at its next request (prefix_cache.PrefixCache reads its budget on every use).
"""
from __future__ import annotations

import os
import threading
import weakref

import torch

# On a CPU: this share of physical memory, at most CPU_MAX bytes, for the whole process.
CPU_SHARE = 0.15
CPU_MAX = 4 << 30
# On CUDA: this share of the memory that weights do not hold (free, cached by torch's allocator,
# or held by the process's KV caches) when an engine is made.
CUDA_SHARE = 0.5


class DeviceBudget:
    """KV bytes for the engines of one device (one per device and process: `for_device`)."""

    _lock = threading.Lock()
    _devices: dict[str, "DeviceBudget"] = {}

    def __init__(self, device: torch.device):
        self.device = device
        self.limit_bytes = 0
        self._members: list[weakref.ref] = []     # weak references to Share objects

    @classmethod
    def for_device(cls, device: torch.device) -> "DeviceBudget":
        key = str(torch.device(device))
        with cls._lock:
            budget = cls._devices.get(key)
            if budget is None:
                budget = cls._devices[key] = cls(torch.device(device))
            return budget

    def join(self, bytes_per_token: int, least_tokens: int, held_bytes) -> "Share":
        """A new engine's share. bytes_per_token: KV bytes of one position of its model;
        least_tokens: positions it needs whatever the budget (one longest request);
        held_bytes(): KV bytes its caches hold now."""
        share = Share(self, bytes_per_token, least_tokens, held_bytes)
        with self._lock:
            self._members = [m for m in self._members if m() is not None]
            self.limit_bytes = self._measure()
            self._members.append(weakref.ref(share))
        return share

    def leave(self, share: "Share") -> None:
        with self._lock:
            self._members = [m for m in self._members if m() is not None and m() is not share]

    @property
    def engines(self) -> int:
        return sum(1 for m in self._members if m() is not None)

    def _measure(self) -> int:
        if self.device.type == "cuda":
            free, _total = torch.cuda.mem_get_info(self.device)
            cached = torch.cuda.memory_reserved(self.device) - torch.cuda.memory_allocated(self.device)
            held = sum(m().held_bytes() for m in self._members if m() is not None)
            return int((free + cached + held) * CUDA_SHARE)
        physical = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        return min(CPU_MAX, int(physical * CPU_SHARE))


class Share:
    """One engine's part of a DeviceBudget; `tokens` is read by its prefix cache on every use."""

    def __init__(self, budget: DeviceBudget, bytes_per_token: int, least_tokens: int, held_bytes):
        self.budget = budget
        self.bytes_per_token = max(1, bytes_per_token)
        self.least_tokens = least_tokens
        self.held_bytes = held_bytes

    @property
    def tokens(self) -> int:
        part = self.budget.limit_bytes // max(1, self.budget.engines)
        return max(part // self.bytes_per_token, self.least_tokens)

    def close(self) -> None:
        self.budget.leave(self)
