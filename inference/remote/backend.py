"""`RemoteBackend`: an inference engine a team runs (vLLM, llama.cpp's server, Ollama, any
OpenAI-compatible server) behind the same `Backend` interface as the in-process model.

The prompt, its budget, the stop rules and the post-processing stay ours; the engine generates.
The prompt is the one the local engine would get: token ids when the tokenizer is known here
(the `model` setting names a folder or Hub id with tokenizer.json) and the engine takes ids
(vLLM, llama.cpp), else text with the model's FIM markers, in which special-token text quoted by
a document is broken up (a zero-width space after its first character) so that the engine reads
it as text. Without a tokenizer here, prompts are budgeted by characters, at the characters per
token the engine's own tokenizer gives on a code sample (vLLM, llama.cpp), else
DEFAULT_CHARS_PER_TOKEN.

All HTTP runs on one event loop in a thread of its own (one connection pool): `generate` (any
thread) and `agenerate` (the server's loop) hand requests to it. Each request's stream is
watched: a set cancel event, a newer request with the same key or the time budget closes the
connection, which stops the engine's generation.

Faults never block: an engine that is down, too slow, restarting or failing makes `health` not
ok, with the reason; requests then fail at once with EngineError (no waiting on a dead
connection) while a probe retries with backoff (0.5 s doubling to 15 s, sooner while requests
keep coming) and restores health when the engine answers again. A request the engine refuses
(HTTP 400) reports the reason too but does not stop the next one. Token healing and the
first-token rule for blank lines need the sampler, so they are the local engine's only.
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import json
import logging
import math
import os
import random
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

from stablelm_lsp.inference.api import (Backend, GenerationRequest, GenerationResult, Health,
                                        ModelInfo, PromptPart, SpecialTokens, join_parts)
from stablelm_lsp.inference.checks import SamplingParams, checked_parts
from stablelm_lsp.inference.errors import EngineClosed, EngineError, InvalidParameter
from stablelm_lsp.inference.stopping import TextStops

from .client import EngineClient, EngineFault
from .describe import EngineFacts, describe, detect_kind
from .engines import (ENDPOINT_KINDS, KINDS, WireParams, chat_body, check_endpoint, completion_body,
                      display_url, engine_stops, parse_event)

log = logging.getLogger(__name__)

API_KEY_ENV = "STABLELM_LSP_API_KEY"
DEFAULT_CONTEXT = 2048          # positions assumed when neither the engine nor config.json say
DEFAULT_CHARS_PER_TOKEN = 3.0   # code tokenizers hold 3.5-4.5; fewer errs towards fitting
CONNECT_WAIT_S = 5.0            # how long loading waits for the engine before reporting it down
NO_BUDGET_FIRST_BYTE_S = 120.0  # longest wait for an answer's start without a time budget
CANCEL_POLL_S = 0.01            # how often a running request looks at its cancel event
BACKOFF_FIRST_S, BACKOFF_MAX_S = 0.5, 15.0
NUDGE_AFTER_S = 2.0             # a request while down makes the probe try again after this long
ZERO_WIDTH_SPACE = "\u200b"


@dataclass(frozen=True)
class RemoteOptions:
    endpoint: str                   # base URL: http(s)://host:port (a trailing /v1 is dropped)
    kind: str = "auto"              # auto | openai | vllm | llamacpp | ollama
    model: str | None = None        # served model; a folder or Hub id also gives the tokenizer
    api_key: str | None = field(default=None, repr=False)   # default: $STABLELM_LSP_API_KEY
    offline: bool | None = None     # no Hub download of the tokenizer (None: from the environment)

    def __post_init__(self) -> None:
        if self.kind not in ENDPOINT_KINDS:
            raise InvalidParameter(f"endpointKind must be one of {', '.join(ENDPOINT_KINDS)}, "
                                   f"got {self.kind!r}")
        try:
            check_endpoint(self.endpoint)
        except ValueError as exc:
            raise InvalidParameter(str(exc)) from None


@dataclass
class _LocalTokenizer:
    tokenizer: Any                  # models.Tokenizer
    folder: Path
    config: dict                    # config.json, {} without one


def find_tokenizer(model: str | None, offline: bool | None = None) -> _LocalTokenizer | None:
    """The tokenizer of `model` when it is a folder or Hub id with tokenizer.json (a Hub id is
    looked up in the cache, and fetched (its tokenizer files only) unless offline); None when
    `model` is only a served model's name."""
    if not model:
        return None
    from stablelm_lsp.models import CheckpointNotFound, ModelError, Tokenizer
    from stablelm_lsp.models.hub import TOKENIZER_FILES, resolve_checkpoint

    try:
        folder = resolve_checkpoint(model, offline=offline, files=TOKENIZER_FILES,
                                    complete=lambda p: (p / "tokenizer.json").exists())
    except CheckpointNotFound as exc:
        log.info("no tokenizer for %s here (%s): prompts are budgeted with the engine's help", model, exc)
        return None
    if not (folder / "tokenizer.json").exists():
        return None
    config: dict = {}
    try:
        config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        pass
    try:
        tokenizer = Tokenizer.from_folder(folder)
    except ModelError as exc:
        log.warning("%s: %s; prompts are budgeted with the engine's help", model, exc)
        return None
    return _LocalTokenizer(tokenizer, folder, config if isinstance(config, dict) else {})


