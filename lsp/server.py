"""The language server: pygls 2.x, over stdio or TCP, hardened against what clients send.

Handlers translate between protocol types and the completion core (completion.py); the model is
behind the text-level `Backend` interface. What pygls does on its own and this module changes:

- framing is parsed by transport.py (resynchronises after a wrong Content-Length or garbage);
- invalid params get an InvalidParams response (pygls sends none), naming the bad field;
- requests before `initialize` get ServerNotInitialized, after `shutdown` InvalidRequest;
- handler exceptions become InternalError without the traceback pygls puts in `data`;
- documents live in documents.DocumentStore: URIs that are not open are never read from disk,
  edits for unknown documents and stale versions are ignored, bad edit ranges are refused;
- server-to-client requests (`window/workDoneProgress/create`, `workspace/configuration`) are
  never awaited without a timeout;
- `exit`, end of input, SIGTERM and SIGINT end the process cleanly even while a model loads:
  the load stops between tensors, and a load stuck inside torch is not waited for (`os._exit`
  once the log is flushed: a daemon thread inside torch at interpreter exit aborts the process).
  The exit code is 0 after `shutdown`, 1 otherwise.

A chat module registers its command on the server object (`server.command(...)`) and loads its
model with `server.backends.load(...)`; `server.settings.chat_model` names it and
`server.settings.chat_max_new_tokens` bounds its replies.
"""
from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import os
import re
import signal
import sys
import threading
from pathlib import PurePosixPath
from typing import Any, Callable

import cattrs
from lsprotocol import types
from pygls.capabilities import ServerCapabilitiesBuilder
from pygls.exceptions import (
    JsonRpcException,
    JsonRpcInvalidParams,
    JsonRpcInvalidRequest,
    JsonRpcServerNotInitialized,
)
from pygls.lsp.server import LanguageServer
from pygls.protocol import LanguageServerProtocol
from pygls.protocol.language_server import lsp_method
from pygls.uris import to_fs_path

from stablelm_lsp.inference.api import GenerationError
from stablelm_lsp.inference.errors import EngineError
from stablelm_lsp.inference.load import load_backend
from stablelm_lsp.inference.prompts.fim import ContextFile, TemplateError

from . import chat
from .backends import BackendManager, Loader
from .common import quiet_libraries
from .completion import Completer, ShownCompletion
from .documents import Cursor, Document, DocumentStore, EditError, PositionEncoding
from .postprocess import Completion
from .settings import SECTION, Settings, SettingsError
from .stats import Stats
from .transport import FileWriter, FramingError, StdinChunks, run_connection

log = logging.getLogger(__name__)

SERVER_NAME = "stablelm-lsp"
STATUS_NOTIFICATION = "stablelm/status"
STATUS_COMMAND = "stablelm.status"
ACCEPTED_COMMAND = "stablelm.accepted"
CLIENT_REQUEST_TIMEOUT_S = 2.0     # for answers to our own requests to the client
EXIT_WAIT_S = 1.0                  # how long an exiting server waits for a model load to stop
MAX_CONTEXT_FILES = 8              # other open documents offered as prompt context
REQUEST_FAILED = -32803

_PARSE_ERROR, _INVALID_REQUEST, _INTERNAL_ERROR = -32700, -32600, -32603
_ID_IN_BODY = re.compile(rb'"id"\s*:\s*(-?\d+|"(?:[^"\\]|\\.)*")')


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("stablelm-lsp")
    except PackageNotFoundError:
        return "0"


