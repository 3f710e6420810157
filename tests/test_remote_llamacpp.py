"""The language server on a real engine: llama-cpp-python's OpenAI-compatible server running a GGUF
converted from a test checkpoint (tests/llama_cpp_engine.py). Completions over LSP are what the
engine answers for the same prompt, typing reuses the engine's cache (as the engine itself
reports it), cancelling stops the engine's stream, and chat works both through the engine's chat
route and through the local chat template.

Skipped, saying why, without llama-cpp-python's server; `STABLELM_TEST_REMOTE=1 bash
scripts/test.sh` installs it (CI does)."""
from __future__ import annotations

import asyncio
import json
import shutil
import time
import uuid

import httpx
import pytest
import pytest_asyncio
from lsprotocol import types
from pygls.exceptions import JsonRpcRequestCancelled

import llama_cpp_engine
from checkpoints import SPECIAL_TOKENS
from lsp_testing import SOURCE, TIMEOUT_S, change, inline, inline_params, status
from stablelm_lsp.inference.api import GenerationResult, prompt_text
from stablelm_lsp.inference.prompts.budget import TokenCounter
from stablelm_lsp.inference.prompts.chat import ChatMessage, prepare_turn
from stablelm_lsp.inference.remote.backend import RemoteBackend, RemoteOptions
from stablelm_lsp.inference.remote.engines import engine_stops
from stablelm_lsp.inference.stopping import TextStops
from stablelm_lsp.lsp.chat import CHAT_COMMAND
from stablelm_lsp.lsp.completion import Completer
from stablelm_lsp.lsp.documents import Cursor, split_lines
from stablelm_lsp.lsp.settings import Settings
from stablelm_lsp.models import Tokenizer
from test_remote_lsp import eventually, serving

pytestmark = pytest.mark.skipif(llama_cpp_engine.missing() is not None,
                                reason=str(llama_cpp_engine.missing()))
asyncio_test = pytest.mark.asyncio(loop_scope="module")

CURSORS = [(10, 12), (10, 25), (11, 8), (6, 15), (12, 14)]      # mid-line and line ends
CHAT_TOKENS = 200
SETTINGS = Settings(debounce_ms=0, timeout_ms=600_000, chat_max_new_tokens=CHAT_TOKENS)


@pytest.fixture(scope="module")
def checkpoint(checkpoint_factory, tmp_path_factory):
    """A tiny StableLM whose output rows are zero for its special tokens and for the tokens with
    non-ASCII bytes: its other logits are far from zero either way, so it never ends a text (an
    answer runs to its length limit, long enough to cancel midway), never writes a FIM marker and
    writes ASCII only. (llama-cpp-python's streaming slows down with the length of the answer
    when a random model writes bytes that are not UTF-8: 400 tokens took 46 s, against 1 s.)"""
    from safetensors.torch import load_file, save_file

    source = checkpoint_factory("stablelm-3b", max_position_embeddings=2048)
    folder = tmp_path_factory.mktemp("ascii-endless")
    for file in source.iterdir():
        if file.name != "model.safetensors":
            shutil.copy(file, folder / file.name)
    token_bytes = Tokenizer.from_folder(source).token_bytes
    silent = [i for i, piece in enumerate(token_bytes)
              if i < len(SPECIAL_TOKENS) or any(b >= 0x80 for b in piece)]
    weights = load_file(source / "model.safetensors")
    weights["lm_head.weight"][silent] = 0.0
    save_file(weights, folder / "model.safetensors", metadata={"format": "pt"})
    return folder


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
                       "--chat-max-new-tokens", str(CHAT_TOKENS), text=SOURCE) as (client, uri):
        yield client, uri


def engine_answer(engine, body: dict, route: str = "/v1/completions") -> str:
    """The engine's own answer to `body`, asked directly and streamed as the server streams it
    (llama-cpp-python's streamed text can differ from its whole answer: a character made of
    several tokens goes missing from the stream)."""
    chat = route.endswith("/chat/completions")
    body = {"model": "tiny", "temperature": 0.0, "top_p": 1.0, **body, "stream": True}
    pieces = []
    with httpx.stream("POST", f"{engine.url}{route}", json=body, timeout=TIMEOUT_S) as response:
        response.raise_for_status()
        for line in response.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            choices = json.loads(line[len("data: "):])["choices"]
            if choices:
                pieces.append((choices[0].get("delta", {}).get("content") if chat
                               else choices[0].get("text")) or "")
    return "".join(pieces)


