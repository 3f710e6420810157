"""Which kernel the decoder's linear layers (and the output head) run on a CPU.

Decoding is one token per pass: every linear layer is a matrix-vector product that reads each
weight once, so its speed is the memory bandwidth the kernel reaches. torch's default CPU path
(MKL sgemv through F.linear) reaches about 16 GB/s on one core of the machines here, while the
same core reads memory at about 39 GB/s; oneDNN's linear kernel on weights packed once into its
own blocked layout reaches about 24 GB/s, and it stays fast for the few positions a draft
verification runs (measured: 4096x768 float32 layers, one thread: 32 ms -> 21 ms for 1 position,
61 ms -> 37 ms for 8).

`pack_linears` replaces every nn.Linear of a models.Decoder with a `PackedLinear` holding the
packed weight (the unpacked one is released; a tied output head gets a packed copy of the
embedding, which the embedding lookup still needs). Results match F.linear to float rounding
(the sums are accumulated in another order).

Chosen by "auto" on a CPU in float32 when torch was built with oneDNN and a self-check on a small
layer agrees with F.linear; "torch" keeps F.linear; asking for "onednn" where it cannot run is an
error.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .errors import InvalidParameter

log = logging.getLogger(__name__)

KERNELS = ("auto", "torch", "onednn")


@dataclass(frozen=True)
class LinearChoice:
    name: str           # "torch" | "onednn"
    reason: str


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


def onednn_problems(device: torch.device, dtype: torch.dtype) -> list[str]:
    """What stops the packed oneDNN kernel from running here (empty: nothing)."""
    problems = []
    if device.type != "cpu":
        problems.append(f"packed oneDNN linear layers are for CPUs (this is {device.type})")
    if dtype != torch.float32:
        problems.append(f"packed oneDNN linear layers are used for float32 (the model runs in "
                        f"{str(dtype).removeprefix('torch.')})")
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
    its own way (and cannot lower layers packed here)."""
    if requested not in KERNELS:
        raise InvalidParameter(f"unknown linear kernel {requested!r} (choose from {', '.join(KERNELS)})")
    if requested == "torch":
        return LinearChoice("torch", "requested")
    problems = onednn_problems(device, dtype)
    if compiled:
        problems.insert(0, "the decode step is compiled with torch.compile")
    if not problems:
        return LinearChoice("onednn", "requested" if requested == "onednn" else "CPU, float32, oneDNN available")
    if requested == "onednn":
        raise InvalidParameter("cannot use packed oneDNN linear layers: " + "; ".join(problems))
    return LinearChoice("torch", problems[0])


def pack_linears(model: nn.Module) -> int:
    """Replace model's nn.Linear layers by PackedLinear (a models.Decoder's tied head too);
    returns how many layers were packed. Packing twice is a no-op."""
    packed = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is nn.Linear:
                setattr(parent, name, PackedLinear(child.weight, child.bias))
                packed += 1
    if getattr(model, "lm_head", False) is None and hasattr(model, "embed"):
        # tied: the head reads the embedding table; the lookup keeps the unpacked one
        model.lm_head = PackedLinear(model.embed.weight, None)
        model.head_is_tied_copy = True
        packed += 1
    return packed


def install(model: nn.Module, choice: LinearChoice) -> None:
    if choice.name == "onednn":
        count = pack_linears(model)
        log.debug("linear layers: oneDNN packed (%d layers; %s)", count, choice.reason)
    else:
        log.debug("linear layers: torch (%s)", choice.reason)
