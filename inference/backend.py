"""`LocalBackend`: the in-process model behind the text-level `Backend` interface (api.py).

The only place in inference/ that sees text: it tokenizes the prompt (special-token text parsed
only in the prompt format's own parts), turns generated token ids into streamed text deltas (never
splitting a character, never showing part of a stop string) and leaves everything on token ids to
the `Engine`.

Token healing (`GenerationRequest.token_healing`): a prompt ending where the user's cursor is
often ends inside a word, and its last tokens are ones the model rarely saw there (`fina` rather
than `finally`, `retur` as `ret` + `ur`). Up to four tokens of the word at the cursor
(`HEAL_TOKENS`, as many as one ordinary token still extends; guidance and transformers'
`token_healing` take back one) are taken back, never a special one nor indentation, and the first
generated token is limited to the tokens whose bytes start with their bytes; those bytes are cut
from the generated text before anything is streamed, stop-matched or returned, so the text still
starts at the end of the prompt.

`nonblank_first_token` (a cursor on a blank line) bars a first token that ends the line
(`keeps_line`, `line_text_ids`).
"""
from __future__ import annotations

import os
import threading
from pathlib import Path
from typing import Callable, Sequence

import torch

from .api import Backend, GenerationRequest, GenerationResult, ModelInfo, PromptPart
from .checks import SamplingParams, checked_parts
from .engine import Engine
from .errors import InvalidParameter
from .stopping import TextStops
from .streaming import Utf8StreamDecoder

# Most prompt tokens token healing takes back (the partly typed word at the cursor).
HEAL_TOKENS = 4


