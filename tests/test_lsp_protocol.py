"""Bad input over raw JSON-RPC: the real server process, bytes in, messages out.

Every case ends with the server still answering (or exiting cleanly at end of input)."""
from __future__ import annotations

import json
import re
import socket
import subprocess
import sys
import time

import pytest

from lsp_testing import TIMEOUT_S, RawServer, server_env
from stablelm_lsp.lsp.server import StableLMServer
from stablelm_lsp.lsp.settings import Settings

TEXT = "def add(a, b):\n    return a + b\n\n\nprint(add(1, 2))\n"


@pytest.fixture(scope="module")
def server(starcoder2_checkpoint, tmp_path_factory):
    """One initialized server with a loaded model, shared by the cases that leave it usable."""
    raw = RawServer(starcoder2_checkpoint, tmp_path_factory.mktemp("raw"), "--max-new-tokens", "8")
    raw.initialize({"general": {"positionEncodings": ["utf-16"]}})
    assert raw.wait_ready()["state"] == "ready"
    yield raw
    raw.close()


def _open(raw, uri, text, version=1):
    raw.notify("textDocument/didOpen", {"textDocument": {
        "uri": uri, "languageId": "python", "version": version, "text": text}})


def _inline(raw, uri, line, character):
    return raw.response(raw.request("textDocument/inlineCompletion", {
        "textDocument": {"uri": uri}, "position": {"line": line, "character": character},
        "context": {"triggerKind": 2}}))


def _error(message):
    assert "error" in message, message
    return message["error"]["code"], message["error"]["message"]


def test_requests_before_initialize_get_server_not_initialized(starcoder2_checkpoint, tmp_path):
    raw = RawServer(starcoder2_checkpoint, tmp_path)
    try:
        _open(raw, "file:///x.py", "x = 1\n")          # a notification: dropped
        code, _ = _error(_inline(raw, "file:///x.py", 0, 0))
        assert code == -32002
        raw.initialize()
        assert raw.wait_ready()["state"] == "ready"
        # The early didOpen was dropped: the document is unknown now.
        assert _inline(raw, "file:///x.py", 0, 5)["result"] == {"items": []}
        code, _ = _error(raw.response(raw.request("initialize", {"capabilities": {}})))
        assert code == -32600                          # initialize twice
    finally:
        raw.close()


def test_invalid_params_and_unknown_methods_get_error_responses(server):
    code, message = _error(server.response(server.request("textDocument/inlineCompletion", {
        "textDocument": {"uri": "file:///a.py"}, "position": {"line": "x", "character": 0},
        "context": {"triggerKind": 1}})))
    assert code == -32602 and "position.line" in message
    code, _ = _error(server.response(server.request("textDocument/inlineCompletion")))
    assert code == -32602
    code, _ = _error(server.response(server.request("textDocument/noSuchMethod", {})))
    assert code == -32601
    code, _ = _error(server.response(server.request("workspace/executeCommand",
                                                    {"command": "stablelm.noSuchCommand"})))
    assert code == -32602
    server.notify("textDocument/didOpen", {"textDocument": {"uri": 3}})   # bad notification
    server.notify("$/noSuchNotification", {})
    assert server.status()["state"] == "ready"


def test_unknown_documents_positions_past_the_end_and_bad_edits(server, tmp_path):
    on_disk = tmp_path / "on_disk.py"
    on_disk.write_text(TEXT)
    # A file that exists but is not open: never read from disk.
    assert _inline(server, on_disk.as_uri(), 1, 11)["result"] == {"items": []}

    uri = "file:///proj/bad_edits.py"
    _open(server, uri, TEXT)
    past_end = _inline(server, uri, 999, 999)
    assert "result" in past_end                                  # clamped to the end of the text
    server.notify("textDocument/didChange", {"textDocument": {"uri": "file:///never-opened.py",
                                                              "version": 2},
                                             "contentChanges": [{"text": "x"}]})
    # An edit whose end precedes its start: refused; completions stop until the text is resent.
    server.notify("textDocument/didChange", {"textDocument": {"uri": uri, "version": 2},
                                             "contentChanges": [{"range": {
                                                 "start": {"line": 1, "character": 4},
                                                 "end": {"line": 0, "character": 2}}, "text": "y"}]})
    assert _inline(server, uri, 1, 11)["result"] == {"items": []}
    _open(server, uri, TEXT, version=3)
    assert "result" in _inline(server, uri, 1, 11)


