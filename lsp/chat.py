"""The `stablelm.chat` command: chat about the editor's code, streamed while it is generated.

Protocol (README, "Chat"): `workspace/executeCommand` with command `stablelm.chat` and one
argument `{messages: [{role, content}], context?: {uri, range?}, chatId?}` (without a chatId the
server makes one). While the reply is generated the server sends `stablelm/chatDelta`
notifications `{chatId, delta}`; the response is `{chatId, text, finishReason, promptTokens,
reusedTokens}`. `$/cancelRequest` stops generation within one decode step and is answered with
RequestCancelled (-32800).

This module checks the client's JSON (`parse_params`) and serves a chat with three narrow
collaborators: `DocumentContext` (editor context from the open documents), `ChatModels` (the chat
model, or the completion model) and a delta sender. Prompt building is inference/prompts/chat.py.
"""
from __future__ import annotations

import asyncio
import logging
import threading
import uuid
from dataclasses import dataclass
from typing import Any, Callable, Mapping

from pygls.exceptions import JsonRpcException, JsonRpcInvalidParams

from stablelm_lsp.inference.api import Backend, GenerationError
from stablelm_lsp.inference.prompts.budget import TokenCounter
from stablelm_lsp.inference.prompts.chat import (ConversationMemory, EditorContext, check_messages,
                                                 prepare_turn)
from stablelm_lsp.inference.prompts.chat_template import ROLES, ChatFormatError, ChatMessage

from .backends import BackendManager
from .documents import Cursor, Document, DocumentStore, PositionEncoding
from .protocol import REQUEST_FAILED
from .settings import Settings

log = logging.getLogger(__name__)

CHAT_COMMAND = "stablelm.chat"
CHAT_DELTA_NOTIFICATION = "stablelm/chatDelta"
MODEL_WAIT_POLL_S = 0.1     # how often a chat waiting for the completion model looks again


@dataclass(frozen=True)
class ChatParams:
    chat_id: str
    messages: list[ChatMessage]
    context: Mapping[str, Any] | None


def parse_messages(raw: Any) -> list[ChatMessage]:
    """Client JSON -> checked messages (see `check_messages`)."""
    if not isinstance(raw, (list, tuple)) or not raw:
        raise ChatFormatError("messages must be a non-empty list of {role, content} objects")
    messages: list[ChatMessage] = []
    for i, item in enumerate(raw):
        if not isinstance(item, Mapping):
            raise ChatFormatError(f"messages[{i}] must be an object with role and content")
        role, content = item.get("role"), item.get("content")
        if role not in ROLES:
            raise ChatFormatError(f"messages[{i}].role is {role!r}; expected one of {', '.join(ROLES)}")
        if not isinstance(content, str):
            raise ChatFormatError(f"messages[{i}].content must be a string")
        messages.append(ChatMessage(role, content))
    check_messages(messages)
    return messages


def parse_params(arguments: tuple) -> ChatParams:
    """The command's arguments -> ChatParams (a new chatId when the client gave none);
    InvalidParams naming what is wrong."""
    if len(arguments) != 1 or not isinstance(arguments[0], Mapping):
        raise JsonRpcInvalidParams(f"{CHAT_COMMAND} takes one argument: "
                                   "{messages: [{role, content}], context?: {uri, range?}, chatId?}")
    params = arguments[0]
    chat_id = params.get("chatId")
    if chat_id is None:
        chat_id = uuid.uuid4().hex
    elif not isinstance(chat_id, str) or not chat_id:
        raise JsonRpcInvalidParams(f"{CHAT_COMMAND}: chatId must be a non-empty string")
    try:
        messages = parse_messages(params.get("messages"))
    except ChatFormatError as exc:
        raise JsonRpcInvalidParams(f"{CHAT_COMMAND}: {exc}") from None
    context = params.get("context")
    if context is not None and not (isinstance(context, Mapping) and isinstance(context.get("uri"), str)):
        raise JsonRpcInvalidParams(f"{CHAT_COMMAND}: context must be {{uri: string, range?: Range}}")
    return ChatParams(chat_id, messages, context)


