"""The completion model's life cycle in the server: background loading, status, swapping.

lsp/ only sees the text-level `Backend` interface (inference/api.py); `load_local_backend` is the
one place that picks the in-process implementation. The chat module loads its own model through
`BackendManager.load` so that both go through the same path and settings.

Loads stop early when they are no longer wanted (a newer load, or the server exiting): the
progress callback, called between tensors, raises `LoadCancelled`. A load still busy inside torch
cannot be stopped; `wait_idle` tells the server whether it has to exit without waiting for it.
"""
from __future__ import annotations

import importlib.util
import logging
import os
import threading
import time
from pathlib import Path
from typing import Callable

from stablelm_lsp.inference.api import Backend

from .settings import Settings

log = logging.getLogger(__name__)

# progress(fraction in [0, 1], message) while a checkpoint loads
Progress = Callable[[float, str], None]
Loader = Callable[[str | None, Settings, Progress], Backend]


class LoadCancelled(Exception):
    """Raised by a load's progress callback when the load is no longer wanted."""


def builtin_model_dir() -> Path | None:
    """models/builtin/ found without importing stablelm_lsp.models (which imports torch)."""
    spec = importlib.util.find_spec("stablelm_lsp.models")
    locations = spec.submodule_search_locations if spec is not None else None
    return Path(list(locations)[0]) / "builtin" if locations else None


def describe_model(model: str | None) -> dict:
    """{model, path, builtin} for the status, the same before and after loading: `model` is the
    Hub id as given or the checkpoint folder's name; `path` the folder (None for a Hub id until it
    is found in the cache)."""
    if model is None:
        folder = builtin_model_dir()
        return {"model": folder.name if folder else "builtin",
                "path": os.path.abspath(folder) if folder else None, "builtin": True}
    local = Path(model).expanduser()
    if not local.exists():
        return {"model": model, "path": None, "builtin": False}
    folder = Path(os.path.abspath(local))
    builtin = builtin_model_dir()
    return {"model": folder.name or str(folder), "path": str(folder),
            "builtin": builtin is not None and folder.resolve() == builtin.resolve()}


def load_local_backend(model: str | None, settings: Settings, progress: Progress) -> Backend:
    """`model` (a folder or Hub id; None: the built-in model) in this process."""
    from stablelm_lsp.inference.backend import LocalBackend
    from stablelm_lsp.models import builtin_model_path

    return LocalBackend.load(model or str(builtin_model_path()), device=settings.device,
                             dtype=settings.dtype, allow_pickle=settings.allow_pickle,
                             progress=progress, prefix_reuse=settings.prefix_cache,
                             **engine_options(settings))


def engine_options(settings) -> dict:
    """The engine's options from settings (or the CLI's arguments, which use the same names)."""
    return {"attention": settings.attention, "linear": settings.linear,
            "decode_step": settings.decode_step,
            **({} if settings.speculation else {"draft_tokens": 0})}


class BackendManager:
    """Owns the completion backend. `status` is what `stablelm/status` reports:
    {state: loading|ready|error, model, builtin, device, dtype, message?, kernels?} (kernels:
    what inference/tuning.py chose, once ready)."""

    def __init__(self, on_status: Callable[[dict], None],
                 on_progress: Callable[[str, float, str, int], None],
                 loader: Loader = load_local_backend):
        """on_status(status) on every change; on_progress(kind: begin|report|end, fraction,
        message, load) while loading, `load` numbering the background loads. Both are called
        from the loading thread."""
        self._on_status = on_status
        self._on_progress = on_progress
        self._loader = loader
        self._lock = threading.Lock()
        self._idle = threading.Condition(self._lock)
        self._loads = 0             # `load` calls running
        self._threads: set[threading.Thread] = set()     # background loads running
        self._closed = False
        self._backend: Backend | None = None
        self._generation = 0        # bumped by each load; a superseded load's result is closed
        self._status: dict = {"state": "loading", "model": None, "path": None, "builtin": False,
                              "device": None, "dtype": None}

    @property
    def backend(self) -> Backend | None:
        """The ready completion backend, None while loading or after a failure."""
        return self._backend

    @property
    def status(self) -> dict:
        with self._lock:
            return dict(self._status)

    def load(self, model: str | None, settings: Settings, progress: Progress | None = None,
             wanted: Callable[[], bool] = lambda: True) -> Backend:
        """Load a model synchronously with this manager's loader (used for chat models). Raises
        LoadCancelled once the manager is closed or `wanted()` is false, at the next progress
        call (between tensors)."""
        report = progress or (lambda fraction, message: None)

        def checked(fraction: float, message: str) -> None:
            if self._closed or not wanted():
                raise LoadCancelled(f"loading {model or 'the built-in model'} was stopped")
            report(fraction, message)

        with self._lock:
            if self._closed:
                raise LoadCancelled("the server is exiting")
            self._loads += 1
        try:
            return self._loader(model, settings, checked)
        finally:
            with self._lock:
                self._loads -= 1
                self._idle.notify_all()

    def wait_idle(self, timeout: float) -> bool:
        """Wait up to `timeout` seconds for running loads to end; whether none is left."""
        deadline = time.monotonic() + timeout
        with self._lock:
            while self._loads or self._threads:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._idle.wait(left)
        return True

    def start(self, settings: Settings) -> None:
        """Load the completion model in the background, replacing the current one when done."""
        described = describe_model(settings.model)
        with self._lock:
            if self._closed:
                return
            self._generation += 1
            generation = self._generation
            old, self._backend = self._backend, None
            self._status = {"state": "loading", **described, "device": settings.device,
                            "dtype": settings.dtype}
            status = dict(self._status)
        if old is not None:
            old.close()
        self._on_status(status)
        thread = threading.Thread(target=self._load, args=(generation, settings, status["model"]),
                                  daemon=True, name="stablelm-model-loader")
        with self._lock:
            self._threads.add(thread)
        thread.start()

    def _load(self, generation: int, settings: Settings, name: str) -> None:
        try:
            self._load_and_report(generation, settings, name)
        finally:
            with self._lock:
                self._threads.discard(threading.current_thread())
                self._idle.notify_all()

    def _load_and_report(self, generation: int, settings: Settings, name: str) -> None:
        label = settings.model or "the built-in model"
        self._on_progress("begin", 0.0, f"loading {label}", generation)
        try:
            backend = self.load(
                settings.model, settings,
                lambda fraction, message: self._on_progress("report", fraction, message, generation),
                wanted=lambda: generation == self._generation)
        except LoadCancelled as exc:
            log.info("%s", exc)
            self._on_progress("end", 1.0, "stopped", generation)
            return
        except Exception as exc:   # reported to the client as state "error"; the server stays up
            log.error("could not load %s: %s", label, exc, exc_info=log.isEnabledFor(logging.DEBUG))
            self._on_progress("end", 1.0, "failed", generation)
            self._finish(generation, None, {"state": "error", "message": str(exc) or type(exc).__name__})
            return
        info = backend.info
        self._on_progress("end", 1.0, f"{name} ready", generation)
        # The name stays the one reported while loading; the path is where it was read from.
        self._finish(generation, backend, {"state": "ready", "path": os.path.abspath(info.path),
                                           "builtin": info.builtin, "device": info.device,
                                           "dtype": info.dtype, "kernels": info.kernels})

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
        """Unload the model; running loads stop at their next progress call, and no new one
        starts."""
        with self._lock:
            self._closed = True
            self._generation += 1
            backend, self._backend = self._backend, None
        if backend is not None:
            backend.close()
