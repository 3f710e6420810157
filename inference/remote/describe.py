"""What an engine is and serves, asked over HTTP: its kind, the served model, its context length,
llama.cpp's slots, and, when no tokenizer is known here, its special tokens and how many
characters its tokens hold on average.

Detection (endpointKind auto): llama.cpp's server answers `/props`, Ollama `/api/version`, vLLM
`/version` and lists `max_model_len` with its models; anything else with `/v1/models` is an
OpenAI-compatible server.
"""
from __future__ import annotations

import asyncio
import math
from dataclasses import dataclass, field
from typing import Any

from stablelm_lsp.inference.api import SpecialTokens
from stablelm_lsp.models.tokenizer import SPECIAL_NAMES

from .client import EngineClient, EngineFault
from .engines import KINDS, EngineKind

# Ollama cuts prompts longer than its num_ctx from the front, silently: without a num_ctx in the
# model's parameters, assume its long-standing default.
OLLAMA_DEFAULT_CONTEXT = 2048
EOS_NAMES = ("<|endoftext|>", "</s>", "<|end_of_text|>", "<eos>")
TOKENIZE_PARALLEL = 4       # requests at once while looking for special tokens

# Text whose token count calibrates the character budget when only the engine can tokenize:
# code in a few languages, with indentation, as completion prompts hold.
CALIBRATION_TEXT = '''\
import os
from dataclasses import dataclass


@dataclass
class Point:
    x: float
    y: float

    def distance(self, other: "Point") -> float:
        return ((self.x - other.x) ** 2 + (self.y - other.y) ** 2) ** 0.5


def read_lines(path: str) -> list[str]:
    with open(path, encoding="utf-8") as f:
        return [line.rstrip("\\n") for line in f if line.strip()]

function debounce(fn, ms) {
  let timer = null;
  return (...args) => {
    clearTimeout(timer);
    timer = setTimeout(() => fn(...args), ms);
  };
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    for (i, arg) in args.iter().enumerate() {
        println!("{}: {}", i, arg);
    }
}
'''


@dataclass(frozen=True)
class EngineFacts:
    kind: EngineKind
    model: str | None               # the model name requests carry (None: the engine's only one)
    served: tuple[str, ...]         # what /v1/models lists
    context: int | None             # positions per request, when the engine says
    slots: int = 1                  # llama.cpp's parallel slots (KV caches)
    special: SpecialTokens = field(default_factory=SpecialTokens)    # found on the engine
    chars_per_token: float | None = None    # measured with the engine's tokenizer


async def detect_kind(client: EngineClient) -> EngineKind:
    """The engine's kind from the routes it answers; EngineFault when it answers none."""
    props = await client.get_json("/props", missing_ok=True)
    if isinstance(props, dict) and ("default_generation_settings" in props or "total_slots" in props):
        return KINDS["llamacpp"]
    version = await client.get_json("/api/version", missing_ok=True)
    if isinstance(version, dict) and "version" in version:
        return KINDS["ollama"]
    version = await client.get_json("/version", missing_ok=True)
    models = _model_entries(await client.get_json("/v1/models"))
    if isinstance(version, dict) and "version" in version and any("max_model_len" in m for m in models):
        return KINDS["vllm"]
    return KINDS["openai"]


async def describe(client: EngineClient, kind: EngineKind, model: str | None, *,
                   learn_tokens: bool) -> EngineFacts:
    """The facts requests need. `model` is the setting (None: the engine's first model).
    learn_tokens: no tokenizer is known here, so find the special tokens and the characters per
    token on the engine; else `model` named a tokenizer (a folder or Hub id), and when the
    engine serves one model under another name, that one is meant."""
    entries = _model_entries(await client.get_json("/v1/models"))
    served = tuple(str(m["id"]) for m in entries if m.get("id") is not None)
    name = _served_model(client, kind, model, served, names_tokenizer=not learn_tokens)
    context, slots, template = None, 1, None
    if kind.name == "vllm":
        lengths = [m.get("max_model_len") for m in entries if str(m.get("id")) == name]
        context = next((n for n in lengths if isinstance(n, int) and n > 0), None)
    elif kind.name == "llamacpp":
        props = await client.get_json("/props")
        settings = props.get("default_generation_settings") if isinstance(props, dict) else None
        n_ctx = settings.get("n_ctx") if isinstance(settings, dict) else None
        context = n_ctx if isinstance(n_ctx, int) and n_ctx > 0 else None
        total = props.get("total_slots") if isinstance(props, dict) else None
        slots = total if isinstance(total, int) and total > 0 else 1
    elif kind.name == "ollama":
        show = await client.post_json("/api/show", {"model": name})
        context, template = _ollama_context(show), (show or {}).get("template")
    special, chars_per_token = SpecialTokens(), None
    if learn_tokens:
        special = await _special_tokens(client, kind, name, template)
        chars_per_token = await _chars_per_token(client, kind, name)
    return EngineFacts(kind, name, served, context, slots, special, chars_per_token)