class StableLMProtocol(LanguageServerProtocol):
    """pygls' protocol with the guards listed in the module docstring."""

    _server: "StableLMServer"

    def __init__(self, server, converter):
        super().__init__(server, converter)
        self.initialize_received = False
        self.exit_code: int | None = None

    # -- JSON-RPC level ------------------------------------------------------------------------

    def handle_frame(self, frame: bytes | FramingError) -> None:
        """One framed body (or framing problem) from transport.run_connection."""
        if isinstance(frame, FramingError):
            log.warning("malformed input: %s", frame.message)
            if frame.salvage is None:
                return
            frame = frame.salvage
        try:
            data = json.loads(frame)
        except ValueError as exc:      # JSONDecodeError, UnicodeDecodeError
            self.send_error(_guess_id(frame), _PARSE_ERROR, f"Parse error: {exc}")
            return
        try:
            self._handle_json(data)
        except Exception:   # never let one message end the connection
            log.exception("failed to handle a message")
            if isinstance(data, dict) and "method" in data and _valid_id(data.get("id")) \
                    and data.get("id") is not None:
                self.send_error(data["id"], _INTERNAL_ERROR, "Internal error (see the server log)")

    def _handle_json(self, data: Any) -> None:
        if not isinstance(data, dict):
            self.send_error(None, _INVALID_REQUEST, "Invalid request: a message must be a JSON object")
            return
        msg_id = data.get("id")
        method = data.get("method")
        if data.get("jsonrpc") != "2.0" or not _valid_id(msg_id) \
                or ("method" in data and not isinstance(method, str)) \
                or ("method" not in data and msg_id is None):
            self.send_error(msg_id if _valid_id(msg_id) else None, _INVALID_REQUEST,
                            'Invalid request: expected {"jsonrpc": "2.0", "method": string, '
                            '"id"?: integer or string, "params"?: ...}')
            return
        try:
            message = self.structure_message(data)
        except JsonRpcException as exc:
            if method is not None and msg_id is not None:
                self._send_response(msg_id, error=exc.to_response_error())
            else:
                log.warning("dropped %s: %s", method or "a response", exc.message)
            return
        self.handle_message(message)

    def send_error(self, msg_id: int | str | None, code: int, message: str) -> None:
        self._send_data({"jsonrpc": "2.0", "id": msg_id, "error": {"code": code, "message": message}})

    def structure_message(self, data: dict):
        try:
            return super().structure_message(data)
        except JsonRpcInvalidParams as exc:
            cause = exc.__cause__
            detail = "; ".join(cattrs.transform_error(cause)) if cause is not None else ""
            raise JsonRpcInvalidParams(
                f"Invalid params for {data.get('method')}: {detail or 'wrong shape'}") from cause

    def handle_message(self, message) -> None:
        method = getattr(message, "method", None)
        is_request = method is not None and getattr(message, "id", None) is not None
        if method is not None and method != types.EXIT:
            if not self.initialize_received and method != types.INITIALIZE:
                if is_request:
                    self._send_response(message.id, error=JsonRpcServerNotInitialized(
                        "the server is not initialized: send initialize first").to_response_error())
                return
            if method == types.INITIALIZE and self.initialize_received:
                self._send_response(message.id, error=JsonRpcInvalidRequest(
                    "initialize was already received").to_response_error())
                return
            if self._shutdown:
                if is_request:
                    self._send_response(message.id, error=JsonRpcInvalidRequest(
                        "the server is shutting down").to_response_error())
                return
            if method == types.INITIALIZE:
                self.initialize_received = True
        super().handle_message(message)

    def _send_response(self, msg_id, result=None, error=None):
        if error is not None and error.data is not None:
            # pygls puts the handler's traceback here; it stays in the server's log.
            error = types.ResponseError(code=error.code, message=error.message)
        super()._send_response(msg_id, result, error)

    # -- built-in notifications pygls would handle unsafely ---------------------------------

    @lsp_method(types.EXIT)
    def lsp_exit(self, *args) -> None:
        self.exit_code = 0 if self._shutdown else 1

    @lsp_method(types.TEXT_DOCUMENT_DID_OPEN)
    def lsp_text_document__did_open(self, params: types.DidOpenTextDocumentParams) -> None:
        self._server.did_open(params)

    @lsp_method(types.TEXT_DOCUMENT_DID_CHANGE)
    def lsp_text_document__did_change(self, params: types.DidChangeTextDocumentParams) -> None:
        self._server.did_change(params)

    @lsp_method(types.TEXT_DOCUMENT_DID_CLOSE)
    def lsp_text_document__did_close(self, params: types.DidCloseTextDocumentParams) -> None:
        self._server.did_close(params)


