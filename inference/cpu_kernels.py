"""The project's own CPU kernels, built with the machine's C compiler at first use and loaded with
ctypes: csrc/rows_linear.c (linear layers with float32 or int8 weights for a few positions,
inference/linear.py), csrc/q8_linear.c (int8 weights times inputs quantized to int8),
csrc/decode_attention.c (attention of a few positions over a float32 or float16 KV cache,
inference/attention.py) and csrc/decode_layers.c (every decoder layer of a short pass in one call,
calling the others through function pointers: inference/native_layers.py).

No build step at install time and no dependency: the sources ship with the package; the first
engine that wants a kernel compiles it (under a second) with `-O3 -march=native` into the user's
cache directory ($STABLELM_LSP_CACHE, else $XDG_CACHE_HOME/stablelm-lsp, else ~/.cache/stablelm-lsp),
under a name derived from the source, the flags, the compiler and the machine, so a changed
source or another CPU gets a fresh build. The library is linked against OpenMP when the compiler
can, and then shares the OpenMP runtime torch loaded (same soname). Where there is no compiler,
or the build or the self-check fails, `kernel_for` says why and the caller keeps torch's kernels. The compiler's output never reaches stdout (the language server speaks on it).

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

CSRC = Path(__file__).with_name("csrc")
_FLAG_SETS = (["-O3", "-march=native", "-fopenmp"], ["-O3", "-march=native"], ["-O3", "-fopenmp"], ["-O3"])


@dataclass
class LinearKernel:
    """rows_linear (float32 weights) or int8_linear (int8 weights, a float32 scale per row)."""
    fn: ctypes._CFuncPtr
    max_m: int
    path: Path

    def __call__(self, x: torch.Tensor, w: torch.Tensor, scale: torch.Tensor | None,
                 b: torch.Tensor | None, y: torch.Tensor, m: int, n: int, k: int) -> None:
        rc = self.fn(x.data_ptr(), w.data_ptr(), None if scale is None else scale.data_ptr(),
                     None if b is None else b.data_ptr(), y.data_ptr(), m, n, k, torch.get_num_threads())
        if rc:
            raise RuntimeError(f"{self.fn.__name__} refused m={m} n={n} k={k}")


@dataclass
class AttentionKernel:
    """decode_attention over a float32 cache (fn) or a float16 one (fn16): picked by k's dtype."""
    fn: ctypes._CFuncPtr
    fn16: ctypes._CFuncPtr
    path: Path

    DTYPES = (torch.float32, torch.float16)     # of the cache it reads; queries are float32

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
                 out: torch.Tensor, heads: int, kv_heads: int, t: int, s: int, d: int,
                 head_stride: int, scale: float) -> None:
        fn = self.fn16 if k.dtype == torch.float16 else self.fn
        rc = fn(q.data_ptr(), k.data_ptr(), v.data_ptr(), None if mask is None else mask.data_ptr(),
                out.data_ptr(), heads, kv_heads, t, s, d, head_stride, scale, torch.get_num_threads())
        if rc:
            raise RuntimeError(f"decode_attention refused heads={heads}/{kv_heads} t={t} s={s} d={d}")


_lock = threading.RLock()     # reentrant: a self-check may load the kernels it calls
_loaded: dict[str, object] = {}     # name -> the kernel, or why there is none


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


def cpu_id() -> str:
    """What -march=native depends on: the CPU's model and flags."""
    try:
        text = Path("/proc/cpuinfo").read_text()
        lines = [ln for ln in text.splitlines() if ln.startswith(("model name", "flags", "Features"))]
        return "\n".join(dict.fromkeys(lines))
    except OSError:
        return platform.processor()


def _build(cc: str, name: str) -> tuple[Path | None, str]:
    source_path = CSRC / f"{name}.c"
    # the source and the headers it may include, all part of the build's identity
    source = source_path.read_bytes() + b"".join(h.read_bytes() for h in sorted(CSRC.glob("*.h")))
    ident = "\n".join([_compiler_id(cc), platform.machine(), cpu_id()])
    errors = []
    for flags in _FLAG_SETS:
        digest = hashlib.sha256(source + ident.encode() + " ".join(flags).encode()).hexdigest()[:16]
        target = cache_dir() / f"{name}-{digest}.so"
        if target.exists():
            return target, " ".join(flags)
        target.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
            out = Path(tmp) / target.name
            cmd = [cc, *flags, "-shared", "-fPIC", "-o", str(out), str(source_path)]
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


