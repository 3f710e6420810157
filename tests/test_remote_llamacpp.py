"""The language server on a real engine: llama-cpp-python's OpenAI-compatible server running a GGUF
converted from a test checkpoint (tests/llama_cpp_engine.py). Completions over LSP are what the
engine answers for the same prompt, typing reuses the engine's cache (as the engine itself
reports it), cancelling stops the engine's stream, and chat works both through the engine's chat
route and through the local chat template.

Skipped, saying why, without llama-cpp-python's server; `STABLELM_TEST_REMOTE=1 bash
scripts/test.sh` installs it (CI does)."""
from __future__ import annotations

import asyncio
import time
import uuid

import httpx
import pytest
import pytest_asyncio
from lsprotocol import types
from pygls.exceptions import JsonRpcRequestCancelled

import llama_cpp_engine
from lsp_testing import TIMEOUT_S, change, inline, inline_params, status
from stablelm_lsp.inference.api import GenerationResult, prompt_text
from stablelm_lsp.inference.prompts.budget import TokenCounter
from stablelm_lsp.inference.prompts.chat import ChatMessage, prepare_turn
from stablelm_lsp.inference.remote.backend import RemoteBackend, RemoteOptions
from stablelm_lsp.inference.remote.engines import engine_stops
from stablelm_lsp.lsp.chat import CHAT_COMMAND
from stablelm_lsp.lsp.completion import Completer
from stablelm_lsp.lsp.documents import Cursor, split_lines
from stablelm_lsp.lsp.settings import Settings
from test_remote_lsp import serving

pytestmark = [pytest.mark.skipif(llama_cpp_engine.missing() is not None,
                                 reason=str(llama_cpp_engine.missing())),
              pytest.mark.asyncio(loop_scope="module")]

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
CURSORS = [(10, 12), (10, 25), (11, 8), (6, 15), (12, 14)]      # mid-line and line ends
SETTINGS = Settings(debounce_ms=0, timeout_ms=600_000)


@pytest.fixture(scope="module")
def checkpoint(checkpoint_factory):
    return checkpoint_factory("stablelm-3b", max_position_embeddings=2048)


@pytest.fixture(scope="module")
def engine(checkpoint, tmp_path_factory):
    folder = tmp_path_factory.mktemp("llama-cpp")
    gguf = llama_cpp_engine.convert(checkpoint, folder / "tiny.gguf")
    server = llama_cpp_engine.start_server(gguf, folder / "server.log")
    yield server
    server.stop()


@pytest.fixture(scope="module")
def backend(engine, checkpoint):
    backend = RemoteBackend.connect(RemoteOptions(engine.url, model=str(checkpoint)))
    assert backend.health.ok, backend.health
    yield backend
    backend.close()


@pytest_asyncio.fixture(loop_scope="module")
async def session(engine, checkpoint, tmp_path):
    async with serving(tmp_path, engine.url, "--model", str(checkpoint), "--timeout-ms", "600000",
                       text=SOURCE) as (client, uri):
        yield client, uri


def engine_answer(engine, body: dict, route: str = "/v1/completions") -> dict:
    """The engine's own answer to `body`, asked directly (no streaming)."""
    response = httpx.post(f"{engine.url}{route}", json={"model": "tiny", "temperature": 0.0,
                                                        "top_p": 1.0, **body}, timeout=TIMEOUT_S)
    response.raise_for_status()
    return response.json()


def expected_completion(engine, backend, lines, cursor) -> str | None:
    """What the server should show at `cursor`: its own prompt and rules, the engine's text."""
    completer = Completer(backend, SETTINGS)
    pending = completer.prepare(lines, Cursor(*cursor), path="a.py", repo="proj",
                                context_files=[], key="expected")
    request = pending.request
    answer = engine_answer(engine, {
        "prompt": prompt_text(request.parts()), "max_tokens": request.max_new_tokens,
        "stop": list(engine_stops(request.stop, backend.info.stop_texts))})
    completion = completer.finish(pending, GenerationResult(text=answer["choices"][0]["text"]))
    return completion.text if completion else None


def test_the_engine_tokenizes_as_the_checkpoint_does(engine, backend):
    """The GGUF's tokenizer is the checkpoint's: what the prompt was budgeted with is what runs."""
    text = SOURCE + "<fim_middle>"
    tokens = httpx.post(f"{engine.url}/extras/tokenize", json={"input": text}).json()["tokens"]
    ours = backend._local.tokenizer.encode(text, parse_special=True)
    assert tokens[-len(ours):] == ours and len(tokens) - len(ours) <= 1     # a BOS at most


