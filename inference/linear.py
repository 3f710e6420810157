"""The linear layers' kernels: what can run here, and the layer that runs one per pass length.

A decode step is one position per pass: every linear layer is a matrix-vector product that reads
each weight once, so its speed is the memory bandwidth the kernel reaches; a prefill chunk of a
few hundred positions is a matrix product, bound by arithmetic. Which kernel is fastest for each
depends on the CPU (our own kernel was 2x slower than F.linear on a Zen 1 EPYC and 1.3-4x faster
on a Zen 3 one), so the engine measures them on the model's own layers (inference/tuning.py)
and every layer runs the fastest per range of pass lengths. The implementations:

- "rows": the project's own kernels (csrc/rows_linear.c, for float32 and for int8 weights; built
  at first use by cpu_kernels.py) for passes of up to 16 positions: each weight row is streamed
  once and multiplied into every position.
- "torch": torch's op for the weights: F.linear, or for int8 weights
  `torch._weight_int8pack_mm` (where this torch build has it for the device).
- "onednn-plain": oneDNN's linear on the plain float32 weights (`mkldnn._linear_pointwise`).
- "onednn": oneDNN on weights packed into its blocked layout, which then is the layer's only
  copy: the packed layout serves every pass length of the layer or none (a tied head never packs:
  the embedding lookup needs the plain table).
- "q8": the own int8 x int8 kernel (csrc/q8_linear.c, int8 weights, up to 16 positions): the
  inputs are quantized to int8 too, per block of 32, as llama.cpp's Q8_0 does, and 32 weights
  are multiplied at a time in integers. It does not compute the layer's own arithmetic (the
  inputs' rounding moves each output by at most models/quantize.py's q8_input_error_bound), so
  "auto" never chooses it: it runs where forced (`--linear q8`); the benchmarks measure it beside
  the others.
- "widen": the layer's weights widened per pass (int8 dequantized, 16-bit converted) to float32
  on a CPU (to the compute dtype on a GPU), then F.linear: one layer's temporary, never a
  second copy of the model; for long passes the conversion is paid once for many positions.

`--linear NAME` forces one implementation for every pass it can run (longer passes than "rows"
takes go to "onednn-plain", else "torch", for float32 weights and to "widen" for int8 ones).
Results match F.linear on the same (dequantized) weights to float rounding, "q8"'s its reference
arithmetic (models/quantize.py q8_linear_reference).

On CUDA float layers stay nn.Linear ("torch"); int8 layers get "torch" or "widen".
"""
from __future__ import annotations

import ctypes
import functools
import logging
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from stablelm_lsp.models.quantize import Int8Linear, dequantize, quantize_rows

from .cpu_kernels import kernel_for
from .errors import InvalidParameter

log = logging.getLogger(__name__)

KERNELS = ("auto", "rows", "torch", "onednn", "onednn-plain", "widen", "q8")


@dataclass(frozen=True)
class Impl:
    """One way to compute a layer: run(layer, x [m, K] contiguous) -> y [m, N]."""
    name: str
    run: Callable[["KernelLinear", torch.Tensor], torch.Tensor] = field(repr=False, compare=False)
    max_m: int | None = None    # the longest pass it takes (None: any)
    packed: bool = False        # runs on oneDNN's packed layout, and only on it
    traced: bool = True         # torch.compile / CUDA graphs can capture it (no ctypes call)
    quantizes_inputs: bool = False  # rounds the inputs too: not the layer's arithmetic (never auto)
    kernel: object = field(default=None, repr=False, compare=False)   # an own kernel's LinearKernel

    def takes(self, m: int) -> bool:
        return self.max_m is None or m <= self.max_m


# A layer's choice: (longest pass length, implementation) pairs by increasing length, the last
# one's length None (every longer pass).
Table = tuple[tuple[int | None, Impl], ...]


