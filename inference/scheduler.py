"""One worker thread owns the model; requests from any thread queue for it.

A request may carry a key (a document URI). A newer request with the same key supersedes the
older one: still queued, it is answered at once without running; already running, it is told to
stop at its next step. A caller's cancel event is honoured the same way.
"""
from __future__ import annotations

import threading
from collections import deque
from concurrent.futures import Future, TimeoutError as FutureTimeout
from typing import Callable, Generic, TypeVar

from .errors import EngineClosed

T = TypeVar("T")

# How often a caller blocked on a queued job looks at its cancel event. A job that is already
# running checks the event itself on every decode step.
_CANCEL_POLL_S = 0.02


class Job(Generic[T]):
    def __init__(self, run: Callable[["Job[T]"], T], dropped: Callable[[str], T],
                 key: str | None, cancel: threading.Event | None):
        self.run = run                  # called on the worker thread
        self.dropped = dropped          # reason -> the answer for a job stopped before it ran
        self.key = key
        self.cancel = cancel or threading.Event()
        self.superseded = threading.Event()
        self.future: Future[T] = Future()

    def stop_reason(self) -> str | None:
        """"superseded" or "cancelled" once the job should stop; checked every decode step."""
        if self.superseded.is_set():
            return "superseded"
        if self.cancel.is_set():
            return "cancelled"
        return None


class Scheduler:
    def __init__(self, name: str = "stablelm-engine"):
        self._cond = threading.Condition()
        self._queue: deque[Job] = deque()
        self._running: Job | None = None
        self._closed = False
        self._thread = threading.Thread(target=self._work, name=name, daemon=True)
        self._thread.start()

    def run(self, run: Callable[[Job[T]], T], dropped: Callable[[str], T], *,
            key: str | None = None, cancel: threading.Event | None = None) -> T:
        """Queues `run` and blocks until it (or its replacement answer) is done."""
        job = self.submit(run, dropped, key=key, cancel=cancel)
        while True:
            try:
                return job.future.result(timeout=_CANCEL_POLL_S)
            except FutureTimeout:
                if job.cancel.is_set():
                    self._drop_if_queued(job, "cancelled")

    def submit(self, run: Callable[[Job[T]], T], dropped: Callable[[str], T], *,
               key: str | None = None, cancel: threading.Event | None = None) -> Job[T]:
        job = Job(run, dropped, key, cancel)
        with self._cond:
            if self._closed:
                raise EngineClosed("the engine is closed")
            if key is not None:
                for old in [j for j in self._queue if j.key == key]:
                    self._queue.remove(old)
                    old.superseded.set()
                    old.future.set_result(old.dropped("superseded"))
                if self._running is not None and self._running.key == key:
                    self._running.superseded.set()
            self._queue.append(job)
            self._cond.notify()
        return job

    def close(self) -> None:
        """Answers queued jobs as cancelled, stops the running one, joins the worker."""
        with self._cond:
            if self._closed:
                return
            self._closed = True
            while self._queue:
                job = self._queue.popleft()
                job.future.set_result(job.dropped("cancelled"))
            if self._running is not None:
                self._running.cancel.set()
            self._cond.notify()
        if threading.current_thread() is not self._thread:
            self._thread.join()

    @property
    def pending(self) -> int:
        """Jobs queued or running."""
        with self._cond:
            return len(self._queue) + (self._running is not None)

    def _drop_if_queued(self, job: Job, reason: str) -> None:
        with self._cond:
            if job in self._queue:
                self._queue.remove(job)
                job.future.set_result(job.dropped(reason))

    def _work(self) -> None:
        while True:
            with self._cond:
                while not self._queue and not self._closed:
                    self._cond.wait()
                if not self._queue:
                    return
                job = self._running = self._queue.popleft()
            try:
                reason = job.stop_reason()
                job.future.set_result(job.dropped(reason) if reason else job.run(job))
            except BaseException as exc:  # handed to the caller, the worker lives on
                job.future.set_exception(exc)
            finally:
                with self._cond:
                    self._running = None
