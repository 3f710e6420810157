"""`stablelm.chat` end to end: the real server over stdio, driven by pytest-lsp's client, on tiny
checkpoints built in the test session. Replies are compared with the in-process engine given
the same prompt."""
from __future__ import annotations

import asyncio
import sys
import uuid
from collections import defaultdict
from pathlib import Path

import pytest
import pytest_asyncio
from lsprotocol import types
from pygls.exceptions import JsonRpcInvalidParams, JsonRpcRequestCancelled
from pytest_lsp import ClientServerConfig, client_capabilities, make_test_lsp_client

from stablelm_lsp.inference.backend import LocalBackend
from stablelm_lsp.inference.prompts.chat import EditorContext, prepare_turn
from stablelm_lsp.inference.prompts.chat_template import ChatMessage
from stablelm_lsp.lsp.chat import CHAT_COMMAND, CHAT_DELTA_NOTIFICATION
from stablelm_lsp.lsp.documents import split_lines
from test_chat_format import STRICT_TEMPLATE, copy_with_chat_template

pytestmark = pytest.mark.asyncio(loop_scope="module")

SERVER = [sys.executable, "-m", "stablelm_lsp.lsp.cli", "--stdio", "--device", "cpu",
          "--dtype", "float32"]
SOURCE = ("import math\n\n\ndef area(radius):\n    \"\"\"The area of a circle.\"\"\"\n"
          "    return math.pi * radius ** 2\n\n\nprint(area(2.0))\n")
SELECTION = {"start": {"line": 3, "character": 0}, "end": {"line": 5, "character": 32}}  # area()
QUESTION = "What does this function return?"


@pytest.fixture(scope="module")
def completion_checkpoint(checkpoint_factory) -> Path:
    """No chat template (the Zephyr fallback); 4096 positions leave room for whole replies."""
    return checkpoint_factory("stablelm-3b", max_position_embeddings=4096)


@pytest.fixture(scope="module")
def chat_checkpoint(checkpoint_factory, tmp_path_factory) -> Path:
    """Another family, with a chat template of its own."""
    source = checkpoint_factory("stablelm-2-1.6b", max_position_embeddings=4096)
    return copy_with_chat_template(source, tmp_path_factory.mktemp("chat-model"), STRICT_TEMPLATE,
                                   weights=True)


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("workspace")
    (root / "pkg").mkdir()
    return root


async def start_server(command: list[str], workspace: Path):
    """A client connected to a fresh server; `client.deltas[chatId]` collects chat deltas."""
    deltas: dict[str, list[str]] = defaultdict(list)

    def factory():
        client = make_test_lsp_client()

        @client.feature(CHAT_DELTA_NOTIFICATION)
        def on_delta(params):
            deltas[params.chatId].append(params.delta)

        return client

    client = await ClientServerConfig(server_command=command, client_factory=factory).start()
    client.deltas = deltas
    await client.initialize_session(types.InitializeParams(
        capabilities=client_capabilities("visual-studio-code"), root_uri=workspace.as_uri(),
        workspace_folders=[types.WorkspaceFolder(workspace.as_uri(), workspace.name)]))
    uri = (workspace / "pkg" / "geometry.py").as_uri()
    client.text_document_did_open(types.DidOpenTextDocumentParams(
        types.TextDocumentItem(uri=uri, language_id="python", version=1, text=SOURCE)))
    client.document_uri = uri
    return client


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def client(completion_checkpoint, workspace):
    client = await start_server([*SERVER, "--model", str(completion_checkpoint)], workspace)
    yield client
    await client.shutdown_session()
    await client.stop()


@pytest.fixture(scope="module")
def reference(completion_checkpoint):
    """The same checkpoint in this process, to compute the reply the server must give."""
    backend = LocalBackend.load(completion_checkpoint, device="cpu", dtype="float32")
    yield backend
    backend.close()


def chat_params(messages: list[dict], chat_id: str | None = None, **extra) -> dict:
    return {"chatId": chat_id or str(uuid.uuid4()), "messages": messages, **extra}


async def chat(client, params: dict):
    return await client.workspace_execute_command_async(
        types.ExecuteCommandParams(command=CHAT_COMMAND, arguments=[params]))


def field(result, name: str):
    return result[name] if isinstance(result, dict) else getattr(result, name)


def expected_reply(backend: LocalBackend, messages: list[ChatMessage], context=None, keep_from=0):
    prompt, request = prepare_turn(backend.info, messages, count_tokens=backend.count_tokens,
                                   context=context, keep_from=keep_from)
    return prompt, backend.generate(request)


