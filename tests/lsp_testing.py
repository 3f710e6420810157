"""Helpers for the language-server tests: the real `stablelm-lsp --stdio` in a subprocess, driven
by pytest-lsp's client or by raw JSON-RPC bytes."""
from __future__ import annotations

import asyncio
import json
import os
import queue
import subprocess
import sys
import threading
import time
from pathlib import Path

from lsprotocol import types
from pytest_lsp import LanguageClient, make_test_lsp_client

TIMEOUT_S = 60.0

# A small Python file the end-to-end tests open (positions in the tests refer to it).
SOURCE = '''import os


def read_config(path):
    """Read a configuration file and return its lines."""
    with open(path) as f:
        return [line.strip() for line in f]


def main():
    lines = read_config(os.environ["CONFIG"])
    for line in lines:
        print(line)
'''


def server_command(model: Path, *flags: str) -> list[str]:
    """No debounce and no time budget by default: answers must not depend on the machine's load."""
    return [sys.executable, "-m", "stablelm_lsp.lsp", "--stdio", "--model", str(model),
            "--debounce-ms", "0", "--timeout-ms", "600000", *flags]


def server_env(state_dir: Path) -> dict[str, str]:
    """The environment for a server whose stats file goes under `state_dir`."""
    return {**os.environ, "XDG_STATE_HOME": str(state_dir), "PYTHONUNBUFFERED": "1"}


def capabilities(encodings: list[str] | None = None, progress: bool = True) -> types.ClientCapabilities:
    return types.ClientCapabilities(
        general=types.GeneralClientCapabilities(position_encodings=encodings),
        window=types.WindowClientCapabilities(work_done_progress=progress),
        text_document=types.TextDocumentClientCapabilities(
            inline_completion=types.InlineCompletionClientCapabilities()),
    )


async def start_client(model: Path, state_dir: Path, *flags: str, encodings: list[str] | None = None,
                       init_options: dict | None = None, root: Path | None = None,
                       wait_ready: bool = True) -> tuple[LanguageClient, types.InitializeResult]:
    client = make_test_lsp_client()
    await client.start_io(*server_command(model, *flags), env=server_env(state_dir))
    root_uri = (root or state_dir / "proj").as_uri()
    result = await client.initialize_session(types.InitializeParams(
        capabilities=capabilities(encodings), root_uri=root_uri,
        initialization_options=init_options))
    if wait_ready:
        await wait_for_state(client, "ready")
    return client, result


async def status(client: LanguageClient) -> dict:
    return await client.workspace_execute_command_async(types.ExecuteCommandParams("stablelm.status"))


async def wait_for_state(client: LanguageClient, *states: str, model: str | None = None) -> dict:
    """Poll stablelm.status until its state is one of `states` (and its model `model`, when
    given: a reload is asynchronous, so the old model may still report "ready" for a while)."""
    deadline = time.monotonic() + TIMEOUT_S
    while True:
        current = await status(client)
        if current["state"] in states and (model is None or current["model"] == model
                                           or current["state"] == "error"):
            return current
        assert time.monotonic() < deadline, f"server still {current} after {TIMEOUT_S}s"
        await asyncio.sleep(0.05)


def open_document(client: LanguageClient, uri: str, text: str, version: int = 1,
                  language: str = "python") -> None:
    client.text_document_did_open(types.DidOpenTextDocumentParams(
        types.TextDocumentItem(uri=uri, language_id=language, version=version, text=text)))


def inline_params(uri: str, line: int, character: int) -> types.InlineCompletionParams:
    return types.InlineCompletionParams(
        context=types.InlineCompletionContext(trigger_kind=types.InlineCompletionTriggerKind.Automatic),
        text_document=types.TextDocumentIdentifier(uri=uri),
        position=types.Position(line=line, character=character))


async def inline(client: LanguageClient, uri: str, line: int, character: int):
    result = await client.text_document_inline_completion_async(inline_params(uri, line, character))
    return list(result.items) if isinstance(result, types.InlineCompletionList) else list(result or [])


def change(client: LanguageClient, uri: str, version: int, start: tuple[int, int],
           end: tuple[int, int], text: str) -> None:
    client.text_document_did_change(types.DidChangeTextDocumentParams(
        text_document=types.VersionedTextDocumentIdentifier(uri=uri, version=version),
        content_changes=[types.TextDocumentContentChangePartial(
            range=types.Range(types.Position(*start), types.Position(*end)), text=text)]))