def test_whole_document_changes_replace_the_text(server):
    # Outside any workspace folder the prompt names the file by its base name only, so these two
    # documents give the same prompt once their texts agree.
    edited, reference = "file:///one/same_name.py", "file:///two/same_name.py"
    changed = TEXT.replace("a + b", "sum((a, b))")
    _open(server, edited, TEXT)
    server.notify("textDocument/didChange", {"textDocument": {"uri": edited, "version": 2},
                                             "contentChanges": [{"text": changed}]})
    _open(server, reference, changed)
    texts = [[item["insertText"] for item in _inline(server, uri, 1, 11)["result"]["items"]]
             for uri in (edited, reference)]
    assert texts[0] == texts[1] and texts[0]


def test_large_and_binary_documents_get_bounded_work(server):
    many_lines = "".join(f"value_{i} = compute({i})\n" for i in range(250_000))   # ~6 MB
    assert len(many_lines) > 5_000_000
    _open(server, "file:///proj/large.py", many_lines)
    assert "result" in _inline(server, "file:///proj/large.py", 125_000, 8)
    one_line = "var a=1;" * 700_000                                              # 5.6 MB
    _open(server, "file:///proj/minified.js", one_line)
    assert "result" in _inline(server, "file:///proj/minified.js", 0, 3_000_000)
    _open(server, "file:///proj/blob.bin", "PK\x03\x04\x00\x00binary\x00" * 100)
    assert _inline(server, "file:///proj/blob.bin", 0, 4)["result"] == {"items": []}


def _frame(body) -> bytes:
    if not isinstance(body, bytes):
        body = json.dumps(body).encode()
    return b"Content-Length: %d\r\n\r\n%s" % (len(body), body)


def _status_request(msg_id) -> bytes:
    return json.dumps({"jsonrpc": "2.0", "id": msg_id, "method": "workspace/executeCommand",
                       "params": {"command": "stablelm.status"}}).encode()


def test_broken_framing_is_answered_and_recovered_from(server):
    send = server.send_bytes
    send(b"this is not a header\r\n\r\n")                   # skipped
    send(b"Content-Type: application/json\r\n\r\n")          # no Content-Length: skipped
    send(_frame(b"{not json"))
    assert _error(server.read())[0] == -32700
    send(_frame(b"[1, 2]"))
    message = server.read()
    assert message["id"] is None and _error(message)[0] == -32600
    send(_frame({"jsonrpc": "1.0", "id": 7, "method": "shutdown"}))
    message = server.read()
    assert message["id"] == 7 and _error(message)[0] == -32600
    send(_frame({"jsonrpc": "2.0", "id": [1], "method": "shutdown"}))
    assert _error(server.read())[0] == -32600
    send(_frame(b"\xff\xfe{}"))
    assert _error(server.read())[0] == -32700

    # Content-Length too short: the request still gets an answer (a parse error) by its id.
    send(b"Content-Length: 30\r\n\r\n" + _status_request(8))
    message = server.read()
    assert message["id"] == 8 and _error(message)[0] == -32700
    # Too long, with the next message behind it: both are served.
    request = _status_request(9)
    send(b"Content-Length: %d\r\n\r\n" % (len(request) + 40) + request + _frame(_status_request(10)))
    answers = [server.read(), server.read()]
    assert [a["id"] for a in answers] == [9, 10] and all("result" in a for a in answers)
    # Too long, and nothing behind it: served after a moment of silence.
    request = _status_request(11)
    send(b"Content-Length: %d\r\n\r\n" % (len(request) + 40) + request)
    message = server.read()
    assert message["id"] == 11 and message["result"]["state"] == "ready"
    # An absurd length is refused without waiting for its body.
    send(b"Content-Length: 99999999999\r\n\r\n" + _frame(_status_request(12)))
    message = server.read()
    assert message["id"] == 12 and "result" in message


