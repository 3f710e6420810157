"""The language server with a remote engine (`--endpoint`), end to end: the real server over stdio,
pytest-lsp's client, and an HTTP server answering as vLLM, llama.cpp's server or Ollama do
(tests/fake_engine.py). Faults must never block or crash the server: the status says what is
wrong, completions come back empty, each kind of failure is shown once, and the server recovers
by itself."""
from __future__ import annotations

import asyncio
import contextlib
import inspect
import json
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
from lsprotocol import types
from pygls.exceptions import JsonRpcRequestCancelled
from pytest_lsp import make_test_lsp_client

from fake_engine import FakeEngine, free_port
from lsp_testing import (TIMEOUT_S, capabilities, change, inline, inline_params, open_document,
                         server_env, status, stop_client, wait_for_state)
from stablelm_lsp.lsp.chat import CHAT_COMMAND, CHAT_DELTA_NOTIFICATION
from stablelm_lsp.models import Tokenizer

SOURCE = "import os\n\n\ndef read_config(path):\n    with open(path) as f:\n        return f.read()\n\n\nx = read_\n"
CURSOR = (8, 9)     # after "x = read_"


@pytest.fixture(scope="module")
def tokenizer_dir(checkpoint_factory) -> Path:
    return checkpoint_factory("starcoder2")


@pytest.fixture
def engines():
    started: list[FakeEngine] = []

    def make(kind: str = "llamacpp", **fields) -> FakeEngine:
        engine = FakeEngine(kind=kind, **fields)
        started.append(engine)
        return engine.start()

    yield make
    for engine in started:
        engine.stop()


async def start(tmp_path: Path, endpoint: str, *flags: str, env: dict | None = None,
                wait: tuple[str, ...] = ("ready",)):
    """The server on `endpoint`; `client.statuses` collects stablelm/status, `client.deltas`
    chat deltas."""
    client = make_test_lsp_client()
    client.statuses, client.deltas = [], {}

    @client.feature("stablelm/status")
    def on_status(params):
        client.statuses.append(params)

    @client.feature(CHAT_DELTA_NOTIFICATION)
    def on_delta(params):
        client.deltas.setdefault(params.chatId, []).append(params.delta)

    command = [sys.executable, "-m", "stablelm_lsp.lsp", "--stdio", "--endpoint", endpoint,
               "--debounce-ms", "0", *flags]
    await client.start_io(*command, env={**server_env(tmp_path), **(env or {})})
    await client.initialize_session(types.InitializeParams(
        capabilities=capabilities(), root_uri=(tmp_path / "proj").as_uri()))
    if wait:
        await wait_for_state(client, *wait)
    return client


@contextlib.asynccontextmanager
async def serving(tmp_path: Path, endpoint: str, *flags: str, text: str = SOURCE, **kwargs):
    """(client, uri of an open document holding `text`) for the duration of the block."""
    client = await start(tmp_path, endpoint, *flags, **kwargs)
    try:
        uri = (tmp_path / "proj" / "a.py").as_uri()
        open_document(client, uri, text)
        yield client, uri
    finally:
        await stop_client(client)


def errors_shown(client) -> list[str]:
    return [m.message for m in client.messages if m.type == types.MessageType.Error]


async def eventually(test, timeout: float = TIMEOUT_S):
    """Until `test()` (a function or a coroutine function) is true."""
    deadline = time.monotonic() + timeout
    while not (await result if inspect.isawaitable(result := test()) else result):
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.05)


async def test_completion_comes_from_the_engine_with_the_local_prompt(tmp_path, engines, tokenizer_dir):
    engine = engines("llamacpp", reply="_config('a.cfg')\nprint(x)\n", piece_chars=3)
    async with serving(tmp_path, engine.url, "--model", str(tokenizer_dir)) as (client, uri):
        current = await status(client)
        assert current["state"] == "ready" and current["endpoint"] == engine.url
        assert (current["device"], current["dtype"]) == (engine.url, "llamacpp")
        assert current["path"] == str(tokenizer_dir)
        # No weights, no torch: the process never mapped libtorch.
        maps = Path(f"/proc/{client._server.pid}/maps")
        if maps.exists():
            assert "libtorch" not in maps.read_text()
        items = await inline(client, uri, *CURSOR)
        assert [i.insert_text for i in items] == ["_config('a.cfg')"]
        body = engine.completions()[-1].body
        prompt = body["prompt"]
        assert isinstance(prompt, list) and all(isinstance(t, int) for t in prompt)
        text = Tokenizer.from_folder(tokenizer_dir).decode(prompt)
        assert text.startswith("<repo_name>proj<file_sep><fim_prefix>a.py\nimport os")
        assert text.endswith("<fim_middle>x = read_")
        # A partly typed statement: our rule ends it at the line's end (the engine is not told
        # to stop at newlines, the line may go on); the model's stop texts go to the engine.
        assert body["cache_prompt"] is True and body["id_slot"] == 0 and "<file_sep>" in body["stop"]
        last = (await status(client))["lastRun"]
        assert last["promptTokens"] == len(prompt) and last["finishReason"] in ("eos", "stop")
        assert last["draftLength"] is None          # the engine's own business