async def stop_client(client: LanguageClient) -> int | None:
    """shutdown + exit; the server is killed if it does not exit in time. Returns its exit code."""
    try:
        await asyncio.wait_for(client.shutdown_session(), TIMEOUT_S)
    finally:
        if client._server is not None and client._server.returncode is None:
            client._server.kill()
        await client.stop()
    return client._server.returncode if client._server is not None else None


class RawServer:
    """The server as a subprocess spoken to in raw bytes, for framing and protocol edge cases.
    A thread parses what the server writes: anything that is not a well-framed JSON message on
    its stdout fails the test."""

    def __init__(self, model: Path, state_dir: Path, *flags: str, command: list[str] | None = None):
        self.process = subprocess.Popen(command or server_command(model, *flags),
                                        stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                        stderr=subprocess.DEVNULL, env=server_env(state_dir))
        self._messages: queue.Queue = queue.Queue()
        self._next_id = 0
        threading.Thread(target=self._read_all, daemon=True).start()

    def _read_all(self) -> None:
        stream = self.process.stdout
        try:
            while True:
                length = None
                while True:
                    line = stream.readline()
                    if not line:
                        self._messages.put(None)
                        return
                    if line == b"\r\n":
                        break
                    name, _, value = line.decode("ascii").partition(":")
                    if name not in ("Content-Length", "Content-Type"):
                        raise AssertionError(f"the server wrote a bad header line {line!r}")
                    if name == "Content-Length":
                        length = int(value)
                self._messages.put(json.loads(stream.read(length)))
        except Exception as exc:     # handed to the test by read()
            self._messages.put(exc)

    def send_bytes(self, data: bytes) -> None:
        self.process.stdin.write(data)
        self.process.stdin.flush()

    def send(self, message: dict, content_length: int | None = None) -> None:
        body = json.dumps(message).encode()
        length = len(body) if content_length is None else content_length
        self.send_bytes(b"Content-Length: %d\r\n\r\n" % length + body)

    def request(self, method: str, params=None, **extra) -> int:
        self._next_id += 1
        message = {"jsonrpc": "2.0", "id": self._next_id, "method": method, **extra}
        if params is not None:
            message["params"] = params
        self.send(message)
        return self._next_id

    def notify(self, method: str, params=None) -> None:
        message = {"jsonrpc": "2.0", "method": method}
        if params is not None:
            message["params"] = params
        self.send(message)

    def read(self, timeout: float = TIMEOUT_S) -> dict | None:
        """The next message from the server; None once its output is closed."""
        try:
            message = self._messages.get(timeout=timeout)
        except queue.Empty:
            raise AssertionError(f"no message from the server in {timeout}s") from None
        if isinstance(message, Exception):
            raise message
        return message

    def response(self, msg_id, answer_requests: bool = True) -> dict:
        """Read until the response to `msg_id`; server requests are answered with null unless
        `answer_requests` is False (a client that never answers)."""
        while True:
            message = self.read()
            assert message is not None, "the server closed its output"
            if message.get("id") == msg_id and "method" not in message:
                return message
            if answer_requests and "method" in message and "id" in message:
                self.send({"jsonrpc": "2.0", "id": message["id"], "result": None})

    def initialize(self, capabilities: dict | None = None, answer_requests: bool = True) -> dict:
        msg_id = self.request("initialize", {"processId": None, "rootUri": None,
                                             "capabilities": capabilities or {}})
        result = self.response(msg_id, answer_requests)
        self.notify("initialized", {})
        return result

    def status(self, answer_requests: bool = True) -> dict:
        answer = self.response(self.request("workspace/executeCommand",
                                            {"command": "stablelm.status"}), answer_requests)
        return answer["result"]

    def wait_ready(self, answer_requests: bool = True) -> dict:
        deadline = time.monotonic() + TIMEOUT_S
        while time.monotonic() < deadline:
            current = self.status(answer_requests)
            if current["state"] != "loading":
                return current
            time.sleep(0.05)
        raise AssertionError("the model did not load")

    def close(self) -> int:
        """Close the server's input (end of stream) and wait for it to exit."""
        try:
            self.process.stdin.close()
        except BrokenPipeError:
            pass
        try:
            return self.process.wait(timeout=TIMEOUT_S)
        finally:
            if self.process.poll() is None:
                self.process.kill()
