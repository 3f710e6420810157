"""JSON-RPC hardening: pygls' protocol with the guards a careful server needs.

What pygls does on its own and this protocol changes:

- framing is parsed by transport.py (resynchronises after a wrong Content-Length or garbage);
- invalid params get an InvalidParams response (pygls sends none), naming the bad field;
- requests before `initialize` get ServerNotInitialized, after `shutdown` InvalidRequest;
- handler exceptions become InternalError without the traceback pygls puts in `data`;
- document notifications go to the server's own handlers (documents.DocumentStore: URIs that are
  not open are never read from disk, edits for unknown documents and stale versions are ignored);
- `$/cancelRequest` also sets the request's `cancel_event()`, which work running in threads
  checks: pygls cancels a coroutine at its next `await`, and an executeCommand coroutine not at all.
"""
from __future__ import annotations

import json
import logging
import re
import threading
from typing import TYPE_CHECKING, Any

import cattrs
from lsprotocol import types
from pygls.exceptions import (
    JsonRpcException,
    JsonRpcInvalidParams,
    JsonRpcInvalidRequest,
    JsonRpcServerNotInitialized,
)
from pygls.protocol import LanguageServerProtocol
from pygls.protocol.language_server import lsp_method

from .transport import FramingError

if TYPE_CHECKING:
    from .server import StableLMServer

log = logging.getLogger(__name__)

REQUEST_FAILED = types.LSPErrorCodes.RequestFailed.value   # -32803

_PARSE_ERROR, _INVALID_REQUEST, _INTERNAL_ERROR = -32700, -32600, -32603
_ID_IN_BODY = re.compile(rb'"id"\s*:\s*(-?\d+|"(?:[^"\\]|\\.)*")')


class StableLMProtocol(LanguageServerProtocol):
    """pygls' protocol with the guards listed in the module docstring."""

    _server: "StableLMServer"

    def __init__(self, server, converter):
        super().__init__(server, converter)
        self.initialize_received = False
        self.exit_code: int | None = None
        # requests received and not answered yet -> set by their $/cancelRequest
        self._cancel_events: dict[int | str, threading.Event] = {}

    def cancel_event(self) -> threading.Event:
        """The cancel event of the request being handled (a handler's coroutine calls this):
        set when the client cancels it, already set when it was answered as cancelled before
        the handler ran. A fresh event outside a request (a direct call)."""
        msg_id = self.msg_id
        if msg_id is None:
            return threading.Event()
        event = self._cancel_events.get(msg_id)
        if event is None:       # answered already: only a cancelled request is answered unrun
            event = threading.Event()
            event.set()
        return event

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
        if method == types.CANCEL_REQUEST:
            event = self._cancel_events.get(message.params.id)
            if event is not None:
                event.set()
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
        if is_request:
            self._cancel_events[message.id] = threading.Event()
        super().handle_message(message)

    def _send_response(self, msg_id, result=None, error=None):
        self._cancel_events.pop(msg_id, None)
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
