"""The engine interface that lsp/ talks to.

lsp/ never touches token ids, tensors or models: it builds prompt *text* (inference/prompts/) and
hands a `GenerationRequest` to a `Backend`, which it gets from `load.load_backend`. The
in-process engine implements it (`LocalBackend`, inference/backend.py), and so does a remote
engine a team runs (`RemoteBackend`, inference/remote/: vLLM, llama.cpp's server, Ollama, any
OpenAI-compatible server), which is why everything here is text, not token ids.

A prompt built from documents is a sequence of `PromptPart`s (models/prompt_parts.py, offered
here): the prompt format's own text is special, everything that came from documents, messages or
file paths is plain, so that a file quoting `<|endoftext|>` cannot end the prompt. A remote
backend can send such a prompt pre-tokenized, or refuse content holding special-token text.
"""
from __future__ import annotations

import abc
import asyncio
import threading
from dataclasses import dataclass, field
from typing import Callable, Sequence

# What tokenizers know about prompts lives with them (models/); it is part of this interface.
from stablelm_lsp.models.prompt_parts import PromptPart, SpecialTokens, join_parts, prompt_text

__all__ = ["Backend", "GenerationError", "GenerationRequest", "GenerationResult", "ModelInfo",
           "PRIORITY_BACKGROUND", "PRIORITY_CHAT", "PRIORITY_COMPLETION", "PromptPart",
           "SpecialTokens", "join_parts", "prompt_text"]

# `GenerationRequest.priority`: lower is more urgent. Background work is what the server computes
# before it is asked for (lsp/anticipation.py); it runs only where the backend can keep it from
# delaying the others (`Backend.runs_background`).
PRIORITY_COMPLETION = 0
PRIORITY_CHAT = 1
PRIORITY_BACKGROUND = 2


class GenerationError(ValueError):
    """A request the engine cannot serve (empty prompt, too long, bad parameters)."""


@dataclass(frozen=True)
class ModelInfo:
    name: str                       # human-readable: the model id or folder name
    path: str                       # where it was loaded from
    model_type: str                 # stablelm | persimmon | starcoder2
    builtin: bool                   # the model shipped with the project
    max_positions: int
    special: SpecialTokens
    stop_texts: tuple[str, ...]     # special tokens that end a code completion
    chat_template: str | None = None  # jinja source from tokenizer_config.json
    device: str = "cpu"
    dtype: str = "float32"          # or "int8": int8 weights (computing in float32 on a CPU)
    # the kernels chosen for this machine and how (inference/tuning.py Plan.describe); None
    # where there is no such choice (a remote engine)
    kernels: dict | None = field(default=None, compare=False)


@dataclass
class GenerationRequest:
    # The prompt: either `prompt`, whole text whose special-token strings are parsed as specials
    # (for callers that write prompts by hand), or `prompt_parts` (prompts built from documents).
    prompt: str = ""
    prompt_parts: tuple[PromptPart, ...] | None = None
    max_new_tokens: int = 64
    temperature: float = 0.0        # 0 = greedy
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()      # stop strings (matched across token boundaries)
    use_model_stops: bool = True    # also stop at EOS and the family's stop tokens
    max_lines: int | None = None    # stop after this many newline-terminated lines
    # When set: stop at the first newline (not included) unless the line it ends, `line_before`
    # + the text generated before it with trailing whitespace ignored, ends with one of these
    # (a partly typed statement is completed to its end; one that opens a block goes on).
    continued_by: tuple[str, ...] | None = None
    line_before: str = ""
    # The first generated token may not end the line (a line break before any text other than
    # spaces and tabs, end of text), nor be spaces and tabs alone when `line_before` (the
    # cursor line's text before the cursor) is indentation: for a cursor on a blank line, where
    # nothing says nothing.
    nonblank_first_token: bool = False
    time_budget_s: float | None = None
    key: str | None = None          # scheduling key (document URI): newer supersedes older
    # When the prompt ends with plain text, take its last token back and let the first generated
    # token be any token that extends it (a partly typed word is completed as the model would
    # have tokenized the whole word). The returned text still starts where the prompt ends.
    token_healing: bool = False
    # Lower is more urgent: completions 0, chat replies 1, background work 2 (PRIORITY_*). A
    # running request lets more urgent ones run between its steps, so a keystroke's completion
    # does not wait for a chat reply, nor for work done ahead of time.
    priority: int = PRIORITY_COMPLETION
    # Multi-line completions: the cursor line's indentation (its leading spaces and tabs). An
    # engine may end the completion before the first line indented less (llama.cpp's
    # `n_indent`); the local engine leaves that to post-processing.
    indent: int | None = None
    # Chat: the (role, content) messages the prompt renders, for an engine that applies its own
    # chat template (a remote engine whose tokenizer is not known here). The prompt is still
    # what `prompt_parts` says for every other backend.
    messages: tuple[tuple[str, str], ...] | None = None

    def parts(self) -> tuple[PromptPart, ...]:
        """The prompt as parts: `prompt_parts`, or `prompt` as one special part."""
        if self.prompt_parts is not None:
            return tuple(self.prompt_parts)
        return (PromptPart(self.prompt, special=True),)


