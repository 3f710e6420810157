"""The language server: pygls 2.x, over stdio or TCP; one thin handler per feature.

Handlers translate between protocol types and the parts that know no protocol: documents
(documents.py), the per-document request lifecycle (session.py: debounce, type-through,
cancellation, stale versions), the completion core (completion.py) and the chat (chat.py). The
model is behind the text-level `Backend` interface, loaded by backends.BackendManager. The
JSON-RPC hardening is protocol.py, `$/progress` while loading progress.py, protocol items
items.py, and the process around a connection (logging, signals, stdio/TCP) process.py.

- documents live in documents.DocumentStore: URIs that are not open are never read from disk,
  edits for unknown documents and stale versions are ignored, bad edit ranges are refused;
- every edit is recorded in the context ring (inference/prompts/ring.py), whose chunks other
  documents' prompts get as context; `stablelm/didFocus` (the cursor rests) and shown
  suggestions let the server prepare the next completion before it is asked for
  (anticipation.py);
- server-to-client requests (`window/workDoneProgress/create`, `workspace/configuration`) are
  never awaited without a timeout.
"""
from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
from typing import Any, Callable

from lsprotocol import types
from pygls.capabilities import ServerCapabilitiesBuilder
from pygls.exceptions import JsonRpcException, JsonRpcInvalidParams
from pygls.lsp.server import LanguageServer

from stablelm_lsp.inference.api import GenerationError
from stablelm_lsp.inference.errors import EngineError
from stablelm_lsp.inference.load import load_backend
from stablelm_lsp.inference.prompts.fim import ContextFile, TemplateError
from stablelm_lsp.inference.prompts.ring import EditRing

from .backends import BackendManager, Loader
from .chat import (CHAT_COMMAND, CHAT_DELTA_NOTIFICATION, ChatModels, ChatService, DocumentContext,
                   parse_params)
from .completion import Completer
from .documents import Cursor, Document, DocumentStore, PositionEncoding, relative_path
from .items import ACCEPTED_COMMAND, SERVER_NAME, completion_item, inline_item
from .process import exit_now
from .progress import CLIENT_REQUEST_TIMEOUT_S, LoadProgress, capability
from .protocol import REQUEST_FAILED, StableLMProtocol
from .session import CHOICES, CompletionSessions
from .settings import SECTION, Settings, SettingsError
from .stats import Stats
from .transport import run_connection

log = logging.getLogger(__name__)

STATUS_NOTIFICATION = "stablelm/status"
STATUS_COMMAND = "stablelm.status"
FOCUS_NOTIFICATION = "stablelm/didFocus"
EXIT_WAIT_S = 1.0                  # how long an exiting server waits for a model load to stop
MAX_CONTEXT_FILES = 8              # other open documents offered as prompt context


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("stablelm-lsp")
    except PackageNotFoundError:
        return "0"


