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
from stablelm_lsp.inference.remote.engines import display_url

from .settings import Settings

log = logging.getLogger(__name__)

Loader = Callable[[str | None, BackendOptions], Backend]


class LoadCancelled(Exception):
    """Raised by a load's progress callback when the load is no longer wanted."""


def _backend_status(backend: Backend, loading: dict) -> dict:
    """The status fields a loaded backend gives: where it runs and, for a remote engine, whether
    it answers. The name stays the one reported while loading (a remote engine's served model
    when none was named); the path is where the model or its tokenizer was read from."""
    info, health = backend.info, backend.health
    status = {"state": "ready" if health.ok else "error", "builtin": info.builtin,
              "device": info.device, "dtype": info.dtype}
    if "endpoint" in loading:
        status["path"] = None if info.path == info.device else info.path
        if loading.get("model") is None and health.ok:
            status["model"] = info.name
    else:
        status["path"] = os.path.abspath(info.path)
    if not health.ok:
        status.update(message=health.message, fault=health.fault)
    return status


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
        described = describe_model(settings.model, settings.endpoint)
        where = {"device": settings.device, "dtype": settings.dtype}
        if settings.endpoint is not None:
            shown = display_url(settings.endpoint)
            where = {"device": shown, "dtype": settings.endpoint_kind, "endpoint": shown}
        with self._lock:
            if self._closed:
                return
            self._generation += 1
            generation = self._generation
            old, self._backend = self._backend, None
            self._status = {"state": "loading", **described, **where}
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
        if settings.endpoint is not None:
            label = f"{settings.model or 'the served model'} at {display_url(settings.endpoint)}"
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
        self._on_progress("end", 1.0, f"{name or backend.info.name} ready", generation)
        # A remote engine's health changes by itself (down, back): each change is a new status.
        backend.on_health_change(lambda health: self._health_changed(generation, backend))
        self._finish(generation, backend, None)

    def _health_changed(self, generation: int, backend: Backend) -> None:
        """A remote engine went down or came back: its status, if it is still the one in use
        (called on the backend's own thread, which must not close it)."""
        with self._lock:
            if generation != self._generation or self._backend is not backend:
                return
        self._finish(generation, backend, None)

    def _finish(self, generation: int, backend: Backend | None, status: dict | None) -> None:
        """Publish the end of load `generation`: `status` (a failure), or the state of `backend`
        (ready, or a remote engine's fault), unless a newer load replaced it."""
        with self._lock:
            current = generation == self._generation
            if current:
                self._backend = backend
                if status is None:
                    status = _backend_status(backend, self._status)
                self._status.update(status)
                if self._status["state"] != "error":
                    self._status.pop("message", None)
                    self._status.pop("fault", None)
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
