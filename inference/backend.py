"""`LocalBackend`: the in-process model behind the text-level `Backend` interface (api.py).

The only place in inference/ that sees text: it tokenizes the prompt, turns generated token ids
into streamed text deltas (never splitting a character, never showing part of a stop string) and
leaves everything on token ids to the `Engine`.
"""
from __future__ import annotations

import os
import threading
from pathlib import Path
from typing import Callable

from .api import Backend, GenerationRequest, GenerationResult, ModelInfo
from .engine import Engine
from .errors import EmptyPrompt, InvalidParameter
from .sampling import SamplingParams
from .stopping import TextStops
from .streaming import Utf8StreamDecoder


class LocalBackend(Backend):
    def __init__(self, loaded, *, builtin: bool = False, budget_tokens: int | None = None,
                 attention: str = "auto", prefix_reuse: bool = True):
        """loaded: a models.LoadedModel. budget_tokens: KV positions kept across requests
        (default: a share of the device's memory, see engine.default_budget_tokens).
        attention: auto | sdpa | flash (inference/attention.py). prefix_reuse=False: no KV reuse
        across requests (a measurement baseline)."""
        self.loaded = loaded
        self.tokenizer = loaded.tokenizer
        self.engine = Engine(loaded, budget_tokens=budget_tokens, attention=attention,
                             prefix_reuse=prefix_reuse)
        cfg, tok = loaded.config, loaded.tokenizer
        self._info = ModelInfo(
            name=loaded.name, path=str(loaded.path), model_type=cfg.model_type, builtin=builtin,
            max_positions=cfg.max_positions, special=tok.special,
            stop_texts=tuple(sorted(t for t in map(tok.id_to_token, tok.stop_ids) if t)),
            chat_template=tok.chat_template, device=str(loaded.device),
            dtype=str(loaded.dtype).removeprefix("torch."),
        )

    @classmethod
    def load(cls, path_or_id: str | os.PathLike, *, device: str = "auto", dtype: str = "auto",
             allow_pickle: bool = False, progress: Callable[[float, str], None] | None = None,
             budget_tokens: int | None = None, attention: str = "auto",
             prefix_reuse: bool = True) -> "LocalBackend":
        """Load a checkpoint folder or Hub id (models.load_model) and start an engine on it."""
        from stablelm_lsp.models import builtin_model_path, load_model

        loaded = load_model(path_or_id, device=device, dtype=dtype, allow_pickle=allow_pickle,
                            progress=progress)
        builtin = Path(loaded.path).resolve() == builtin_model_path().resolve()
        return cls(loaded, builtin=builtin, budget_tokens=budget_tokens, attention=attention,
                   prefix_reuse=prefix_reuse)

    @property
    def info(self) -> ModelInfo:
        return self._info

    def count_tokens(self, text: str) -> int:
        return len(self.tokenizer.encode(text, parse_special=True))

    def generate(self, request: GenerationRequest, cancel: threading.Event | None = None,
                 on_delta: Callable[[str], None] | None = None) -> GenerationResult:
        if not isinstance(request.prompt, str):
            raise InvalidParameter(f"the prompt must be text, got {type(request.prompt).__name__}")
        if not request.prompt:
            raise EmptyPrompt("the prompt is empty")
        if isinstance(request.stop, str):
            raise InvalidParameter("stop must be a sequence of strings, not one string")
        sampling = SamplingParams(request.temperature, request.top_k, request.top_p, request.seed)
        text_stops = TextStops(request.stop, request.max_lines)
        # The checkpoint's own conventions (a BOS token, for Persimmon) come with the prompt.
        prompt_ids = self.tokenizer.encode(request.prompt, parse_special=True, add_special_tokens=True)
        decoder = Utf8StreamDecoder(self.tokenizer.decode_bytes)
        pieces: list[str] = []

        def emit(text: str) -> None:
            if text:
                pieces.append(text)
                if on_delta is not None:
                    on_delta(text)

        def on_token(token_id: int) -> str | None:
            shown, reason = text_stops.feed(decoder.push(token_id))
            emit(shown)
            return reason

        result = self.engine.generate(
            prompt_ids, max_new_tokens=request.max_new_tokens, sampling=sampling,
            stop_ids=self.tokenizer.stop_ids if request.use_model_stops else (),
            time_budget_s=request.time_budget_s, on_token=on_token, key=request.key, cancel=cancel)
        reason = result.finish_reason
        if reason not in ("stop", "max_lines"):
            # Generation ended for another reason: what was held back (an incomplete character,
            # a possible start of a stop string) is final now, unless it completes a stop.
            shown, text_reason = text_stops.feed(decoder.flush())
            emit(shown)
            if text_reason:
                reason = text_reason
            else:
                emit(text_stops.finish())
        return GenerationResult(
            text="".join(pieces), token_ids=result.token_ids, finish_reason=reason,
            prompt_tokens=result.prompt_tokens, reused_tokens=result.reused_tokens,
            elapsed_s=result.elapsed_s)

    def close(self) -> None:
        self.engine.close()