def _check_linear(kernel: LinearKernel, int8: bool) -> str | None:
    """Against F.linear (on the dequantized weights for int8) on odd shapes: a K off the vector
    width, with and without a bias, every M."""
    import torch.nn.functional as F

    from stablelm_lsp.models.quantize import dequantize, quantize_rows

    g = torch.Generator().manual_seed(0)
    n, k = 37, 83
    w, b = torch.randn(n, k, generator=g), torch.randn(n, generator=g)
    q = scale = None
    if int8:
        q, scale = torch.empty(n, k, dtype=torch.int8), torch.empty(n)
        quantize_rows(w, q, scale)
        w = dequantize(q, scale, torch.float32)
    for m in range(1, kernel.max_m + 1):
        x = torch.randn(m, k, generator=g)
        for bias in (b, None):
            y = torch.empty(m, n)
            kernel(x, q if int8 else w, scale, bias, y, m, n, k)
            if not torch.allclose(y, F.linear(x, w, bias), atol=1e-4, rtol=1e-4):
                return f"the compiled {kernel.fn.__name__} disagrees with F.linear (m={m})"
    return None


def _check_q8(kernel: LinearKernel) -> str | None:
    """Against the exact arithmetic it implements (models/quantize.py q8_linear_reference) on odd
    shapes: a K off the 32-input block, with and without a bias, every M."""
    from stablelm_lsp.models.quantize import q8_linear_reference, quantize_rows

    g = torch.Generator().manual_seed(0)
    n, k = 37, 83
    w, b = torch.randn(n, k, generator=g), torch.randn(n, generator=g)
    q, scale = torch.empty(n, k, dtype=torch.int8), torch.empty(n)
    quantize_rows(w, q, scale)
    for m in range(1, kernel.max_m + 1):
        x = torch.randn(m, k, generator=g)
        x[0, 40:72] = 0         # a block of zeros (scale 0)
        for bias in (b, None):
            y = torch.empty(m, n)
            kernel(x, q, scale, bias, y, m, n, k)
            if not torch.allclose(y.double(), q8_linear_reference(x, q, scale, bias), atol=1e-4, rtol=1e-4):
                return f"the compiled q8_linear disagrees with its reference arithmetic (m={m})"
    return None


def _check_attention(kernel: AttentionKernel) -> str | None:
    """Against SDPA (on the float32 values of a float16 cache): GQA, several positions under a
    mask, a head size off the 16-lane width."""
    import torch.nn.functional as F

    g = torch.Generator().manual_seed(0)
    heads, kv_heads, t, s, d, capacity = 6, 2, 3, 70, 24, 96
    for dtype in AttentionKernel.DTYPES:
        k = torch.randn(1, kv_heads, capacity, d, generator=g).to(dtype)[:, :, :s]
        v = torch.randn(1, kv_heads, capacity, d, generator=g).to(dtype)[:, :, :s]
        q = torch.randn(1, heads, t, d, generator=g)
        mask = torch.rand(t, s, generator=g) > 0.3
        mask[:, 0] = True
        for m in (mask, None):
            out = torch.empty_like(q)
            kernel(q, k, v, None if m is None else m.view(torch.uint8), out, heads, kv_heads, t, s, d,
                   k.stride(1), d ** -0.5)
            want = F.scaled_dot_product_attention(q, k.float(), v.float(), attn_mask=m, enable_gqa=True)
            if not torch.allclose(out, want, atol=1e-4, rtol=1e-4):
                return f"the compiled attention kernel disagrees with SDPA ({dtype} cache)"
    return None


def typed_linear(fn):
    """A linear kernel's C function with its argument types (x, w, scale, b, y, M, N, K, threads)."""
    fn.argtypes = [ctypes.c_void_p] * 5 + [ctypes.c_long] * 3 + [ctypes.c_int]
    fn.restype = ctypes.c_int
    return fn


def typed_attention(fn):
    """An attention kernel's C function with its argument types (see AttentionKernel)."""
    fn.argtypes = [ctypes.c_void_p] * 5 + [ctypes.c_long] * 6 + [ctypes.c_float, ctypes.c_int]
    fn.restype = ctypes.c_int
    return fn


