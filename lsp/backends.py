"""The completion model's life cycle in the server: background loading, status, swapping.

lsp/ only sees the text-level `Backend` interface (inference/api.py); `load_local_backend` is the
one place that picks the in-process implementation. The chat module loads its own model through
`BackendManager.load` so that both go through the same path and settings.
"""
from __future__ import annotations

import logging
import threading
from typing import Callable

from stablelm_lsp.inference.api import Backend

from .settings import Settings

log = logging.getLogger(__name__)

# progress(fraction in [0, 1], message) while a checkpoint loads
Progress = Callable[[float, str], None]
Loader = Callable[[str | None, Settings, Progress], Backend]


def load_local_backend(model: str | None, settings: Settings, progress: Progress) -> Backend:
    """`model` (a folder or Hub id; None: the built-in model) in this process."""
    from stablelm_lsp.inference.backend import LocalBackend
    from stablelm_lsp.models import builtin_model_path

    return LocalBackend.load(model or str(builtin_model_path()), device=settings.device,
                             dtype=settings.dtype, allow_pickle=settings.allow_pickle,
                             progress=progress, prefix_reuse=settings.prefix_cache)


class BackendManager:
    """Owns the completion backend. `status` is what `stablelm/status` reports:
    {state: loading|ready|error, model, builtin, device, dtype, message?}."""

    def __init__(self, on_status: Callable[[dict], None],
                 on_progress: Callable[[str, float, str], None],
                 loader: Loader = load_local_backend):
        """on_status(status) on every change; on_progress(kind: begin|report|end, fraction,
        message) while loading. Both are called from the loading thread."""
        self._on_status = on_status
        self._on_progress = on_progress
        self._loader = loader
        self._lock = threading.Lock()
        self._backend: Backend | None = None
        self._generation = 0        # bumped by each load; a superseded load's result is closed
        self._status: dict = {"state": "loading", "model": None, "builtin": False,
                              "device": None, "dtype": None}

    @property
    def backend(self) -> Backend | None:
        """The ready completion backend, None while loading or after a failure."""
        return self._backend

    @property
    def status(self) -> dict:
        with self._lock:
            return dict(self._status)

    def load(self, model: str | None, settings: Settings, progress: Progress | None = None) -> Backend:
        """Load a model synchronously with this manager's loader (used for chat models)."""
        return self._loader(model, settings, progress or (lambda fraction, message: None))

    def start(self, settings: Settings) -> None:
        """Load the completion model in the background, replacing the current one when done."""
        with self._lock:
            self._generation += 1
            generation = self._generation
            old, self._backend = self._backend, None
            self._status = {"state": "loading", "model": settings.model or "built-in",
                            "builtin": settings.model is None, "device": settings.device,
                            "dtype": settings.dtype}
            status = dict(self._status)
        if old is not None:
            old.close()
        self._on_status(status)
        threading.Thread(target=self._load, args=(generation, settings), daemon=True,
                         name="stablelm-model-loader").start()

    def _load(self, generation: int, settings: Settings) -> None:
        label = settings.model or "the built-in model"
        self._on_progress("begin", 0.0, f"loading {label}")
        try:
            backend = self.load(settings.model, settings,
                                lambda fraction, message: self._on_progress("report", fraction, message))
        except Exception as exc:   # reported to the client as state "error"; the server stays up
            log.error("could not load %s: %s", label, exc, exc_info=log.isEnabledFor(logging.DEBUG))
            self._on_progress("end", 1.0, "failed")
            self._finish(generation, None, {"state": "error", "message": str(exc) or type(exc).__name__})
            return
        info = backend.info
        self._on_progress("end", 1.0, f"{info.name} ready")
        self._finish(generation, backend, {"state": "ready", "model": info.name,
                                           "builtin": info.builtin, "device": info.device,
                                           "dtype": info.dtype})

    def _finish(self, generation: int, backend: Backend | None, status: dict) -> None:
        with self._lock:
            current = generation == self._generation
            if current:
                self._backend = backend
                self._status.update(status)
                status = dict(self._status)
        if not current:
            if backend is not None:
                backend.close()
            return
        self._on_status(status)

    def close(self) -> None:
        with self._lock:
            self._generation += 1
            backend, self._backend = self._backend, None
        if backend is not None:
            backend.close()