def _valid_id(msg_id: Any) -> bool:
    return msg_id is None or (isinstance(msg_id, (int, str)) and not isinstance(msg_id, bool))


def _guess_id(body: bytes) -> int | str | None:
    """The request id of a message that does not parse, if it shows before its params."""
    head = body.split(b'"params"', 1)[0]
    match = _ID_IN_BODY.search(head)
    if match is None:
        return None
    try:
        return json.loads(match.group(1))
    except ValueError:
        return None


@dataclasses.dataclass
class _DocumentSession:
    """Per-document request state."""

    inflight: threading.Event | None = None     # cancel event of the running completion
    shown: ShownCompletion | None = None        # last completion shown, for type-through

    def cancel(self) -> None:
        if self.inflight is not None:
            self.inflight.set()
            self.inflight = None


class StableLMServer(LanguageServer):
    protocol: StableLMProtocol

    def __init__(self, settings: Settings, loader: Loader = load_backend):
        super().__init__(SERVER_NAME, _version(), protocol_cls=StableLMProtocol,
                         text_document_sync_kind=types.TextDocumentSyncKind.Incremental)
        self.settings = settings
        self.documents = DocumentStore()
        self.sessions: dict[str, _DocumentSession] = {}
        self.encoding = PositionEncoding.UTF16
        self.backends = BackendManager(self._on_status, self._on_progress, loader)
        self.completer: Completer | None = None
        self.stats = Stats(settings.stats_path())
        self.loop: asyncio.AbstractEventLoop | None = None
        self.shutdown_received = False
        self.last_run: dict | None = None    # the latest generation's numbers, for stablelm.status
        self._runs = 0
        self._settings_problems: list[str] = []
        self._faults_shown: set[str] = set()    # kinds of remote engine failure shown to the user
        self._progress_events: asyncio.Queue | None = None
        self._tasks: set[asyncio.Task] = set()
        self._stop: asyncio.Future | None = None     # set by request_stop (a signal)
        self._register_features()

    # -- running -------------------------------------------------------------------------------

    async def serve(self, read_chunk: Callable, writer) -> int:
        """Serve one connection until `exit` or end of input; returns the exit code."""
        self.loop = asyncio.get_running_loop()
        stop = self.stopping()
        self._progress_events = asyncio.Queue()
        self._spawn(self._progress_worker())
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
            for session in self.sessions.values():
                session.cancel()
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
        self.chat = chat.register(self)

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
        for session in self.sessions.values():
            session.cancel()
        self.stats.flush()

    def _on_did_change_configuration(self, params: types.DidChangeConfigurationParams) -> None:
        """Settings carried by the notification apply before the next message is handled (an
        async handler would run later, after requests sent behind it); pulled ones when the
        client answers."""
        values = params.settings
        if not values and _capability(self.client_capabilities, "workspace", "configuration"):
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
        for session in self.sessions.values():
            session.cancel()
            session.shown = None
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
        if self._progress_events is not None:
            self._in_loop(self._progress_events.put_nowait, (kind, fraction, message, load))

    async def _progress_worker(self) -> None:
        """Turns loading events into $/progress, only if the client supports work-done progress
        and answers window/workDoneProgress/create in time. A newer load ends the progress of
        the one it replaces; the replaced load's later events are dropped."""
        token: str | None = None
        percentage = -1
        sequence = 0
        current = None
        while True:
            kind, fraction, message, load = await self._progress_events.get()
            if kind != "begin" and load != current:
                continue
            if kind == "begin":
                if token is not None:
                    self.work_done_progress.end(token, types.WorkDoneProgressEnd(message="replaced"))
                token, percentage, current = None, 0, load
                if _capability(self.client_capabilities, "window", "work_done_progress"):
                    sequence += 1
                    token = await self._create_progress_token(f"stablelm-load-{sequence}")
                    if token is not None:
                        self.work_done_progress.begin(token, types.WorkDoneProgressBegin(
                            title="stablelm-lsp", message=message, percentage=0))
            elif token is not None and kind == "report":
                if int(fraction * 100) != percentage:
                    percentage = int(fraction * 100)
                    self.work_done_progress.report(token, types.WorkDoneProgressReport(
                        message=message, percentage=percentage))
            elif token is not None and kind == "end":
                self.work_done_progress.end(token, types.WorkDoneProgressEnd(message=message))
                token = None

    async def _create_progress_token(self, token: str) -> str | None:
        future = self.protocol.send_request_async(
            types.WINDOW_WORK_DONE_PROGRESS_CREATE, types.WorkDoneProgressCreateParams(token=token))
        # Not wait_for: cancelling would break pygls when a late answer arrives.
        done, _ = await asyncio.wait([future], timeout=CLIENT_REQUEST_TIMEOUT_S)
        if not done or future.exception() is not None:
            log.info("the client did not create a progress token; loading without $/progress")
            return None
        return token

    # -- documents -----------------------------------------------------------------------------

    def did_open(self, params: types.DidOpenTextDocumentParams) -> None:
        item = params.text_document
        doc = Document(item.uri, item.text, item.version, item.language_id)
        self.documents.open(doc)
        self._session(item.uri).cancel()
        self.sessions[item.uri] = _DocumentSession()
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
        session = self._session(uri)
        session.cancel()     # latest wins: an edit makes the running completion stale
        for change in params.content_changes:
            if isinstance(change, types.TextDocumentContentChangePartial):
                start = doc.cursor(change.range.start.line, change.range.start.character, self.encoding)
                end = doc.cursor(change.range.end.line, change.range.end.character, self.encoding)
                if session.shown is not None and not session.shown.observe_insert(start, end, change.text):
                    session.shown = None
                try:
                    doc.replace_range(start, end, change.text, version)
                except EditError as exc:
                    log.error("%s: %s; completions stop until the client sends the whole text",
                              uri, exc)
                    session.shown = None
                    return
            else:
                doc.replace_all(change.text, version)
                session.shown = None

    def did_close(self, params: types.DidCloseTextDocumentParams) -> None:
        uri = params.text_document.uri
        self.documents.close(uri)
        session = self.sessions.pop(uri, None)
        if session is not None:
            session.cancel()

    def _session(self, uri: str) -> _DocumentSession:
        return self.sessions.setdefault(uri, _DocumentSession())

    # -- completion ----------------------------------------------------------------------------

    async def _on_inline_completion(self, params: types.InlineCompletionParams):
        answer = await self.complete_at(params.text_document.uri, params.position)
        if answer is None:
            return types.InlineCompletionList(items=[])
        completion, cursor, doc, completion_id = answer
        return types.InlineCompletionList(items=[
            inline_item(completion, cursor, doc, self.encoding, completion_id)])

    async def _on_completion(self, params: types.CompletionParams):
        answer = await self.complete_at(params.text_document.uri, params.position)
        if answer is None:
            return types.CompletionList(is_incomplete=True, items=[])
        completion, cursor, doc, completion_id = answer
        edit_range = _range(doc, cursor, completion.replace, self.encoding)
        first_line = completion.text.strip().split("\n", 1)[0]
        item = types.CompletionItem(
            label=first_line[:80] or completion.text.strip()[:80],
            kind=types.CompletionItemKind.Text,
            detail=SERVER_NAME,
            insert_text_format=types.InsertTextFormat.PlainText,
            text_edit=types.TextEdit(range=edit_range, new_text=completion.text),
            filter_text="",
            sort_text="0",
            command=_accepted_command(completion_id),
        )
        # Incomplete: the client asks again as the user types, which type-through answers.
        return types.CompletionList(is_incomplete=True, items=[item])

    async def complete_at(self, uri: str, position: types.Position):
        """(completion, cursor, document, id) or None: the shared path of both requests."""
        doc = self.documents.get(uri)
        completer = self.completer
        if not self.settings.enabled or doc is None or doc.binary or doc.out_of_sync \
                or completer is None:
            return None
        session = self._session(uri)
        cursor = doc.cursor(position.line, position.character, self.encoding)
        if session.shown is not None:
            remainder = session.shown.remainder(cursor)
            if remainder is not None:
                return remainder, cursor, doc, session.shown.id
        session.cancel()      # latest wins: a newer request supersedes the running one
        cancel = threading.Event()
        session.inflight = cancel
        version = doc.version
        try:
            if self.settings.debounce_ms:
                await asyncio.sleep(self.settings.debounce_ms / 1000)
            if cancel.is_set() or doc.version != version or self.documents.get(uri) is not doc:
                return None
            path, repo = self.workspace_path(uri)
            try:
                pending = completer.prepare(doc.lines, cursor, path=path, repo=repo,
                                            context_files=self._context_files(doc), key=uri)
                result = await completer.backend.agenerate(pending.request, cancel=cancel)
            except EngineError as exc:      # a remote engine's fault: in the status, not per request
                log.debug("no completion for %s: %s", uri, exc)
                return None
            except (GenerationError, TemplateError) as exc:
                raise JsonRpcException(f"stablelm-lsp: {exc}", code=REQUEST_FAILED) from exc
        finally:
            if session.inflight is cancel:
                session.inflight = None
        if cancel.is_set() or doc.version != version or self.documents.get(uri) is not doc \
                or result.finish_reason in ("cancelled", "superseded"):
            return None      # the document moved on: never show a completion for older text
        self._runs += 1
        self.last_run = {"run": self._runs, "promptTokens": result.prompt_tokens,
                         "reusedTokens": result.reused_tokens,
                         "generatedTokens": len(result.token_ids),
                         "draftedTokens": result.drafted_tokens,
                         "acceptedTokens": result.accepted_tokens,
                         "finishReason": result.finish_reason,
                         "elapsedMs": round(result.elapsed_s * 1000, 1)}
        log.debug("completion %s: %s", uri, self.last_run)
        completion = completer.finish(pending, result)
        if completion is None:
            session.shown = None
            return None
        session.shown = ShownCompletion(completion, cursor)
        self.stats.record_shown(session.shown.id)
        return completion, cursor, doc, session.shown.id

    def _context_files(self, current: Document) -> list[ContextFile]:
        """Other open documents in the same language, most recently opened last."""
        others = [d for d in self.documents
                  if d is not current and not d.binary and not d.out_of_sync
                  and d.language_id == current.language_id]
        return [ContextFile(self.workspace_path(d.uri)[0], d.lines) for d in others[-MAX_CONTEXT_FILES:]]

    def workspace_path(self, uri: str) -> tuple[str, str]:
        """(path relative to its workspace folder, that folder's name) for prompt headers."""
        roots = [folder.uri for folder in self.workspace.folders.values()]
        if self.workspace.root_uri:
            roots.append(self.workspace.root_uri)
        return relative_path(uri, roots)

    # -- commands ------------------------------------------------------------------------------

    def _status_command(self, *args) -> dict:
        return {**self.backends.status, **self.stats.snapshot(),
                "statsFile": str(self.stats.path), "lastRun": self.last_run}

    def _accepted_command(self, *args) -> dict:
        if len(args) != 1 or not isinstance(args[0], dict) or not isinstance(args[0].get("id"), str):
            raise JsonRpcInvalidParams(f'{ACCEPTED_COMMAND} takes one argument: {{"id": string}}')
        return {"counted": self.stats.record_accepted(args[0]["id"])}


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


