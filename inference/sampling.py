"""Choosing the next token from a row of logits: greedy, temperature, top-k, top-p, seeded.

Works on one sequence's logits (`[V]` float32). Randomness comes only from a `torch.Generator`
owned by the `Sampler`, so the same seed on the same device gives the same tokens.
"""
from __future__ import annotations

import secrets

import torch

from .checks import SamplingParams
from .errors import NonFiniteLogits

__all__ = ["Sampler", "SamplingParams"]


class Sampler:
    """Draws tokens for one request; holds that request's random state."""

    def __init__(self, params: SamplingParams, device: torch.device | str = "cpu"):
        self.params = params
        self.generator: torch.Generator | None = None
        if not params.greedy:
            self.generator = torch.Generator(device=device)
            seed = params.seed if params.seed is not None else secrets.randbits(63)
            self.generator.manual_seed(seed)

    def __call__(self, logits: torch.Tensor, allowed: torch.Tensor | None = None) -> int:
        """logits: [V] float32 of the last position -> the chosen token id. allowed: ids [N]
        the choice is limited to (token healing constrains the first token this way)."""
        if allowed is not None:
            logits = torch.full_like(logits, float("-inf")).index_copy_(0, allowed, logits[allowed])
        if self.generator is None:
            return int(torch.argmax(logits))
        probs = self.distribution(logits)
        # NaN or infinite logits give NaN probabilities, on which CUDA's multinomial stops the
        # process with a device-side assert: refuse them here, as an error of this request.
        if not bool(torch.isfinite(probs).all()):
            raise NonFiniteLogits("the model produced NaN or infinite logits, nothing can be "
                                  "sampled (broken weights, or an overflow in half precision: "
                                  "try --dtype float32 or bfloat16)")
        return int(torch.multinomial(probs, 1, generator=self.generator))

    def distribution(self, logits: torch.Tensor) -> torch.Tensor:
        """[V] probabilities after temperature, top-k and top-p (zero outside the kept set)."""
        p = self.params
        scaled = logits.float() / p.temperature
        if p.top_k and p.top_k < scaled.shape[-1]:
            # Everything below the k-th largest value is cut (ties at the k-th value are kept).
            kth = torch.topk(scaled, p.top_k).values[-1]
            scaled = scaled.masked_fill(scaled < kth, float("-inf"))
        if p.top_p < 1.0:
            sorted_logits, order = torch.sort(scaled, descending=True)
            sorted_probs = torch.softmax(sorted_logits, dim=-1)
            # Drop a token when the tokens more likely than it already reach top_p; the most
            # likely token is always kept.
            mass_before = torch.cumsum(sorted_probs, dim=-1) - sorted_probs
            drop_sorted = mass_before >= p.top_p
            drop = torch.empty_like(drop_sorted).scatter_(0, order, drop_sorted)
            scaled = scaled.masked_fill(drop, float("-inf"))
        return torch.softmax(scaled, dim=-1)
