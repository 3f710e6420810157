"""The chat reply length setting, end to end: the real server, a tiny checkpoint, the engine's own
reply to the same prompt as the reference."""
from __future__ import annotations

import sys
import uuid

import pytest
from lsprotocol import types
from pytest_lsp import ClientServerConfig, client_capabilities

from stablelm_lsp.inference.backend import LocalBackend
from stablelm_lsp.inference.prompts.chat import prepare_turn
from stablelm_lsp.inference.prompts.chat_template import ChatMessage
from stablelm_lsp.lsp.chat import CHAT_COMMAND

QUESTION = "What does this function return?"


@pytest.mark.asyncio
async def test_chat_max_new_tokens_limits_the_reply(checkpoint_factory, tmp_path):
    model = checkpoint_factory("stablelm-3b", max_position_embeddings=4096)
    limit = 7
    reference = LocalBackend.load(model, device="cpu", dtype="float32")
    try:
        _, request = prepare_turn(reference.info, [ChatMessage("user", QUESTION)],
                                  count_tokens=reference.count_tokens, max_new_tokens=limit)
        expected = reference.generate(request)
    finally:
        reference.close()
    assert expected.finish_reason == "length" and len(expected.token_ids) == limit

    command = [sys.executable, "-m", "stablelm_lsp.lsp", "--stdio", "--model", str(model),
               "--device", "cpu", "--dtype", "float32", "--stats-file", str(tmp_path / "stats.json")]
    client = await ClientServerConfig(server_command=command).start()
    try:
        await client.initialize_session(types.InitializeParams(
            capabilities=client_capabilities("visual-studio-code"),
            initialization_options={"chatMaxNewTokens": limit}))
        result = await client.workspace_execute_command_async(types.ExecuteCommandParams(
            command=CHAT_COMMAND, arguments=[{"chatId": str(uuid.uuid4()),
                                              "messages": [{"role": "user", "content": QUESTION}]}]))
    finally:
        await client.shutdown_session()
        await client.stop()
    assert (result["finishReason"], result["text"]) == ("length", expected.text)
