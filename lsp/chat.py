"""The `stablelm.chat` command: chat about the editor's code, streamed while it is generated.

Protocol (README, "Chat"): `workspace/executeCommand` with command `stablelm.chat` and one
argument `{chatId, messages: [{role, content}], context?: {uri, range?}}`. While the reply is
generated the server sends `stablelm/chatDelta` notifications `{chatId, delta}`; the response is
`{chatId, text, finishReason, promptTokens, reusedTokens}`. `$/cancelRequest` stops generation
within one decode step and is answered with RequestCancelled (-32800).

pygls answers a cancelled executeCommand itself but lets the command's coroutine run on; this
module ties the request's future to the generation's cancel event instead. Prompt building is
inference/prompts/chat.py; this module only translates protocol to it and owns the chat model,
which is loaded at the first chat (setting `chatModel`; without it the completion model answers).
"""
from __future__ import annotations

import asyncio
import logging
import threading
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Mapping

from lsprotocol import types
from pygls.exceptions import JsonRpcException, JsonRpcInvalidParams

from stablelm_lsp.inference.api import Backend, GenerationError
from stablelm_lsp.inference.prompts.budget import TokenCounter
from stablelm_lsp.inference.prompts.chat import (ConversationMemory, EditorContext, check_messages,
                                                 prepare_turn)
from stablelm_lsp.inference.prompts.chat_template import ROLES, ChatFormatError, ChatMessage

from .documents import Cursor, Document

if TYPE_CHECKING:
    from .server import StableLMServer

log = logging.getLogger(__name__)

CHAT_COMMAND = "stablelm.chat"
CHAT_DELTA_NOTIFICATION = "stablelm/chatDelta"
MODEL_WAIT_POLL_S = 0.1     # how often a chat waiting for the completion model looks again
REQUEST_FAILED = types.LSPErrorCodes.RequestFailed.value


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
    """The command's arguments -> ChatParams; InvalidParams naming what is wrong."""
    if len(arguments) != 1 or not isinstance(arguments[0], Mapping):
        raise JsonRpcInvalidParams(f"{CHAT_COMMAND} takes one argument: "
                                   "{chatId, messages: [{role, content}], context?: {uri, range?}}")
    params = arguments[0]
    chat_id = params.get("chatId")
    if not isinstance(chat_id, str) or not chat_id:
        raise JsonRpcInvalidParams(f"{CHAT_COMMAND}: chatId must be a non-empty string")
    try:
        messages = parse_messages(params.get("messages"))
    except ChatFormatError as exc:
        raise JsonRpcInvalidParams(f"{CHAT_COMMAND}: {exc}") from None
    context = params.get("context")
    if context is not None and not (isinstance(context, Mapping) and isinstance(context.get("uri"), str)):
        raise JsonRpcInvalidParams(f"{CHAT_COMMAND}: context must be {{uri: string, range?: Range}}")
    return ChatParams(chat_id, messages, context)


def editor_context(server: "StableLMServer", context: Mapping[str, Any]) -> EditorContext:
    """The open document `context.uri` with its `range` selected; InvalidParams when the document
    is not open (nothing is read from disk) or the range is malformed."""
    uri = context["uri"]
    doc = server.documents.get(uri)
    if doc is None:
        raise JsonRpcInvalidParams(f"{CHAT_COMMAND}: context.uri {uri} is not open in the editor")
    if doc.binary or doc.out_of_sync:
        why = "binary" if doc.binary else "out of sync with the editor"
        raise JsonRpcInvalidParams(f"{CHAT_COMMAND}: context.uri {uri} is {why}")
    path = server.workspace_path(uri)[0]
    lines = list(doc.lines)      # a snapshot: edits may arrive while the prompt is built
    selection_range = context.get("range")
    if selection_range is None:
        return EditorContext(path, doc.language_id, lines)
    try:
        start = _cursor(doc, selection_range["start"], server)
        end = _cursor(doc, selection_range["end"], server)
    except (KeyError, TypeError, ValueError):
        raise JsonRpcInvalidParams(f"{CHAT_COMMAND}: context.range must be {{start: {{line, "
                                   f"character}}, end: {{line, character}}}} with whole numbers "
                                   "at or above 0") from None
    if (end.line, end.index) < (start.line, start.index):
        raise JsonRpcInvalidParams(f"{CHAT_COMMAND}: context.range ends before it starts")
    return EditorContext(path, doc.language_id, lines, selected_text(lines, start, end),
                         start.line, end.line)


