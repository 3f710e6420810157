"""Completions computed before they are asked for.

The cache makes a keystroke cheap once a document's prompt is computed; the expensive moments
are the ones the server does not see coming. Three it can:

- a completion is shown: the user may accept it. The completion for the document as it will be
  right after the accept is computed at once (llama.vim does the same), so that the request that
  follows the accept finds it ready ("accept");
- the cursor rests (`stablelm/didFocus`, which the editors send on cursor idle and on switching
  documents): that position's completion is computed, and with it the document's prompt into
  the KV cache ("focus");
- a request ran out of time (`timeoutMs`): it is finished ("timeout").

Each is one background request (`PRIORITY_BACKGROUND`: any request runs first, waiting at most
for the forward pass in progress, and everything the background request computed stays cached
for it), made only where the backend can run background work (`Backend.runs_background`). The
result is kept per document and answers a request only when that request's prompt and
parameters are exactly the ones it was computed for. Edits that make its state unreachable
(typing that diverges from the suggestion shown; any edit, for the others) discard it and stop
its computation; a request for the document that does not match it supersedes it in the engine,
continuing from what it computed.
"""
from __future__ import annotations

import asyncio
import dataclasses
import logging
import threading
from dataclasses import dataclass
from typing import Sequence

from stablelm_lsp.inference.api import PRIORITY_BACKGROUND, Backend, GenerationResult
from stablelm_lsp.inference.prompts.lines import line_content

from .completion import PendingCompletion
from .documents import Cursor
from .postprocess import Completion

log = logging.getLogger(__name__)

# Finish reasons of a complete result; a background request stopped early is not one.
COMPLETE = ("length", "eos", "stop", "max_lines")


@dataclass
class Counters:
    """How completion requests were answered, for `stablelm.status` (and the benchmarks)."""

    requests: int = 0           # completion requests answered for an open document with a model
    model_runs: int = 0         # ... by running the model
    type_through: int = 0       # ... from the suggestion being typed (no model run)
    prepared: int = 0           # ... by a result computed before the request (no model run)
    background_runs: int = 0    # background requests started
    background_done: int = 0    # ... that completed
    background_running: int = 0  # ... still running
    discarded: int = 0          # prepared results dropped unused (edits, newer ones, stopped)

    def as_json(self) -> dict[str, int]:
        return {"requests": self.requests, "modelRuns": self.model_runs,
                "typeThrough": self.type_through, "prepared": self.prepared,
                "answeredWithoutModel": self.type_through + self.prepared,
                "backgroundRuns": self.background_runs, "backgroundDone": self.background_done,
                "backgroundRunning": self.background_running, "discarded": self.discarded}


def same_work(a: PendingCompletion, b: PendingCompletion) -> bool:
    """Whether two completions are the same work: the same prompt (and what post-processing
    reads of the document) and the same request, whatever their priority and time budget."""
    if a.prompt != b.prompt:
        return False
    return (dataclasses.replace(a.request, priority=0, time_budget_s=None)
            == dataclasses.replace(b.request, priority=0, time_budget_s=None))


@dataclass
class AcceptWatch:
    """Whether edits lead to the state after accepting a completion shown at `at`: the document's
    lines from `at.line` on are those of the suggestion typed partly, or accepted whole (in one
    edit or in pieces, its replaced closers gone). Edits elsewhere break it."""

    at: Cursor
    before: str                 # the cursor line up to `at`
    after: str                  # the cursor line after `at`, without its terminator
    terminator: str
    following: tuple[str, ...]  # the lines after the cursor line that the accepted text spans
    completion: Completion

    @classmethod
    def of(cls, lines: Sequence[str], at: Cursor, completion: Completion) -> "AcceptWatch":
        line = lines[at.line]
        content = line_content(line)
        span = completion.text.count("\n")
        return cls(at, content[:at.index], content[at.index:], line[len(content):],
                   tuple(lines[at.line + 1:at.line + 1 + span]), completion)

    def holds(self, lines: Sequence[str], first: int, last: int) -> bool:
        """After an edit of lines `first`..`last` (numbered before it), `lines` being the
        document now."""
        span = len(self.following)
        if first < self.at.line or last > self.at.line + span:
            return False
        region = "".join(lines[self.at.line:self.at.line + span + 1])
        text = self.completion.text
        if region == self.before + text + self.after[self.completion.replace:] + self.terminator:
            return True
        if not region.startswith(self.before):
            return False
        rest = region[len(self.before):]
        typed = 0
        while typed < min(len(rest), len(text)) and rest[typed] == text[typed]:
            typed += 1
        for n in range(typed, -1, -1):      # the suggestion's first n characters typed
            untouched = self.following[:span - text[:n].count("\n")]
            if rest == text[:n] + self.after + self.terminator + "".join(untouched):
                return True
        return False


