"""Finding a model's files: a local folder, or a Hub id in (and, when online, fetched into) the
Hugging Face cache. No torch here: a remote engine's tokenizer is found the same way, in a process
that never loads weights.
"""
from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Callable, Sequence

from .errors import CheckpointNotFound

HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
# What describes a model without its weights: enough to build and budget its prompts.
TOKENIZER_FILES = ("config.json", "tokenizer.json", "tokenizer_config.json",
                   "special_tokens_map.json", "chat_template.jinja", "generation_config.json")
CHECKPOINT_FILES = TOKENIZER_FILES + ("*.safetensors", "model.safetensors.index.json")


def offline_mode() -> bool:
    """HF_HUB_OFFLINE or STABLELM_LSP_OFFLINE set (to anything but 0): nothing is downloaded."""
    return any(os.environ.get(name, "") not in ("", "0")
               for name in ("HF_HUB_OFFLINE", "STABLELM_LSP_OFFLINE"))


def has_weights(path: Path) -> bool:
    return any(path.glob("*.safetensors")) or any(path.glob("pytorch_model*.bin"))


def resolve_checkpoint(path_or_id: str | os.PathLike, offline: bool | None = None,
                       files: Sequence[str] = CHECKPOINT_FILES,
                       complete: Callable[[Path], bool] = has_weights) -> Path:
    """A local folder, or the cached snapshot of a Hub model id with `files` (glob patterns).

    A cached snapshot that is not `complete` (a tokenizer fetched for a remote engine, and now
    the weights are wanted) is fetched again unless offline."""
    text = os.fspath(path_or_id)
    if not text.strip():
        raise CheckpointNotFound("no model given (empty path)")
    path = Path(text).expanduser()
    if path.exists():
        if not path.is_dir():
            raise CheckpointNotFound(f"{path} is a file; give the checkpoint's folder")
        return path
    if not HUB_ID.match(text) or text.startswith((".", "/", "~")):
        raise CheckpointNotFound(f"{path}: no such folder")
    if offline is None:
        offline = offline_mode()
    try:
        from huggingface_hub import snapshot_download
    except ImportError:  # pragma: no cover - huggingface_hub is a dependency
        raise CheckpointNotFound(f"{text}: no such folder") from None
    try:
        cached = Path(snapshot_download(text, allow_patterns=list(files), local_files_only=True))
        if complete(cached):
            return cached
    except Exception:
        cached = None
    if offline:
        where = "incomplete in" if cached is not None else "not in"
        raise CheckpointNotFound(
            f"{text}: no such folder, and {where} the Hugging Face cache (offline)") from None
    try:
        return Path(snapshot_download(text, allow_patterns=list(files)))
    except Exception as exc:
        raise CheckpointNotFound(f"{text}: no such folder, and the Hub download failed "
                                 f"({type(exc).__name__})") from None