def _cursor(doc: Document, position: Mapping[str, Any], server: "StableLMServer") -> Cursor:
    line, character = position["line"], position["character"]
    if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in (line, character)):
        raise ValueError("not a position")
    return doc.cursor(line, character, server.encoding)


def selected_text(lines: list[str], start: Cursor, end: Cursor) -> str:
    """The text between two cursors of the same document (lines with terminators)."""
    if start.line == end.line:
        return lines[start.line][start.index:end.index]
    return (lines[start.line][start.index:] + "".join(lines[start.line + 1:end.line])
            + lines[end.line][:end.index])


class ChatService:
    """Serves `stablelm.chat` for one server: the chat model, conversation memory, cancellation."""

    def __init__(self, server: "StableLMServer"):
        self.server = server
        self.memory = ConversationMemory()
        self._chat_backend: Backend | None = None
        self._chat_backend_key: tuple | None = None     # the settings it was loaded with
        self._load_lock = asyncio.Lock()

    async def chat(self, *arguments: Any) -> dict:
        params = parse_params(arguments)
        cancel = threading.Event()
        answered = self._cancel_with_request(cancel)
        context = editor_context(self.server, params.context) if params.context else None
        backend = await self._backend(cancel)
        if backend is None:     # cancelled while the model loaded; pygls has answered already
            return {"chatId": params.chat_id, "text": "", "finishReason": "cancelled",
                    "promptTokens": 0, "reusedTokens": 0}
        messages, keep_from = self.memory.resolve(params.messages)
        settings = self.server.settings
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
        protocol = self.server.protocol

        def send(delta: str) -> None:       # on the loop: nothing follows the cancelled answer
            if not answered():
                protocol.notify(CHAT_DELTA_NOTIFICATION, {"chatId": params.chat_id, "delta": delta})

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

    def _cancel_with_request(self, cancel: threading.Event) -> Callable[[], bool]:
        """Set `cancel` when the client cancels this executeCommand request; return a test,
        for the event loop, of whether pygls has cancelled the request (and so answered it).

        pygls keeps the request's future under its id and cancels that future on $/cancelRequest
        (answering RequestCancelled from a done callback); the command coroutine runs in a task
        of its own that nothing cancels. `cancel` is set from a done callback too, one loop turn
        after the future is cancelled, while the engine may still emit deltas: the test lets the
        sender drop those, so no delta follows the answer. A request already gone from the
        table was answered before this coroutine started: it was cancelled.
        """
        protocol = self.server.protocol
        msg_id = protocol.msg_id
        if msg_id is None:      # not called through a request (a direct call in-process)
            return cancel.is_set
        future = protocol._request_futures.get(msg_id)
        if future is None:
            cancel.set()
            return cancel.is_set
        future.add_done_callback(lambda f: cancel.set() if f.cancelled() else None)
        return lambda: cancel.is_set() or future.cancelled()

    async def _backend(self, cancel: threading.Event) -> Backend | None:
        """The chat model (loaded now if the settings name one that is not loaded), else the
        completion model once it is ready; None when cancelled while waiting for it."""
        settings = self.server.settings
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
                        self.server.backends.load, settings.chat_model, key[1])
                except Exception as exc:    # a bad path or checkpoint: the user's to fix
                    log.error("could not load the chat model %s: %s", settings.chat_model, exc)
                    raise JsonRpcException(f"{CHAT_COMMAND}: the chat model {settings.chat_model} "
                                           f"did not load: {exc}", code=REQUEST_FAILED) from None
                self._chat_backend_key = key
            return self._chat_backend

    async def _completion_backend(self, cancel: threading.Event) -> Backend | None:
        backends = self.server.backends
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


def register(server: "StableLMServer") -> ChatService:
    """Add `stablelm.chat` to `server`; the returned service's close() unloads the chat model."""
    service = ChatService(server)

    async def chat_command(*arguments):     # pygls passes the command's arguments positionally
        return await service.chat(*arguments)

    server.command(CHAT_COMMAND)(chat_command)
    return service
