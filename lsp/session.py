"""The request lifecycle per document, without protocol types: debounce, type-through,
cancellation and stale versions.

Latest wins: an edit or a newer request for the same document cancels the running completion
(its cancel event stops the engine within one step), and an answer computed for text that has
changed since is never shown. While the user types the characters of the completion shown, its
rest is answered from memory (`ShownCompletion`) without running the model.
"""
from __future__ import annotations

import asyncio
import logging
import threading
from dataclasses import dataclass
from typing import Callable, Sequence

from stablelm_lsp.inference.api import GenerationResult
from stablelm_lsp.inference.prompts.fim import ContextFile

from .completion import Completer, ShownCompletion
from .documents import Cursor, Document, DocumentStore, EditError
from .postprocess import Completion

log = logging.getLogger(__name__)

# (path relative to its workspace folder, that folder's name, other files to offer as context)
PromptSources = Callable[[Document], tuple[str, str, Sequence[ContextFile]]]


@dataclass
class Answer:
    """What a completion request gets: `completion` None when post-processing left nothing;
    `result` None when it came from type-through memory (no model run)."""

    completion: Completion | None
    completion_id: str | None
    result: GenerationResult | None


@dataclass
class DocumentSession:
    """One document's request state."""

    inflight: threading.Event | None = None     # cancel event of the running completion
    shown: ShownCompletion | None = None        # last completion shown, for type-through

    def cancel(self) -> None:
        if self.inflight is not None:
            self.inflight.set()
            self.inflight = None


class CompletionSessions:
    """The sessions of the open documents, kept in step with `documents`."""

    def __init__(self, documents: DocumentStore):
        self.documents = documents
        self._sessions: dict[str, DocumentSession] = {}

    def session(self, uri: str) -> DocumentSession:
        return self._sessions.setdefault(uri, DocumentSession())

    def opened(self, uri: str) -> None:
        self.session(uri).cancel()
        self._sessions[uri] = DocumentSession()

    def closed(self, uri: str) -> None:
        session = self._sessions.pop(uri, None)
        if session is not None:
            session.cancel()

    def cancel_all(self, forget_shown: bool = False) -> None:
        """Cancel every running completion (and forget what was shown, when settings change)."""
        for session in self._sessions.values():
            session.cancel()
            if forget_shown:
                session.shown = None

    def edit(self, doc: Document, start: Cursor, end: Cursor, text: str, version: int) -> bool:
        """Apply an incremental edit, keeping type-through memory when it types the completion
        shown; False (and the document out of sync) when the edit cannot apply."""
        session = self.session(doc.uri)
        session.cancel()        # latest wins: an edit makes the running completion stale
        if session.shown is not None and not session.shown.observe_insert(start, end, text):
            session.shown = None
        try:
            doc.replace_range(start, end, text, version)
        except EditError as exc:
            log.error("%s: %s; completions stop until the client sends the whole text", doc.uri, exc)
            session.shown = None
            return False
        return True

    def replace_all(self, doc: Document, text: str, version: int) -> None:
        session = self.session(doc.uri)
        session.cancel()
        doc.replace_all(text, version)
        session.shown = None

    async def complete(self, doc: Document, cursor: Cursor, completer: Completer, *,
                       debounce_s: float, sources: PromptSources) -> Answer | None:
        """A completion at `cursor`, or None when the document moved on (an edit, a newer
        request) before it was ready. Raises what the completer raises (GenerationError,
        TemplateError)."""
        session = self.session(doc.uri)
        if session.shown is not None:
            remainder = session.shown.remainder(cursor)
            if remainder is not None:
                return Answer(remainder, session.shown.id, None)
        session.cancel()      # latest wins: a newer request supersedes the running one
        cancel = threading.Event()
        session.inflight = cancel
        version = doc.version

        def stale() -> bool:
            return cancel.is_set() or doc.version != version or self.documents.get(doc.uri) is not doc

        try:
            if debounce_s:
                await asyncio.sleep(debounce_s)
            if stale():
                return None
            path, repo, context_files = sources(doc)
            pending = completer.prepare(doc.lines, cursor, path=path, repo=repo,
                                        context_files=context_files, key=doc.uri)
            result = await completer.backend.agenerate(pending.request, cancel=cancel)
        finally:
            if session.inflight is cancel:
                session.inflight = None
        if stale() or result.finish_reason in ("cancelled", "superseded"):
            return None      # never show a completion for older text
        completion = completer.finish(pending, result)
        if completion is None:
            session.shown = None
            return Answer(None, None, result)
        session.shown = ShownCompletion(completion, cursor)
        return Answer(completion, session.shown.id, result)
