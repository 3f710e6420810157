"""Generation on token ids: prefix reuse across requests, chunked prefill, sampling, stopping,
cancellation, one worker thread owning the model.

The engine knows nothing of text: prompts are token ids, results are token ids. inference/backend.py
puts a tokenizer in front of it.

Invariant: for every cached slot, `slot.tokens` lists exactly the positions its KVCache holds.
Prefill runs in chunks and records each one as it completes, so a request stopped at any point
(cancelled, superseded, out of time) leaves everything it computed reusable by the next one.
"""
from __future__ import annotations

import functools
import logging
import operator
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch

from .attention import install, ring_capacity, select_attention
from .captured import DecodeStep
from .errors import EmptyPrompt, InvalidParameter, OutOfMemory, PromptTooLong, TokenOutOfRange
from .kv_budget import DeviceBudget
from .linear import KERNELS as LINEAR_KERNELS
from .lru import LRU
from .native_layers import install as install_native_layers
from .prefix_cache import PrefixCache, Slot
from .sampling import Sampler, SamplingParams
from .scheduler import Job, Scheduler
from .speculation import Acceptance, Drafter
from .stopping import TokenStops
from .tuning import ACCEPTANCE, draft_length
from .tuning import plan as plan_kernels

# Prompt tokens run per forward step during prefill: large enough to keep the matrix units busy,
# small enough that a cancel or a newer keystroke is noticed quickly.
PREFILL_CHUNK = {"cpu": 256, "cuda": 1024}
# Most draft tokens verified in one pass (speculation.py) where the kernels' cost of k + 1
# positions against one is not measured (on a CPU it is: inference/tuning.py). A pass of a few
# dozen positions costs little more than one on a GPU while the weights dominate.
DRAFT_TOKENS = {"cpu": 8, "cuda": 16}
# While a greedy request follows the previous sequence of its document, drafts may be this many
# times longer: they are the model's own earlier choices.
_ALIGNED_DRAFT_FACTOR = 4
# Previous sequences (prompt + completion) remembered for drafting, one per document key.
_PREVIOUS_KEYS = 64

log = logging.getLogger(__name__)

KV_DTYPES = ("auto", "float32", "float16", "bfloat16")


def kv_cache_dtype(requested: str, device: torch.device, dtype: torch.dtype, int8: bool) -> torch.dtype:
    """The KV cache's dtype. A decode step at long context reads the whole cache: in float16 it
    reads half the bytes (the own CPU attention kernel widens it in registers; SDPA reads it
    converted), at the price of rounding the keys and values to float16. "auto": float16 for int8
    weights on a CPU (already a quantized model; the cache is then as large as the weights at
    ~2000 tokens on the 160M model), else the compute dtype (exact against transformers). Another
    dtype than the compute dtype is for CPUs (flash-attn and the captured GPU steps read the
    cache in the compute dtype)."""
    if requested not in KV_DTYPES:
        raise InvalidParameter(f"unknown KV cache dtype {requested!r} (choose from {', '.join(KV_DTYPES)})")
    if requested == "auto":
        return torch.float16 if int8 and device.type == "cpu" and dtype == torch.float32 else dtype
    wanted = getattr(torch, requested)
    if wanted != dtype and device.type != "cpu":
        raise InvalidParameter(f"a KV cache in {requested} with the model in "
                               f"{str(dtype).removeprefix('torch.')} is for CPUs (this is {device.type})")
    return wanted


@dataclass
class EngineResult:
    token_ids: list[int] = field(default_factory=list)   # generated ids, a final stop id included
    finish_reason: str = "length"   # length | eos | stop | max_lines | time | cancelled | superseded
    prompt_tokens: int = 0
    reused_tokens: int = 0          # prompt tokens whose keys/values came from the cache
    elapsed_s: float = 0.0          # from the call to the answer, queueing included
    drafted_tokens: int = 0         # draft tokens verified (speculation.py)
    accepted_tokens: int = 0        # of those, the ones the model chose: generated without a pass


