"""The engines' wire formats: what each kind accepts, the request bodies, the streamed answers.

Pure functions of data, no I/O. Every kind answers OpenAI-style `/v1/completions` and
`/v1/chat/completions` with server-sent events (`data: {...}` lines, then `data: [DONE]`);
the kinds differ in what they accept beyond that:

| kind | prompt as token ids | extras sent | cached tokens reported in |
|---|---|---|---|
| vllm | yes | top_k, ignore_eos, stop_token_ids, usage in the stream | usage.prompt_tokens_details.cached_tokens (with --enable-prompt-tokens-details) |
| llamacpp | yes | top_k, min_p, ignore_eos, cache_prompt, id_slot, n_indent, t_max_predict_ms | usage.prompt_tokens_details.cached_tokens, timings.cache_n |
| ollama | no | completions go to `/api/generate` with `raw: true` (its `/v1/completions` wraps the prompt in the model's template) and stream JSON lines | - |
| openai | no | nothing beyond OpenAI's fields (any compatible server) | usage.prompt_tokens_details.cached_tokens |

At most MAX_STOPS stop strings go to any engine (vLLM's limit in several versions); the client
applies all of them to the text itself anyway.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence
from urllib.parse import urlsplit, urlunsplit

MAX_STOPS = 4
ENDPOINT_KINDS = ("auto", "openai", "vllm", "llamacpp", "ollama")


def display_url(url: str) -> str:
    """`url` without user:password@ (it can be shown and logged)."""
    parts = urlsplit(url)
    if parts.username is None and parts.password is None:
        return url
    host = parts.hostname or ""
    if parts.port is not None:
        host = f"{host}:{parts.port}"
    return urlunsplit((parts.scheme, host, parts.path, parts.query, parts.fragment))


def check_endpoint(url: str) -> str:
    """The base URL without a trailing `/` (or `/v1`, which every route here adds itself);
    ValueError for something that is not an http(s) URL."""
    parts = urlsplit(url.strip())
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"endpoint must be an http:// or https:// URL, got {display_url(url)!r}")
    base = url.strip().rstrip("/")
    return base[:-3] if base.endswith("/v1") else base


@dataclass(frozen=True)
class EngineKind:
    name: str
    token_prompts: bool             # accepts `prompt: [int, ...]`
    tokenize_path: str | None       # route that tokenizes text, for budgets without a tokenizer
    completions_path: str = "/v1/completions"
    completions_ndjson: bool = False    # completions stream JSON lines, not server-sent events
    chat_path: str = "/v1/chat/completions"


KINDS: dict[str, EngineKind] = {
    "openai": EngineKind("openai", token_prompts=False, tokenize_path=None),
    "vllm": EngineKind("vllm", token_prompts=True, tokenize_path="/tokenize"),
    "llamacpp": EngineKind("llamacpp", token_prompts=True, tokenize_path="/tokenize"),
    "ollama": EngineKind("ollama", token_prompts=False, tokenize_path=None,
                         completions_path="/api/generate", completions_ndjson=True),
}


@dataclass(frozen=True)
class WireParams:
    """A generation request's parameters as the engines take them."""

    max_tokens: int
    temperature: float = 0.0
    top_k: int = 0                  # 0: no top-k cut
    top_p: float = 1.0
    seed: int | None = None
    stops: tuple[str, ...] = ()     # at most MAX_STOPS
    stop_token_ids: tuple[int, ...] = ()    # vLLM: special tokens that end generation
    ignore_eos: bool = False
    slot: int | None = None         # llama.cpp: the slot (KV cache) this document uses
    indent: int | None = None       # llama.cpp: end before a line indented less than this
    time_limit_ms: int | None = None    # llama.cpp: stop at a newline once generating took this long


def engine_stops(request_stops: Sequence[str], model_stops: Sequence[str]) -> tuple[str, ...]:
    """The stop strings sent to the engine: the request's first, then the model's, at most
    MAX_STOPS (the client still applies every one of them to the text)."""
    return tuple(dict.fromkeys(s for s in (*request_stops, *model_stops) if s))[:MAX_STOPS]


def completion_body(kind: EngineKind, model: str | None, prompt: str | list[int],
                    params: WireParams) -> dict[str, Any]:
    """The body of a streaming completion request for `kind`."""
    if kind.name == "ollama":
        options: dict[str, Any] = {"num_predict": params.max_tokens,
                                   "temperature": params.temperature, "top_p": params.top_p,
                                   "top_k": params.top_k}
        if params.stops:
            options["stop"] = list(params.stops)
        if params.seed is not None:
            options["seed"] = params.seed
        return {"model": model, "prompt": prompt, "raw": True, "stream": True, "options": options}
    return {"prompt": prompt, **_openai_fields(kind, model, params)}


