"""The request lifecycle per document, without protocol types: debounce, type-through,
prepared results, choices, cancellation and stale versions.

Latest wins: an edit or a newer request for the same document cancels the running completion
(its cancel event stops the engine within one step), and an answer computed for text that has
changed since is never shown. While the user types the characters of a completion shown, its
rest is answered from memory (`ShownCompletion`) without running the model; a request whose
prompt is exactly one computed ahead of time (anticipation.py) is answered with that result.
The wait before the model runs adapts to the typing rhythm and the model's latency
(debounce.py).
"""
from __future__ import annotations

import asyncio
import dataclasses
import logging
import threading
import time
from dataclasses import dataclass
from typing import Callable, Sequence

from stablelm_lsp.inference.api import GenerationResult
from stablelm_lsp.inference.lru import LRU
from stablelm_lsp.inference.prompts.fim import ContextFile

from .anticipation import AcceptWatch, Anticipation, Counters
from .completion import Completer, PendingCompletion, ShownCompletion, Suggestion
from .debounce import AdaptiveDebounce
from .documents import Cursor, Document, DocumentStore, EditError, after_insertion, with_insertion

log = logging.getLogger(__name__)

# (path relative to its workspace folder, that folder's name, other files to offer as context)
# for a cursor in a document whose lines are given (the document's own, or as they will be after
# an accept).
PromptSources = Callable[[Document, Sequence[str], Cursor], tuple[str, str, Sequence[ContextFile]]]

SHOWN_IDS = 1024            # suggestion ids an accept may name
CHOICES = 3                 # items for an explicit request: the greedy one, then sampled ones
CHOICE_ATTEMPTS = 6         # sampled completions tried to find them
CHOICE_TEMPERATURE = 0.8
CHOICE_TOP_P = 0.95


@dataclass
class Answer:
    """What a completion request gets: `suggestions` empty when post-processing left nothing;
    `result` None when it came from type-through memory, and `prepared` when it was computed
    before the request (neither ran the model for it)."""

    suggestions: list[Suggestion]
    result: GenerationResult | None
    prepared: bool = False
    context_paths: tuple[str, ...] = ()     # what the prompt had as context (other files)


@dataclass
class DocumentSession:
    """One document's request state."""

    inflight: threading.Event | None = None     # cancel event of the running completion
    shown: ShownCompletion | None = None        # last completions shown, for type-through
    caret: Cursor | None = None                 # where the last edit left the cursor

    def cancel(self) -> None:
        if self.inflight is not None:
            self.inflight.set()
            self.inflight = None