class DocumentContext:
    """Editor context from the documents open in the editor (nothing is read from disk)."""

    def __init__(self, documents: DocumentStore, path_of: Callable[[str], str],
                 encoding: Callable[[], PositionEncoding]):
        """path_of(uri): how the file is named to the model; encoding(): the negotiated one."""
        self._documents = documents
        self._path_of = path_of
        self._encoding = encoding

    def __call__(self, context: Mapping[str, Any]) -> EditorContext:
        """The open document `context.uri` with its `range` selected; InvalidParams when the
        document is not open or the range is malformed."""
        uri = context["uri"]
        doc = self._documents.get(uri)
        if doc is None:
            raise JsonRpcInvalidParams(f"{CHAT_COMMAND}: context.uri {uri} is not open in the editor")
        if doc.binary or doc.out_of_sync:
            why = "binary" if doc.binary else "out of sync with the editor"
            raise JsonRpcInvalidParams(f"{CHAT_COMMAND}: context.uri {uri} is {why}")
        path = self._path_of(uri)
        lines = list(doc.lines)      # a snapshot: edits may arrive while the prompt is built
        selection_range = context.get("range")
        if selection_range is None:
            return EditorContext(path, doc.language_id, lines)
        encoding = self._encoding()
        try:
            start = _cursor(doc, selection_range["start"], encoding)
            end = _cursor(doc, selection_range["end"], encoding)
        except (KeyError, TypeError, ValueError):
            raise JsonRpcInvalidParams(f"{CHAT_COMMAND}: context.range must be {{start: {{line, "
                                       f"character}}, end: {{line, character}}}} with whole numbers "
                                       "at or above 0") from None
        if (end.line, end.index) < (start.line, start.index):
            raise JsonRpcInvalidParams(f"{CHAT_COMMAND}: context.range ends before it starts")
        return EditorContext(path, doc.language_id, lines, selected_text(lines, start, end),
                             start.line, end.line)


def _cursor(doc: Document, position: Mapping[str, Any], encoding: PositionEncoding) -> Cursor:
    line, character = position["line"], position["character"]
    if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in (line, character)):
        raise ValueError("not a position")
    return doc.cursor(line, character, encoding)


def selected_text(lines: list[str], start: Cursor, end: Cursor) -> str:
    """The text between two cursors of the same document (lines with terminators)."""
    if start.line == end.line:
        return lines[start.line][start.index:end.index]
    return (lines[start.line][start.index:] + "".join(lines[start.line + 1:end.line])
            + lines[end.line][:end.index])


class ChatModels:
    """The model that answers chats: the `chatModel` setting's, loaded at the first chat through
    the server's BackendManager (same path and options as the completion model), else the
    completion model once it is ready."""

    def __init__(self, backends: BackendManager, settings: Callable[[], Settings]):
        self._backends = backends
        self._settings = settings
        self._chat_backend: Backend | None = None
        self._chat_backend_key: tuple | None = None     # the settings it was loaded with
        self._load_lock = asyncio.Lock()

    async def backend(self, cancel: threading.Event) -> Backend | None:
        """The chat model (loaded now if the settings name one that is not loaded), else the
        completion model once it is ready; None when cancelled while waiting for it."""
        settings = self._settings()
        if settings.chat_model is None:
            if self._chat_backend is not None:      # set earlier, no longer wanted
                async with self._load_lock:
                    self.close()
            return await self._completion_backend(cancel)
        key = (settings.chat_model, settings.backend_options())
        async with self._load_lock:
            if self._chat_backend_key != key:
                self.close()
                log.info("loading the chat model %s", settings.chat_model)
                try:
                    self._chat_backend = await asyncio.to_thread(
                        self._backends.load, settings.chat_model, key[1])
                except Exception as exc:    # a bad path or checkpoint: the user's to fix
                    log.error("could not load the chat model %s: %s", settings.chat_model, exc)
                    raise JsonRpcException(f"{CHAT_COMMAND}: the chat model {settings.chat_model} "
                                           f"did not load: {exc}", code=REQUEST_FAILED) from None
                self._chat_backend_key = key
            return self._chat_backend

    async def _completion_backend(self, cancel: threading.Event) -> Backend | None:
        backends = self._backends
        while backends.backend is None and not cancel.is_set():
            status = backends.status
            if status["state"] == "error":
                raise JsonRpcException(f"{CHAT_COMMAND}: the model did not load: "
                                       f"{status.get('message')}", code=REQUEST_FAILED)
            await asyncio.sleep(MODEL_WAIT_POLL_S)
        return None if cancel.is_set() else backends.backend

    def close(self) -> None:
        """Unload the chat model (the next chat loads it again)."""
        backend, self._chat_backend, self._chat_backend_key = self._chat_backend, None, None
        if backend is not None:
            backend.close()