def test_handler_exception_is_an_internal_error_without_traceback(tmp_path):
    server = StableLMServer(Settings(stats_file=str(tmp_path / "stats.json")))
    written: list[bytes] = []

    class Writer:
        def write(self, data):
            written.append(data)

        def close(self):
            pass

    def failing(params):
        raise KeyError("broken handler")

    server.feature("custom/fail")(failing)
    server.protocol.set_writer(Writer())
    for message in ({"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": {"capabilities": {}}},
                    {"jsonrpc": "2.0", "id": 2, "method": "custom/fail", "params": {}}):
        server.protocol.handle_frame(json.dumps(message).encode())
    response = json.loads(written[-1].split(b"\r\n\r\n", 1)[1])
    assert response["id"] == 2
    assert response["error"] == {"code": -32603, "message": "KeyError: 'broken handler'"}


def test_shutdown_exit_and_end_of_input(starcoder2_checkpoint, tmp_path):
    raw = RawServer(starcoder2_checkpoint, tmp_path)
    raw.initialize()
    assert raw.response(raw.request("shutdown"))["result"] is None
    code, message = _error(raw.response(raw.request("workspace/executeCommand",
                                                    {"command": "stablelm.status"})))
    assert code == -32600 and "shutting down" in message
    raw.notify("exit")
    assert raw.process.wait(timeout=TIMEOUT_S) == 0
    raw.close()

    raw = RawServer(starcoder2_checkpoint, tmp_path)
    raw.initialize()
    raw.notify("exit")                                   # without shutdown
    assert raw.process.wait(timeout=TIMEOUT_S) == 1
    raw.close()

    raw = RawServer(starcoder2_checkpoint, tmp_path)
    raw.initialize()
    raw.send_bytes(b"Content-Length: 500\r\n\r\n{\"jsonrpc\"")  # cut off mid-message
    assert raw.close() == 1                              # end of input: exits, no hang or spin


def test_the_status_names_the_built_in_model_alike_while_loading_and_when_ready(tmp_path):
    from stablelm_lsp.models import builtin_model_path

    raw = RawServer(None, tmp_path, command=[sys.executable, "-m", "stablelm_lsp.lsp", "--stdio"])
    try:
        raw.initialize()
        notified = []
        while not notified or notified[-1]["state"] == "loading":
            message = raw.read()
            assert message is not None, "the server closed its output"
            if message.get("method") == "stablelm/status":
                notified.append(message["params"])
        assert [n["state"] for n in notified] == ["loading", "ready"]
        expected = {"model": builtin_model_path().name, "path": str(builtin_model_path()),
                    "builtin": True}
        for status in (*notified, raw.status()):
            assert {key: status[key] for key in expected} == expected, status
    finally:
        raw.close()


def test_settings_apply_before_the_requests_sent_after_them(starcoder2_checkpoint,
                                                            stablelm_checkpoint, tmp_path):
    """A configuration change and a request written at once: the request sees the new settings."""
    raw = RawServer(starcoder2_checkpoint, tmp_path)
    try:
        raw.initialize()
        assert raw.wait_ready()["model"] == starcoder2_checkpoint.name
        change = {"jsonrpc": "2.0", "method": "workspace/didChangeConfiguration",
                  "params": {"settings": {"stablelm": {"model": str(stablelm_checkpoint)}}}}
        raw.send_bytes(_frame(change) + _frame(_status_request("after-change")))
        current = raw.response("after-change")["result"]
        assert (current["state"], current["model"]) == ("loading", stablelm_checkpoint.name)
    finally:
        raw.close()
    # A change without settings: the server asks for them, and applies the answer.
    raw = RawServer(stablelm_checkpoint, tmp_path)
    try:
        raw.initialize({"workspace": {"configuration": True}})
        raw.notify("workspace/didChangeConfiguration", {"settings": None})
        while (message := raw.read()).get("method") != "workspace/configuration":
            assert message is not None
        assert message["params"] == {"items": [{"section": "stablelm"}]}
        raw.send({"jsonrpc": "2.0", "id": message["id"],
                  "result": [{"model": str(starcoder2_checkpoint)}]})
        deadline = time.monotonic() + TIMEOUT_S
        while raw.status()["model"] != starcoder2_checkpoint.name:
            assert time.monotonic() < deadline, "the pulled settings were not applied"
            time.sleep(0.05)
    finally:
        raw.close()