def _model_entries(answer: Any) -> list[dict]:
    data = answer.get("data") if isinstance(answer, dict) else None
    if not isinstance(data, list):      # Ollama's native /api/tags lists "models"
        data = answer.get("models") if isinstance(answer, dict) else None
    return [m for m in data or [] if isinstance(m, dict)]


def _served_model(client: EngineClient, kind: EngineKind, model: str | None,
                  served: tuple[str, ...], names_tokenizer: bool) -> str | None:
    """The model name requests carry. llama.cpp's server and most single-model servers answer
    with their one model whatever the name; vLLM and Ollama route by name."""
    if model is None or model in served:
        return model or (served[0] if served else None)
    if kind.name == "ollama" and f"{model}:latest" in served:
        return f"{model}:latest"
    if len(served) == 1 and (names_tokenizer or kind.name in ("llamacpp", "openai")):
        return served[0]
    if served:
        listed = ", ".join(served[:8]) or "nothing"
        raise EngineFault("model-missing", f"the engine at {client.shown} does not serve {model} "
                                           f"(it lists {listed}); set model to one of those")
    return model


def _ollama_context(show: Any) -> int:
    """num_ctx from the model's parameters, else Ollama's default, within the model's own."""
    if not isinstance(show, dict):
        return OLLAMA_DEFAULT_CONTEXT
    context = OLLAMA_DEFAULT_CONTEXT
    for line in str(show.get("parameters") or "").splitlines():
        words = line.split()
        if len(words) == 2 and words[0] == "num_ctx" and words[1].isdigit():
            context = int(words[1])
    info = show.get("model_info")
    if isinstance(info, dict):
        limits = [v for k, v in info.items() if k.endswith(".context_length") and isinstance(v, int)]
        if limits:
            context = min(context, limits[0])
    return context


async def _tokenize(client: EngineClient, kind: EngineKind, model: str | None, text: str) -> list | None:
    if kind.tokenize_path is None:
        return None
    if kind.name == "llamacpp":
        body = {"content": text, "add_special": False, "parse_special": True}
    else:
        body = {"prompt": text, "add_special_tokens": False, **({"model": model} if model else {})}
    answer = await client.post_json(kind.tokenize_path, body, missing_ok=True)
    tokens = answer.get("tokens") if isinstance(answer, dict) else None
    return tokens if isinstance(tokens, list) else None


async def _special_tokens(client: EngineClient, kind: EngineKind, model: str | None,
                          template: Any) -> SpecialTokens:
    """The FIM and repository markers the engine's vocabulary has (one token each), or that
    Ollama's template for the model writes; the end-of-text token likewise."""
    fields = {**SPECIAL_NAMES, "eos": EOS_NAMES}
    if isinstance(template, str):
        found = {f: next((n for n in names if n in template), None) for f, names in fields.items()}
        return SpecialTokens(**found)
    candidates = [(f, n) for f, names in fields.items() for n in names]
    parallel = asyncio.Semaphore(TOKENIZE_PARALLEL)

    async def tokenize(text: str) -> list | None:
        async with parallel:
            return await _tokenize(client, kind, model, text)

    counts = await asyncio.gather(*(tokenize(n) for _, n in candidates))
    found: dict[str, str | None] = {f: None for f in fields}
    for (f, name), tokens in zip(candidates, counts):
        if found[f] is None and tokens is not None and len(tokens) == 1:
            found[f] = name
    return SpecialTokens(**found)


async def _chars_per_token(client: EngineClient, kind: EngineKind, model: str | None) -> float | None:
    tokens = await _tokenize(client, kind, model, CALIBRATION_TEXT)
    if not tokens:
        return None
    # Rounded down to a tenth: counts err towards more tokens, prompts towards fitting.
    return math.floor(len(CALIBRATION_TEXT) / len(tokens) * 10) / 10
