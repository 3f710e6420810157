"""Process entry: logging, signals, and serving one connection over stdio or TCP.

`exit`, end of input, SIGTERM and SIGINT end the process cleanly even while a model loads: the
load stops between tensors, and a load stuck inside torch is not waited for (`exit_now`, once the
log is flushed: a daemon thread inside torch at interpreter exit aborts the process). The exit
code is 0 after `shutdown`, 1 otherwise.
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import sys
from typing import TYPE_CHECKING

from .common import quiet_libraries
from .transport import FileWriter, StdinChunks

if TYPE_CHECKING:
    from .server import StableLMServer


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
