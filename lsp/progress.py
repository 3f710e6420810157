"""Model loading shown as `$/progress`, when the client supports work-done progress.

The loading thread's events (backends.BackendManager's on_progress) are queued on the event loop
and turned into begin/report/end notifications by one task. The client must create the token
first (`window/workDoneProgress/create`); a client that does not answer within
CLIENT_REQUEST_TIMEOUT_S gets no progress, and loading goes on regardless.
"""
from __future__ import annotations

import asyncio
import logging
from typing import Any

from lsprotocol import types
from pygls.lsp.server import LanguageServer

log = logging.getLogger(__name__)

CLIENT_REQUEST_TIMEOUT_S = 2.0     # for answers to our own requests to the client


def capability(capabilities: types.ClientCapabilities | None, *path: str) -> Any:
    """capabilities.path[0].path[1]..., None where the client left something out."""
    value: Any = capabilities
    for name in path:
        value = getattr(value, name, None)
    return value


class LoadProgress:
    """Turns loading events (kind: begin|report|end, fraction, message, load) into $/progress.
    A newer load ends the progress of the one it replaces; the replaced load's later events are
    dropped."""

    def __init__(self, server: LanguageServer):
        self._server = server
        self._events: asyncio.Queue = asyncio.Queue()

    def put(self, kind: str, fraction: float, message: str, load: int) -> None:
        """Queue an event; on the event loop's thread."""
        self._events.put_nowait((kind, fraction, message, load))

    async def run(self) -> None:
        server = self._server
        token: str | None = None
        percentage = -1
        sequence = 0
        current = None
        while True:
            kind, fraction, message, load = await self._events.get()
            if kind != "begin" and load != current:
                continue
            if kind == "begin":
                if token is not None:
                    server.work_done_progress.end(token, types.WorkDoneProgressEnd(message="replaced"))
                token, percentage, current = None, 0, load
                if capability(server.client_capabilities, "window", "work_done_progress"):
                    sequence += 1
                    token = await self._create_token(f"stablelm-load-{sequence}")
                    if token is not None:
                        server.work_done_progress.begin(token, types.WorkDoneProgressBegin(
                            title="stablelm-lsp", message=message, percentage=0))
            elif token is not None and kind == "report":
                if int(fraction * 100) != percentage:
                    percentage = int(fraction * 100)
                    server.work_done_progress.report(token, types.WorkDoneProgressReport(
                        message=message, percentage=percentage))
            elif token is not None and kind == "end":
                server.work_done_progress.end(token, types.WorkDoneProgressEnd(message=message))
                token = None

    async def _create_token(self, token: str) -> str | None:
        future = self._server.protocol.send_request_async(
            types.WINDOW_WORK_DONE_PROGRESS_CREATE, types.WorkDoneProgressCreateParams(token=token))
        # Not wait_for: cancelling would break pygls when a late answer arrives.
        done, _ = await asyncio.wait([future], timeout=CLIENT_REQUEST_TIMEOUT_S)
        if not done or future.exception() is not None:
            log.info("the client did not create a progress token; loading without $/progress")
            return None
        return token