async def test_typing_reuses_the_engines_cache(tmp_path, engines, tokenizer_dir):
    engine = engines("llamacpp", reply="zzz")
    async with serving(tmp_path, engine.url, "--model", str(tokenizer_dir)) as (client, uri):
        await inline(client, uri, *CURSOR)
        line, column = CURSOR
        for version, char in enumerate("con", start=2):
            change(client, uri, version, (line, column), (line, column), char)
            column += 1
            await inline(client, uri, line, column)
            last = (await status(client))["lastRun"]
            assert last["promptTokens"] - last["reusedTokens"] <= 3, last


async def test_nothing_is_computed_ahead_on_a_remote_engine(tmp_path, engines, tokenizer_dir):
    """A remote engine runs requests as they come, with no lower priority: the server prepares
    nothing there (no request before it is asked for), and answers as before."""
    engine = engines("llamacpp", reply="_config('a.cfg')")
    async with serving(tmp_path, engine.url, "--model", str(tokenizer_dir)) as (client, uri):
        client.protocol.notify("stablelm/didFocus", {"uri": uri, "position": {"line": 4, "character": 0}})
        (item,) = await inline(client, uri, *CURSOR)
        assert item.insert_text == "_config('a.cfg')"
        await client.workspace_execute_command_async(types.ExecuteCommandParams(
            "stablelm.accepted", item.command.arguments))
        counters = (await status(client))["counters"]
        assert (counters["backgroundRuns"], counters["modelRuns"]) == (0, 1)
        assert len(engine.completions()) == 1


async def test_cancel_closes_the_engines_stream(tmp_path, engines, tokenizer_dir):
    engine = engines("vllm", reply="a" * 2000, piece_chars=1, delay_s=0.005)
    async with serving(tmp_path, engine.url, "--model", str(tokenizer_dir), "--max-new-tokens", "2000",
                       text="def f():\n    \n") as (client, uri):
        future = client.protocol.send_request("textDocument/inlineCompletion",
                                              inline_params(uri, 1, 4), msg_id="to-cancel")
        assert await asyncio.to_thread(engine.wait_for, lambda: len(engine.completions()) == 1)
        await asyncio.sleep(0.2)
        client.cancel_request(types.CancelParams(id="to-cancel"))
        with pytest.raises(JsonRpcRequestCancelled):
            await asyncio.wrap_future(future)
        assert await asyncio.to_thread(engine.wait_for, lambda: engine.disconnects == 1)
        assert engine.streams_finished == 0
        # A keystroke supersedes the running request the same way.
        request = asyncio.ensure_future(inline(client, uri, 1, 4))
        assert await asyncio.to_thread(engine.wait_for, lambda: len(engine.completions()) == 2)
        await asyncio.sleep(0.2)
        change(client, uri, 2, (1, 4), (1, 4), "r")
        assert await request == []
        assert await asyncio.to_thread(engine.wait_for, lambda: engine.disconnects == 2)


async def test_engine_down_at_start_then_up(tmp_path, engines, tokenizer_dir):
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    async with serving(tmp_path, url, "--model", str(tokenizer_dir), wait=("error",)) as (client, uri):
        current = await status(client)
        assert current["fault"] == "unreachable" and f"cannot reach the engine at {url}" in current["message"]
        for _ in range(5):      # keystrokes while it is down: empty at once, one message
            assert await inline(client, uri, *CURSOR) == []
        assert len(errors_shown(client)) == 1 and "cannot reach" in errors_shown(client)[0]
        engines("llamacpp", port=port, reply="_config(path)")
        await wait_for_state(client, "ready")
        assert [i.insert_text for i in await inline(client, uri, *CURSOR)] == ["_config(path)"]
        states = [s.state for s in client.statuses]
        assert states[-1] == "ready" and "error" in states


async def test_engine_failing_then_recovering(tmp_path, engines, tokenizer_dir):
    engine = engines("vllm", reply="_config(path)")
    async with serving(tmp_path, engine.url, "--model", str(tokenizer_dir)) as (client, uri):
        engine.fail_status = 500
        for _ in range(4):
            assert await inline(client, uri, *CURSOR) == []
        current = await wait_for_state(client, "error")
        assert "HTTP 500" in current["message"] and "scripted failure 500" in current["message"]
        engine.fail_status, engine.die_after = None, 2      # dies in the middle of answers now
        engine.reply = "_config(path)" * 3

        async def died():
            await inline(client, uri, *CURSOR)
            return (await status(client)).get("fault") == "disconnected"

        await eventually(died)
        shown = errors_shown(client)
        assert len(shown) == 2 and "HTTP 500" in shown[0] and "middle of an answer" in shown[1]
        engine.die_after = None

        async def answers():
            return bool(await inline(client, uri, *CURSOR))

        await eventually(answers)
        assert (await status(client))["state"] == "ready"


