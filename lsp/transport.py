"""The JSON-RPC base protocol (`Content-Length` framing) over stdio or TCP, robust to broken clients.

pygls' own read loop trusts every header: a wrong Content-Length swallows the next message or
waits forever, and garbage between messages is silently skipped until the next line that happens
to parse. Here a frame parser resynchronises on the next header instead, using one fact: a header
line (`Content-Length: N` followed by a raw line break) can never occur inside a JSON body, whose
strings cannot hold raw line breaks. The connection ends cleanly at end of input.
"""
from __future__ import annotations

import asyncio
import json
import logging
import os
import re
import threading
from dataclasses import dataclass
from typing import Awaitable, Callable

log = logging.getLogger(__name__)

MAX_HEADER_BYTES = 8 << 10        # header block this long without an end is garbage
MAX_MESSAGE_BYTES = 256 << 20     # larger bodies are refused (a 5 MB document is ~6-30 MB of JSON)
IDLE_FLUSH_S = 1.0                # a body still short after this much silence is tried as it is

_HEADER_END = re.compile(rb"\r?\n\r?\n")
_CONTENT_LENGTH = re.compile(rb"content-length[ \t]*:[ \t]*(\d+)[ \t]*\r?\n", re.IGNORECASE)
_HEADER_LINE = re.compile(rb"[A-Za-z0-9-]+[ \t]*:[^\r\n]*")


@dataclass(frozen=True)
class FramingError:
    """Bytes that did not frame as declared. `salvage` holds what was received as a body (it may
    still be a complete message, or at least reveal the request id to answer)."""

    message: str
    salvage: bytes | None = None


class FrameParser:
    """Incremental parser: `feed` bytes, get complete bodies and framing errors back."""

    def __init__(self) -> None:
        self._buffer = bytearray()
        self._length: int | None = None      # body length once a header block was read
        self._scanned = 0                    # body bytes already searched for a stray header

    @property
    def awaiting_body(self) -> bool:
        """A header was read and part of its body is missing."""
        return self._length is not None

    def feed(self, data: bytes) -> list:
        self._buffer += data
        frames: list = []
        while self._step(frames):
            pass
        return frames

    def flush_idle(self) -> list:
        """After a silence: a body shorter than its Content-Length that is complete JSON on its
        own is taken (the client declared too many bytes and waits for an answer)."""
        if self._length is None or not self._buffer:
            return []
        try:
            text = self._buffer.decode("utf-8")
            _, end = json.JSONDecoder().raw_decode(text)
        except ValueError:
            return []
        if text[end:].strip():
            return []
        body = bytes(self._buffer)
        message = f"Content-Length {self._length} exceeds the {len(body)}-byte body"
        self._buffer.clear()
        self._length = None
        return [FramingError(message, salvage=body)]

    def _step(self, frames: list) -> bool:
        """Consume one header block or body if possible; False when more input is needed."""
        buffer = self._buffer
        if self._length is None:
            end = _HEADER_END.search(buffer)
            if end is None:
                if len(buffer) > MAX_HEADER_BYTES:
                    return self._resync(frames, "no message header in the input")
                return False
            block = bytes(buffer[:end.end()])
            found = list(_CONTENT_LENGTH.finditer(block))
            if not found:
                del buffer[:end.end()]
                frames.append(FramingError("a header without Content-Length was skipped"))
                return True
            header = found[-1]
            skipped = block[:header.start()]
            if any(line and not _HEADER_LINE.fullmatch(line) for line in skipped.splitlines()):
                frames.append(FramingError(f"{len(skipped)} bytes of garbage before a header "
                                           "were skipped"))
            length = int(header.group(1))
            del buffer[:end.end()]
            if length > MAX_MESSAGE_BYTES:
                frames.append(FramingError(f"a {length}-byte message exceeds the "
                                           f"{MAX_MESSAGE_BYTES}-byte limit and was skipped"))
                return True     # its body is not a header: it is dropped while resyncing
            self._length = length
            self._scanned = 0
            return True
        # Reading a body. A header inside it means the declared length overran the message.
        length = self._length
        available = min(len(buffer), length)
        overrun = _CONTENT_LENGTH.search(buffer, self._scanned, available)
        if overrun is None:
            self._scanned = max(available - 64, 0)   # a header may straddle the next chunk
        elif len(buffer) >= length or _HEADER_END.search(buffer, overrun.start()):
            salvage = bytes(buffer[:overrun.start()])
            del buffer[:overrun.start()]
            self._length = None
            frames.append(FramingError("Content-Length ran past the end of the message",
                                       salvage=salvage))
            return True
        else:
            self._scanned = overrun.start()          # wait for that header's end
        if len(buffer) < length:
            return False
        frames.append(bytes(buffer[:length]))
        del buffer[:length]
        self._length = None
        return True

    def _resync(self, frames: list, reason: str) -> bool:
        header = _CONTENT_LENGTH.search(self._buffer, 1)
        # Without a header, keep a tail that may be the start of one still arriving.
        drop = header.start() if header is not None else len(self._buffer) - 64
        del self._buffer[:drop]
        frames.append(FramingError(f"{reason}: {drop} bytes skipped"))
        return header is not None


ReadChunk = Callable[[], Awaitable[bytes]]


async def run_connection(read_chunk: ReadChunk, on_frame: Callable[[object], None],
                         stopped: Callable[[], bool]) -> None:
    """Read frames until end of input or `stopped()`, handing each to `on_frame`."""
    parser = FrameParser()
    while not stopped():
        try:
            data = await asyncio.wait_for(read_chunk(),
                                          IDLE_FLUSH_S if parser.awaiting_body else None)
        except asyncio.TimeoutError:
            for frame in parser.flush_idle():
                on_frame(frame)
            continue
        if not data:
            log.info("end of input: the client closed the connection")
            return
        for frame in parser.feed(data):
            on_frame(frame)
            if stopped():
                return


class StdinChunks:
    """Reads a file descriptor in a daemon thread (a pipe, a file or a tty alike) and hands the
    chunks to asyncio; b"" marks the end."""

    def __init__(self, fd: int, loop: asyncio.AbstractEventLoop):
        self._queue: asyncio.Queue[bytes] = asyncio.Queue()
        self._fd = fd
        self._loop = loop
        threading.Thread(target=self._pump, daemon=True, name="stablelm-stdin").start()

    def _pump(self) -> None:
        while True:
            try:
                data = os.read(self._fd, 1 << 16)
            except OSError as exc:
                log.error("reading the input failed: %s", exc)
                data = b""
            self._loop.call_soon_threadsafe(self._queue.put_nowait, data)
            if not data:
                return

    async def read(self) -> bytes:
        return await self._queue.get()


class FileWriter:
    """A pygls writer for a binary file: whole messages, flushed, from any thread."""

    def __init__(self, stream):
        self._stream = stream
        self._lock = threading.Lock()

    def write(self, data: bytes) -> None:
        with self._lock:
            self._stream.write(data)
            self._stream.flush()

    def close(self) -> None:
        with self._lock:
            self._stream.close()