def expected_completion(engine, backend, lines, cursor) -> str | None:
    """What the server should show at `cursor`: its own prompt and rules, the engine's text."""
    completer = Completer(backend, SETTINGS)
    pending = completer.prepare(lines, Cursor(*cursor), path="a.py", repo="proj",
                                context_files=[], key="expected")
    request = pending.request
    text = engine_answer(engine, {
        "prompt": prompt_text(request.parts()), "max_tokens": request.max_new_tokens,
        "stop": list(engine_stops(request.stop, backend.info.stop_texts))})
    # The server applies the request's text rules to the stream (a partly typed statement ends
    # at the line's end); the same rules on the engine's text.
    stops = TextStops(request.stop, request.max_lines, request.continued_by, request.line_before)
    shown, reason = stops.feed(text)
    completion = completer.finish(pending, GenerationResult(
        text=shown if reason else shown + stops.finish()))
    return completion.text if completion else None


def test_the_engine_tokenizes_as_the_checkpoint_does(engine, backend):
    """The GGUF's tokenizer is the checkpoint's: what the prompt was budgeted with is what runs."""
    text = SOURCE + "<fim_middle>"
    tokens = httpx.post(f"{engine.url}/extras/tokenize", json={"input": text}).json()["tokens"]
    ours = backend._local.tokenizer.encode(text, parse_special=True)
    assert tokens[-len(ours):] == ours and len(tokens) - len(ours) <= 1     # a BOS at most


@asyncio_test
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


@asyncio_test
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
    print(f"keystrokes answered by the engine: {len(reused)}; (prompt tokens from its cache, "
          f"evaluated) each: {reused}; last prompt {last['promptTokens']} tokens")
    for kept, evaluated in reused:
        # One keystroke changes the prompt's last token or two; the rest comes from the cache.
        assert evaluated <= 3 and kept >= last["promptTokens"] - 40, (kept, evaluated, last)


@asyncio_test
async def test_cancel_mid_stream(engine, session):
    client, uri = session
    # A long answer (this model never ends a text; 1000 tokens take the engine seconds): a blank
    # line inside a block, many lines allowed.
    client.workspace_did_change_configuration(types.DidChangeConfigurationParams(
        settings={"stablelm": {"maxNewTokens": 1000, "maxLines": 1000}}))
    await status(client)
    change(client, uri, 2, (13, 0), (13, 0), "    \n")
    answered = engine.log_text().count("POST /v1/completions")
    disconnected = engine.log_text().count("Disconnected from client")
    future = client.protocol.send_request("textDocument/inlineCompletion",
                                          inline_params(uri, 13, 4), msg_id="cancel-me")
    await eventually(lambda: engine.log_text().count("POST /v1/completions") > answered)
    await asyncio.sleep(0.3)        # the engine is streaming its answer
    client.cancel_request(types.CancelParams(id="cancel-me"))
    with pytest.raises(JsonRpcRequestCancelled):
        await asyncio.wrap_future(future)
    # The server closed the stream: the engine saw its client go and stopped generating.
    start = time.monotonic()
    await eventually(lambda: engine.log_text().count("Disconnected from client") > disconnected)
    print(f"the engine logged the disconnect {time.monotonic() - start:.2f} s after the cancel")


@asyncio_test
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
    assert answer["text"] == direct and answer["promptTokens"] > 0


@asyncio_test
async def test_chat_through_the_engines_chat_route(engine, tmp_path):
    # The model named by its served name only: no tokenizer here, the engine's template.
    async with serving(tmp_path, engine.url, "--model", "tiny",
                       "--chat-max-new-tokens", str(CHAT_TOKENS)) as (client, _):
        messages = [{"role": "user", "content": "Hello"}]
        chat_id = str(uuid.uuid4())
        answer = await client.workspace_execute_command_async(types.ExecuteCommandParams(
            CHAT_COMMAND, [{"chatId": chat_id, "messages": messages}]))
        direct = engine_answer(engine, {"messages": messages, "max_tokens": SETTINGS.chat_max_new_tokens},
                               route="/v1/chat/completions")
        assert answer["text"] == direct
        assert "".join(client.deltas.get(chat_id, [])) == answer["text"]