def _bind_linear(entry: str, max_m: str = "rows_linear_max_m"):
    def bind(lib: ctypes.CDLL, path: Path) -> LinearKernel:
        fn = typed_linear(getattr(lib, entry))
        longest = getattr(lib, max_m)
        longest.restype = ctypes.c_int
        return LinearKernel(fn, longest(), path)

    return bind


def _bind_attention(lib: ctypes.CDLL, path: Path) -> AttentionKernel:
    return AttentionKernel(typed_attention(lib.decode_attention), typed_attention(lib.decode_attention_f16), path)


def _bind_layers(lib: ctypes.CDLL, path: Path):
    from .native_layers import LayersKernel

    return LayersKernel(lib, path)


def _check_layers(kernel) -> str | None:
    from .native_layers import check

    return check(kernel)


# kernel -> the source it is built from (csrc/<source>.c), how its entry point is bound, and the
# check it must pass
_KERNELS = {"rows_linear": ("rows_linear", _bind_linear("rows_linear"), lambda k: _check_linear(k, False)),
            "int8_linear": ("rows_linear", _bind_linear("int8_linear"), lambda k: _check_linear(k, True)),
            "q8_linear": ("q8_linear", _bind_linear("q8_linear", "q8_linear_max_m"), _check_q8),
            "decode_attention": ("decode_attention", _bind_attention, _check_attention),
            "decode_layers": ("decode_layers", _bind_layers, _check_layers)}


def cpu_float32_problems(what: str, device: torch.device, dtype: torch.dtype) -> list[str]:
    """Why `what` (a CPU float32 kernel) cannot run on this device and dtype (empty: it can)."""
    problems = []
    if device.type != "cpu":
        problems.append(f"{what} is for CPUs (this is {device.type})")
    if dtype != torch.float32:
        problems.append(f"{what} is for float32 (the model runs in {str(dtype).removeprefix('torch.')})")
    return problems


def kernel_for(name: str, what: str, device: torch.device, dtype: torch.dtype):
    """(kernel, []) when the own kernel `name` can run here, else (None, [why not])."""
    problems = cpu_float32_problems(what, device, dtype)
    if problems:
        return None, problems
    kernel = _get(name)
    return (None, [kernel]) if isinstance(kernel, str) else (kernel, [])


def load_rows_linear() -> LinearKernel | str:
    """The linear kernel, built if needed; or a sentence saying why it cannot be used here."""
    return _get("rows_linear")


def load_decode_layers():
    """The every-layer kernel (inference/native_layers.py), built if needed; or why not."""
    return _get("decode_layers")


def build_ids(names: list[str]) -> dict[str, str]:
    """Each named kernel (built if needed): its library's file name (which names the source,
    flags, compiler and CPU it was built from), or why there is none."""
    return {name: k if isinstance(k, str) else k.path.name for name in names for k in [_get(name)]}


def _get(name: str):
    with _lock:
        if name not in _loaded:
            _loaded[name] = _load(name)
            if isinstance(_loaded[name], str):
                log.info("own CPU kernel %s not available: %s", name, _loaded[name])
        return _loaded[name]


def _load(name: str):
    if os.environ.get("STABLELM_LSP_NO_CC"):
        return "STABLELM_LSP_NO_CC is set"
    stem, bind, check = _KERNELS[name]
    source = CSRC / f"{stem}.c"
    if not source.exists():
        return f"kernel source missing ({source})"
    cc = _compiler()
    if cc is None:
        return "no C compiler (cc, gcc or clang) on PATH"
    try:
        path, detail = _build(cc, stem)
    except OSError as exc:
        return f"cannot build in {cache_dir()}: {exc}"
    if path is None:
        return f"{cc} could not build {source.name} ({detail})"
    try:
        kernel = bind(ctypes.CDLL(str(path)), path)
    except (OSError, AttributeError) as exc:
        return f"cannot load {path}: {exc}"
    problem = check(kernel)
    if problem:
        return problem
    log.debug("own CPU kernel %s: %s (%s)", name, path, detail)
    return kernel


def reset_for_tests() -> None:
    with _lock:
        _loaded.clear()