@dataclass(eq=False)
class Prepared:
    """A completion computed in the background for one document state."""

    origin: str                     # accept | focus | timeout
    pending: PendingCompletion      # what it answers (its request at background priority)
    cancel: threading.Event
    task: asyncio.Future            # -> GenerationResult
    watch: AcceptWatch | None       # accept: the edits it survives; None: none

    @property
    def result(self) -> GenerationResult | None:
        """The complete result; None while it runs, or when it stopped early or failed."""
        if not self.task.done() or self.task.cancelled() or self.task.exception() is not None:
            return None
        result = self.task.result()
        return result if result.finish_reason in COMPLETE else None


class Anticipation:
    """The prepared completions of the open documents, at most one per document."""

    def __init__(self, counters: Counters):
        self.counters = counters
        self._prepared: dict[str, Prepared] = {}

    def get(self, uri: str) -> Prepared | None:
        return self._prepared.get(uri)

    def start(self, uri: str, origin: str, pending: PendingCompletion, backend: Backend,
              watch: AcceptWatch | None = None) -> Prepared | None:
        """Compute `pending` in the background for document `uri` (whose key its request
        carries), replacing what was prepared for it; None where the backend runs no background
        work. The same work already prepared or under way is kept."""
        if not backend.runs_background:
            return None
        current = self._prepared.get(uri)
        if current is not None and same_work(current.pending, pending) \
                and not (current.task.done() and current.result is None):
            current.watch = watch
            return current
        self.discard(uri)
        request = dataclasses.replace(pending.request, priority=PRIORITY_BACKGROUND,
                                      time_budget_s=None)
        cancel = threading.Event()
        task = asyncio.ensure_future(backend.agenerate(request, cancel=cancel))
        prepared = Prepared(origin, PendingCompletion(pending.prompt, request), cancel, task, watch)
        self._prepared[uri] = prepared
        self.counters.background_runs += 1
        self.counters.background_running += 1
        task.add_done_callback(lambda _: self._finished(uri, prepared))
        log.debug("%s: preparing the completion (%s)", uri, origin)
        return prepared

    def _finished(self, uri: str, prepared: Prepared) -> None:
        self.counters.background_running -= 1
        if prepared.task.cancelled():
            pass
        elif prepared.task.exception() is not None:
            log.debug("%s: background completion failed: %s", uri, prepared.task.exception())
        elif prepared.result is not None:
            self.counters.background_done += 1
            return
        if self._prepared.get(uri) is prepared:      # stopped early: nothing to answer with
            del self._prepared[uri]
            self.counters.discarded += 1

    def take(self, uri: str, pending: PendingCompletion) -> GenerationResult | None:
        """The result prepared for exactly `pending`, once complete (then forgotten). One still
        running is left alone: the request's own generation supersedes it and continues from
        what it computed."""
        prepared = self._prepared.get(uri)
        if prepared is None or not same_work(prepared.pending, pending):
            return None
        result = prepared.result
        if result is not None:
            del self._prepared[uri]
        return result

    def edited(self, uri: str, lines: Sequence[str], first: int, last: int) -> None:
        """An edit of lines `first`..`last` of document `uri`, now `lines`."""
        prepared = self._prepared.get(uri)
        if prepared is not None and (prepared.watch is None
                                     or not prepared.watch.holds(lines, first, last)):
            log.debug("%s: the edit leaves the prepared state (%s): discarded", uri, prepared.origin)
            self.discard(uri)

    def discard(self, uri: str) -> None:
        """Forget what is prepared for `uri` and stop computing it."""
        prepared = self._prepared.pop(uri, None)
        if prepared is not None:
            prepared.cancel.set()
            self.counters.discarded += 1

    def discard_all(self) -> None:
        for uri in list(self._prepared):
            self.discard(uri)
