"""int8 weights: weight-only, per-output-channel symmetric quantization, done while loading.

Each row r of a weight matrix W [N, K] (one output channel) is stored as int8 q[r] with one
float32 scale s[r] = max|W[r]| / 127, so that W[r] ~ q[r] * s[r] with an error of at most s[r]/2
per weight; activations stay in the compute dtype. The embedding table is quantized the same way
per row (a token's row is dequantized when it is looked up), so a tied output head reads the same
int8 table. Norms and biases stay float.

The modules here compute with torch alone (dequantizing the weights in the compute dtype each
call): the reference the faster kernels (inference/linear.py) are checked against, and the path
on devices they do not cover.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

QMAX = 127


def quantize_rows(w: torch.Tensor, q: torch.Tensor, scale: torch.Tensor) -> None:
    """Quantize float rows w [n, K] into q [n, K] (int8) and scale [n] (float32), in place.

    One temporary of w's size (the divided rows); a zero row gets scale 0 and zero weights."""
    w = w.float()
    amax = torch.linalg.vector_norm(w, float("inf"), dim=1)
    s = amax / QMAX
    scaled = w / torch.where(s > 0, s, torch.ones_like(s))[:, None]
    q.copy_(scaled.round_().clamp_(-QMAX, QMAX))
    scale.copy_(s)


def dequantize(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """q [N, K] int8 with scale [N] -> the float weights [N, K] in `dtype` (a new tensor)."""
    return (q.to(torch.float32) * scale.float()[:, None]).to(dtype)


QBLOCK = 32     # inputs per block when the inputs are quantized too (q8_linear_reference)


def quantize_blocks(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs x [M, K] (float32) to int8 per block of QBLOCK along K, as llama.cpp's Q8_0 and the
    own q8 kernel (inference/csrc/q8_linear.c) do: d = max|x[block]| / 127, q = round(x / d),
    ties to even. Returns q [M, blocks, QBLOCK] (float32 holding integers; zeros past K) and
    d [M, blocks] (float32)."""
    m, k = x.shape
    blocks = -(-k // QBLOCK)
    xp = F.pad(x.float(), (0, blocks * QBLOCK - k)).view(m, blocks, QBLOCK)
    d = xp.abs().amax(-1) / QMAX
    q = torch.where(d[..., None] > 0, xp / torch.where(d > 0, d, 1)[..., None], 0).round_()
    return q, d


def q8_linear_reference(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor,
                        bias: torch.Tensor | None) -> torch.Tensor:
    """The arithmetic of the q8 kernel, exactly, in float64: int8 weights q [N, K] (scale [N])
    against the inputs x [M, K] quantized per block (quantize_blocks), each block's dot product
    an exact integer, y = scale * sum_b d_b * dot_b + bias. Against the float inputs on the same
    weights it differs by at most q8_input_error_bound."""
    qx, d = quantize_blocks(x)
    n, k = q.shape
    qw = F.pad(q.double(), (0, qx.shape[1] * QBLOCK - k)).view(n, -1, QBLOCK)
    dots = torch.einsum("mbk,nbk->mnb", qx.double(), qw)
    y = (dots * d.double()[:, None, :]).sum(-1) * scale.double()
    return y if bias is None else y + bias.double()


def q8_input_error_bound(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """[M, N]: how far quantizing the inputs may move each output of a layer with int8 weights
    q (scale): each input moves by at most half its block's d, so an output by at most
    sum_b d_b / 2 * sum over the block of |q * scale|."""
    _, d = quantize_blocks(x)
    n, k = q.shape
    aw = F.pad(q.double().abs(), (0, d.shape[1] * QBLOCK - k)).view(n, -1, QBLOCK).sum(-1)
    return (d.double() / 2) @ aw.T * scale.double()


def _frozen(t: torch.Tensor) -> nn.Parameter:
    return nn.Parameter(t, requires_grad=False)


class Int8Linear(nn.Module):
    """y = x (q * scale)^T + b with q int8 [out, in], scale float32 [out], b in the compute dtype."""

    def __init__(self, n_in: int, n_out: int, bias: bool):
        super().__init__()
        self.in_features, self.out_features = n_in, n_out
        self.weight = _frozen(torch.empty(n_out, n_in, dtype=torch.int8))
        self.scale = _frozen(torch.empty(n_out, dtype=torch.float32))
        self.bias = _frozen(torch.empty(n_out)) if bias else None

    @classmethod
    def sharing(cls, weight: nn.Parameter, scale: nn.Parameter) -> "Int8Linear":
        """A layer reading another module's int8 rows (a tied head reading the embedding)."""
        layer = cls.__new__(cls)
        nn.Module.__init__(layer)
        layer.out_features, layer.in_features = weight.shape
        layer.weight, layer.scale, layer.bias = weight, scale, None
        return layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.linear(x, self.weight.to(x.dtype)) * self.scale.to(x.dtype)
        return y if self.bias is None else y + self.bias

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8"


class Int8Embedding(nn.Module):
    """Rows of an int8 table [V, H] with a scale per row, looked up and dequantized to `dtype`."""

    def __init__(self, vocab: int, dim: int):
        super().__init__()
        self.weight = _frozen(torch.empty(vocab, dim, dtype=torch.int8))
        self.scale = _frozen(torch.empty(vocab, dtype=torch.float32))
        self.dtype = torch.float32      # the compute dtype (set by the loader)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        rows = self.weight[ids].to(torch.float32) * self.scale[ids][..., None]
        return rows.to(self.dtype)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, {self.weight.shape[1]}, int8"


def is_quantized(module: nn.Module) -> bool:
    return isinstance(module, (Int8Linear, Int8Embedding))