async def test_slow_engine_does_not_block(tmp_path, engines, tokenizer_dir):
    engine = engines("ollama", reply="_config(path)", header_delay_s=3.0)
    async with serving(tmp_path, engine.url, "--model", str(tokenizer_dir),
                       "--timeout-ms", "300") as (client, uri):
        start_time = time.monotonic()
        assert await inline(client, uri, *CURSOR) == []
        assert time.monotonic() - start_time < 2.5
        current = await status(client)      # the server answers meanwhile
        assert current["fault"] == "timeout" and "did not answer" in current["message"]


async def test_api_key_is_used_and_never_logged_or_shown(tmp_path, engines, tokenizer_dir):
    secret = "sk-remote-test-5f3c9a"
    engine = engines("vllm", api_key=secret, reply="_config(path)")
    log_file = tmp_path / "server.log"
    async with serving(tmp_path, engine.url, "--model", str(tokenizer_dir), "--log-level", "debug",
                       "--log-file", str(log_file),
                       env={"STABLELM_LSP_API_KEY": secret}) as (client, uri):
        assert [i.insert_text for i in await inline(client, uri, *CURSOR)] == ["_config(path)"]
        engine.api_key = "sk-rotated"       # the engine changes its key: refused, shown, not leaked
        assert await inline(client, uri, 8, 4) == []
        current = await wait_for_state(client, "error")
        assert current["fault"] == "auth" and "refused the API key" in current["message"]
        seen = repr(client.statuses) + repr(client.messages) + repr(await status(client))
        logged = log_file.read_text()
        assert "/v1/completions" in logged         # debug logging was on
        assert secret not in logged and secret not in seen


async def test_chat_streams_from_the_engines_chat_route(tmp_path, engines):
    engine = engines("vllm", reply="It reads the file. " * 40, piece_chars=4, delay_s=0.002)
    async with serving(tmp_path, engine.url, "--model", "tiny") as (client, _):
        chat_id = str(uuid.uuid4())
        answer = await client.workspace_execute_command_async(types.ExecuteCommandParams(
            CHAT_COMMAND, [{"chatId": chat_id, "messages": [{"role": "user", "content": "What?"}]}]))
        assert answer["text"] == "It reads the file. " * 40 and answer["finishReason"] == "eos"
        assert "".join(client.deltas[chat_id]) == answer["text"]
        body = engine.completions()[-1].body
        assert engine.completions()[-1].path == "/v1/chat/completions"
        assert body["messages"][-1] == {"role": "user", "content": "What?"} and body["model"] == "tiny"
        # Cancelled mid-answer: the engine's stream is closed.
        engine.delay_s = 0.02
        future = client.protocol.send_request("workspace/executeCommand", types.ExecuteCommandParams(
            CHAT_COMMAND, [{"chatId": "c2", "messages": [{"role": "user", "content": "Again?"}]}]),
            msg_id="chat-to-cancel")
        await asyncio.to_thread(engine.wait_for, lambda: len(engine.completions()) == 2)
        await asyncio.sleep(0.3)
        client.cancel_request(types.CancelParams(id="chat-to-cancel"))
        with pytest.raises(JsonRpcRequestCancelled):
            await asyncio.wrap_future(future)
        assert await asyncio.to_thread(engine.wait_for, lambda: engine.disconnects == 1)


async def test_endpoint_setting_switches_engines(tmp_path, engines, tokenizer_dir):
    first = engines("llamacpp", reply="_one")
    second = engines("vllm", reply="_two")
    async with serving(tmp_path, first.url, "--model", str(tokenizer_dir)) as (client, uri):
        assert [i.insert_text for i in await inline(client, uri, *CURSOR)] == ["_one"]
        client.workspace_did_change_configuration(types.DidChangeConfigurationParams(
            settings={"stablelm": {"endpoint": second.url, "endpointKind": "vllm"}}))

        async def switched():
            current = await status(client)
            return current["state"] == "ready" and current["endpoint"] == second.url

        await eventually(switched)
        assert [i.insert_text for i in await inline(client, uri, *CURSOR)] == ["_two"]
        client.workspace_did_change_configuration(types.DidChangeConfigurationParams(
            settings={"stablelm": {"endpoint": "ftp://nowhere"}}))
        await status(client)
        assert any("endpoint" in m.message for m in client.messages
                   if m.type == types.MessageType.Warning)


def test_cli_generates_on_the_engine(engines):
    engine = engines("llamacpp", reply=" return a + b\n")
    run = [sys.executable, "-m", "stablelm_lsp.lsp", "generate", "--endpoint", engine.url,
           "--prompt", "def add(a, b):\n", "--json"]
    done = subprocess.run(run, capture_output=True, text=True, timeout=TIMEOUT_S)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["text"] == " return a + b\n"
    assert "HTTP Request" not in done.stderr        # httpx's per-request lines stay quiet
    down = subprocess.run([*run[:5], f"http://127.0.0.1:{free_port()}", *run[6:]],
                          capture_output=True, text=True, timeout=TIMEOUT_S)
    assert down.returncode == 2 and "error: cannot reach the engine" in down.stderr
    bad = subprocess.run([*run[:5], "localhost:8000", *run[6:]], capture_output=True, text=True,
                         timeout=TIMEOUT_S)
    assert bad.returncode == 2 and bad.stderr.strip().endswith("got 'localhost:8000'")