def geometry_context() -> EditorContext:
    """What the server makes of `SELECTION` in the open document."""
    lines = split_lines(SOURCE)
    text = "".join(lines[3:5]) + lines[5][:32]
    return EditorContext("pkg/geometry.py", "python", lines, text, 3, 5)


async def test_reply_streams_deltas_and_matches_the_engine_on_the_same_prompt(client, reference):
    params = chat_params([{"role": "user", "content": QUESTION}],
                         context={"uri": client.document_uri, "range": SELECTION})
    result = await chat(client, params)
    prompt, expected = expected_reply(reference, [ChatMessage("user", QUESTION)], geometry_context())
    assert "def area(radius):" in prompt.text and "Selected code from pkg/geometry.py" in prompt.text
    assert field(result, "chatId") == params["chatId"]
    assert field(result, "text") == expected.text and len(expected.token_ids) > 100
    assert field(result, "finishReason") == expected.finish_reason
    assert field(result, "promptTokens") == prompt.tokens == expected.prompt_tokens
    assert "".join(client.deltas[params["chatId"]]) == field(result, "text")
    assert len(client.deltas[params["chatId"]]) > 1


async def test_a_chat_without_chat_id_gets_one_from_the_server(client, reference):
    """The argument as first specified, {messages, context?}: the server makes the chatId, uses
    it in the deltas and returns it."""
    result = await chat(client, {"messages": [{"role": "user", "content": QUESTION}]})
    chat_id = field(result, "chatId")
    assert isinstance(chat_id, str) and chat_id
    _, expected = expected_reply(reference, [ChatMessage("user", QUESTION)])
    assert field(result, "text") == expected.text
    assert "".join(client.deltas[chat_id]) == expected.text


async def test_second_turn_reuses_the_cache_of_the_first(client, reference, capsys):
    first_question = "Explain the selected code."
    context = {"uri": client.document_uri, "range": SELECTION}
    first = await chat(client, chat_params([{"role": "user", "content": first_question}],
                                           context=context))
    # A new chatId per request, as the VS Code client sends; history without the context.
    history = [{"role": "user", "content": first_question},
               {"role": "assistant", "content": field(first, "text")},
               {"role": "user", "content": "Can it be shorter?"}]
    second = await chat(client, chat_params(history))
    first_prompt = field(first, "promptTokens")
    reused = field(second, "reusedTokens")
    with capsys.disabled():
        print(f"\nsecond turn: {reused} of {field(second, 'promptTokens')} prompt tokens reused "
              f"(first turn prompt {first_prompt}, reply {len(field(first, 'text'))} chars)")
    assert reused >= first_prompt - 1      # the last token may merge with the reply's first
    # What the server answered equals the engine on the prompt that folds the first context in.
    messages = [ChatMessage("user", first_question)]
    prompt1, _ = expected_reply(reference, messages, geometry_context())
    conversation = [*prompt1.conversation, ChatMessage("assistant", field(first, "text")),
                    ChatMessage("user", "Can it be shorter?")]
    prompt2, expected = expected_reply(reference, conversation, keep_from=prompt1.first_kept)
    assert prompt2.text.startswith(prompt1.text + field(first, "text"))
    assert field(second, "text") == expected.text


async def test_cancel_stops_the_stream_and_leaves_the_engine_usable(client, reference):
    messages = [{"role": "user", "content": QUESTION}]
    _, uncancelled = expected_reply(reference, [ChatMessage("user", QUESTION)], geometry_context())
    assert uncancelled.finish_reason == "length"     # 512 tokens: long enough to be cut short
    params = chat_params(messages, context={"uri": client.document_uri, "range": SELECTION})
    chat_id = params["chatId"]
    request_id = f"chat-{chat_id}"
    future = asyncio.ensure_future(client.protocol.send_request_async(   # sent once scheduled
        types.WORKSPACE_EXECUTE_COMMAND,
        types.ExecuteCommandParams(command=CHAT_COMMAND, arguments=[params]), msg_id=request_id))
    while not client.deltas[chat_id]:
        await asyncio.sleep(0.005)
    client.protocol.notify(types.CANCEL_REQUEST, types.CancelParams(id=request_id))
    with pytest.raises(JsonRpcRequestCancelled):
        await future
    at_response = len(client.deltas[chat_id])
    await asyncio.sleep(0.5)
    after = len(client.deltas[chat_id]) - at_response
    # Deltas sent before the cancel was read come before the answer; none may follow it
    # (the engine stops within a step, and what it emits meanwhile is dropped).
    assert after == 0, f"{after} deltas arrived after the cancellation was answered"
    assert at_response + after < len(uncancelled.token_ids) // 2
    # The engine serves the next request, and the cancelled one left its prompt cached.
    again = await chat(client, {**params, "chatId": str(uuid.uuid4())})
    assert field(again, "text") == uncancelled.text
    assert field(again, "reusedTokens") >= field(again, "promptTokens") - 1