class KernelLinear(nn.Module):
    """y = x W^T + b for float weights, or x (q * scale)^T + b for int8 ones (inference only),
    computed by the implementation its table names for the pass length. Holds the weight it was
    given (shared, never copied: a tied head reads the embedding table itself)."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None,
                 scale: torch.Tensor | None = None, shares_embedding: bool = False):
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.weight = _parameter(weight)
        self.bias = None if bias is None else _parameter(bias)
        self.scale = None if scale is None else _parameter(scale)
        self.shares_embedding = shares_embedding
        self.packed_weight: torch.Tensor | None = None   # while packed, instead of .weight
        self.table: Table = ()

    @property
    def int8(self) -> bool:
        return self.scale is not None

    @property
    def can_pack(self) -> bool:
        return not self.int8 and not self.shares_embedding and self.weight_dtype == torch.float32

    @property
    def weight_dtype(self) -> torch.dtype:
        return self.packed_weight.dtype if self.packed_weight is not None else self.weight.dtype

    def impl_for(self, m: int) -> Impl:
        for bound, impl in self.table:
            if bound is None or m <= bound:
                return impl
        raise RuntimeError("linear layer without a kernel table")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        m = x.numel() // self.in_features
        x2 = x.reshape(m, self.in_features)
        if not x2.is_contiguous() or x2.stride(1) != 1:     # (a size-1 dim may have any stride)
            x2 = torch.empty_like(x2, memory_format=torch.contiguous_format).copy_(x2)
        return self.impl_for(m).run(self, x2).view(*x.shape[:-1], self.out_features)

    def pack(self) -> None:
        """Into oneDNN's layout, in place (the plain weight is released)."""
        if self.packed_weight is None:
            plain = self.weight
            del self.weight
            self.packed_weight = torch.ops.mkldnn._reorder_linear_weight(plain.detach(), 1)

    def unpack(self) -> None:
        if self.packed_weight is not None:
            self.weight = _parameter(self.packed_weight.to_dense())
            self.packed_weight = None

    def extra_repr(self) -> str:
        table = ", ".join(f"{'<=' + str(b) if b else 'longer'}: {i.name}" for b, i in self.table)
        return (f"in_features={self.in_features}, out_features={self.out_features}"
                f"{', int8' if self.int8 else ''}; {table}")


def release_freed_memory() -> None:
    """Give the pages of freed weights back to the system: glibc keeps freed heap blocks resident,
    and packing (or unpacking) layer by layer frees one weight per layer, amid the others
    (without this, a model packed for oneDNN stayed 13% above its weights' bytes)."""
    try:
        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError, TypeError):   # not glibc
        pass


def _parameter(t: torch.Tensor) -> nn.Parameter:
    return t if isinstance(t, nn.Parameter) else nn.Parameter(t, requires_grad=False)


# -- the implementations ------------------------------------------------------------------------

def _torch_float(layer: KernelLinear, x: torch.Tensor) -> torch.Tensor:
    return F.linear(x, layer.weight, layer.bias)


def _onednn(layer: KernelLinear, x: torch.Tensor) -> torch.Tensor:
    w = layer.packed_weight if layer.packed_weight is not None else layer.weight
    return torch.ops.mkldnn._linear_pointwise(x, w, layer.bias, "none", [], "")


def _widen(layer: KernelLinear, x: torch.Tensor) -> torch.Tensor:
    dtype = torch.float32 if x.device.type == "cpu" else x.dtype
    bias = None if layer.bias is None else layer.bias.to(dtype)
    if not layer.int8:
        return F.linear(x.to(dtype), layer.weight.to(dtype), bias).to(x.dtype)
    # the scales applied to the outputs: one conversion of the weights, no second pass over them
    y = F.linear(x.to(dtype), layer.weight.to(dtype)).mul_(layer.scale.to(dtype))
    return (y if bias is None else y.add_(bias)).to(x.dtype)


def _torch_int8(layer: KernelLinear, x: torch.Tensor) -> torch.Tensor:
    y = torch._weight_int8pack_mm(x, layer.weight, layer.scale.to(x.dtype))
    return y if layer.bias is None else y + layer.bias


