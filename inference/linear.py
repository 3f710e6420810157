"""Which kernel the decoder's linear layers (and the output head) run on a CPU.

Decoding is one token per pass: every linear layer is a matrix-vector product that reads each
weight once, so its speed is the memory bandwidth the kernel reaches. On the machines here (AMD
EPYC, one thread; `python bench/linear_bench.py` measures it) torch's F.linear (MKL sgemv) reads
weights at 11-16 GB/s while the core streams memory at 30-39 GB/s, and oneDNN's kernel on weights
packed into its own blocked layout at 13-24 GB/s. The kernels:

- "rows": the project's own kernel (csrc/rows_linear.c, built at first use by cpu_kernels.py)
  for passes of up to 12 positions (decode steps, draft verifications): it streams each weight
  row once at close to the core's memory bandwidth (for one position 2-3x F.linear and
  1.2-1.7x oneDNN packed, on one and two threads). Longer passes (prefill chunks) go to oneDNN
  on the same, unpacked weights (as fast as on packed ones there), else F.linear: no second
  copy, and a tied head reads the embedding table itself.
- "onednn": `PackedLinear`, every layer packed once into oneDNN's layout (the unpacked weight is
  released; a tied head gets a packed copy of the embedding, which the lookup still needs).
  As fast as "rows" for long prefill chunks, about half as fast for decode steps.
- "torch": F.linear everywhere.

"auto" on a CPU in float32 is "rows" when a C compiler builds it and its self-check agrees with
F.linear, else "onednn" when torch has oneDNN and its self-check passes, else "torch"; elsewhere
(CUDA, other dtypes, a decode step compiled with torch.compile, which cannot trace either) it is
"torch". Asking for a kernel that cannot run is an error. Results match F.linear to float
rounding (the sums are accumulated in another order).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from .cpu_kernels import cpu_float32_problems, kernel_for
from .errors import InvalidParameter

log = logging.getLogger(__name__)

KERNELS = ("auto", "torch", "onednn", "rows")
# Longest pass the own kernel runs; longer ones go to F.linear (bench/linear_bench.py: where the
# own kernel stops beating it on the machines here).
ROWS_MAX_M = 12


@dataclass(frozen=True)
class LinearChoice:
    name: str           # "torch" | "onednn" | "rows"
    reason: str
    kernel: object = field(default=None, repr=False, compare=False)   # rows: cpu_kernels.RowsKernel


class PackedLinear(nn.Module):
    """y = x W^T + b with W in oneDNN's packed layout (inference only)."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None):
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.packed = torch.ops.mkldnn._reorder_linear_weight(weight.detach(), 1)
        self.bias = None if bias is None else bias.detach()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.mkldnn._linear_pointwise(x, self.packed, self.bias, "none", [], "")

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, oneDNN packed"


class RowsLinear(nn.Module):
    """y = x W^T + b: the project's kernel for passes of up to `max_m` positions, F.linear on
    the same weight for longer ones (inference only; the weight is shared, never copied)."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, kernel, max_m: int,
                 onednn: bool = False):
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.weight = _parameter(weight)
        self.bias = None if bias is None else _parameter(bias)
        self.kernel = kernel
        self.max_m = min(max_m, kernel.max_m)
        self.onednn = onednn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        m = x.numel() // self.in_features
        if m > self.max_m or x.dtype != torch.float32 or x.device.type != "cpu":
            if self.onednn and x.dtype == torch.float32 and x.device.type == "cpu":
                # oneDNN on the plain weight: as fast as on a packed one for long passes
                # (bench/linear_bench.py), without a second copy of the weights
                return torch.ops.mkldnn._linear_pointwise(x.contiguous(), self.weight, self.bias,
                                                          "none", [], "")
            return F.linear(x, self.weight, self.bias)
        x = x.contiguous()
        y = x.new_empty(*x.shape[:-1], self.out_features)
        self.kernel(x, self.weight, self.bias, y, m, self.out_features, self.in_features)
        return y

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"own kernel up to {self.max_m} positions")


def _parameter(t: torch.Tensor) -> nn.Parameter:
    return t if isinstance(t, nn.Parameter) else nn.Parameter(t, requires_grad=False)


def rows_problems(device: torch.device, dtype: torch.dtype):
    """(kernel, []) when the project's kernel can run here, else (None, [why not])."""
    return kernel_for("rows_linear", "the own linear kernel", device, dtype)