class _LoopThread:
    """An event loop running in a daemon thread; coroutines are submitted from any thread."""

    def __init__(self, name: str):
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name=name, daemon=True)
        self.thread.start()

    def submit(self, coro) -> concurrent.futures.Future:
        return asyncio.run_coroutine_threadsafe(coro, self.loop)

    def stop(self, timeout: float = 2.0) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        if threading.current_thread() is self.thread:
            return
        self.thread.join(timeout)
        if not self.thread.is_alive():
            self.loop.close()


@dataclass
class _Run:
    """A request in flight: what the watcher checks, what the stream fills in."""

    key: str | None
    superseded: bool = False
    started: bool = False           # the engine's answer has begun
    pieces: list[str] = field(default_factory=list)
    text_reason: str | None = None  # our stop rules ended it (stop, max_lines)
    engine_finish: str | None = None
    by_string: bool = False
    prompt_tokens: int | None = None
    cached_tokens: int | None = None
    completion_tokens: int | None = None


class RemoteBackend(Backend):
    def __init__(self, options: RemoteOptions, tokenizer: _LocalTokenizer | None = None):
        """A backend for `options.endpoint`, not connected yet (see `connect`)."""
        self.options = options
        self._local = tokenizer
        api_key = options.api_key if options.api_key is not None else os.environ.get(API_KEY_ENV)
        self._api_key = api_key or None
        self._loop = _LoopThread("stablelm-remote")
        self._client: EngineClient | None = None
        self._closed = False
        self._health = Health(False, f"connecting to {display_url(options.endpoint)}", "connecting")
        self._down = True           # requests fail at once until a probe (or the connect) succeeds
        self._listeners: list[Callable[[Health], None]] = []
        self._lock = threading.Lock()
        self._facts: EngineFacts | None = None
        self._info = self._make_info(None)
        self._runs: dict[str, _Run] = {}
        self._slots: OrderedDict[str, int] = OrderedDict()     # document key -> llama.cpp slot
        self._probe: asyncio.Task | None = None
        self._nudge: asyncio.Event | None = None
        self._last_attempt = 0.0

    @classmethod
    def connect(cls, options: RemoteOptions, wait_s: float = CONNECT_WAIT_S) -> "RemoteBackend":
        """Find the tokenizer, then ask the engine what it is and serves, waiting up to `wait_s`.
        An engine that does not answer yet is not an error: the backend comes back not ok, and
        probes until it does."""
        backend = cls(options, find_tokenizer(options.model, options.offline))
        future = backend._loop.submit(backend._start())
        try:
            future.result(wait_s)
        except concurrent.futures.TimeoutError:
            log.info("%s: no answer within %.0f s; still trying", backend._shown, wait_s)
        return backend

    # -- Backend -------------------------------------------------------------------------------

    @property
    def info(self) -> ModelInfo:
        return self._info

    @property
    def health(self) -> Health:
        return self._health

    @property
    def engine(self) -> str | None:
        """The engine's kind once known (openai, vllm, llamacpp, ollama)."""
        return self._facts.kind.name if self._facts else None

    def on_health_change(self, callback: Callable[[Health], None]) -> None:
        with self._lock:
            self._listeners.append(callback)

    def count_tokens(self, prompt: str | Sequence[PromptPart]) -> int:
        if self._local is not None:
            tok = self._local.tokenizer
            if isinstance(prompt, str):
                return len(tok.encode(prompt, parse_special=True))
            return len(tok.encode_parts(prompt))
        text = prompt if isinstance(prompt, str) else "".join(p.text for p in prompt)
        return math.ceil(len(text) / self._chars_per_token())

    def generate(self, request: GenerationRequest, cancel: threading.Event | None = None,
                 on_delta: Callable[[str], None] | None = None) -> GenerationResult:
        try:
            return self._submit(request, cancel or threading.Event(), on_delta).result()
        except concurrent.futures.CancelledError:
            raise EngineClosed("the remote backend was closed") from None

    async def agenerate(self, request: GenerationRequest, cancel: threading.Event | None = None,
                        on_delta: Callable[[str], None] | None = None) -> GenerationResult:
        cancel = cancel or threading.Event()
        future = self._submit(request, cancel, on_delta)
        try:
            return await asyncio.wrap_future(future)
        except asyncio.CancelledError:
            if not asyncio.current_task().cancelling():     # not ours: the backend was closed
                raise EngineClosed("the remote backend was closed") from None
            cancel.set()
            future.cancel()
            raise

    def close(self) -> None:
        """Close the connections (running requests end as if cancelled) and the loop's thread."""
        if self._closed:
            return
        self._closed = True
        future = self._loop.submit(self._shutdown())
        if threading.current_thread() is self._loop.thread:     # a listener: no waiting on itself
            future.add_done_callback(lambda _: self._loop.stop())
            return
        try:
            future.result(2.0)
        except (concurrent.futures.TimeoutError, concurrent.futures.CancelledError, RuntimeError):
            pass
        self._loop.stop()

    # -- connecting and health -----------------------------------------------------------------

    @property
    def _shown(self) -> str:
        return display_url(self.options.endpoint)

    def _submit(self, request, cancel, on_delta) -> concurrent.futures.Future:
        if self._closed:
            raise EngineClosed("the remote backend was closed")
        return self._loop.submit(self._generate(request, cancel, on_delta))

    async def _start(self) -> None:
        from importlib.metadata import PackageNotFoundError, version

        try:
            agent = f"stablelm-lsp/{version('stablelm-lsp')}"
        except PackageNotFoundError:
            agent = "stablelm-lsp"
        self._client = EngineClient(self.options.endpoint, self._api_key, user_agent=agent)
        self._nudge = asyncio.Event()
        try:
            await self._connect()
        except EngineFault as fault:
            self._on_fault(fault)

    async def _connect(self) -> None:
        """Detect (or take) the kind, describe the engine, and be healthy."""
        self._last_attempt = time.monotonic()
        client = self._client
        kind = await detect_kind(client) if self.options.kind == "auto" else KINDS[self.options.kind]
        facts = await describe(client, kind, self.options.model, learn_tokens=self._local is None)
        first = self._facts is None or self._facts != facts
        self._facts = facts
        self._info = self._make_info(facts)
        self._down = False
        if first:
            log.info("engine %s at %s: model %s, %d positions%s, prompts as %s", kind.name,
                     self._shown, facts.model or "(its only one)", self._info.max_positions,
                     f", {facts.slots} slots" if facts.slots > 1 else "",
                     "token ids" if self._token_prompts() else "text")
        self._set_health(Health())

    def _on_fault(self, fault: EngineFault) -> None:
        self._set_health(Health(False, fault.message, fault.fault))
        if fault.blocking:
            self._down = True
            if self._probe is None or self._probe.done():
                self._probe = asyncio.get_running_loop().create_task(self._probe_until_up())

    async def _probe_until_up(self) -> None:
        delay = BACKOFF_FIRST_S
        while not self._closed:
            self._nudge.clear()
            try:        # jitter: editors of a team do not all knock at the same moment
                await asyncio.wait_for(self._nudge.wait(), delay * random.uniform(0.8, 1.2))
            except asyncio.TimeoutError:
                pass
            try:
                await self._connect()
                return
            except EngineFault as fault:
                self._set_health(Health(False, fault.message, fault.fault))
            delay = min(delay * 2, BACKOFF_MAX_S)

    def _set_health(self, health: Health) -> None:
        with self._lock:
            if health == self._health:
                return
            before, self._health = self._health, health
            listeners = list(self._listeners)
        if not health.ok:
            log.warning("engine at %s: %s", self._shown, health.message)
        elif before.fault != "connecting":
            log.info("the engine at %s answers again", self._shown)
        for listener in listeners:
            try:
                listener(health)
            except Exception:       # a listener's bug must not stop the engine's loop
                log.exception("health listener failed")

    async def _shutdown(self) -> None:
        for task in asyncio.all_tasks():
            if task is not asyncio.current_task():
                task.cancel()
        if self._client is not None:
            await self._client.close()

    # -- prompts -------------------------------------------------------------------------------

    def _chars_per_token(self) -> float:
        facts = self._facts
        return facts.chars_per_token if facts and facts.chars_per_token else DEFAULT_CHARS_PER_TOKEN

    def _token_prompts(self) -> bool:
        return self._local is not None and self._facts is not None and self._facts.kind.token_prompts

    def _make_info(self, facts: EngineFacts | None) -> ModelInfo:
        local = self._local
        limits = []
        if facts is not None and facts.context:
            limits.append(facts.context)
        config_positions = (local.config.get("max_position_embeddings") or local.config.get("n_positions")) \
            if local else None
        if isinstance(config_positions, int) and config_positions > 0:
            limits.append(config_positions)
        if local is not None:
            tok = local.tokenizer
            special = tok.special
            stop_texts = tuple(sorted(t for t in map(tok.id_to_token, tok.stop_ids) if t))
            chat_template = tok.chat_template
        else:
            special = facts.special if facts else SpecialTokens()
            stop_texts = tuple(sorted({s for s in (special.eos, special.fim_prefix, special.fim_suffix,
                                                   special.fim_middle, special.fim_pad,
                                                   special.file_sep, special.repo_name) if s}))
            chat_template = None
        name = self.options.model or (facts.model if facts else None) or "remote model"
        return ModelInfo(
            name=name, path=str(local.folder) if local else self._shown,
            model_type=str(local.config.get("model_type") or "remote") if local else "remote",
            builtin=False, max_positions=min(limits) if limits else DEFAULT_CONTEXT,
            special=special, stop_texts=stop_texts, chat_template=chat_template,
            device=self._shown, dtype=facts.kind.name if facts else self.options.kind)

    def _wire_prompt(self, parts: tuple[PromptPart, ...]) -> tuple[str | list[int], int | None]:
        """(what the engine gets as the prompt, its token count when known here)."""
        if self._local is not None:
            ids = self._local.tokenizer.encode_parts(parts, add_special_tokens=True)
            if self._token_prompts():
                return ids, len(ids)
            return self._text(parts), len(ids)
        return self._text(parts), None

    def _text(self, parts: Sequence[PromptPart]) -> str:
        """The prompt as text, special-token text in plain parts broken up so that the engine's
        tokenizer reads it as text (the local engine encodes it as text, too)."""
        if self._local is not None:
            specials = tuple(self._local.tokenizer.added_special)
        else:
            specials = tuple(t for t in vars(self._info.special).values() if t)
        out = []
        for part in join_parts(parts):
            text = part.text
            if not part.special:
                for s in specials:
                    if s in text:
                        text = text.replace(s, s[0] + ZERO_WIDTH_SPACE + s[1:])
            out.append(text)
        return "".join(out)

    def _slot(self, key: str | None) -> int | None:
        """llama.cpp: each document keeps a slot (its own KV cache) while it is among the
        `slots` most recently used ones."""
        facts = self._facts
        if key is None or facts is None or facts.kind.name != "llamacpp":
            return None
        if key in self._slots:
            self._slots.move_to_end(key)
            return self._slots[key]
        if len(self._slots) < facts.slots:
            slot = len(self._slots)
        else:
            _, slot = self._slots.popitem(last=False)
        self._slots[key] = slot
        return slot

    # -- generation ----------------------------------------------------------------------------

    async def _generate(self, request: GenerationRequest, cancel: threading.Event,
                        on_delta: Callable[[str], None] | None) -> GenerationResult:
        start = time.monotonic()
        parts = checked_parts(request)
        if isinstance(request.stop, str):
            raise InvalidParameter("stop must be a sequence of strings, not one string")
        if request.max_new_tokens < 1:
            raise InvalidParameter(f"max_new_tokens must be >= 1, got {request.max_new_tokens}")
        sampling = SamplingParams(request.temperature, request.top_k, request.top_p, request.seed)
        model_stops = self._info.stop_texts if request.use_model_stops else ()
        stops = TextStops((*request.stop, *model_stops), request.max_lines, request.continued_by,
                          request.line_before)
        if self._down:
            if time.monotonic() - self._last_attempt > NUDGE_AFTER_S and self._nudge is not None:
                self._nudge.set()
            raise EngineError(self._health.message or "the engine is not ready", self._health.fault or "down")
        facts, kind = self._facts, self._facts.kind
        chat = request.messages is not None and self._local is None
        prompt_tokens = None
        if chat:
            prompt = None
        else:
            prompt, prompt_tokens = self._wire_prompt(parts)
        room = self._info.max_positions - (prompt_tokens if prompt_tokens is not None
                                           else self.count_tokens(parts))
        if room < 1:
            raise EngineError(f"the prompt needs {self._info.max_positions - room} positions; "
                              f"the engine serves {self._info.max_positions}", "too-long")
        stop_token_ids = ()
        if self._local is not None and request.use_model_stops and kind.name == "vllm":
            stop_token_ids = tuple(sorted(self._local.tokenizer.stop_ids))
        params = WireParams(
            max_tokens=min(request.max_new_tokens, room), temperature=sampling.temperature,
            top_k=sampling.top_k, top_p=sampling.top_p, seed=sampling.seed,
            stops=engine_stops(request.stop, model_stops), stop_token_ids=stop_token_ids,
            ignore_eos=not request.use_model_stops, slot=self._slot(request.key),
            indent=request.indent if request.max_lines else None,
            time_limit_ms=round(request.time_budget_s * 1000) if request.time_budget_s else None)
        if chat:
            path, body, ndjson = kind.chat_path, chat_body(kind, facts.model, request.messages, params), False
        else:
            path, body = kind.completions_path, completion_body(kind, facts.model, prompt, params)
            ndjson = kind.completions_ndjson
        first_byte_s = request.time_budget_s or NO_BUDGET_FIRST_BYTE_S

        run = _Run(request.key)
        if run.key is not None:
            older = self._runs.get(run.key)
            if older is not None:
                older.superseded = True
            self._runs[run.key] = run

        def emit(text: str) -> None:
            if text:
                run.pieces.append(text)
                if on_delta is not None:
                    on_delta(text)

        async def stream() -> None:
            async with self._client.stream(path, body, first_byte_s, ndjson=ndjson) as events:
                run.started = True
                async for data in events:
                    try:
                        chunk = parse_event(data, chat=chat, ollama_native=ndjson)
                    except ValueError as exc:
                        raise EngineFault("protocol", f"the engine at {self._shown} streamed an "
                                                      f"event of no known format ({exc})") from None
                    if chunk.error is not None:
                        raise EngineFault("engine-error", f"the engine at {self._shown} failed: "
                                                          f"{chunk.error[:300]}", blocking=False)
                    for name in ("prompt_tokens", "cached_tokens", "completion_tokens"):
                        if getattr(chunk, name) is not None:
                            setattr(run, name, getattr(chunk, name))
                    if chunk.text:
                        shown, reason = stops.feed(chunk.text)
                        emit(shown)
                        if reason is not None:
                            run.text_reason = reason
                            return      # leaving the block closes the stream: the engine stops
                    if chunk.finish is not None:
                        run.engine_finish, run.by_string = chunk.finish, chunk.stopped_by_string
                if run.engine_finish is None:
                    raise EngineFault("disconnected", f"the engine at {self._shown} ended the "
                                                      "answer before finishing it")

        task = asyncio.ensure_future(stream())
        reason = None
        try:
            while not task.done():
                await asyncio.wait([task], timeout=CANCEL_POLL_S)
                if task.done():
                    break
                if run.superseded:
                    reason = "superseded"
                elif cancel.is_set():
                    reason = "cancelled"
                elif run.started and request.time_budget_s is not None \
                        and time.monotonic() - start > request.time_budget_s:
                    reason = "time"
                if reason is not None:
                    task.cancel()
                    break
            try:
                await task
            except asyncio.CancelledError:
                if reason is None:
                    raise
        except EngineFault as fault:
            self._on_fault(fault)
            raise EngineError(fault.message, fault.fault) from None
        finally:
            if not task.done():
                task.cancel()
            if run.key is not None and self._runs.get(run.key) is run:
                del self._runs[run.key]
        if reason is None:
            self._down = False
            self._set_health(Health())
            reason = run.text_reason or _finish_reason(run)
            if run.text_reason is None:
                emit(stops.finish())
        return GenerationResult(
            text="".join(run.pieces), finish_reason=reason,
            prompt_tokens=run.prompt_tokens if run.prompt_tokens is not None else (prompt_tokens or 0),
            reused_tokens=run.cached_tokens or 0, elapsed_s=time.monotonic() - start)


def _finish_reason(run: _Run) -> str:
    """The engines' finish reasons in ours: "length" stays, "stop" is a stop string when the
    engine says so (vLLM's stop_reason), else the end of text."""
    if run.engine_finish == "length":
        return "length"
    return "stop" if run.by_string else "eos"