def test_a_client_that_never_answers_progress_creation(starcoder2_checkpoint, tmp_path):
    raw = RawServer(starcoder2_checkpoint, tmp_path)
    try:
        raw.initialize({"window": {"workDoneProgress": True}}, answer_requests=False)
        assert raw.wait_ready(answer_requests=False)["state"] == "ready"
        _open(raw, "file:///proj/a.py", TEXT)
        message = raw.response(raw.request("textDocument/inlineCompletion", {
            "textDocument": {"uri": "file:///proj/a.py"}, "position": {"line": 1, "character": 11},
            "context": {"triggerKind": 2}}), answer_requests=False)
        assert "result" in message
    finally:
        raw.close()


def test_tcp_binds_to_localhost_by_default(starcoder2_checkpoint, tmp_path):
    process = subprocess.Popen(
        [sys.executable, "-m", "stablelm_lsp.lsp", "--tcp", "--port", "0", "--model",
         str(starcoder2_checkpoint)], stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, env=server_env(tmp_path), text=True)
    try:
        deadline = time.monotonic() + TIMEOUT_S
        while time.monotonic() < deadline:
            match = re.search(r"listening on ([\d.]+):(\d+)", process.stderr.readline())
            if match:
                break
        assert match and match.group(1) == "127.0.0.1"
        with socket.create_connection((match.group(1), int(match.group(2))), timeout=TIMEOUT_S) as sock:
            stream = sock.makefile("rwb")
            for message in ({"jsonrpc": "2.0", "id": 1, "method": "initialize",
                             "params": {"capabilities": {}}},
                            {"jsonrpc": "2.0", "id": 2, "method": "shutdown"},
                            {"jsonrpc": "2.0", "method": "exit"}):
                stream.write(_frame(message))
                stream.flush()
                if "id" not in message:
                    continue
                length = int(stream.readline().split(b":")[1])
                while stream.readline() != b"\r\n":
                    pass
                assert json.loads(stream.read(length))["id"] == message["id"]
        assert process.wait(timeout=TIMEOUT_S) == 0
        assert process.stdout.read() == ""                # nothing on stdout in TCP mode
    finally:
        if process.poll() is None:
            process.kill()
        process.stdout.close()
        process.stderr.close()


def _cli(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "stablelm_lsp.lsp", *args], capture_output=True,
                          text=True, timeout=120, cwd=cwd)


def test_command_line_errors_are_one_line_and_exit_2(starcoder2_checkpoint, tmp_path):
    source = tmp_path / "a.py"
    source.write_text(TEXT)
    model = ["--model", str(starcoder2_checkpoint)]
    cases = [
        ("complete", str(tmp_path / "missing.py"), "--line", "0", "--character", "0", *model),
        ("complete", str(source), "--line", "0", "--character", "0", "--template", "{bogus}", *model),
        ("complete", str(source), "--line", "0", "--character", "0", "--max-new-tokens", "0", *model),
        ("--stdio", "--context-tokens", "-5", *model),
    ]
    for args in cases:
        result = _cli(*args)
        assert result.returncode == 2, (args, result.stderr)
        assert result.stdout == ""
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("stablelm-lsp: error:"), result.stderr
    result = _cli("complete", str(source), "--line", "-1", "--character", "0", *model)
    assert result.returncode == 2 and "zero-based" in result.stderr