def onednn_problems(device: torch.device, dtype: torch.dtype) -> list[str]:
    """What stops the packed oneDNN kernel from running here (empty: nothing)."""
    problems = cpu_float32_problems("the packed oneDNN kernel", device, dtype)
    if not problems:
        problem = _self_check()
        if problem:
            problems.append(problem)
    return problems


def _self_check() -> str | None:
    if not torch.backends.mkldnn.is_available():
        return "torch was built without oneDNN"
    try:
        g = torch.Generator().manual_seed(0)
        w, b = torch.randn(24, 16, generator=g), torch.randn(24, generator=g)
        x = torch.randn(1, 3, 16, generator=g)
        with torch.inference_mode():
            got = PackedLinear(w, b)(x)
        if not torch.allclose(got, F.linear(x, w, b), atol=1e-4, rtol=1e-4):
            return "oneDNN's packed linear kernel disagrees with F.linear on this machine"
    except (RuntimeError, AttributeError) as e:  # op missing in this torch build, or failing
        return f"oneDNN's packed linear kernel is unavailable ({str(e).splitlines()[0][:120]})"
    return None


def select_linear(requested: str, device: torch.device, dtype: torch.dtype,
                  compiled: bool = False) -> LinearChoice:
    """compiled: the decode step is compiled with torch.compile, whose CPU backend packs weights
    its own way (and can trace neither the packed layers nor the own kernel's ctypes call)."""
    if requested not in KERNELS:
        raise InvalidParameter(f"unknown linear kernel {requested!r} (choose from {', '.join(KERNELS)})")
    if requested == "torch":
        return LinearChoice("torch", "requested")
    if compiled:
        if requested != "auto":
            raise InvalidParameter(f"cannot use the {requested!r} linear kernel: the decode step "
                                   "is compiled with torch.compile")
        return LinearChoice("torch", "the decode step is compiled with torch.compile")
    problems = []
    if requested in ("auto", "rows"):
        kernel, problems = rows_problems(device, dtype)
        if kernel is not None:
            return LinearChoice("rows", "requested" if requested == "rows" else
                                "CPU, float32, own kernel built", kernel)
        if requested == "rows":
            raise InvalidParameter("cannot use the own linear kernel: " + "; ".join(problems))
    onednn = onednn_problems(device, dtype)
    if not onednn:
        return LinearChoice("onednn", "requested" if requested == "onednn" else
                            "CPU, float32, oneDNN available" + (f" ({problems[0]})" if problems else ""))
    if requested == "onednn":
        raise InvalidParameter("cannot use packed oneDNN linear layers: " + "; ".join(onednn))
    return LinearChoice("torch", (problems or onednn)[0])


def _replace_linears(model: nn.Module, make) -> int:
    """Replace model's nn.Linear layers by make(weight, bias), and a models.Decoder's tied head
    (None: it reads the embedding table) by make(embedding, None); returns how many layers were
    replaced. Replacing twice is a no-op."""
    replaced = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is nn.Linear:
                setattr(parent, name, make(child.weight, child.bias))
                replaced += 1
    if getattr(model, "lm_head", False) is None and hasattr(model, "embed"):
        model.lm_head = make(model.embed.weight, None)
        model.head_is_tied_copy = True      # still tied (see Decoder.tied)
        replaced += 1
    return replaced


def pack_linears(model: nn.Module) -> int:
    """PackedLinear layers (a tied head gets a packed copy; the lookup keeps the unpacked one)."""
    return _replace_linears(model, PackedLinear)


def rows_linears(model: nn.Module, kernel, max_m: int = ROWS_MAX_M) -> int:
    """RowsLinear layers on the same weights (a tied head reads the embedding table itself)."""
    onednn = not onednn_problems(torch.device("cpu"), torch.float32)
    return _replace_linears(model, lambda w, b: RowsLinear(w, b, kernel, max_m, onednn))


def install(model: nn.Module, choice: LinearChoice) -> None:
    if choice.name == "onednn":
        count = pack_linears(model)
        log.debug("linear layers: oneDNN packed (%d layers; %s)", count, choice.reason)
    elif choice.name == "rows":
        count = rows_linears(model, choice.kernel)
        log.debug("linear layers: own kernel up to %d positions, F.linear beyond (%d layers; %s)",
                  ROWS_MAX_M, count, choice.reason)
    else:
        log.debug("linear layers: torch (%s)", choice.reason)
