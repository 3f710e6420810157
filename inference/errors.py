"""Specific reasons a generation request is refused; all are `GenerationError`s (inference/api.py).

Each is raised before any model work starts, so the engine stays usable afterwards; OutOfMemory
and NonFiniteLogits come from the work itself, after the engine has put its caches back in order;
EngineError, from a remote engine, can also end a request that was under way.
"""
from __future__ import annotations

from .api import GenerationError


class EmptyPrompt(GenerationError):
    """The prompt has no tokens."""


class TokenOutOfRange(GenerationError):
    """A prompt token id is negative or not below the model's vocabulary size."""


class InvalidParameter(GenerationError):
    """A generation parameter is out of its range (max_new_tokens <= 0, top_p > 1, ...)."""


class PromptTooLong(GenerationError):
    """The prompt needs more positions than the model has."""


class BudgetTooSmall(GenerationError):
    """The engine's KV-cache budget cannot hold even this one request."""


class EngineClosed(GenerationError):
    """The engine was closed; no more requests are accepted."""


class AttentionUnavailable(GenerationError):
    """The requested attention kernel cannot run here (flash-attn without CUDA or half precision)."""


class OutOfMemory(GenerationError):
    """The device ran out of memory for this request, even after the idle caches were dropped."""


class NonFiniteLogits(GenerationError):
    """The model produced NaN or infinite logits (broken weights, or overflow in half precision)."""


class EngineError(GenerationError):
    """A remote engine could not serve the request: unreachable, too slow, failing or refusing
    it. The message says why, for the user; the backend's health says whether it is down."""

    def __init__(self, message: str, fault: str):
        super().__init__(message)
        self.fault = fault
