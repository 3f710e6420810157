"""Server settings: defaults, then command-line flags, then initializationOptions, then
workspace/didChangeConfiguration, each overriding the one before.

Clients send camelCase JSON (`{"maxNewTokens": 48}`), either flat or under a "stablelm" section.
A bad value is reported and ignored; the other values in the same message still apply.
"""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from stablelm_lsp.inference.prompts.chat import CHAT_MAX_NEW_TOKENS
from stablelm_lsp.inference.load import BackendOptions, Progress
from stablelm_lsp.inference.remote.engines import ENDPOINT_KINDS, check_endpoint

SECTION = "stablelm"


class SettingsError(ValueError):
    """One or more setting values that were refused; `.applied` holds what was kept."""

    def __init__(self, problems: list[str], applied: "Settings"):
        super().__init__("; ".join(problems))
        self.problems = problems
        self.applied = applied


@dataclass(frozen=True)
class Settings:
    model: str | None = None          # checkpoint folder or Hub id; None: the built-in model
    device: str = "auto"
    dtype: str = "auto"
    allow_pickle: bool = False
    max_new_tokens: int = 64
    max_lines: int = 8                # lines of a multi-line completion
    temperature: float = 0.0
    context_tokens: int = 1536        # prompt budget; clamped to what the model's positions allow
    debounce_ms: int = 75             # the longest wait before a request runs the model
    debounce_min_ms: int = 0          # the shortest (lsp/debounce.py adapts between the two)
    timeout_ms: int = 5000            # generation time budget per request
    chat_model: str | None = None     # read by the chat module; None: the completion model
    chat_max_new_tokens: int = CHAT_MAX_NEW_TOKENS   # longest chat reply (read by the chat module)
    enabled: bool = True
    template: str | None = None       # prompt template (see inference/prompts/fim.py)
    stats_file: str | None = None     # None: $XDG_STATE_HOME/stablelm-lsp/stats.json
    prefix_cache: bool = True         # reuse the KV cache across requests (off only to measure)
    speculation: bool = True          # verify drafts (previous completion, n-grams) in one pass
    anticipate: bool = True           # compute completions before they are asked for (anticipation.py)
    attention: str = "auto"           # auto | sdpa | flash | cpu (inference/attention.py)
    linear: str = "auto"              # auto (measured) or one forced kernel (inference/linear.py)
    decode_step: str = "off"          # off | static | compile | cuda-graph (inference/captured.py)
    kv_dtype: str = "auto"            # auto | float32 | float16 | bfloat16 (inference/engine.py)
    endpoint: str | None = None       # a remote engine's URL: generation runs there
    endpoint_kind: str = "auto"       # auto | openai | vllm | llamacpp | ollama

    def stats_path(self) -> Path:
        if self.stats_file:
            return Path(self.stats_file).expanduser()
        state = os.environ.get("XDG_STATE_HOME") or os.path.join(Path.home(), ".local", "state")
        return Path(state) / "stablelm-lsp" / "stats.json"

    def backend_options(self, progress: Progress | None = None) -> BackendOptions:
        """How inference.load.load_backend runs the model under these settings."""
        return BackendOptions(device=self.device, dtype=self.dtype, attention=self.attention,
                              linear=self.linear,
                              decode_step=self.decode_step, kv_dtype=self.kv_dtype,
                              speculation=self.speculation,
                              prefix_cache=self.prefix_cache, allow_pickle=self.allow_pickle,
                              endpoint=self.endpoint, endpoint_kind=self.endpoint_kind,
                              progress=progress)

    def model_changed(self, other: "Settings") -> bool:
        """Whether going to `other` needs the completion model loaded again."""
        return self.model != other.model or self.backend_options() != other.backend_options()

    def merged(self, values: Mapping[str, Any] | None) -> "Settings":
        """These settings updated from client JSON; raises SettingsError (with the good values
        applied) when some are refused."""
        if not values:
            return self
        if not isinstance(values, Mapping):
            raise SettingsError([f"settings must be an object, got {type(values).__name__}"], self)
        section = values.get(SECTION)
        if isinstance(section, Mapping):
            values = section
        changes: dict[str, Any] = {}
        problems: list[str] = []
        for key, value in values.items():
            name = _JSON_NAMES.get(key)
            if name is None:
                problems.append(f"unknown setting {key!r}")
                continue
            try:
                changes[name] = _check(name, value)
            except ValueError as exc:
                problems.append(f"{key}: {exc}")
        applied = dataclasses.replace(self, **changes)
        if problems:
            raise SettingsError(problems, applied)
        return applied


def _camel(name: str) -> str:
    head, *rest = name.split("_")
    return head + "".join(part.capitalize() for part in rest)


_FIELDS = {f.name: f for f in dataclasses.fields(Settings)}
_JSON_NAMES = {_camel(name): name for name in _FIELDS}

_RANGES = {
    "max_new_tokens": (1, 4096), "max_lines": (1, 1000), "context_tokens": (16, 1 << 20),
    "chat_max_new_tokens": (1, 32768),
    "debounce_ms": (0, 10_000), "debounce_min_ms": (0, 10_000), "timeout_ms": (1, 600_000), "temperature": (0.0, 10.0),
}
# Values a setting may take; the CLI offers the same (lsp/common.py).
CHOICES = {"dtype": ("auto", "float32", "bfloat16", "float16", "int8"),
            "attention": ("auto", "sdpa", "flash", "cpu"),
            "endpoint_kind": ENDPOINT_KINDS,
            "linear": ("auto", "rows", "torch", "onednn", "onednn-plain", "widen", "q8"),
            "decode_step": ("off", "static", "compile", "cuda-graph"),
            "kv_dtype": ("auto", "float32", "float16", "bfloat16")}


def _check(name: str, value: Any) -> Any:
    kind = _FIELDS[name].type
    if kind == "bool":
        if not isinstance(value, bool):
            raise ValueError(f"expected true or false, got {value!r}")
        return value
    if kind == "int" or kind == "float":
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"expected a number, got {value!r}")
        if kind == "int" and value != int(value):
            raise ValueError(f"expected a whole number, got {value!r}")
        low, high = _RANGES[name]
        if not low <= value <= high:
            raise ValueError(f"{value!r} is outside [{low}, {high}]")
        return int(value) if kind == "int" else float(value)
    # str and str | None: an empty string or null means "unset" for the optional ones
    if value is None or value == "":
        if kind == "str | None":
            return None
        raise ValueError("must not be empty")
    if not isinstance(value, str):
        raise ValueError(f"expected a string, got {value!r}")
    if name in CHOICES and value not in CHOICES[name]:
        raise ValueError(f"{value!r} is not one of {', '.join(CHOICES[name])}")
    if name == "endpoint":
        check_endpoint(value)       # ValueError naming what is wrong
    if name == "template":
        from stablelm_lsp.inference.prompts.fim import PromptTemplate, TemplateError

        try:
            PromptTemplate(value)
        except TemplateError as exc:
            raise ValueError(str(exc)) from None
    return value