def _rows_impl(kernel, name: str = "rows") -> Impl:
    """An own kernel (float32 or int8 weights: cpu_kernels.LinearKernel)."""
    def run(layer: KernelLinear, x: torch.Tensor) -> torch.Tensor:
        m = x.shape[0]
        y = x.new_empty(m, layer.out_features)
        kernel(x, layer.weight, layer.scale, layer.bias, y, m, layer.out_features, layer.in_features)
        return y

    return Impl(name, run, max_m=kernel.max_m, traced=False, quantizes_inputs=name == "q8", kernel=kernel)


TORCH = Impl("torch", _torch_float)
WIDEN = Impl("widen", _widen)
ONEDNN_PLAIN = Impl("onednn-plain", _onednn, traced=False)
ONEDNN_PACKED = Impl("onednn", _onednn, packed=True, traced=False)
TORCH_INT8 = Impl("torch", _torch_int8)


# -- what can run here --------------------------------------------------------------------------

@dataclass
class Candidates:
    """The implementations that can run a model's layers here, and why others cannot."""
    impls: list[Impl]
    problems: dict[str, str]        # name -> why it is not available
    fallback: Impl                  # for passes longer than a forced implementation takes

    def named(self, name: str) -> Impl | None:
        return next((i for i in self.impls if i.name == name), None)


def candidates(device: torch.device, dtype: torch.dtype, int8: bool) -> Candidates:
    """Every implementation that builds and passes its self-check for these weights here.
    dtype: the compute dtype (float weights are stored in it)."""
    impls, problems = [], {}
    if int8:
        kernel, why = kernel_for("int8_linear", "the own int8 linear kernel", device, dtype)
        if kernel is not None:
            impls.append(_rows_impl(kernel))
        else:
            problems["rows"] = "; ".join(why)
        kernel, why = kernel_for("q8_linear", "the own int8 x int8 kernel", device, dtype)
        if kernel is not None:
            impls.append(_rows_impl(kernel, "q8"))
        else:
            problems["q8"] = "; ".join(why)
        problem = _int8pack_problem(device, dtype)
        if problem is None:
            impls.append(TORCH_INT8)
        else:
            problems["torch"] = problem
        impls.append(WIDEN)
        problems["onednn"] = problems["onednn-plain"] = "oneDNN's kernels take float32 weights"
        return Candidates(impls, problems, WIDEN)
    if device.type == "cpu" and dtype == torch.float32:
        kernel, why = kernel_for("rows_linear", "the own linear kernel", device, dtype)
        if kernel is not None:
            impls.append(_rows_impl(kernel))
        else:
            problems["rows"] = "; ".join(why)
        impls.append(TORCH)
        problems["q8"] = "the int8 x int8 kernel takes int8 weights"
        problem = _onednn_problem()
        if problem is None:
            impls += [ONEDNN_PLAIN, ONEDNN_PACKED]
        else:
            problems["onednn"] = problems["onednn-plain"] = problem
        problems["widen"] = "the weights are float32 already"
        return Candidates(impls, problems, ONEDNN_PLAIN if problem is None else TORCH)
    if device.type == "cpu":        # 16-bit weights
        problems["rows"] = "the own kernels take float32 or int8 weights"
        problems["q8"] = "the int8 x int8 kernel takes int8 weights"
        problems["onednn"] = problems["onednn-plain"] = "oneDNN's kernels here take float32 weights"
        return Candidates([TORCH, WIDEN], problems, TORCH)
    for name in ("rows", "onednn", "onednn-plain", "widen", "q8"):
        problems[name] = f"float layers on {device.type} run torch's F.linear"
    return Candidates([TORCH], problems, TORCH)