@dataclass
class GenerationResult:
    text: str
    token_ids: list[int] = field(default_factory=list)
    finish_reason: str = "length"   # length | eos | stop | max_lines | time | cancelled | superseded
    prompt_tokens: int = 0
    reused_tokens: int = 0          # prompt tokens whose KV came from the cache
    elapsed_s: float = 0.0
    drafted_tokens: int = 0         # speculative draft tokens verified (0 where not supported)
    accepted_tokens: int = 0        # of those, the ones kept
    draft_length: int | None = None  # the engine's draft length after this run (it follows the
                                     # acceptance measured): None where not known (remote)


@dataclass(frozen=True)
class Health:
    """Whether a backend can serve requests now. A local engine always can; a remote one is
    down while its server is unreachable, failing or refusing requests, and comes back by
    itself."""

    ok: bool = True
    message: str | None = None      # why not, for the user (never a secret such as an API key)
    fault: str | None = None        # the kind of failure: unreachable, timeout, http-500, ...


class Backend(abc.ABC):
    """What lsp/ needs from an inference engine, local or remote."""

    @property
    @abc.abstractmethod
    def info(self) -> ModelInfo: ...

    @abc.abstractmethod
    def count_tokens(self, prompt: str | Sequence[PromptPart]) -> int:
        """Tokens `prompt` takes inside a prompt, encoded as `generate` encodes it: a str like
        `GenerationRequest.prompt` (specials parsed), parts like `prompt_parts`. What the
        tokenizer adds around a whole prompt (a BOS token) is not counted. For prompt budgets."""

    @abc.abstractmethod
    def generate(
        self,
        request: GenerationRequest,
        cancel: threading.Event | None = None,
        on_delta: Callable[[str], None] | None = None,
    ) -> GenerationResult:
        """Blocking generation, safe to call from any thread.

        `cancel` set from another thread stops generation within one decode step
        (finish_reason "cancelled"); `on_delta` receives text deltas as they are produced, never
        splitting a multi-byte character. A newer request with the same `key` supersedes this one
        (finish_reason "superseded").
        """

    @property
    def runs_background(self) -> bool:
        """Whether requests at PRIORITY_BACKGROUND are cheap for everyone else: a more urgent
        request arriving while one runs waits at most one forward chunk, and what the background
        request computed stays cached for it. The in-process engine can promise that; a remote
        engine runs requests as they come, so there background work would compete with the
        user's requests and the server does none."""
        return False

    async def agenerate(
        self,
        request: GenerationRequest,
        cancel: threading.Event | None = None,
        on_delta: Callable[[str], None] | None = None,
    ) -> GenerationResult:
        """`generate` from asyncio: runs in a thread; cancelling the awaiting task sets `cancel`."""
        cancel = cancel or threading.Event()
        try:
            return await asyncio.to_thread(self.generate, request, cancel, on_delta)
        except asyncio.CancelledError:
            cancel.set()
            raise

    @property
    def health(self) -> Health:
        return Health()

    def on_health_change(self, callback: Callable[[Health], None]) -> None:
        """Call `callback(health)` (from any thread) whenever `health` changes. A local engine's
        never does."""

    def close(self) -> None:
        """Release the device; the backend is unusable afterwards."""