class CompletionSessions:
    """The sessions of the open documents, kept in step with `documents`."""

    def __init__(self, documents: DocumentStore):
        self.documents = documents
        self._sessions: dict[str, DocumentSession] = {}
        self.counters = Counters()
        self.anticipation = Anticipation(self.counters)
        self.debounce = AdaptiveDebounce()
        self._shown_ids: LRU[str, str] = LRU(SHOWN_IDS)      # suggestion id -> document URI

    def document_of(self, suggestion_id: str) -> str | None:
        """The URI of the document a suggestion was shown for."""
        return self._shown_ids.get(suggestion_id)

    def session(self, uri: str) -> DocumentSession:
        return self._sessions.setdefault(uri, DocumentSession())

    def opened(self, uri: str) -> None:
        self.session(uri).cancel()
        self.anticipation.discard(uri)
        self._sessions[uri] = DocumentSession()

    def closed(self, uri: str) -> None:
        session = self._sessions.pop(uri, None)
        if session is not None:
            session.cancel()
        self.anticipation.discard(uri)
        self.debounce.forget(uri)

    def cancel_all(self, forget_shown: bool = False) -> None:
        """Cancel every running completion and background one (and forget what was shown,
        when settings change)."""
        for session in self._sessions.values():
            session.cancel()
            if forget_shown:
                session.shown = None
        self.anticipation.discard_all()

    def edit(self, doc: Document, start: Cursor, end: Cursor, text: str, version: int) -> bool:
        """Apply an incremental edit, keeping type-through memory when it types the completion
        shown; False (and the document out of sync) when the edit cannot apply."""
        session = self.session(doc.uri)
        session.cancel()        # latest wins: an edit makes the running completion stale
        self.debounce.edited(doc.uri)
        if session.shown is not None and not session.shown.observe_insert(start, end, text):
            session.shown = None
        try:
            doc.replace_range(start, end, text, version)
        except EditError as exc:
            log.error("%s: %s; completions stop until the client sends the whole text", doc.uri, exc)
            session.shown = None
            self.anticipation.discard(doc.uri)
            return False
        self.anticipation.edited(doc.uri, doc.lines, start.line, end.line)
        session.caret = after_insertion(start, text)
        return True

    def replace_all(self, doc: Document, text: str, version: int) -> None:
        session = self.session(doc.uri)
        session.cancel()
        doc.replace_all(text, version)
        session.shown = None
        self.anticipation.discard(doc.uri)

    async def complete(self, doc: Document, cursor: Cursor, completer: Completer, *,
                       debounce_s: tuple[float, float], sources: PromptSources,
                       choices: int = 1, anticipate: bool = True) -> Answer | None:
        """Completions at `cursor` (up to `choices` distinct ones), or None when the document
        moved on (an edit, a newer request) before they were ready. `debounce_s`: the bounds of
        the wait before the model runs. `anticipate`: prepare what may be asked next. Raises
        what the completer raises (GenerationError, TemplateError)."""
        asked = time.monotonic()
        session = self.session(doc.uri)
        if session.shown is not None:
            remainder = session.shown.remainder(cursor)
            if remainder is not None and (choices == 1 or len(remainder) > 1):
                self.counters.requests += 1
                self.counters.type_through += 1
                return Answer(remainder, None)
        session.cancel()      # latest wins: a newer request supersedes the running one
        cancel = threading.Event()
        session.inflight = cancel
        version = doc.version

        def stale() -> bool:
            return cancel.is_set() or doc.version != version or self.documents.get(doc.uri) is not doc

        try:
            path, repo, context_files = sources(doc, doc.lines, cursor)
            pending = completer.prepare(doc.lines, cursor, path=path, repo=repo,
                                        context_files=context_files, key=doc.uri)
            result = self.anticipation.take(doc.uri, pending)
            prepared = result is not None
            if not prepared:
                delay = self.debounce.delay(doc.uri, *debounce_s)
                if delay:
                    await asyncio.sleep(delay)
                if stale():
                    return None
                started = time.monotonic()
                result = await completer.backend.agenerate(pending.request, cancel=cancel)
                self.debounce.ran(time.monotonic() - started)
            if stale() or result.finish_reason in ("cancelled", "superseded"):
                return None      # never show a completion for older text
            completions = [completer.finish(pending, result)]
            if choices > 1:
                budget = pending.request.time_budget_s
                completions += await self._sampled(completer, pending, choices, completions,
                                                   cancel, stale, None if budget is None else asked + budget)
        finally:
            if session.inflight is cancel:
                session.inflight = None
        if stale():
            return None
        self.counters.requests += 1
        if prepared:
            self.counters.prepared += 1
        else:
            self.counters.model_runs += 1
        suggestions = [Suggestion(c) for c in completions if c is not None]
        for suggestion in suggestions:
            self._shown_ids.put(suggestion.id, doc.uri)
        session.shown = ShownCompletion(suggestions, cursor) if suggestions else None
        if anticipate:
            self._anticipate(doc, cursor, completer, sources, pending, result, suggestions)
        return Answer(suggestions, result, prepared, pending.prompt.context_paths)

    async def _sampled(self, completer: Completer, pending: PendingCompletion, choices: int,
                       found: list, cancel: threading.Event, stale: Callable[[], bool],
                       deadline: float | None) -> list:
        """Sampled completions of the same prompt (its KV cache is reused: only the last prompt
        token and the new ones run) until `choices` distinct ones are found in all, before
        `deadline` (time.monotonic(); the end of the request's time budget)."""
        texts = {c.text for c in found if c is not None}
        more = []
        for seed in range(1, CHOICE_ATTEMPTS + 1):
            left = None if deadline is None else deadline - time.monotonic()
            if len(texts) >= choices or stale() or (left is not None and left <= 0):
                break
            request = dataclasses.replace(pending.request, temperature=CHOICE_TEMPERATURE,
                                          top_p=CHOICE_TOP_P, seed=seed, time_budget_s=left)
            result = await completer.backend.agenerate(request, cancel=cancel)
            if result.finish_reason in ("cancelled", "superseded"):
                break
            completion = completer.finish(pending, result)
            if completion is not None and completion.text not in texts:
                texts.add(completion.text)
                more.append(completion)
        return more

    def _anticipate(self, doc: Document, cursor: Cursor, completer: Completer,
                    sources: PromptSources, pending: PendingCompletion, result: GenerationResult,
                    suggestions: list[Suggestion]) -> None:
        """After an answer: finish it in the background if it ran out of time, else prepare the
        completion for the document as it will be once the first suggestion is accepted."""
        if not completer.backend.runs_background:
            return
        if result.finish_reason == "time":
            if self.anticipation.start(doc.uri, "timeout", pending, completer.backend):
                # the same request again gets the whole completion, not the rest of a cut one
                self.session(doc.uri).shown = None
            return
        if not suggestions:
            return
        first = suggestions[0].completion
        lines, after = with_insertion(doc.lines, cursor, first.text, first.replace)
        path, repo, context_files = sources(doc, lines, after)
        predicted = completer.prepare(lines, after, path=path, repo=repo,
                                      context_files=context_files, key=doc.uri)
        self.anticipation.start(doc.uri, "accept", predicted, completer.backend,
                                watch=AcceptWatch.of(doc.lines, cursor, first))

    def focus(self, doc: Document, cursor: Cursor, completer: Completer,
              sources: PromptSources) -> bool:
        """The cursor rests at `cursor`: prepare its completion (the document's prompt goes into
        the KV cache with it), unless a request runs for the document or a suggestion is shown
        there. Whether one was started or is under way."""
        session = self.session(doc.uri)
        if session.inflight is not None or not completer.backend.runs_background:
            return False
        if session.shown is not None and session.shown.remainder(cursor) is not None:
            return False
        path, repo, context_files = sources(doc, doc.lines, cursor)
        pending = completer.prepare(doc.lines, cursor, path=path, repo=repo,
                                    context_files=context_files, key=doc.uri)
        return self.anticipation.start(doc.uri, "focus", pending, completer.backend) is not None

    def accepted(self, doc: Document, completer: Completer, sources: PromptSources) -> None:
        """A suggestion was accepted (the editor inserted it, its edit came first): make sure
        the completion after it is prepared, where the last edit left the cursor."""
        session = self.session(doc.uri)
        if self.anticipation.get(doc.uri) is None and session.caret is not None:
            self.focus(doc, session.caret, completer, sources)