def _capability(capabilities: types.ClientCapabilities | None, *path: str) -> Any:
    value: Any = capabilities
    for name in path:
        value = getattr(value, name, None)
    return value


def _range(doc: Document, cursor: Cursor, replace: int, encoding: PositionEncoding) -> types.Range:
    start = types.Position(cursor.line, doc.column(cursor, encoding))
    end = types.Position(cursor.line, doc.column(Cursor(cursor.line, cursor.index + replace), encoding))
    return types.Range(start, end)


def _accepted_command(completion_id: str) -> types.Command:
    return types.Command(title="Accept completion", command=ACCEPTED_COMMAND,
                         arguments=[{"id": completion_id}])


def inline_item(completion: Completion, cursor: Cursor, doc: Document, encoding: PositionEncoding,
                completion_id: str) -> types.InlineCompletionItem:
    """The inline completion item for `completion` at `cursor`: a range only when it replaces
    auto-inserted closers (without one, clients insert at the cursor)."""
    return types.InlineCompletionItem(
        insert_text=completion.text,
        range=_range(doc, cursor, completion.replace, encoding) if completion.replace else None,
        command=_accepted_command(completion_id),
    )


def relative_path(uri: str, root_uris: list[str]) -> tuple[str, str]:
    """(path of `uri` relative to the innermost root containing it, that root's folder name);
    the file name alone and no repository name outside every root."""
    path = to_fs_path(uri) if uri.startswith("file:") else None
    if path is None:       # untitled:, other schemes
        return uri.split(":", 1)[-1].lstrip("/"), ""
    best: tuple[str, str] | None = None
    for root_uri in root_uris:
        root = to_fs_path(root_uri) if root_uri.startswith("file:") else None
        if not root:
            continue
        try:
            rel = os.path.relpath(path, root)
        except ValueError:      # another drive
            continue
        if not rel.startswith(".."):
            candidate = (PurePosixPath(*rel.split(os.sep)).as_posix(), os.path.basename(root.rstrip(os.sep)))
            if best is None or len(candidate[0]) < len(best[0]):
                best = candidate
    return best or (os.path.basename(path), "")


