"""One worker thread owns the model; requests from any thread queue for it.

A request may carry a key (a document URI). A newer request with the same key supersedes the
older one: still queued, it is answered at once without running; already running, it is told to
stop at its next step. A caller's cancel event is honoured the same way.

Priorities: a job's priority is a number, lower = more urgent (completions 0, a chat reply 1,
background work 2: inference/api.py). A running job calls `run_urgent` between its steps: queued
jobs more urgent than it run there and then, on the worker thread, while it waits (its state
stays as it is), so a keystroke's completion never waits for a long chat reply to finish, nor for
work done ahead of time: it waits at most for the step in progress. A job already told to stop
(superseded, cancelled) runs nothing there: it ends first and frees what it holds (its KV cache
slot), so that a newer request for the same document continues from what it computed.
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
                 key: str | None, cancel: threading.Event | None, priority: int = 0):
        self.run = run                  # called on the worker thread
        self.dropped = dropped          # reason -> the answer for a job stopped before it ran
        self.key = key
        self.priority = priority
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
        self._active: list[Job] = []    # running: the outermost first, then any it paused for
        self._closed = False
        self._thread = threading.Thread(target=self._work, name=name, daemon=True)
        self._thread.start()

    def run(self, run: Callable[[Job[T]], T], dropped: Callable[[str], T], *,
            key: str | None = None, cancel: threading.Event | None = None, priority: int = 0) -> T:
        """Queues `run` and blocks until it (or its replacement answer) is done."""
        job = self.submit(run, dropped, key=key, cancel=cancel, priority=priority)
        while True:
            try:
                return job.future.result(timeout=_CANCEL_POLL_S)
            except FutureTimeout:
                if job.cancel.is_set():
                    self._drop_if_queued(job, "cancelled")

    def submit(self, run: Callable[[Job[T]], T], dropped: Callable[[str], T], *,
               key: str | None = None, cancel: threading.Event | None = None,
               priority: int = 0) -> Job[T]:
        job = Job(run, dropped, key, cancel, priority)
        with self._cond:
            if self._closed:
                raise EngineClosed("the engine is closed")
            if key is not None:
                for old in [j for j in self._queue if j.key == key]:
                    self._queue.remove(old)
                    old.superseded.set()
                    old.future.set_result(old.dropped("superseded"))
                for running in self._active:
                    if running.key == key:
                        running.superseded.set()
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
            for running in self._active:
                running.cancel.set()
            self._cond.notify()
        if threading.current_thread() is not self._thread:
            self._thread.join()

    @property
    def pending(self) -> int:
        """Jobs queued or running."""
        with self._cond:
            return len(self._queue) + len(self._active)

    def run_urgent(self, current: Job) -> int:
        """Runs, on the worker thread and before returning, every queued job more urgent than
        `current` (the running job calling this between its steps); returns how many ran."""
        ran = 0
        while True:
            with self._cond:
                if self._closed or not self._queue or current.stop_reason():
                    return ran
                urgent = min((j for j in self._queue if j.priority < current.priority),
                             key=lambda j: j.priority, default=None)
                if urgent is None:
                    return ran
                self._queue.remove(urgent)
                self._active.append(urgent)
            self._execute(urgent)
            ran += 1

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
                # the most urgent first; FIFO among equals
                job = min(self._queue, key=lambda j: j.priority)
                self._queue.remove(job)
                self._active.append(job)
            self._execute(job)

    def _execute(self, job: Job) -> None:
        try:
            reason = job.stop_reason()
            job.future.set_result(job.dropped(reason) if reason else job.run(job))
        except BaseException as exc:  # handed to the caller, the worker lives on
            job.future.set_exception(exc)
        finally:
            with self._cond:
                self._active.remove(job)