async def test_completions_over_lsp_equal_the_engines_answer(engine, backend, session):
    client, uri = session
    current = await status(client)
    assert current["state"] == "ready" and (current["device"], current["dtype"]) == (engine.url, "openai")
    lines = split_lines(SOURCE)
    shown = 0
    for cursor in CURSORS:
        items = await inline(client, uri, *cursor)
        expected = expected_completion(engine, backend, lines, cursor)
        assert [i.insert_text for i in items] == ([expected] if expected else []), cursor
        shown += bool(expected)
    assert shown >= 2, "too few non-empty completions to compare"


async def test_typing_reuses_the_engines_cache(engine, session):
    client, uri = session
    line, column = 11, 8       # "    for " -> typing a name
    await inline(client, uri, line, column)
    reused = []
    for version, char in enumerate("itemz", start=2):
        before = len(engine.prefix_hits())
        change(client, uri, version, (line, column), (line, column), char)
        column += 1
        await inline(client, uri, line, column)
        hits = engine.prefix_hits()[before:]
        if hits:            # typing into the suggestion is answered without the engine
            reused.append(hits[-1])
    assert len(reused) >= 3, reused
    last = (await status(client))["lastRun"]
    for kept, evaluated in reused:
        # One keystroke changes the prompt's last token or two; the rest comes from the cache.
        assert evaluated <= 3 and kept >= last["promptTokens"] - 40, (kept, evaluated, last)


async def test_cancel_mid_stream(engine, session, checkpoint):
    client, uri = session
    # A long answer: a blank line inside a block, many lines and tokens allowed.
    client.workspace_did_change_configuration(types.DidChangeConfigurationParams(
        settings={"stablelm": {"maxNewTokens": 1500, "maxLines": 1000}}))
    await status(client)
    change(client, uri, 2, (13, 0), (13, 0), "    \n")
    before = engine.log_text().count("Disconnected from client")
    future = client.protocol.send_request("textDocument/inlineCompletion",
                                          inline_params(uri, 13, 4), msg_id="cancel-me")
    await asyncio.sleep(0.3)
    client.cancel_request(types.CancelParams(id="cancel-me"))
    with pytest.raises(JsonRpcRequestCancelled):
        await asyncio.wrap_future(future)
    deadline = time.monotonic() + TIMEOUT_S
    while engine.log_text().count("Disconnected from client") == before:
        assert time.monotonic() < deadline, "the engine kept generating for a cancelled request"
        await asyncio.sleep(0.05)
    # The engine is free again: a new request is answered.
    assert await inline(client, uri, 10, 12) is not None


async def test_chat_through_the_local_chat_template(engine, backend, session):
    client, _ = session
    messages = [{"role": "user", "content": "What does read_config return?"}]
    answer = await client.workspace_execute_command_async(types.ExecuteCommandParams(
        CHAT_COMMAND, [{"chatId": str(uuid.uuid4()), "messages": messages}]))
    prompt, request = prepare_turn(backend.info, [ChatMessage(**m) for m in messages],
                                   count_tokens=TokenCounter(backend.count_tokens),
                                   max_new_tokens=SETTINGS.chat_max_new_tokens)
    direct = engine_answer(engine, {"prompt": prompt.text, "max_tokens": request.max_new_tokens,
                                    "stop": list(engine_stops(request.stop, backend.info.stop_texts))})
    assert answer["text"] == direct["choices"][0]["text"] and answer["promptTokens"] > 0


async def test_chat_through_the_engines_chat_route(engine, tmp_path):
    # The model named by its served name only: no tokenizer here, the engine's template.
    async with serving(tmp_path, engine.url, "--model", "tiny") as (client, _):
        messages = [{"role": "user", "content": "Hello"}]
        chat_id = str(uuid.uuid4())
        answer = await client.workspace_execute_command_async(types.ExecuteCommandParams(
            CHAT_COMMAND, [{"chatId": chat_id, "messages": messages}]))
        direct = engine_answer(engine, {"messages": messages, "max_tokens": SETTINGS.chat_max_new_tokens},
                               route="/v1/chat/completions")
        assert answer["text"] == direct["choices"][0]["message"]["content"]
        assert "".join(client.deltas.get(chat_id, [])) == answer["text"]