class ChatService:
    """Serves `stablelm.chat`: conversation memory, prompt, streamed generation, cancellation."""

    def __init__(self, context: Callable[[Mapping[str, Any]], EditorContext], models: ChatModels,
                 settings: Callable[[], Settings], send_delta: Callable[[str, str], None]):
        """context(json): the editor context a request names; send_delta(chat_id, delta) sends
        one notification (called on the event loop)."""
        self._context = context
        self.models = models
        self._settings = settings
        self._send_delta = send_delta
        self.memory = ConversationMemory()

    async def chat(self, params: ChatParams, cancel: threading.Event) -> dict:
        """The reply to `params`. `cancel` is set when the client cancels the request (which
        then has its answer already): generation stops within one step, and no delta is sent
        after it is set."""
        context = self._context(params.context) if params.context else None
        backend = await self.models.backend(cancel)
        if backend is None:     # cancelled while the model loaded; the request is answered
            return {"chatId": params.chat_id, "text": "", "finishReason": "cancelled",
                    "promptTokens": 0, "reusedTokens": 0}
        messages, keep_from = self.memory.resolve(params.messages)
        settings = self._settings()
        try:
            # Tokenizing a long conversation takes a while: off the event loop. The counter is
            # this request's own (its cache is not thread-safe); it saves recounting the
            # context's lines while the prompt is fitted to the budget.
            prompt, request = await asyncio.to_thread(
                prepare_turn, backend.info, messages, context=context, keep_from=keep_from,
                count_tokens=TokenCounter(backend.count_tokens),
                temperature=settings.temperature, max_new_tokens=settings.chat_max_new_tokens,
                key=f"chat:{params.chat_id}")
        except ChatFormatError as exc:
            raise JsonRpcInvalidParams(f"{CHAT_COMMAND}: {exc}") from None

        loop = asyncio.get_running_loop()

        def send(delta: str) -> None:       # on the loop: nothing follows the cancelled answer
            if not cancel.is_set():
                self._send_delta(params.chat_id, delta)

        def on_delta(delta: str) -> None:   # on the engine's thread; protocol output from the loop
            if not cancel.is_set():
                loop.call_soon_threadsafe(send, delta)

        try:
            result = await backend.agenerate(request, cancel=cancel, on_delta=on_delta)
        except GenerationError as exc:
            raise JsonRpcException(f"{CHAT_COMMAND}: {exc}", code=REQUEST_FAILED) from None
        self.memory.remember(params.messages, prompt)
        log.info("chat %s: %d prompt tokens (%d reused, %d of editor context), %d history "
                 "messages dropped, %s after %.2f s", params.chat_id, result.prompt_tokens,
                 result.reused_tokens, prompt.context_tokens,
                 prompt.first_kept - (messages[0].role == "system"), result.finish_reason,
                 result.elapsed_s)
        return {"chatId": params.chat_id, "text": result.text, "finishReason": result.finish_reason,
                "promptTokens": result.prompt_tokens, "reusedTokens": result.reused_tokens}

    def close(self) -> None:
        self.models.close()
