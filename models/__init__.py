"""stablelm_lsp.models: checkpoints, configs, tokenizers and the decoder math.

The names below are imported on first use (PEP 562), so that `builtin_model_path`, the errors,
the tokenizer and Hub lookups can be had without importing torch (the server reports which model
it loads before torch is loaded; a remote engine's tokenizer never needs torch).
"""
from __future__ import annotations

import importlib
from pathlib import Path


def builtin_model_path() -> Path:
    """The small model trained by the project and shipped in the package (training/): the one
    place that knows where it lies."""
    return Path(__file__).resolve().parent / "builtin"


_LAZY = {
    "LoadedModel": "checkpoint", "load_model": "checkpoint", "pick_device": "checkpoint",
    "pick_dtype": "checkpoint", "resolve_checkpoint": "hub",
    "SUPPORTED_MODEL_TYPES": "config", "ModelConfig": "config",
    "Decoder": "decoder", "KVCache": "decoder",
    "CheckpointError": "errors", "CheckpointNotFound": "errors", "ModelError": "errors",
    "PickleRefused": "errors", "UnsupportedModel": "errors",
    "Tokenizer": "tokenizer",
}


def __getattr__(name: str):
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


__all__ = ["builtin_model_path", *_LAZY]
