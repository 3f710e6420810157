"""The project's own CPU kernel (csrc/rows_linear.c), built with the machine's C compiler at first
use and loaded with ctypes.

No build step at install time and no dependency: the source ships with the package; the first
engine that wants the kernel compiles it (about 0.3 s) with `-O3 -march=native` into the user's
cache directory ($STABLELM_LSP_CACHE, else $XDG_CACHE_HOME/stablelm-lsp, else ~/.cache/stablelm-lsp),
under a name derived from the source, the flags, the compiler and the machine, so a changed
source or another CPU gets a fresh build. The library is linked against OpenMP when the compiler
can, and then shares the OpenMP runtime torch loaded (same soname). Where there is no compiler,
or the build or the self-check fails, `load_rows_linear` says why and the caller keeps torch's
kernels. The compiler's output never reaches stdout (the language server speaks on it).

ctypes releases the GIL during the call; each call costs a few microseconds.
"""
from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path

import torch

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("csrc") / "rows_linear.c"
_FLAG_SETS = (["-O3", "-march=native", "-fopenmp"], ["-O3", "-march=native"], ["-O3", "-fopenmp"], ["-O3"])


@dataclass
class RowsKernel:
    fn: ctypes._CFuncPtr
    max_m: int
    path: Path

    def __call__(self, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, y: torch.Tensor,
                 m: int, n: int, k: int) -> None:
        rc = self.fn(x.data_ptr(), w.data_ptr(), None if b is None else b.data_ptr(), y.data_ptr(),
                     m, n, k, torch.get_num_threads())
        if rc:
            raise RuntimeError(f"rows_linear refused m={m} n={n} k={k}")


_lock = threading.Lock()
_loaded: RowsKernel | str | None = None     # the kernel, or why there is none


def cache_dir() -> Path:
    root = os.environ.get("STABLELM_LSP_CACHE")
    if root:
        return Path(root) / "kernels"
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "stablelm-lsp" / "kernels"


def _compiler() -> str | None:
    for name in (os.environ.get("CC"), "cc", "gcc", "clang"):
        if name and shutil.which(name):
            return name
    return None


def _compiler_id(cc: str) -> str:
    try:
        out = subprocess.run([cc, "--version"], capture_output=True, text=True, timeout=30)
        return out.stdout.splitlines()[0] if out.stdout else cc
    except (OSError, subprocess.SubprocessError):
        return cc


def _cpu_id() -> str:
    """What -march=native depends on: the CPU's model and flags."""
    try:
        text = Path("/proc/cpuinfo").read_text()
        lines = [ln for ln in text.splitlines() if ln.startswith(("model name", "flags", "Features"))]
        return "\n".join(dict.fromkeys(lines))
    except OSError:
        return platform.processor()


def _build(cc: str) -> tuple[Path | None, str]:
    source = SOURCE.read_bytes()
    ident = "\n".join([_compiler_id(cc), platform.machine(), _cpu_id()])
    errors = []
    for flags in _FLAG_SETS:
        digest = hashlib.sha256(source + ident.encode() + " ".join(flags).encode()).hexdigest()[:16]
        target = cache_dir() / f"rows_linear-{digest}.so"
        if target.exists():
            return target, " ".join(flags)
        target.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
            out = Path(tmp) / target.name
            cmd = [cc, *flags, "-shared", "-fPIC", "-o", str(out), str(SOURCE)]
            try:
                proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120,
                                      stdin=subprocess.DEVNULL)
            except (OSError, subprocess.SubprocessError) as exc:
                errors.append(f"{' '.join(flags)}: {exc}")
                continue
            if proc.returncode != 0:
                first = (proc.stderr.strip().splitlines() or ["failed"])[0]
                errors.append(f"{' '.join(flags)}: {first[:200]}")
                continue
            os.replace(out, target)     # atomic: a concurrent build of the same name is harmless
        return target, " ".join(flags)
    return None, "; ".join(errors)


def _self_check(kernel: RowsKernel) -> str | None:
    """Against F.linear on odd shapes (a K that is not a multiple of 16, a bias, every M)."""
    import torch.nn.functional as F

    g = torch.Generator().manual_seed(0)
    n, k = 37, 83
    w, b = torch.randn(n, k, generator=g), torch.randn(n, generator=g)
    for m in range(1, kernel.max_m + 1):
        x = torch.randn(m, k, generator=g)
        for bias in (b, None):
            y = torch.empty(m, n)
            kernel(x, w, bias, y, m, n, k)
            if not torch.allclose(y, F.linear(x, w, bias), atol=1e-4, rtol=1e-4):
                return f"the compiled kernel disagrees with F.linear (m={m})"
    return None


def load_rows_linear() -> RowsKernel | str:
    """The kernel, built if needed; or a sentence saying why it cannot be used here."""
    global _loaded
    with _lock:
        if _loaded is None:
            _loaded = _load()
            if isinstance(_loaded, str):
                log.info("own CPU linear kernel not available: %s", _loaded)
        return _loaded


def _load() -> RowsKernel | str:
    if os.environ.get("STABLELM_LSP_NO_CC"):
        return "STABLELM_LSP_NO_CC is set"
    if not SOURCE.exists():
        return f"kernel source missing ({SOURCE})"
    cc = _compiler()
    if cc is None:
        return "no C compiler (cc, gcc or clang) on PATH"
    try:
        path, detail = _build(cc)
    except OSError as exc:
        return f"cannot build in {cache_dir()}: {exc}"
    if path is None:
        return f"{cc} could not build {SOURCE.name} ({detail})"
    try:
        lib = ctypes.CDLL(str(path))
        fn = lib.rows_linear
        fn.argtypes = [ctypes.c_void_p] * 4 + [ctypes.c_long] * 3 + [ctypes.c_int]
        fn.restype = ctypes.c_int
        lib.rows_linear_max_m.restype = ctypes.c_int
        kernel = RowsKernel(fn, lib.rows_linear_max_m(), path)
    except (OSError, AttributeError) as exc:
        return f"cannot load {path}: {exc}"
    problem = _self_check(kernel)
    if problem:
        return problem
    log.debug("own CPU linear kernel: %s (%s)", path, detail)
    return kernel


def reset_for_tests() -> None:
    global _loaded
    with _lock:
        _loaded = None