# Called with each sampled token id (stop ids excepted) on the worker thread; returns a finish
# reason to stop after this token ("stop", "max_lines") or None to go on.
TokenCallback = Callable[[int], "str | None"]


class Engine:
    def __init__(self, loaded, *, budget_tokens: int | None = None, prefill_chunk: int | None = None,
                 attention: str = "auto", prefix_reuse: bool = True, draft_tokens: int | None = None,
                 linear: str = "auto", decode_step: str = "off", kv_dtype: str = "auto",
                 native_layers: bool = True,
                 progress: Callable[[float, str], None] | None = None):
        """loaded: a models.LoadedModel (its .model Decoder, .config, .device, .dtype, .quantization).
        attention: auto | sdpa | flash | cpu (inference/attention.py); the engine installs it in the model.
        prefix_reuse=False computes every prompt from scratch: the baseline benchmarks compare with.
        draft_tokens: most draft tokens verified per pass (0: no speculation; default: from the
        measured cost of a pass, else per device).
        linear: auto | rows | torch | onednn | onednn-plain | widen | q8: the linear layers'
        kernels (inference/linear.py; auto: the fastest measured per pass length,
        inference/tuning.py; q8, int8 weights only, also rounds the inputs to int8).
        decode_step: off | static | compile | cuda-graph: how single-token steps run
        (inference/captured.py; opt-in).
        kv_dtype: auto | float32 | float16 | bfloat16: the KV cache's dtype (see kv_cache_dtype;
        auto: float16 for int8 weights on a CPU, else the compute dtype).
        native_layers: on a CPU, run a pass whose kernels are all the own ones through one C
        call for every layer (inference/native_layers.py); False: the blocks one by one.
        progress(fraction, message): while the kernels are measured (the first load of a model
        on a machine); it may raise to stop."""
        self.prefix_reuse = prefix_reuse
        self.model = loaded.model
        self.config = loaded.config
        self.device = torch.device(loaded.device)
        self.dtype = loaded.dtype
        # Checkpoints pad the embedding table past the tokenizer's vocabulary (stablelm-2: 100352
        # rows, 100289 tokens): ids the tokenizer cannot decode are never sampled.
        tokenizer = getattr(loaded, "tokenizer", None)
        self.sample_vocab = min(self.config.vocab_size,
                                tokenizer.vocab_size if tokenizer is not None else self.config.vocab_size)
        cfg = self.config
        self.prefill_chunk = prefill_chunk or PREFILL_CHUNK.get(self.device.type, 256)
        if draft_tokens is not None and draft_tokens < 0:
            raise InvalidParameter(f"draft_tokens must be >= 0, got {draft_tokens}")
        if linear not in LINEAR_KERNELS:
            raise InvalidParameter(f"unknown linear kernel {linear!r} (choose from {', '.join(LINEAR_KERNELS)})")
        if decode_step == "compile" and linear != "auto":
            raise InvalidParameter(f"cannot use the {linear!r} linear kernel: the decode step is "
                                   "compiled with torch.compile")
        int8 = getattr(loaded, "quantization", None) == "int8"
        self.kv_dtype = kv_cache_dtype(kv_dtype, self.device, self.dtype, int8)
        self._previous: LRU[str | None, list[int]] = LRU(_PREVIOUS_KEYS)
        self.attention = select_attention(attention, self.device, self.dtype, cfg)
        install(self.model, cfg, self.attention)
        self.kernels = plan_kernels(self.model, device=self.device, dtype=self.dtype,
                                    int8=int8, linear=linear, attention=self.attention,
                                    attention_requested=attention, chunk=self.prefill_chunk,
                                    compiled=decode_step == "compile", progress=progress,
                                    kv_dtype=self.kv_dtype, native_layers=native_layers)
        self.native_layers = install_native_layers(self.model, self.kernels.layers)
        # Drafts of a length from the measured cost of a pass (a CPU) follow the acceptance
        # measured while serving: `_update_draft_tokens`. A length given, or none measured: fixed.
        self._adaptive_draft = draft_tokens is None and bool(self.kernels.draft_tokens) \
            and bool(self.kernels.pass_cost)
        self.acceptance = Acceptance(ACCEPTANCE)
        if draft_tokens is None:
            draft_tokens = self.kernels.draft_tokens
        if draft_tokens is None:
            draft_tokens = DRAFT_TOKENS.get(self.device.type, 8)
        self.draft_tokens = draft_tokens
        self.decode_step = None if decode_step == "off" else \
            DecodeStep(self.model, decode_step, self.device, self.kv_dtype)
        if self.decode_step is not None:
            self.decode_step.warm_up()
        ring = None
        if cfg.sliding_window:
            # A ring of window + step - 1 entries takes `step` prompt tokens per forward step and
            # can be cut back by step - 1 positions (an edit just behind the end) without
            # recomputing. A quarter of the window keeps memory within 1.25x the window.
            step = min(self.prefill_chunk, max(1, cfg.sliding_window // 4))
            ring = ring_capacity(cfg.sliding_window, step, self.attention.name)
        self._budget_share = None
        if budget_tokens is None:
            # a share of the device's KV budget, shared with the process's other engines
            per_token = cfg.kv_bytes_per_token * torch.empty((), dtype=self.kv_dtype).element_size()
            self._budget_share = DeviceBudget.for_device(self.device).join(
                per_token, ring if ring is not None else cfg.max_positions,
                lambda: self.prefix_cache.nbytes)
            budget_tokens = lambda: self._budget_share.tokens  # noqa: E731
        # a captured step attends over a cache's whole capacity: only then must it start zeroed
        # (zeroing a 2000-position cache of the 160M model took 46 ms)
        new_cache = functools.partial(self.model.new_cache, dtype=self.kv_dtype,
                                      zeroed=self.decode_step is not None)
        self.prefix_cache = PrefixCache(new_cache, budget_tokens, cfg.max_positions, ring)
        self.scheduler = Scheduler()

    def generate(self, prompt_ids: Sequence[int], *, max_new_tokens: int,
                 sampling: SamplingParams = SamplingParams(), stop_ids: Sequence[int] = (),
                 time_budget_s: float | None = None, on_token: TokenCallback | None = None,
                 key: str | None = None, cancel: threading.Event | None = None,
                 first_token_ids: Sequence[int] | None = None, priority: int = 0) -> EngineResult:
        """Blocking; safe from any thread. Bad input raises a GenerationError subclass before
        anything is queued. first_token_ids: the ids the first generated token must be one of
        (token healing: the tokens that start with the text of a prompt token taken back).
        priority: lower is more urgent (completions 0, chat 1, background work 2: api.py); a
        running request lets more urgent ones run between its forward passes (scheduler.py), so
        background work delays a request by at most the pass in progress."""
        started = time.monotonic()
        tokens = self._check_prompt(prompt_ids)
        allowed = self._check_allowed(first_token_ids)
        # Positions used: the prompt plus every generated token but the last (never fed back).
        room = self.config.max_positions - len(tokens) + 1
        stops = TokenStops.build(max_new_tokens, stop_ids, time_budget_s)
        if room < max_new_tokens:
            stops = TokenStops(room, stops.stop_ids, stops.deadline)
        needed = len(tokens) + stops.max_new_tokens - 1
        self.prefix_cache.check_fits(needed)

        def run(job: Job) -> EngineResult:
            return self._run(job, tokens, needed, sampling, stops, on_token, started, allowed)

        def dropped(reason: str) -> EngineResult:
            return EngineResult([], reason, len(tokens), 0, time.monotonic() - started)

        return self.scheduler.run(run, dropped, key=key, cancel=cancel, priority=priority)

    def clear_cache(self) -> None:
        """Forget every cached sequence (runs between requests, on the worker)."""
        self.scheduler.run(lambda job: self.prefix_cache.clear(), lambda reason: None)

    def close(self) -> None:
        self.scheduler.close()
        self.prefix_cache.clear()
        if self._budget_share is not None:
            self._budget_share.close()

    def __enter__(self) -> "Engine":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _check_prompt(self, prompt_ids: Sequence[int]) -> list[int]:
        try:
            tokens = [operator.index(t) for t in prompt_ids]
        except TypeError:
            raise TokenOutOfRange("prompt token ids must be integers") from None
        if not tokens:
            raise EmptyPrompt("the prompt is empty: at least one token is needed")
        vocab = self.config.vocab_size
        for i, t in enumerate(tokens):
            if not 0 <= t < vocab:
                raise TokenOutOfRange(f"prompt token {i} has id {t}, outside the vocabulary [0, {vocab})")
        if len(tokens) > self.config.max_positions:
            raise PromptTooLong(f"the prompt has {len(tokens)} tokens; the model takes at most "
                                f"{self.config.max_positions} positions")
        return tokens

    def _check_allowed(self, ids: Sequence[int] | torch.Tensor | None) -> torch.Tensor | None:
        if ids is None:
            return None
        if isinstance(ids, torch.Tensor):   # a long 1-D tensor of distinct ids, kept by the caller
            if ids.dim() != 1 or ids.dtype != torch.long:
                raise InvalidParameter("first_token_ids as a tensor must be 1-D int64")
            if not len(ids):
                raise InvalidParameter("first_token_ids is empty: no token could be generated")
            low, high = int(ids.min()), int(ids.max())
            if low < 0 or high >= self.sample_vocab:
                raise TokenOutOfRange(f"first_token_ids has id {low if low < 0 else high}, outside "
                                      f"the vocabulary [0, {self.sample_vocab})")
            return ids
        try:
            allowed = sorted({operator.index(t) for t in ids})
        except TypeError:
            raise TokenOutOfRange("first_token_ids must be integers") from None
        if not allowed:
            raise InvalidParameter("first_token_ids is empty: no token could be generated")
        if allowed[0] < 0 or allowed[-1] >= self.sample_vocab:
            bad = allowed[0] if allowed[0] < 0 else allowed[-1]
            raise TokenOutOfRange(f"first_token_ids has id {bad}, outside the vocabulary "
                                  f"[0, {self.sample_vocab})")
        return torch.tensor(allowed)

    def _run(self, job: Job, tokens: list[int], needed: int, sampling: SamplingParams,
             stops: TokenStops, on_token: TokenCallback | None, started: float,
             allowed: torch.Tensor | None = None) -> EngineResult:
        """One request on the worker. Running out of device memory drops the idle caches and,
        when that freed some and no token was passed on yet, runs the request once more; else it
        is an OutOfMemory error, with the engine usable (what the request held is freed, the
        slots left match their caches)."""
        if allowed is not None:     # moved here, on the worker: no CUDA calls from callers' threads
            allowed = allowed.to(self.device)
        emitted = 0

        def counted(token: int) -> str | None:
            nonlocal emitted
            emitted += 1
            return on_token(token) if on_token is not None else None

        for attempt in range(2):
            try:
                return self._run_once(job, tokens, needed, sampling, stops, counted, started, allowed)
            except torch.OutOfMemoryError as exc:
                dropped = self._free_memory()
                again = not attempt and dropped and not emitted   # nothing streamed yet: retry
                log.warning("out of memory on %s for a request of %d positions; dropped %d idle "
                            "cached prompts%s", self.device, needed, dropped,
                            ", trying once more" if again else "")
                if not again:
                    first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
                    raise OutOfMemory(
                        f"the {self.device.type.upper()} ran out of memory for a request of {needed} "
                        f"positions (prompt and new tokens); shorten the prompt (contextTokens) or "
                        f"maxNewTokens, or use a smaller model or dtype ({first_line})") from None
        raise AssertionError("unreachable")

    def _free_memory(self) -> int:
        """Drops every idle cached slot and hands cached device memory back; how many slots."""
        before = len(self.prefix_cache.slots)
        self.prefix_cache.clear()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        return before - len(self.prefix_cache.slots)

    @torch.inference_mode()
    def _run_once(self, job: Job, tokens: list[int], needed: int, sampling: SamplingParams,
                  stops: TokenStops, on_token: TokenCallback | None, started: float,
                  allowed: torch.Tensor | None = None) -> EngineResult:
        if not self.prefix_reuse:
            self.prefix_cache.clear()
        slot, reused = self.prefix_cache.acquire(tokens, needed, job.key)
        result = EngineResult([], "length", len(tokens), reused)
        drafter = Drafter(tokens, self._previous.get(job.key)) if self.draft_tokens else None
        try:
            rows, draft, result.finish_reason = self._prefill(job, slot, tokens, stops, drafter,
                                                              sampling.greedy)
            if rows is not None:
                result.finish_reason = self._decode(job, slot, rows, draft, sampling, stops, on_token,
                                                    result, allowed, drafter)
        finally:
            self.prefix_cache.release(slot)
            if result.token_ids:
                self._remember(job.key, tokens + result.token_ids)
            self._update_draft_tokens()
        result.elapsed_s = time.monotonic() - started
        return result

    def _prefill(self, job: Job, slot: Slot, tokens: list[int], stops: TokenStops,
                 drafter: Drafter | None, greedy: bool):
        """Runs the prompt tokens the slot lacks, chunk by chunk -> (rows, draft, None), or
        (None, [], reason) when the request is stopped between chunks. The last chunk carries a
        draft of what follows the prompt when there is one (the rest of the previous completion,
        after a keystroke that typed its start): rows [1 + len(draft), V] are the logits of the
        prompt's last token and of each draft token."""
        pending = tokens[len(slot.tokens):]
        step = min(self.prefill_chunk, slot.cache.max_step) if slot.cache.ring else self.prefill_chunk
        for start in range(0, len(pending), step):
            self.scheduler.run_urgent(job)
            reason = job.stop_reason() or stops.time_reason()
            if reason:
                return None, [], reason
            chunk = pending[start:start + step]
            draft = []
            if drafter is not None and start + step >= len(pending):
                room = min(stops.max_new_tokens - 1, slot.cache.max_step - len(chunk))
                draft = drafter.draft(min(self._draft_limit(drafter, self.draft_tokens, greedy), room))
            if not draft:
                rows = self._forward(slot, chunk)
            else:
                rows = self._forward(slot, chunk + draft, all_rows=True)[len(chunk) - 1:]
        return rows, draft, None

    def _update_draft_tokens(self) -> None:
        """The draft length that gives the most tokens per unit of time for the measured cost of
        a pass of k + 1 positions (inference/tuning.py) at the acceptance of the looked-up drafts
        verified so far (the assumed ACCEPTANCE until there are some); at least one, so drafts
        keep being tried and measured."""
        if self._adaptive_draft:
            self.draft_tokens = max(1, draft_length(self.kernels.pass_cost, self.acceptance.rate))

    def _draft_limit(self, drafter: Drafter, k: int, greedy: bool) -> int:
        """Most draft tokens for the next pass: the adaptive k, or further while a greedy request
        follows the previous sequence of the document (the same choices again: all taken)."""
        return _ALIGNED_DRAFT_FACTOR * self.draft_tokens if greedy and drafter.aligned else k

    def _decode(self, job: Job, slot: Slot, rows: torch.Tensor, draft: list[int],
                sampling: SamplingParams, stops: TokenStops, on_token: TokenCallback | None,
                result: EngineResult, allowed: torch.Tensor | None = None,
                drafter: Drafter | None = None) -> str:
        """Samples the generated tokens from rows of logits and feeds each one back.

        `rows[i]` are the logits after the i-th of the last 1 + len(draft) positions run: the last
        position before the draft, then each draft token. Tokens are sampled row by row, in order,
        exactly as one pass per token would sample them; the draft is kept up to the first token
        the model does not choose, which is fed next, with a new draft of what follows it. The
        cache is cut back to what was kept, so `slot.tokens` always matches it."""
        sampler = Sampler(sampling, self.device)
        vocab, generated = self.sample_vocab, result.token_ids
        k = self.draft_tokens
        while True:
            base = slot.cache.length - len(draft)
            kept, reason = 0, None
            for i, row in enumerate(rows):
                token = sampler(row[:vocab], allowed if not generated else None)
                generated.append(token)
                matched = i < len(draft) and token == draft[i]
                kept += matched
                if drafter is not None:
                    drafter.append(token)
                reason = self._token_reason(token, job, stops, on_token, len(generated))
                if reason or not matched:
                    break
            if draft:
                self._cut(slot, base + kept)
                result.drafted_tokens += len(draft)
                result.accepted_tokens += kept
                if not drafter.last_aligned:    # the previous completion's rest: nearly all taken
                    self.acceptance.add(kept, len(draft))
                # a draft taken whole may go further next time; one refused early, less far
                k = min(self.draft_tokens, 2 * k) if kept == len(draft) else max(2, kept + 1)
            if reason:
                return reason
            if self.scheduler.run_urgent(job):
                reason = job.stop_reason() or stops.time_reason()
                if reason:
                    return reason
            draft = []
            if drafter is not None:
                # every draft token kept is a generated token, and one more always follows
                room = min(stops.max_new_tokens - len(generated) - 1, slot.cache.max_step - 1)
                draft = drafter.draft(min(self._draft_limit(drafter, k, sampling.greedy), room))
            if draft:
                rows = self._forward(slot, [token] + draft, all_rows=True)
            else:
                rows = self._step(slot, token)[None]

    def _remember(self, key: str | None, sequence: list[int]) -> None:
        self._previous.put(key, sequence)

    @staticmethod
    def _token_reason(token: int, job: Job, stops: TokenStops, on_token: TokenCallback | None,
                      generated: int) -> str | None:
        if token in stops.stop_ids:
            return "eos"
        reason = (on_token(token) if on_token else None) or stops.limit_reason(generated)
        return reason or job.stop_reason()

    def _forward(self, slot: Slot, ids: list[int], all_rows: bool = False) -> torch.Tensor:
        """Runs `ids` after what the slot holds -> logits [1, V] of the last one, or with
        all_rows [len(ids), V], one row per id."""
        try:
            logits = self.model(torch.tensor([ids], device=self.device), slot.cache,
                                last_only=not all_rows)
        except BaseException:
            # A step that failed part-way may have overwritten entries (a ring's oldest keys):
            # the slot can no longer be trusted.
            self.prefix_cache.drop(slot)
            raise
        slot.tokens.extend(ids)
        return logits[0]

    def _step(self, slot: Slot, token: int) -> torch.Tensor:
        """One token after what the slot holds -> logits [V]; the captured step when enabled."""
        if self.decode_step is None:
            return self._forward(slot, [token])[-1]
        try:
            logits = self.decode_step(slot.cache, token)
        except BaseException:
            self.prefix_cache.drop(slot)
            raise
        slot.tokens.append(token)
        return logits

    @staticmethod
    def _cut(slot: Slot, n: int) -> None:
        """Forget what the slot holds from position n on (a refused draft)."""
        if n < slot.cache.length:
            slot.cache.truncate(n)
            del slot.tokens[n:]
