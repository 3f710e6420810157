"""Large tensors on huge pages (2 MiB on x86): transparent huge pages, asked for with madvise.

A decode step reads every weight and the whole KV cache once: hundreds of MiB streamed from
memory, where with 4 KiB pages each page costs a TLB miss and a page-table walk, and the
hardware prefetchers stop at every page boundary. On this project's VM (AMD EPYC, Zen 3;
`bench/pages_bench.py`, both kinds of pages measured in turn, paired ratios): the own float32
rows kernel over 472 MiB of weights in one mapping (a one-off script) 0.92-0.95x the time, over
the 160M model's own weights 0.96-0.97x (one run 1.14x), a whole decode step at 1500 tokens
0.94-1.01x: a few percent, within this VM's noise in single runs. Linux hands out huge pages
for anonymous memory either always or, the common default
(`/sys/kernel/mm/transparent_hugepage/enabled` = madvise), only where a program asks: this asks
for the memory of tensors large enough to hold one, before it is first written (pages already
faulted in stay small until the kernel's khugepaged collapses them, if it does). Elsewhere
(another OS, THP off, a GPU tensor) nothing happens.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import functools
import os
import sys

import torch

_MADV_HUGEPAGE = 14


def _sizes() -> tuple[int, int]:
    """(page, huge page) sizes: the huge page is the kernel's PMD size (2 MiB on x86-64 and on
    arm64 with 4 KiB pages), 2 MiB where the kernel does not say."""
    try:
        page = os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        page = 4096
    try:
        huge = int(open("/sys/kernel/mm/transparent_hugepage/hpage_pmd_size").read())
    except (OSError, ValueError):
        huge = 2 << 20
    return page, huge


_PAGE, HUGE_PAGE = _sizes()


@functools.cache
def _madvise():
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    except OSError:
        return None
    fn = libc.madvise
    fn.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    fn.restype = ctypes.c_int
    return fn


def advise_huge_pages(t: torch.Tensor) -> bool:
    """Asks that the whole pages of `t`'s storage be backed by huge pages; whether the kernel
    took the advice (False: too small to hold a huge page, not a CPU tensor, not Linux, or
    refused). Only a hint: the memory and its contents are the same either way."""
    madvise = _madvise()
    if madvise is None or t.device.type != "cpu":
        return False
    storage = t.untyped_storage()
    begin, size = storage.data_ptr(), storage.nbytes()
    # whole pages inside the allocation only: the pages at its ends may hold other data
    start = -(-begin // _PAGE) * _PAGE
    end = (begin + size) // _PAGE * _PAGE
    if end - start < HUGE_PAGE:
        return False
    return madvise(start, end - start, _MADV_HUGEPAGE) == 0


def _mapping(t: torch.Tensor) -> dict[str, str] | None:
    """The /proc/self/smaps fields of the memory mapping holding the middle of `t`'s storage
    (inside the advised part, if any); None where that cannot be read."""
    storage = t.untyped_storage()
    address = storage.data_ptr() + storage.nbytes() // 2
    try:
        with open("/proc/self/smaps") as f:
            fields = None
            for line in f:
                head, _, rest = line.partition(" ")
                if "-" in head and not head.endswith(":"):      # a mapping's first line
                    if fields is not None:
                        return fields
                    lo, hi = (int(x, 16) for x in head.split("-"))
                    if lo <= address < hi:
                        fields = {}
                elif fields is not None:
                    fields[head.rstrip(":")] = rest.strip()
            return fields
    except OSError:
        return None


def huge_page_bytes(t: torch.Tensor) -> int | None:
    """Bytes of the memory mapping holding `t` that are backed by huge pages now (AnonHugePages;
    None where that cannot be read): what the kernel granted, for benchmarks. It may grant none
    (memory too fragmented to find free huge pages, pages faulted in before the advice)."""
    fields = _mapping(t)
    return None if fields is None else int(fields.get("AnonHugePages", "0 kB").split()[0]) * 1024


def advised(t: torch.Tensor) -> bool | None:
    """Whether the mapping holding `t` carries the huge-page advice (VmFlags "hg"); None where
    that cannot be read."""
    fields = _mapping(t)
    return None if fields is None else "hg" in fields.get("VmFlags", "").split()
