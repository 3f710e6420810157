"""Ending the server while its model loads: `shutdown` + `exit`, end of input and SIGTERM, on a
checkpoint large enough that the load is still running when the test acts.

A load thread still inside torch when the interpreter shuts down aborts the process ("terminate
called without an active exception", exit status -6); the server has to stop the load or leave
without the interpreter's shutdown, and still exit with the code the LSP spec gives.
"""
from __future__ import annotations

import json
import signal
import subprocess
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from lsp_testing import TIMEOUT_S, server_command, server_env

# 8 layers of hidden 1024: about 400 MB of float32 weights, a few hundred milliseconds of reading
# after the first progress report even on a fast machine.
BIG = dict(hidden_size=1024, intermediate_size=2816, num_hidden_layers=8, num_attention_heads=8,
           num_key_value_heads=8)


@pytest.fixture(scope="module")
def big_checkpoint(checkpoint_factory):
    return checkpoint_factory("stablelm-3b", **BIG)


class Session:
    """A server process spoken to in raw JSON-RPC, its stderr kept."""

    def __init__(self, model, state_dir):
        self.process = subprocess.Popen(server_command(model), stdin=subprocess.PIPE,
                                        stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                        env=server_env(state_dir))
        self.messages: list[dict] = []
        self._new = threading.Condition()
        self._stderr: list[bytes] = []
        threading.Thread(target=self._read_stdout, daemon=True).start()
        threading.Thread(target=lambda: self._stderr.append(self.process.stderr.read()),
                         daemon=True).start()

    def _read_stdout(self) -> None:
        stream = self.process.stdout
        while True:
            header = stream.readline()
            if not header:
                return
            length = int(header.split(b":")[1])
            while stream.readline() != b"\r\n":
                pass
            message = json.loads(stream.read(length))
            if message.get("method") == "window/workDoneProgress/create":
                self.send({"jsonrpc": "2.0", "id": message["id"], "result": None})
            with self._new:
                self.messages.append(message)
                self._new.notify_all()

    def send(self, message: dict) -> None:
        body = json.dumps(message).encode()
        self.process.stdin.write(b"Content-Length: %d\r\n\r\n" % len(body) + body)
        self.process.stdin.flush()

    def wait_for(self, what: str, found) -> dict:
        deadline = time.monotonic() + TIMEOUT_S
        with self._new:
            while True:
                match = next((m for m in self.messages if found(m)), None)
                if match is not None:
                    return match
                left = deadline - time.monotonic()
                assert left > 0, f"no {what} from the server in {TIMEOUT_S}s: {self.messages}"
                self._new.wait(left)

    def statuses(self) -> list[dict]:
        with self._new:
            return [m["params"] for m in self.messages if m.get("method") == "stablelm/status"]

    def stderr(self) -> str:
        self.process.wait(timeout=TIMEOUT_S)
        deadline = time.monotonic() + TIMEOUT_S
        while not self._stderr and time.monotonic() < deadline:
            time.sleep(0.01)
        return b"".join(self._stderr).decode(errors="replace")


def _progress(kind: str):
    return lambda m: m.get("method") == "$/progress" and m["params"]["value"]["kind"] == kind


def _end_while_loading(model, state_dir, how: str, when: str) -> dict:
    """Start a server, wait for the load's `when` progress event, end it `how`; what happened."""
    session = Session(model, state_dir)
    try:
        session.send({"jsonrpc": "2.0", "id": 1, "method": "initialize",
                      "params": {"capabilities": {"window": {"workDoneProgress": True}}}})
        session.send({"jsonrpc": "2.0", "method": "initialized", "params": {}})
        session.wait_for(f"$/progress {when}", _progress(when))
        if how == "shutdown+exit":
            session.send({"jsonrpc": "2.0", "id": 2, "method": "shutdown"})
            session.send({"jsonrpc": "2.0", "method": "exit"})
        elif how == "end of input":
            session.process.stdin.close()
        else:
            session.process.send_signal(signal.SIGTERM)
        ended = time.monotonic()
        code = session.process.wait(timeout=TIMEOUT_S)
        return {"how": how, "when": when, "code": code, "seconds": time.monotonic() - ended,
                "stderr": session.stderr(), "states": [s["state"] for s in session.statuses()]}
    finally:
        if session.process.poll() is None:
            session.process.kill()


def test_ending_the_server_while_the_model_loads_is_clean(big_checkpoint, tmp_path):
    cases = [("shutdown+exit", "report", 0), ("SIGTERM", "report", 1),
             # Still importing torch or building the model: no progress call to stop the load at.
             ("end of input", "begin", 1)]
    with ThreadPoolExecutor(len(cases)) as pool:
        results = list(pool.map(
            lambda case: _end_while_loading(big_checkpoint, tmp_path / f"{case[0]}-{case[1]}",
                                            case[0], case[1]), cases))
    for (how, when, code), result in zip(cases, results):
        what = f"{how} at the load's first {when} event: {result}"
        assert result["states"] == ["loading"], f"the load was not running: {what}"
        assert result["code"] == code, what
        assert "terminate called" not in result["stderr"], what
        assert "Traceback" not in result["stderr"], what
        # The load was stopped or left behind, not waited for to the end; or, ended right at the
        # first progress event, the server closed before the load thread began reading.
        assert any(said in result["stderr"] for said in
                   ("was stopped", "exiting without waiting", "the server is exiting")), what