# -- entry points ------------------------------------------------------------------------------

def configure_logging(log_file: str | None, level: str) -> None:
    """Log to `log_file` or stderr, never stdout; chatty libraries only from WARNING unless the
    level is DEBUG (common.quiet_libraries)."""
    handler = logging.FileHandler(log_file, encoding="utf-8") if log_file else logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    if root.level > logging.DEBUG:
        quiet_libraries()


def exit_now(code: int) -> None:
    """End the process without the interpreter's shutdown (which aborts with "terminate called
    without an active exception" when a daemon thread is inside torch), output flushed first."""
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    os._exit(code)


def _handle_signals(server: StableLMServer) -> None:
    """SIGTERM and SIGINT stop serving as end of input does (a second one exits at once)."""
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):   # Windows
            loop.add_signal_handler(signum, server.request_stop)


def serve_stdio(server: StableLMServer) -> int:
    """Serve on stdin/stdout. File descriptor 1 is pointed at stderr first, so that nothing but
    protocol messages can reach the client's pipe (a stray print, a C library's output)."""
    protocol_out = os.fdopen(os.dup(sys.stdout.fileno()), "wb")
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())
    sys.stdout = sys.stderr

    async def main() -> int:
        _handle_signals(server)
        chunks = StdinChunks(sys.stdin.fileno(), asyncio.get_running_loop())
        return server.exit_when_loads_stop(await server.serve(chunks.read, FileWriter(protocol_out)))

    return asyncio.run(main())


def serve_tcp(server: StableLMServer, host: str, port: int) -> int:
    """Serve one client over TCP (bound to `host`, 127.0.0.1 unless told otherwise)."""

    async def main() -> int:
        finished: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        connected = False
        _handle_signals(server)

        async def on_client(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            nonlocal connected
            if connected:
                writer.close()     # one client per server, as with stdio
                return
            connected = True
            try:
                code = await server.serve(lambda: reader.read(1 << 16), writer)
            finally:
                writer.close()
            if not finished.done():
                finished.set_result(code)

        listener = await asyncio.start_server(on_client, host, port)
        for sock in listener.sockets:
            address = sock.getsockname()
            print(f"stablelm-lsp: listening on {address[0]}:{address[1]}", file=sys.stderr, flush=True)
        async with listener:
            await asyncio.wait([finished, server.stopping()], return_when=asyncio.FIRST_COMPLETED)
            if not finished.done() and connected:     # a signal: the connection is closing
                await finished
            # No client yet when a signal came: exit code 1 (no shutdown).
            return server.exit_when_loads_stop(finished.result() if finished.done() else 1)

    return asyncio.run(main())