async def test_a_message_quoting_special_tokens_is_answered_as_text(client, reference):
    question = "Why does `<|endoftext|>` end a turn and <|user|> start one? <fim_middle>"
    result = await chat(client, chat_params([{"role": "user", "content": question}]))
    prompt, expected = expected_reply(reference, [ChatMessage("user", question)])
    tok = reference.tokenizer
    ids = tok.encode_parts(prompt.parts)
    # The question is in the prompt as its plain encoding; the special ids are the template's:
    # <|endoftext|> once, ending the user turn (the tiny tokenizer has no <|user|> token).
    plain = tok.encode(question, parse_special=False)
    assert any(ids[i:i + len(plain)] == plain for i in range(len(ids)))
    assert [i for i in ids if tok.is_added(i)] == [tok.token_to_id("<|endoftext|>")]
    assert field(result, "promptTokens") == len(ids) == expected.prompt_tokens
    assert field(result, "text") == expected.text
    assert field(result, "finishReason") == expected.finish_reason


BAD_REQUESTS = [
    ("unknown role", lambda uri: [chat_params([{"role": "robot", "content": "hi"}])],
     "role is 'robot'"),
    ("empty messages", lambda uri: [chat_params([])], "non-empty list"),
    ("no argument", lambda uri: [], "takes one argument"),
    ("two arguments", lambda uri: [chat_params([{"role": "user", "content": "a"}])] * 2,
     "takes one argument"),
    ("empty chatId", lambda uri: [{"chatId": "", "messages": [{"role": "user", "content": "a"}]}],
     "chatId"),
    ("last from assistant", lambda uri: [chat_params([{"role": "assistant", "content": "a"}])],
     "must be the user's"),
    ("context not open", lambda uri: [chat_params([{"role": "user", "content": "a"}],
                                                  context={"uri": uri + ".missing"})], "is not open"),
    ("range reversed", lambda uri: [chat_params(
        [{"role": "user", "content": "a"}],
        context={"uri": uri, "range": {"start": {"line": 5, "character": 0},
                                       "end": {"line": 1, "character": 0}}})], "ends before"),
    ("range malformed", lambda uri: [chat_params(
        [{"role": "user", "content": "a"}],
        context={"uri": uri, "range": {"start": {"line": "x"}}})], "context.range"),
    ("over-long message", lambda uri: [chat_params([{"role": "user", "content": "word " * 20000}])],
     "takes at most"),
]


@pytest.mark.parametrize("name, arguments, message", BAD_REQUESTS, ids=[b[0] for b in BAD_REQUESTS])
async def test_bad_requests_get_invalid_params_and_the_server_stays_up(client, name, arguments,
                                                                       message):
    with pytest.raises(JsonRpcInvalidParams, match=message):
        await client.workspace_execute_command_async(types.ExecuteCommandParams(
            command=CHAT_COMMAND, arguments=arguments(client.document_uri)))
    ok = await chat(client, chat_params([{"role": "user", "content": "still there?"}]))
    assert field(ok, "finishReason") in ("eos", "length", "stop")


async def test_a_configured_chat_model_answers_with_its_own_template(completion_checkpoint,
                                                                   chat_checkpoint, workspace):
    client = await start_server([*SERVER, "--model", str(completion_checkpoint),
                                 "--chat-model", str(chat_checkpoint)], workspace)
    try:
        result = await chat(client, chat_params([{"role": "user", "content": QUESTION}]))
    finally:
        await client.shutdown_session()
        await client.stop()
    backend = LocalBackend.load(chat_checkpoint, device="cpu", dtype="float32")
    try:
        prompt, expected = expected_reply(backend, [ChatMessage("user", QUESTION)])
    finally:
        backend.close()
    assert prompt.text == f'<|endoftext|>[U1] "{QUESTION}"\n[A] '
    assert field(result, "promptTokens") == prompt.tokens
    assert field(result, "text") == expected.text
