"""The completion model's life cycle in the server: background loading, status, swapping.

lsp/ only sees the text-level `Backend` interface (inference/api.py) and gets one from
`inference.load.load_backend` with the settings' `BackendOptions`. The chat module loads its own
model through `BackendManager.load` so that both go through the same path and options.

Loads stop early when they are no longer wanted (a newer load, or the server exiting): the
progress callback, called between tensors, raises `LoadCancelled`. A load still busy inside torch
cannot be stopped; `wait_idle` tells the server whether it has to exit without waiting for it.
"""
from __future__ import annotations

import dataclasses
import logging
import os
import threading
import time
from typing import Callable

from stablelm_lsp.inference.api import Backend
from stablelm_lsp.inference.load import BackendOptions, Progress, describe_model, load_backend

from .settings import Settings

log = logging.getLogger(__name__)

Loader = Callable[[str | None, BackendOptions], Backend]


class LoadCancelled(Exception):
    """Raised by a load's progress callback when the load is no longer wanted."""


class BackendManager:
    """Owns the completion backend. `status` is what `stablelm/status` reports:
    {state: loading|ready|error, model, builtin, device, dtype, message?}."""

    def __init__(self, on_status: Callable[[dict], None],
                 on_progress: Callable[[str, float, str, int], None],
                 loader: Loader = load_backend):
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

    def load(self, model: str | None, options: BackendOptions,
             wanted: Callable[[], bool] = lambda: True) -> Backend:
        """Load a model synchronously with this manager's loader (used for chat models), reporting
        to `options.progress`. Raises LoadCancelled once the manager is closed or `wanted()` is
        false, at the next progress call (between tensors)."""
        report = options.progress or (lambda fraction, message: None)

        def checked(fraction: float, message: str) -> None:
            if self._closed or not wanted():
                raise LoadCancelled(f"loading {model or 'the built-in model'} was stopped")
            report(fraction, message)

        with self._lock:
            if self._closed:
                raise LoadCancelled("the server is exiting")
            self._loads += 1
        try:
            return self._loader(model, dataclasses.replace(options, progress=checked))
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
            progress: Progress = lambda fraction, message: self._on_progress(
                "report", fraction, message, generation)
            backend = self.load(settings.model, settings.backend_options(progress),
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
        """Unload the model; running loads stop at their next progress call, and no new one
        starts."""
        with self._lock:
            self._closed = True
            self._generation += 1
            backend, self._backend = self._backend, None
        if backend is not None:
            backend.close()
