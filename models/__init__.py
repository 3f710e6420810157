"""stablelm_lsp.models: checkpoints, configs, tokenizers and the decoder math."""
from pathlib import Path

from .checkpoint import LoadedModel, load_model, pick_device, pick_dtype, resolve_checkpoint
from .config import SUPPORTED_MODEL_TYPES, ModelConfig
from .decoder import Decoder, KVCache
from .errors import CheckpointError, CheckpointNotFound, ModelError, PickleRefused, UnsupportedModel
from .tokenizer import Tokenizer

BUILTIN_MODEL_DIR = Path(__file__).resolve().parent / "builtin"


def builtin_model_path() -> Path:
    """The small model trained by the project and shipped in the package (training/)."""
    return BUILTIN_MODEL_DIR


__all__ = [
    "BUILTIN_MODEL_DIR", "CheckpointError", "CheckpointNotFound", "Decoder", "KVCache",
    "LoadedModel", "ModelConfig", "ModelError", "PickleRefused", "SUPPORTED_MODEL_TYPES",
    "Tokenizer", "UnsupportedModel", "builtin_model_path", "load_model", "pick_device",
    "pick_dtype", "resolve_checkpoint",
]
