"""One way to get a `Backend`: `load_backend(model, options)`.

The server, `stablelm-lsp complete`, `generate` and `chat` all come here with a `BackendOptions`;
what runs the model is chosen here and nowhere else: the in-process `LocalBackend`, or, with an
`endpoint`, a `RemoteBackend` of an engine a team runs (inference/remote/).
This module imports no torch until a backend is loaded, so callers can describe the model
(`describe_model`) before anything heavy is imported.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from stablelm_lsp.models import builtin_model_path
# A bad path or checkpoint: re-exported so that callers above inference/ need not import models/.
from stablelm_lsp.models.errors import ModelError

from .api import Backend

__all__ = ["BackendOptions", "ModelError", "Progress", "describe_model", "load_backend"]

log = logging.getLogger(__name__)

# progress(fraction in [0, 1], message) while a checkpoint loads; it may raise to stop the load
Progress = Callable[[float, str], None]


@dataclass(frozen=True)
class BackendOptions:
    """How to run a model. Equal options (progress aside) give the same backend."""

    device: str = "auto"            # auto | cpu | cuda | cuda:N
    dtype: str = "auto"             # auto (checkpoint's on GPU, float32 on CPU) | float32 | int8 ...
    attention: str = "auto"         # auto | sdpa | flash | cpu (inference/attention.py)
    linear: str = "auto"            # auto (measured) or a forced kernel (inference/linear.py)
    decode_step: str = "off"        # off | static | compile | cuda-graph (inference/captured.py)
    kv_dtype: str = "auto"          # auto | float32 | float16 | bfloat16 (inference/engine.py)
    speculation: bool = True        # verify drafts in one pass (inference/speculation.py)
    prefix_cache: bool = True       # reuse KV across requests (off only for measurements)
    allow_pickle: bool = False      # allow pytorch_model.bin (weights_only=True)
    # A remote engine's base URL (http(s)://host:port): the model runs there, nothing loads here.
    endpoint: str | None = None
    endpoint_kind: str = "auto"     # auto | openai | vllm | llamacpp | ollama
    progress: Progress | None = field(default=None, compare=False)


def describe_model(model: str | None, endpoint: str | None = None) -> dict:
    """{model, path, builtin} for a status, the same before and after loading: `model` is the
    Hub id as given or the checkpoint folder's name; `path` the folder (None for a Hub id until it
    is found in the cache). model None: the built-in model, or with an `endpoint` the engine's
    (named once it answers)."""
    builtin = builtin_model_path()
    if model is None and endpoint is not None:
        return {"model": None, "path": None, "builtin": False}
    if model is None:
        return {"model": builtin.name, "path": str(builtin), "builtin": True}
    local = Path(model).expanduser()
    if not local.exists():
        return {"model": model, "path": None, "builtin": False}
    folder = Path(os.path.abspath(local))
    return {"model": folder.name or str(folder), "path": str(folder),
            "builtin": folder.resolve() == builtin.resolve()}


def load_backend(model: str | None, options: BackendOptions = BackendOptions()) -> Backend:
    """A backend for `model` (a checkpoint folder or Hub id; None: the built-in model).
    Raises models' ModelError for a bad path or checkpoint, GenerationError for bad options.

    With `options.endpoint`, the engine there generates: `model` names the served model (None:
    the engine's first), and when it is a folder or Hub id with tokenizer.json, the tokenizer
    prompts are built with. The engine being down is no error: the backend's health says so
    until the engine answers."""
    if options.endpoint is not None:
        from .remote.backend import RemoteBackend, RemoteOptions

        return RemoteBackend.connect(RemoteOptions(options.endpoint, kind=options.endpoint_kind,
                                                   model=model))
    from .backend import LocalBackend

    if model is None:
        log.info("using the built-in model (%s); pass --model with a checkpoint folder or Hub id "
                 "(e.g. stabilityai/stable-code-3b) for real completions", builtin_model_path())
    engine = {} if options.speculation else {"draft_tokens": 0}
    return LocalBackend.load(model or str(builtin_model_path()), device=options.device,
                             dtype=options.dtype, allow_pickle=options.allow_pickle,
                             progress=options.progress, prefix_reuse=options.prefix_cache,
                             attention=options.attention, linear=options.linear,
                             decode_step=options.decode_step, kv_dtype=options.kv_dtype,
                             **engine)
