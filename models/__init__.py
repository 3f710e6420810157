"""stablelm_lsp.models: checkpoints, configs, tokenizers and the decoder math.

Names that need torch (the decoder, loading weights) are imported on first use, so that the
tokenizer, configs and Hub lookups serve a process that never loads weights (a remote engine)
without torch's import time.
"""
from importlib import import_module
from pathlib import Path

from .config import SUPPORTED_MODEL_TYPES, ModelConfig
from .errors import CheckpointError, CheckpointNotFound, ModelError, PickleRefused, UnsupportedModel
from .hub import resolve_checkpoint
from .tokenizer import Tokenizer

BUILTIN_MODEL_DIR = Path(__file__).resolve().parent / "builtin"

_LAZY = {"LoadedModel": ".checkpoint", "load_model": ".checkpoint", "pick_device": ".checkpoint",
         "pick_dtype": ".checkpoint", "Decoder": ".decoder", "KVCache": ".decoder"}


def __getattr__(name: str):
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(import_module(module, __name__), name)
    globals()[name] = value
    return value


def builtin_model_path() -> Path:
    """The small model trained by the project and shipped in the package (training/)."""
    return BUILTIN_MODEL_DIR


__all__ = [
    "BUILTIN_MODEL_DIR", "CheckpointError", "CheckpointNotFound", "Decoder", "KVCache",
    "LoadedModel", "ModelConfig", "ModelError", "PickleRefused", "SUPPORTED_MODEL_TYPES",
    "Tokenizer", "UnsupportedModel", "builtin_model_path", "load_model", "pick_device",
    "pick_dtype", "resolve_checkpoint",
]
