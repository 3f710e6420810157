"""Checks of a generation request shared by the in-process and remote backends (no torch here):
sampling parameters and the prompt."""
from __future__ import annotations

from dataclasses import dataclass

from .api import GenerationRequest, PromptPart, join_parts
from .errors import EmptyPrompt, InvalidParameter


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.0        # 0 = greedy (argmax); top_k / top_p / seed are then unused
    top_k: int = 0                  # 0 = no top-k cut
    top_p: float = 1.0              # 1.0 = no nucleus cut
    seed: int | None = None         # None = a fresh random seed per request

    def __post_init__(self) -> None:
        if not (self.temperature >= 0.0) or self.temperature == float("inf"):
            raise InvalidParameter(f"temperature must be a finite number >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise InvalidParameter(f"top_k must be >= 0 (0 disables it), got {self.top_k}")
        if not (0.0 < self.top_p <= 1.0):
            raise InvalidParameter(f"top_p must be in (0, 1], got {self.top_p}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0 or self.top_k == 1


def checked_parts(request: GenerationRequest) -> tuple[PromptPart, ...]:
    """The request's prompt as non-empty joined parts; a GenerationError when there is none or
    it is malformed."""
    if request.prompt_parts is not None:
        if request.prompt:
            raise InvalidParameter("give the prompt as prompt or as prompt_parts, not both")
        if isinstance(request.prompt_parts, (str, bytes)) or not all(
                isinstance(p, PromptPart) and isinstance(p.text, str) for p in request.prompt_parts):
            raise InvalidParameter("prompt_parts must be a sequence of PromptPart")
    elif not isinstance(request.prompt, str):
        raise InvalidParameter(f"the prompt must be text, got {type(request.prompt).__name__}")
    parts = join_parts(request.parts())
    if not parts:
        raise EmptyPrompt("the prompt is empty")
    return parts