@functools.lru_cache(maxsize=None)
def _onednn_problem() -> str | None:
    if not torch.backends.mkldnn.is_available():
        return "torch was built without oneDNN"
    try:
        g = torch.Generator().manual_seed(0)
        w, b = torch.randn(24, 16, generator=g), torch.randn(24, generator=g)
        x = torch.randn(3, 16, generator=g)
        layer = KernelLinear(w.clone(), b)
        with torch.inference_mode():
            plain = _onednn(layer, x)
            layer.pack()
            packed = _onednn(layer, x)
            layer.unpack()
        want = F.linear(x, w, b)
        if not (torch.allclose(plain, want, atol=1e-4, rtol=1e-4)
                and torch.allclose(packed, want, atol=1e-4, rtol=1e-4)
                and torch.equal(layer.weight, w)):
            return "oneDNN's linear kernel disagrees with F.linear on this machine"
    except (RuntimeError, AttributeError) as e:  # op missing in this torch build, or failing
        return f"oneDNN's linear kernel is unavailable ({str(e).splitlines()[0][:120]})"
    return None


@functools.lru_cache(maxsize=None)
def _int8pack_problem(device: torch.device, dtype: torch.dtype) -> str | None:
    op = getattr(torch, "_weight_int8pack_mm", None)
    key = "CUDA" if device.type == "cuda" else "CPU"
    try:
        has = op is not None and torch._C._dispatch_has_kernel_for_dispatch_key(
            "aten::_weight_int8pack_mm", key)
    except RuntimeError:
        has = False
    if not has:
        return f"this torch build has no int8 weight kernel (_weight_int8pack_mm) for {device.type}"
    try:
        g = torch.Generator().manual_seed(0)
        w = torch.randn(24, 64, generator=g)
        q, scale = torch.empty(24, 64, dtype=torch.int8), torch.empty(24)
        quantize_rows(w, q, scale)
        x = torch.randn(3, 64, generator=g)
        layer = KernelLinear(q.to(device), None, scale.to(device))
        with torch.inference_mode():
            got = _torch_int8(layer, x.to(device, dtype)).float().cpu()
        want = F.linear(x, dequantize(q, scale, torch.float32))
        tol = 1e-4 if dtype == torch.float32 else 5e-2
        if not torch.allclose(got, want, atol=tol, rtol=tol):
            return "torch's int8 weight kernel disagrees with F.linear on this machine"
    except (RuntimeError, TypeError) as e:
        return f"torch's int8 weight kernel is unavailable ({str(e).splitlines()[0][:120]})"
    return None


def forced(requested: str, found: Candidates) -> Impl:
    """The implementation `--linear requested` names, or an error saying why it cannot run."""
    if requested not in KERNELS or requested == "auto":
        raise InvalidParameter(f"unknown linear kernel {requested!r} (choose from {', '.join(KERNELS)})")
    impl = found.named(requested)
    if impl is None:
        raise InvalidParameter(f"cannot use the {requested!r} linear kernel: {found.problems[requested]}")
    return impl


def forced_table(impl: Impl, fallback: Impl) -> Table:
    return ((impl.max_m, impl), (None, fallback)) if impl.max_m is not None else ((None, impl),)


# -- installing ---------------------------------------------------------------------------------

def install(model: nn.Module) -> list[KernelLinear]:
    """Replace the model's linear layers (nn.Linear, Int8Linear) by KernelLinear layers on the
    same tensors, the output head included (a tied head reads the embedding table itself), in
    model order; their tables are set by the caller. Installing twice returns the same layers."""
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is nn.Linear:
                setattr(parent, name, KernelLinear(child.weight, child.bias))
            elif isinstance(child, Int8Linear):
                shares = getattr(model, "head_shares_embedding", False) and child is model.lm_head
                setattr(parent, name, KernelLinear(child.weight, child.bias, child.scale, shares))
    if getattr(model, "lm_head", False) is None and hasattr(model, "embed"):
        model.lm_head = KernelLinear(model.embed.weight, None, shares_embedding=True)
        model.head_shares_embedding = True      # still tied (see Decoder.tied)
    return [m for m in model.modules() if isinstance(m, KernelLinear)]


def describe(table: Table) -> list[list]:
    """[[longest pass or None, implementation name], ...] (for logs, status and benchmarks)."""
    return [[bound, impl.name] for bound, impl in table]