class LocalBackend(Backend):
    def __init__(self, loaded, *, builtin: bool = False, budget_tokens: int | None = None,
                 attention: str = "auto", prefix_reuse: bool = True, **engine_options):
        """loaded: a models.LoadedModel. budget_tokens: KV positions kept across requests
        (default: a share of the device's KV budget, shared with the process's other engines:
        kv_budget.py).
        attention: auto | sdpa | flash (inference/attention.py). prefix_reuse=False: no KV reuse
        across requests (a measurement baseline). engine_options: the Engine's draft_tokens,
        linear, decode_step, kv_dtype and progress (inference/engine.py)."""
        self.loaded = loaded
        self.tokenizer = loaded.tokenizer
        self._line_text_ids: dict[bool, torch.Tensor] = {}     # see _nonblank
        self.engine = Engine(loaded, budget_tokens=budget_tokens, attention=attention,
                             prefix_reuse=prefix_reuse, **engine_options)
        cfg, tok = loaded.config, loaded.tokenizer
        self._info = ModelInfo(
            name=loaded.name, path=str(loaded.path), model_type=cfg.model_type, builtin=builtin,
            max_positions=cfg.max_positions, special=tok.special,
            stop_texts=tuple(sorted(t for t in map(tok.id_to_token, tok.stop_ids) if t)),
            chat_template=tok.chat_template, device=str(loaded.device),
            dtype=loaded.quantization or str(loaded.dtype).removeprefix("torch."),
            kernels={**self.engine.kernels.describe(),
                     "kvDtype": str(self.engine.kv_dtype).removeprefix("torch.")},
        )

    @classmethod
    def load(cls, path_or_id: str | os.PathLike, *, device: str = "auto", dtype: str = "auto",
             allow_pickle: bool = False, progress: Callable[[float, str], None] | None = None,
             budget_tokens: int | None = None, attention: str = "auto",
             prefix_reuse: bool = True, **engine_options) -> "LocalBackend":
        """Load a checkpoint folder or Hub id (models.load_model) and start an engine on it.
        progress(fraction, message): loading the weights, then measuring the kernels when this
        machine has not measured them for this model (the last tenth)."""
        from stablelm_lsp.models import builtin_model_path, load_model

        def part(low: float, high: float):
            return None if progress is None else \
                lambda fraction, message: progress(low + (high - low) * fraction, message)

        loaded = load_model(path_or_id, device=device, dtype=dtype, allow_pickle=allow_pickle,
                            progress=part(0.0, 0.9))
        builtin = Path(loaded.path).resolve() == builtin_model_path().resolve()
        backend = cls(loaded, builtin=builtin, budget_tokens=budget_tokens, attention=attention,
                      prefix_reuse=prefix_reuse, progress=part(0.9, 1.0), **engine_options)
        if progress is not None:
            progress(1.0, f"kernels {backend.engine.kernels.source}")
        return backend

    @property
    def info(self) -> ModelInfo:
        return self._info

    @property
    def runs_background(self) -> bool:
        """Yes: the engine's scheduler runs more urgent requests between a background request's
        forward passes, and its prefix cache keeps every chunk it computed (engine.py)."""
        return True

    def count_tokens(self, prompt: str | Sequence[PromptPart]) -> int:
        if isinstance(prompt, str):
            return len(self.tokenizer.encode(prompt, parse_special=True))
        return len(self.tokenizer.encode_parts(prompt))

    def generate(self, request: GenerationRequest, cancel: threading.Event | None = None,
                 on_delta: Callable[[str], None] | None = None) -> GenerationResult:
        parts = checked_parts(request)
        if isinstance(request.stop, str):
            raise InvalidParameter("stop must be a sequence of strings, not one string")
        sampling = SamplingParams(request.temperature, request.top_k, request.top_p, request.seed)
        text_stops = TextStops(request.stop, request.max_lines, request.continued_by, request.line_before)
        # The checkpoint's own conventions (a BOS token, for Persimmon) come with the prompt.
        prompt_ids = self.tokenizer.encode_parts(parts, add_special_tokens=True)
        max_new_tokens, first_token_ids, healed = request.max_new_tokens, None, b""
        if request.token_healing and not parts[-1].special:
            prompt_ids, first_token_ids, healed = self._heal(prompt_ids)
            # The regenerated token is not new text: it does not count against the limit.
            max_new_tokens += bool(healed)
        if request.nonblank_first_token:
            first_token_ids = self._nonblank(first_token_ids, healed, request.line_before)
        decoder = Utf8StreamDecoder(self._generated_bytes(healed))
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
            prompt_ids, max_new_tokens=max_new_tokens, sampling=sampling,
            stop_ids=self.tokenizer.stop_ids if request.use_model_stops else (),
            time_budget_s=request.time_budget_s, on_token=on_token, key=request.key, cancel=cancel,
            first_token_ids=first_token_ids, priority=request.priority)
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
            elapsed_s=result.elapsed_s, drafted_tokens=result.drafted_tokens,
            accepted_tokens=result.accepted_tokens, draft_length=self.engine.draft_tokens)

    def _nonblank(self, first_token_ids: list[int] | None, healed: bytes, line_before: str):
        """The first token's choices narrowed to tokens that do not end the line (and, after
        indentation, are not more of it): the healed ones whose bytes after the healed part
        qualify, or every such token of the vocabulary (tensors made once per backend)."""
        spaces = not line_before
        if first_token_ids is not None:
            table = self.tokenizer.token_bytes
            kept = [i for i in first_token_ids if keeps_line(table[i][len(healed):], spaces)]
            return kept or first_token_ids
        cached = self._line_text_ids.get(spaces)
        if cached is None:
            vocab = self.engine.sample_vocab
            ids = [i for i in line_text_ids(self.tokenizer, spaces) if i < vocab]
            cached = self._line_text_ids[spaces] = torch.tensor(ids, dtype=torch.long)
        return cached

    def _heal(self, prompt_ids: list[int]) -> tuple[list[int], list[int] | None, bytes]:
        """(prompt ids, first_token_ids, bytes taken back): the last tokens taken back when some
        ordinary token extends their bytes, else the prompt unchanged.

        Up to HEAL_TOKENS tokens of the cursor's word are taken back, as many as some single
        token still extends: a word typed partly is often split oddly (`retur` as `ret` + `ur`),
        which the model never saw in training and answers by ending the text; the first token
        must then spell the whole typed part (` return`). With one token only, the same
        (`ur`) is chosen again and generation stops: measured on the built-in model, TRAINING.md.

        A run of several whitespace bytes (indentation) is never taken back: byte-level
        pre-tokenizers give the last space of a run to the word after it, so the tokens
        extending a whole run are longer runs, and healing would steer the model away from the
        word that follows (measured: it lowers the built-in model's line-start similarity)."""
        tok = self.tokenizer
        vocab = self.engine.sample_vocab
        best = None
        taken = b""
        for k in range(1, min(HEAL_TOKENS, len(prompt_ids) - 1) + 1):
            token = prompt_ids[-k]
            piece = tok.token_bytes[token]
            if tok.is_added(token) or not piece or (len(piece) > 1 and piece.isspace()) \
                    or b"\n" in piece or (k > 1 and piece[-1:].isspace()):
                break               # not part of the word at the cursor
            taken = piece + taken
            extensions = tok.ids_starting_with(taken)
            if tok.vocab_size > vocab:   # ids past the model's output rows are never sampled
                extensions = [i for i in extensions if i < vocab]
            if not extensions:
                break
            if extensions != [token] or k > 1:
                best = (k, extensions, taken)
        if best is None:
            return prompt_ids, None, b""
        k, extensions, taken = best
        return prompt_ids[:-k], extensions, taken

    def _generated_bytes(self, healed: bytes) -> Callable[[list[int]], bytes]:
        """Token ids -> bytes for the stream decoder, without the `healed` bytes the first
        generated token starts with."""
        decode_bytes = self.tokenizer.decode_bytes
        if not healed:
            return decode_bytes
        skip = len(healed)

        def generated_bytes(ids: list[int]) -> bytes:
            nonlocal skip
            data = decode_bytes(ids)
            if skip:
                data, skip = data[skip:], max(skip - len(data), 0)
            return data

        return generated_bytes

    def close(self) -> None:
        self.engine.close()


def keeps_line(piece: bytes, spaces: bool) -> bool:
    """Whether text starting with `piece` keeps the current line going: something, and no line
    break before its first character other than a space or tab; with spaces=False, not spaces
    and tabs alone either (text must come)."""
    text = piece.lstrip(b" \t")
    return bool(text or (spaces and piece)) and not text.startswith((b"\n", b"\r"))


def line_text_ids(tokenizer, spaces: bool) -> list[int]:
    """Ordinary tokens of `tokenizer` (a models.Tokenizer) whose bytes keep the current line
    going (see `keeps_line`); added tokens excluded."""
    return [i for i, piece in enumerate(tokenizer.token_bytes)
            if not tokenizer.is_added(i) and keeps_line(piece, spaces)]