def chat_body(kind: EngineKind, model: str | None, messages: Sequence[tuple[str, str]],
              params: WireParams) -> dict[str, Any]:
    """The body of a streaming `/v1/chat/completions` request: the engine renders the messages
    with its own chat template."""
    return {"messages": [{"role": role, "content": content} for role, content in messages],
            **_openai_fields(kind, model, params)}


def _openai_fields(kind: EngineKind, model: str | None, params: WireParams) -> dict[str, Any]:
    body: dict[str, Any] = {"max_tokens": params.max_tokens, "temperature": params.temperature,
                            "top_p": params.top_p, "stream": True}
    if model:
        body["model"] = model
    if params.stops:
        body["stop"] = list(params.stops)
    if params.seed is not None:
        body["seed"] = params.seed
    if kind.name in ("vllm", "llamacpp"):
        # vLLM before 0.8 disables top-k with -1 only; llama.cpp takes <= 0 as disabled.
        body["top_k"] = params.top_k if params.top_k > 0 else -1
        body["stream_options"] = {"include_usage": True}
        if params.ignore_eos:
            body["ignore_eos"] = True
    if kind.name == "vllm" and params.stop_token_ids:
        body["stop_token_ids"] = list(params.stop_token_ids)
    if kind.name == "llamacpp":
        body["min_p"] = 0.0         # llama.cpp's default 0.05 would cut what top_p keeps
        body["cache_prompt"] = True
        if params.slot is not None:
            body["id_slot"] = params.slot
        if params.indent:
            body["n_indent"] = params.indent
        if params.time_limit_ms:
            body["t_max_predict_ms"] = params.time_limit_ms
    return body


@dataclass(frozen=True)
class Chunk:
    """One streamed event, in the engines' common terms."""

    text: str = ""
    finish: str | None = None           # the engine's finish reason (stop, length, ...)
    stopped_by_string: bool = False     # vLLM: finish "stop" came from a stop string, not EOS
    prompt_tokens: int | None = None
    cached_tokens: int | None = None    # prompt tokens the engine took from its cache
    completion_tokens: int | None = None
    error: str | None = None            # the engine reported a failure inside the stream


def parse_event(data: Any, *, chat: bool = False, ollama_native: bool = False) -> Chunk:
    """A decoded JSON event of a streamed answer -> Chunk. Raises ValueError for something that
    is none of the engines' formats."""
    if not isinstance(data, dict):
        raise ValueError(f"expected a JSON object, got {type(data).__name__}")
    error = _error_text(data)
    if error is not None:
        return Chunk(error=error)
    if ollama_native:
        text = data.get("response", "")
        if not isinstance(text, str):
            raise ValueError("'response' is not text")
        done = data.get("done") is True
        return Chunk(text=text, finish=(data.get("done_reason") or "stop") if done else None,
                     prompt_tokens=_int(data.get("prompt_eval_count")) if done else None,
                     completion_tokens=_int(data.get("eval_count")) if done else None)
    choices = data.get("choices")
    if not isinstance(choices, list):
        raise ValueError("no 'choices' list")
    text, finish, by_string = "", None, False
    if choices:
        choice = choices[0]
        if not isinstance(choice, dict):
            raise ValueError("a choice is not an object")
        if chat:
            delta = choice.get("delta")
            text = (delta.get("content") or "") if isinstance(delta, dict) else ""
        else:
            text = choice.get("text") or ""
        if not isinstance(text, str):
            raise ValueError("the choice's text is not text")
        finish = choice.get("finish_reason") or None
        by_string = isinstance(choice.get("stop_reason"), str)
    usage = data.get("usage") if isinstance(data.get("usage"), dict) else {}
    details = usage.get("prompt_tokens_details") if isinstance(usage.get("prompt_tokens_details"), dict) else {}
    timings = data.get("timings") if isinstance(data.get("timings"), dict) else {}
    cached = _int(details.get("cached_tokens"))
    if cached is None:
        cached = _int(timings.get("cache_n"))
    return Chunk(text=text, finish=finish, stopped_by_string=by_string,
                 prompt_tokens=_int(usage.get("prompt_tokens")), cached_tokens=cached,
                 completion_tokens=_int(usage.get("completion_tokens")))


def _error_text(data: dict) -> str | None:
    """The message of an error event: `{"error": {...}}` (OpenAI, llama.cpp), `{"error": "..."}`
    (Ollama), `{"object": "error", "message": ...}` (vLLM)."""
    error = data.get("error")
    if isinstance(error, dict):
        return str(error.get("message") or error)
    if isinstance(error, str):
        return error
    if data.get("object") == "error":
        return str(data.get("message") or "error")
    return None


def error_message(body: Any) -> str | None:
    """The message of an HTTP error answer's JSON body, in any of the engines' formats
    (FastAPI's `{"detail": ...}` too)."""
    if not isinstance(body, dict):
        return None
    message = _error_text(body)
    if message is None and "detail" in body:
        message = str(body["detail"])
    return message


def _int(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None