class StableLMServer(LanguageServer):
    protocol: StableLMProtocol

    def __init__(self, settings: Settings, loader: Loader = load_backend):
        super().__init__(SERVER_NAME, _version(), protocol_cls=StableLMProtocol,
                         text_document_sync_kind=types.TextDocumentSyncKind.Incremental)
        self.settings = settings
        self.documents = DocumentStore()
        self.sessions = CompletionSessions(self.documents)
        self.ring = EditRing()
        self.encoding = PositionEncoding.UTF16
        self.backends = BackendManager(self._on_status, self._on_progress, loader)
        self.completer: Completer | None = None
        self.stats = Stats(settings.stats_path())
        self.chat = ChatService(
            DocumentContext(self.documents, lambda uri: self.workspace_path(uri)[0],
                            lambda: self.encoding),
            ChatModels(self.backends, lambda: self.settings), lambda: self.settings,
            self._send_chat_delta)
        self.loop: asyncio.AbstractEventLoop | None = None
        self.shutdown_received = False
        self.last_run: dict | None = None    # the latest generation's numbers, for stablelm.status
        self._runs = 0
        self._settings_problems: list[str] = []
        self._faults_shown: set[str] = set()    # kinds of remote engine failure shown to the user
        self._progress: LoadProgress | None = None
        self._tasks: set[asyncio.Task] = set()
        self._stop: asyncio.Future | None = None     # set by request_stop (a signal)
        self._register_features()

    # -- running -------------------------------------------------------------------------------

    async def serve(self, read_chunk: Callable, writer) -> int:
        """Serve one connection until `exit` or end of input; returns the exit code."""
        self.loop = asyncio.get_running_loop()
        stop = self.stopping()
        self._progress = LoadProgress(self)
        self._spawn(self._progress.run())
        self.protocol.set_writer(writer)
        connection = asyncio.ensure_future(run_connection(
            read_chunk, self.protocol.handle_frame, lambda: self.protocol.exit_code is not None))
        try:
            await asyncio.wait([connection, stop], return_when=asyncio.FIRST_COMPLETED)
            if connection.done():
                connection.result()
            else:
                log.info("stopping on a signal")
                connection.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await connection
        finally:
            self.sessions.cancel_all()
            self.backends.close()
            self.chat.close()
            self.stats.flush()
        if self.protocol.exit_code is not None:
            return self.protocol.exit_code
        return 0 if self.shutdown_received else 1

    def stopping(self) -> asyncio.Future:
        """Done once request_stop was called (on the running loop)."""
        if self._stop is None:
            self._stop = asyncio.get_running_loop().create_future()
        return self._stop

    def request_stop(self) -> None:
        """End serving as at end of input (from a signal handler on the loop); a second request
        exits at once."""
        stop = self.stopping()
        if stop.done():
            log.warning("stopping again: exiting now")
            exit_now(1)
        stop.set_result(None)

    def exit_when_loads_stop(self, code: int) -> int:
        """`code`, once no model load is running any more; a load still running after
        EXIT_WAIT_S (stuck inside torch) ends the process here, log flushed, with `code`."""
        if not self.backends.wait_idle(EXIT_WAIT_S):
            log.info("a model is still loading: exiting without waiting for it")
            exit_now(code)
        return code

    def _spawn(self, coro) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _in_loop(self, func: Callable, *args) -> None:
        """Run `func` on the event loop thread (all protocol output goes from there)."""
        if self.loop is None:
            return
        try:
            if asyncio.get_running_loop() is self.loop:
                func(*args)
                return
        except RuntimeError:
            pass
        try:
            self.loop.call_soon_threadsafe(func, *args)
        except RuntimeError:       # the loop is closed: the server is exiting
            pass

    # -- features ------------------------------------------------------------------------------

    def _register_features(self) -> None:
        self.feature(types.INITIALIZE)(_handler(self._on_initialize))
        self.feature(types.INITIALIZED)(_handler(self._on_initialized))
        self.feature(types.SHUTDOWN)(_handler(self._on_shutdown))
        self.feature(types.WORKSPACE_DID_CHANGE_CONFIGURATION)(
            _handler(self._on_did_change_configuration))
        self.feature(types.TEXT_DOCUMENT_INLINE_COMPLETION,
                     types.InlineCompletionOptions())(_handler(self._on_inline_completion))
        self.feature(types.TEXT_DOCUMENT_COMPLETION, types.CompletionOptions(resolve_provider=False))(
            _handler(self._on_completion))
        self.command(STATUS_COMMAND)(_handler(self._status_command))
        self.command(ACCEPTED_COMMAND)(_handler(self._accepted_command))
        self.command(CHAT_COMMAND)(_handler(self._chat_command))
        self.feature(FOCUS_NOTIFICATION)(_handler(self._on_did_focus))

    def _on_initialize(self, params: types.InitializeParams) -> None:
        encoding = ServerCapabilitiesBuilder.choose_position_encoding(params.capabilities)
        self.encoding = PositionEncoding(str(encoding.value if hasattr(encoding, "value") else encoding))
        self._apply_settings(params.initialization_options, reload=False)
        log.info("client %s, position encoding %s",
                 params.client_info.name if params.client_info else "unknown", self.encoding.value)

    def _on_initialized(self, params: types.InitializedParams) -> None:
        for problem in self._settings_problems:
            self.window_show_message(types.ShowMessageParams(types.MessageType.Warning,
                                                             f"stablelm-lsp: {problem}"))
        self._settings_problems.clear()
        self.backends.start(self.settings)

    def _on_shutdown(self, params: None = None) -> None:
        self.shutdown_received = True
        self.sessions.cancel_all()
        self.stats.flush()

    def _on_did_change_configuration(self, params: types.DidChangeConfigurationParams) -> None:
        """Settings carried by the notification apply before the next message is handled (an
        async handler would run later, after requests sent behind it); pulled ones when the
        client answers."""
        values = params.settings
        if not values and capability(self.client_capabilities, "workspace", "configuration"):
            self._spawn(self._pull_and_apply_configuration())
            return
        self._apply_changed_settings(values)

    async def _pull_and_apply_configuration(self) -> None:
        self._apply_changed_settings(await self._pull_configuration())

    def _apply_changed_settings(self, values: Any) -> None:
        self._apply_settings(values, reload=True)
        for problem in self._settings_problems:
            self.window_show_message(types.ShowMessageParams(types.MessageType.Warning,
                                                             f"stablelm-lsp: {problem}"))
        self._settings_problems.clear()

    async def _pull_configuration(self) -> Any:
        future = self.protocol.send_request_async(
            types.WORKSPACE_CONFIGURATION,
            types.ConfigurationParams(items=[types.ConfigurationItem(section=SECTION)]))
        done, _ = await asyncio.wait([future], timeout=CLIENT_REQUEST_TIMEOUT_S)
        if not done or future.exception() is not None:
            log.info("workspace/configuration got no answer; keeping the current settings")
            return None
        result = future.result()
        # pygls structures the answer's list as a tuple
        return result[0] if isinstance(result, (list, tuple)) and result else None

    def _apply_settings(self, values: Any, reload: bool) -> None:
        old = self.settings
        try:
            new = old.merged(values)
        except SettingsError as exc:
            new = exc.applied
            self._settings_problems.extend(exc.problems)
            log.warning("settings: %s", exc)
        self.settings = new
        if new.stats_path() != old.stats_path():
            self.stats.flush()
            self.stats = Stats(new.stats_path())
        if not reload:
            return
        self.sessions.cancel_all(forget_shown=True)
        if old.model_changed(new):
            self.completer = None
            self.backends.start(new)
        else:
            self._rebuild_completer()

    def _rebuild_completer(self) -> None:
        backend = self.backends.backend
        if backend is None:
            self.completer = None
            return
        try:
            self.completer = Completer(backend, self.settings)
        except TemplateError as exc:
            self.window_show_message(types.ShowMessageParams(
                types.MessageType.Warning, f"stablelm-lsp: {exc}; using the default layout"))
            self.completer = Completer(backend, dataclasses.replace(self.settings, template=None))

    # -- model status and progress (called from the loading thread) ---------------------------

    def _on_status(self, status: dict) -> None:
        self._in_loop(self._publish_status, status)

    def _publish_status(self, status: dict) -> None:
        if status["state"] == "loading":
            self._faults_shown.clear()
        # A remote engine that is down keeps its completer: its backend answers at once with
        # an error (completions come back empty) and learns from the requests to retry sooner.
        if self.backends.backend is not None:
            self._rebuild_completer()
        elif status["state"] == "error":
            self.completer = None
        if status["state"] == "error":
            fault = status.get("fault")
            if fault is None:
                self.window_show_message(types.ShowMessageParams(
                    types.MessageType.Error, f"stablelm-lsp: the model did not load: {status['message']}"))
            elif fault not in self._faults_shown:       # each kind once, not on every keystroke
                self._faults_shown.add(fault)
                self.window_show_message(types.ShowMessageParams(
                    types.MessageType.Error, f"stablelm-lsp: {status['message']}"))
        self.protocol.notify(STATUS_NOTIFICATION, status)

    def _on_progress(self, kind: str, fraction: float, message: str, load: int) -> None:
        if self._progress is not None:
            self._in_loop(self._progress.put, kind, fraction, message, load)

    # -- documents -----------------------------------------------------------------------------

    def did_open(self, params: types.DidOpenTextDocumentParams) -> None:
        item = params.text_document
        doc = Document(item.uri, item.text, item.version, item.language_id)
        self.documents.open(doc)
        self.sessions.opened(item.uri)
        log.debug("opened %s (%d lines%s)", item.uri, len(doc.lines), ", binary" if doc.binary else "")

    def did_change(self, params: types.DidChangeTextDocumentParams) -> None:
        uri, version = params.text_document.uri, params.text_document.version
        doc = self.documents.get(uri)
        if doc is None:
            log.warning("didChange for %s, which is not open: ignored", uri)
            return
        if version is not None and version <= doc.version:
            log.warning("didChange for %s with version %s, not newer than %s: ignored",
                        uri, version, doc.version)
            return
        version = doc.version + 1 if version is None else version
        for change in params.content_changes:
            if isinstance(change, types.TextDocumentContentChangePartial):
                start = doc.cursor(change.range.start.line, change.range.start.character, self.encoding)
                end = doc.cursor(change.range.end.line, change.range.end.character, self.encoding)
                if not self.sessions.edit(doc, start, end, change.text, version):
                    return
                if not doc.binary:
                    self.ring.record(uri, doc.language_id, doc.lines, start.line)
            else:
                self.sessions.replace_all(doc, change.text, version)

    def did_close(self, params: types.DidCloseTextDocumentParams) -> None:
        uri = params.text_document.uri
        self.documents.close(uri)
        self.sessions.closed(uri)

    # -- completion ----------------------------------------------------------------------------

    async def _on_inline_completion(self, params: types.InlineCompletionParams):
        # An explicit request (the user asked, or cycles through items) gets choices.
        invoked = params.context.trigger_kind == types.InlineCompletionTriggerKind.Invoked
        answer = await self.complete_at(params.text_document.uri, params.position,
                                        choices=CHOICES if invoked else 1)
        if answer is None:
            return types.InlineCompletionList(items=[])
        suggestions, cursor, doc = answer
        return types.InlineCompletionList(items=[
            inline_item(s.completion, cursor, doc, self.encoding, s.id) for s in suggestions])

    async def _on_completion(self, params: types.CompletionParams):
        answer = await self.complete_at(params.text_document.uri, params.position)
        if answer is None:
            return types.CompletionList(is_incomplete=True, items=[])
        (suggestion, *_), cursor, doc = answer
        # Incomplete: the client asks again as the user types, which type-through answers.
        return types.CompletionList(is_incomplete=True, items=[
            completion_item(suggestion.completion, cursor, doc, self.encoding, suggestion.id)])

    async def complete_at(self, uri: str, position: types.Position, choices: int = 1):
        """(suggestions, cursor, document) or None: the shared path of both requests."""
        doc = self.documents.get(uri)
        completer = self.completer
        if not self.settings.enabled or doc is None or doc.binary or doc.out_of_sync \
                or completer is None:
            return None
        cursor = doc.cursor(position.line, position.character, self.encoding)
        settings = self.settings
        try:
            answer = await self.sessions.complete(
                doc, cursor, completer, sources=self._prompt_sources, choices=choices,
                debounce_s=(settings.debounce_min_ms / 1000, settings.debounce_ms / 1000),
                anticipate=settings.anticipate)
        except EngineError as exc:      # a remote engine's fault: in the status, not per request
            log.debug("no completion for %s: %s", uri, exc)
            return None
        except (GenerationError, TemplateError) as exc:
            raise JsonRpcException(f"stablelm-lsp: {exc}", code=REQUEST_FAILED) from exc
        if answer is None:
            return None
        if answer.result is not None:
            if not answer.prepared:
                self._record_run(uri, answer.result, answer.context_paths)
            for suggestion in answer.suggestions:
                self.stats.record_shown(suggestion.id)
        if not answer.suggestions:
            return None
        return answer.suggestions, cursor, doc

    def _record_run(self, uri: str, result, context_paths: tuple[str, ...]) -> None:
        self._runs += 1
        self.last_run = {"run": self._runs, "promptTokens": result.prompt_tokens,
                         "reusedTokens": result.reused_tokens,
                         "generatedTokens": len(result.token_ids),
                         "draftedTokens": result.drafted_tokens,
                         "acceptedTokens": result.accepted_tokens,
                         "draftLength": result.draft_length,
                         "finishReason": result.finish_reason,
                         "elapsedMs": round(result.elapsed_s * 1000, 1),
                         "contextFiles": list(context_paths)}
        log.debug("completion %s: %s", uri, self.last_run)

    def _prompt_sources(self, doc: Document, lines, cursor: Cursor
                        ) -> tuple[str, str, list[ContextFile]]:
        """(path, repository name, context files) for a prompt at `cursor` in `doc` (as `lines`):
        the heads of the other open documents in the same language, most recently opened last,
        then the context ring's chunks for the cursor, most relevant last."""
        path, repo = self.workspace_path(doc.uri)
        others = [d for d in self.documents
                  if d is not doc and not d.binary and not d.out_of_sync
                  and d.language_id == doc.language_id]
        files = [ContextFile(self.workspace_path(d.uri)[0], d.lines) for d in others[-MAX_CONTEXT_FILES:]]
        chunks = self.ring.select(doc.uri, doc.language_id, lines, cursor.line)
        files += [chunk.context_file(self.workspace_path(chunk.uri)[0]) for chunk in chunks]
        return path, repo, files

    def workspace_path(self, uri: str) -> tuple[str, str]:
        """(path relative to its workspace folder, that folder's name) for prompt headers."""
        roots = [folder.uri for folder in self.workspace.folders.values()]
        if self.workspace.root_uri:
            roots.append(self.workspace.root_uri)
        return relative_path(uri, roots)

    # -- commands ------------------------------------------------------------------------------

    def _status_command(self, *args) -> dict:
        delay = self.sessions.debounce.last_delay_s
        return {**self.backends.status, **self.stats.snapshot(),
                "statsFile": str(self.stats.path), "lastRun": self.last_run,
                "counters": self.sessions.counters.as_json(),
                "debounceMs": None if delay is None else round(delay * 1000, 1)}

    def _accepted_command(self, *args) -> dict:
        if len(args) != 1 or not isinstance(args[0], dict) or not isinstance(args[0].get("id"), str):
            raise JsonRpcInvalidParams(f'{ACCEPTED_COMMAND} takes one argument: {{"id": string}}')
        counted = self.stats.record_accepted(args[0]["id"])
        uri = self.sessions.document_of(args[0]["id"])
        doc = self.documents.get(uri) if uri else None
        if counted and doc is not None and self._may_anticipate(doc):
            self.sessions.accepted(doc, self.completer, self._prompt_sources)
        return {"counted": counted}

    def _on_did_focus(self, params) -> None:
        """`stablelm/didFocus {uri, position}`: the cursor rests there (the editors send it on
        cursor idle and on switching documents). Prepares that position's completion."""
        try:
            uri, line, character = params.uri, params.position.line, params.position.character
            if not (isinstance(uri, str) and isinstance(line, int) and isinstance(character, int)):
                raise TypeError
        except (AttributeError, TypeError):
            log.warning("%s needs {uri: string, position: {line, character}}: ignored",
                        FOCUS_NOTIFICATION)
            return
        doc = self.documents.get(uri)
        if doc is None or not self._may_anticipate(doc):
            return
        cursor = doc.cursor(line, character, self.encoding)
        try:
            self.sessions.focus(doc, cursor, self.completer, self._prompt_sources)
        except (GenerationError, TemplateError) as exc:
            log.warning("%s: no completion prepared at %s: %s", uri, cursor, exc)

    def _may_anticipate(self, doc: Document) -> bool:
        return (self.settings.enabled and self.settings.anticipate and self.completer is not None
                and not doc.binary and not doc.out_of_sync)

    async def _chat_command(self, *arguments) -> dict:
        return await self.chat.chat(parse_params(arguments), self.protocol.cancel_event())

    def _send_chat_delta(self, chat_id: str, delta: str) -> None:
        self.protocol.notify(CHAT_DELTA_NOTIFICATION, {"chatId": chat_id, "delta": delta})


def _handler(method: Callable) -> Callable:
    """A plain function calling the bound `method`: pygls sets attributes on handlers and passes
    command arguments positionally."""
    if asyncio.iscoroutinefunction(method):
        async def handler(*args):
            return await method(*args)
    else:
        def handler(*args):
            return method(*args)
    return handler
