"""End to end: the real server over stdio (pytest-lsp's client), a tiny StarCoder2-style checkpoint
built in the test session, the real engine."""
from __future__ import annotations

import asyncio
import json
import os
import random
import subprocess
import sys

import pytest
import pytest_asyncio
from lsprotocol import types
from pygls.exceptions import JsonRpcRequestCancelled

from lsp_testing import (
    SOURCE,
    TIMEOUT_S,
    change,
    inline,
    inline_params,
    open_document,
    start_client,
    status,
    stop_client,
    wait_for_state,
)
from checkpoints import starcoder_specials
from stablelm_lsp.lsp.documents import split_lines
from stablelm_lsp.lsp.postprocess import postprocess
from stablelm_lsp.inference.prompts.fim import build_prompt
from stablelm_lsp.lsp.settings import Settings

SPECIAL = starcoder_specials()


# One server serves the tests that do not need a fresh process; each uses its own documents.
pytestmark = pytest.mark.asyncio(loop_scope="module")


@pytest.fixture(scope="module")
def model(starcoder2_checkpoint):
    return starcoder2_checkpoint


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def shared(model, tmp_path_factory):
    state = tmp_path_factory.mktemp("shared-server")
    client, result = await start_client(model, state)
    yield client, result, state
    await stop_client(client)


async def configure(client, **values) -> None:
    """Change settings; the status round trip makes sure the server has applied them."""
    client.workspace_did_change_configuration(types.DidChangeConfigurationParams(
        settings={"stablelm": values}))
    await status(client)


def _uri(tmp_path, name="a.py"):
    return (tmp_path / "proj" / name).as_uri()


async def test_capabilities_progress_and_status(shared, model):
    client, result, _ = shared
    caps = result.capabilities
    assert isinstance(caps.inline_completion_provider, types.InlineCompletionOptions)
    assert caps.completion_provider is not None
    assert caps.text_document_sync.change == types.TextDocumentSyncKind.Incremental
    assert caps.text_document_sync.open_close
    assert {"stablelm.status", "stablelm.accepted"} <= set(caps.execute_command_provider.commands)
    assert caps.position_encoding == types.PositionEncodingKind.Utf16
    assert result.server_info.name == "stablelm-lsp"

    current = await status(client)
    assert current["state"] == "ready" and current["model"] == model.name
    assert current["builtin"] is False and current["device"] == "cpu"
    # the kernels measured on this machine (or reused from an earlier measurement)
    kernels = current["kernels"]
    assert kernels["source"].startswith("measured") and kernels["linear"] and kernels["draftTokens"] >= 0
    # Loading was reported with $/progress: begin ... end.
    (reports,) = client.progress_reports.values()
    assert reports[0].kind == "begin" and reports[-1].kind == "end"


async def test_inline_completion_equals_cli_generate(shared, model):
    client, _, state = shared
    uri = _uri(state, "generate.py")
    # after the indentation of "        return ..." in read_config: token healing leaves
    # indentation alone, so the server's prompt is exactly the CLI's
    line, character = 6, 8
    open_document(client, uri, SOURCE)
    items = await inline(client, uri, line, character)

    lines = split_lines(SOURCE)
    prompt = build_prompt(lines, line, character, special=SPECIAL, count_tokens=len,
                          context_tokens=100_000, path="generate.py", repo="proj")
    cli = subprocess.run(
        [sys.executable, "-m", "stablelm_lsp.lsp", "generate", "--model", str(model), "--json",
         "--max-new-tokens", str(Settings().max_new_tokens), "--prompt", prompt.text],
        capture_output=True, text=True, timeout=120, check=True)
    generated = json.loads(cli.stdout)["text"]
    expected = postprocess(generated, line_before=prompt.line_before, line_after=prompt.line_after,
                           next_lines=prompt.next_lines, max_lines=Settings().max_lines)
    assert expected is not None, "the tiny model's completion here is empty: pick another spot"
    assert len(items) == 1
    assert items[0].insert_text == expected.text
    assert items[0].command.command == "stablelm.accepted"
    cli_json = json.loads(cli.stdout)
    run = (await status(client))["lastRun"]
    assert run["promptTokens"] == cli_json["prompt_tokens"]
    assert run["generatedTokens"] == len(cli_json["token_ids"])
    assert 0 <= run["acceptedTokens"] <= run["draftedTokens"]
    assert isinstance(run["draftLength"], int) and run["draftLength"] >= 0   # in process: known


async def test_astral_characters_left_of_the_cursor_in_utf16_and_utf8(shared, model, tmp_path):
    cursor_line = 'x = "\U0001F600\U0001F680 h\u00e9llo"; print(x.up'
    text = f"import sys\n{cursor_line}\nprint(x)\n"
    columns = {"utf-16": len(cursor_line.encode("utf-16-le")) // 2,   # 2 units per emoji
               "utf-8": len(cursor_line.encode())}                    # 4 bytes per emoji
    assert columns["utf-16"] != columns["utf-8"] != len(cursor_line)
    answers = {}
    client, _, state = shared
    uri = _uri(state, "emoji.py")
    open_document(client, uri, text)
    answers["utf-16"] = [i.insert_text for i in await inline(client, uri, 1, columns["utf-16"])]
    utf8_client, result = await start_client(model, tmp_path, encodings=["utf-8"])
    try:
        assert result.capabilities.position_encoding == "utf-8"
        open_document(utf8_client, uri, text)
        answers["utf-8"] = [i.insert_text for i in await inline(utf8_client, uri, 1, columns["utf-8"])]
    finally:
        await stop_client(utf8_client)
    assert answers["utf-16"] == answers["utf-8"] and answers["utf-16"][0]

    # `stablelm-lsp complete` answers the same at the same place, given in code points.
    path = state / "proj" / "emoji.py"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    cli = subprocess.run(
        [sys.executable, "-m", "stablelm_lsp.lsp", "complete", str(path), "--line", "1",
         "--character", str(len(cursor_line)), "--encoding", "utf-32", "--model", str(model),
         "--root", str(state / "proj"), "--json"],
        capture_output=True, text=True, timeout=120, check=True)
    (item,) = json.loads(cli.stdout)["items"]
    assert item["insertText"] == answers["utf-16"][0]


async def test_latest_wins_edits_and_cancel_request(shared):
    client, _, state = shared
    uri = _uri(state, "latest.py")
    open_document(client, uri, SOURCE)
    # A long debounce makes the overlaps deterministic: the first request is still waiting.
    await configure(client, debounceMs=400)
    try:
        first = asyncio.ensure_future(inline(client, uri, 6, 15))
        await asyncio.sleep(0.1)
        second = await inline(client, uri, 6, 15)
        assert await first == []          # superseded by the newer request for the document
        assert len(second) == 1

        pending = asyncio.ensure_future(inline(client, uri, 12, 14))
        await asyncio.sleep(0.1)
        change(client, uri, 2, (12, 14), (12, 14), "  ")
        assert await pending == []        # the document changed under it

        future = client.protocol.send_request("textDocument/inlineCompletion",
                                              inline_params(uri, 12, 16), msg_id="to-cancel")
        await asyncio.sleep(0.1)
        client.cancel_request(types.CancelParams(id="to-cancel"))
        with pytest.raises(JsonRpcRequestCancelled):
            await asyncio.wrap_future(future)
        assert (await status(client))["state"] == "ready"
    finally:
        await configure(client, debounceMs=0)


async def test_cancel_during_generation_leaves_the_cache_consistent(shared):
    client, _, state = shared
    reference_uri, other_uri = _uri(state, "ref.py"), _uri(state, "other.py")
    await configure(client, maxNewTokens=400, maxLines=1000)
    try:
        open_document(client, reference_uri, SOURCE)
        reference = await inline(client, reference_uri, 11, 0)
        open_document(client, other_uri, SOURCE)
        for delay in (0.02, 0.05, 0.1):
            msg_id = f"cancel-{delay}"
            future = client.protocol.send_request("textDocument/inlineCompletion",
                                                  inline_params(other_uri, 11, 0), msg_id=msg_id)
            await asyncio.sleep(delay)
            client.cancel_request(types.CancelParams(id=msg_id))
            try:
                await asyncio.wrap_future(future)
            except JsonRpcRequestCancelled:
                pass
        again = await inline(client, other_uri, 11, 0)
        assert [i.insert_text for i in again] == [i.insert_text for i in reference]
    finally:
        await configure(client, maxNewTokens=Settings().max_new_tokens, maxLines=Settings().max_lines)


async def test_type_through_answers_from_memory(shared):
    client, _, state = shared
    uri = _uri(state, "type_through.py")
    open_document(client, uri, SOURCE)
    (item,) = await inline(client, uri, 12, 14)        # at the end of "        print(line)"
    text = item.insert_text
    assert len(text.split("\n")[0]) >= 3, f"need a longer first line to type through: {text!r}"
    shown = (await status(client))["completionsShown"]
    version = 1
    for n in range(1, 3):
        version += 1
        change(client, uri, version, (12, 14 + n - 1), (12, 14 + n - 1), text[n - 1])
        (rest,) = await inline(client, uri, 12, 14 + n)
        assert rest.insert_text == text[n:]
        assert rest.command.arguments == item.command.arguments
    assert (await status(client))["completionsShown"] == shown     # no model run

    # A character that does not match the suggestion: the model runs again.
    version += 1
    change(client, uri, version, (12, 16), (12, 16), "#" if text[2] != "#" else "@")
    assert await inline(client, uri, 12, 17) != [rest]
    assert (await status(client))["completionsShown"] >= shown


async def test_fifty_incremental_edits_match_a_fresh_server(shared, model, tmp_path):
    edited, _, state = shared
    uri = _uri(state, "edited.py")
    rng = random.Random(4)
    text = SOURCE
    open_document(edited, uri, text)
    pieces = ["x", "\n", "    ", "\U0001F600", "é", "()", "return ", ""]
    for version in range(2, 52):
        lines = text.split("\n")
        row = rng.randrange(len(lines))
        start = (row, rng.randrange(len(lines[row]) + 1))
        if rng.random() < 0.3 and row + 1 < len(lines):          # across a line break
            end = (row + 1, rng.randrange(len(lines[row + 1]) + 1))
        else:
            end = (row, min(start[1] + rng.randrange(3), len(lines[row])))
        new = rng.choice(pieces)
        offset = lambda p: sum(len(x) + 1 for x in lines[:p[0]]) + p[1]  # noqa: E731
        utf16 = lambda p: (p[0], len(lines[p[0]][:p[1]].encode("utf-16-le")) // 2)  # noqa: E731
        text = text[:offset(start)] + new + text[offset(end):]
        change(edited, uri, version, utf16(start), utf16(end), new)
        if rng.random() < 0.1:    # a stale edit, which must be ignored
            change(edited, uri, version - 1, (0, 0), (0, 0), "STALE")
    last = text.split("\n")
    row = len(last) // 2
    position = (row, len(last[row].encode("utf-16-le")) // 2)
    after_edits = await inline(edited, uri, *position)

    fresh, _ = await start_client(model, tmp_path, root=state / "proj")
    try:
        open_document(fresh, uri, text)
        from_scratch = await inline(fresh, uri, *position)
    finally:
        await stop_client(fresh)
    assert [(i.insert_text, i.range) for i in after_edits] == \
           [(i.insert_text, i.range) for i in from_scratch]


async def test_completion_request_and_accept_counts(shared):
    client, _, state = shared
    uri = _uri(state, "accept.py")
    open_document(client, uri, SOURCE)
    before = await status(client)
    result = await client.text_document_completion_async(types.CompletionParams(
        text_document=types.TextDocumentIdentifier(uri), position=types.Position(6, 15)))
    assert result.is_incomplete and len(result.items) == 1
    item = result.items[0]
    assert item.text_edit.range.start == types.Position(6, 15)
    assert item.text_edit.new_text
    (arguments,) = item.command.arguments

    execute = client.workspace_execute_command_async
    assert await execute(types.ExecuteCommandParams("stablelm.accepted", [arguments])) == {"counted": True}
    assert await execute(types.ExecuteCommandParams("stablelm.accepted", [arguments])) == {"counted": False}
    assert await execute(types.ExecuteCommandParams("stablelm.accepted", [{"id": "unknown"}])) == {"counted": False}
    with pytest.raises(Exception, match="takes one argument"):
        await execute(types.ExecuteCommandParams("stablelm.accepted", ["not an object"]))
    after = await status(client)
    assert after["completionsShown"] == before["completionsShown"] + 1
    assert after["completionsAccepted"] == before["completionsAccepted"] + 1
    # Accepts are written at once to the stats file under $XDG_STATE_HOME.
    saved = json.loads((state / "stablelm-lsp" / "stats.json").read_text())
    assert saved["completionsAccepted"] == after["completionsAccepted"]


async def test_settings_from_initialization_options_and_configuration_changes(
        model, stablelm_checkpoint, tmp_path):
    client, _ = await start_client(model, tmp_path, init_options={"enabled": False, "bogus": 1,
                                                                  "maxNewTokens": "many"})
    uri = _uri(tmp_path)
    try:
        open_document(client, uri, SOURCE)
        assert await inline(client, uri, 6, 15) == []           # disabled
        warnings = [m.message for m in client.messages]
        assert any("bogus" in m for m in warnings) and any("maxNewTokens" in m for m in warnings)

        client.workspace_did_change_configuration(types.DidChangeConfigurationParams(
            settings={"stablelm": {"enabled": True}}))
        assert len(await inline(client, uri, 6, 15)) == 1

        # Another model: loaded in the background, then used (prefix-only: no FIM tokens needed).
        client.workspace_did_change_configuration(types.DidChangeConfigurationParams(
            settings={"stablelm": {"model": str(stablelm_checkpoint)}}))
        current = await wait_for_state(client, "ready", "error", model=stablelm_checkpoint.name)
        assert current["state"] == "ready" and current["model"] == stablelm_checkpoint.name
        await inline(client, uri, 6, 15)

        # int8 weights on the own kernel: loaded again, reported in the status
        await configure(client, dtype="int8", linear="rows")
        current = await wait_for_state(client, "ready", "error")
        assert current["state"] == "ready" and current["dtype"] == "int8", current
        assert all(group["choice"][0][1] == "rows" for group in current["kernels"]["linear"].values())
        assert current["kernels"]["kvDtype"] == "float16"     # auto, for int8 weights on a CPU
        await inline(client, uri, 6, 15)
        await configure(client, dtype="int8", linear="rows", kvDtype="float32")
        current = await wait_for_state(client, "ready", "error")
        assert current["state"] == "ready" and current["kernels"]["kvDtype"] == "float32", current
        await inline(client, uri, 6, 15)
    finally:
        await stop_client(client)


async def test_a_reload_replaced_by_another_ends_its_progress(model, stablelm_checkpoint, tmp_path):
    client, _ = await start_client(model, tmp_path)
    try:
        for target in (stablelm_checkpoint, model):    # the second replaces the first at once
            client.workspace_did_change_configuration(types.DidChangeConfigurationParams(
                settings={"stablelm": {"model": str(target)}}))
        # Three progresses (the first load and both reloads), each begun and ended once.
        loop = asyncio.get_running_loop()
        deadline = loop.time() + TIMEOUT_S
        while True:
            kinds = {token: [r.kind for r in reports]
                     for token, reports in client.progress_reports.items()}
            done = len(kinds) == 3 and all(k[-1] == "end" for k in kinds.values())
            if done or loop.time() > deadline:
                break
            await asyncio.sleep(0.05)
        assert len(kinds) == 3 and all(k[0] == "begin" and k[-1] == "end" and k.count("end") == 1
                                       for k in kinds.values()), kinds
        current = await wait_for_state(client, "ready", "error", model=model.name)
        assert current["state"] == "ready"
    finally:
        await stop_client(client)


async def test_requests_while_loading_get_empty_results(model, tmp_path):
    # A checkpoint whose config.json is a pipe: loading blocks until the test writes it.
    slow = tmp_path / "slow-model"
    slow.mkdir()
    for f in model.iterdir():
        if f.name != "config.json":
            os.symlink(f, slow / f.name)
    os.mkfifo(slow / "config.json")
    client, _ = await start_client(slow, tmp_path, wait_ready=False)
    uri = _uri(tmp_path)
    try:
        open_document(client, uri, SOURCE)
        loading = await status(client)
        assert loading["state"] == "loading"
        assert await inline(client, uri, 6, 15) == []
        config = (model / "config.json").read_bytes()
        await asyncio.to_thread(_write_fifo, slow / "config.json", config)
        ready = await wait_for_state(client, "ready")
        assert len(await inline(client, uri, 6, 15)) == 1
        # One name in both states (the folder's), the folder itself apart.
        assert loading["model"] == ready["model"] == "slow-model"
        assert loading["path"] == ready["path"] == str(slow)
    finally:
        await stop_client(client)


def _write_fifo(path, data):
    with open(path, "wb") as f:
        f.write(data)


async def test_a_model_that_fails_to_load_is_reported_and_the_server_stays_up(tmp_path):
    missing = tmp_path / "no-such-model"
    client, _ = await start_client(missing, tmp_path, wait_ready=False)
    uri = _uri(tmp_path)
    try:
        current = await wait_for_state(client, "error")
        assert str(missing) in current["message"]
        open_document(client, uri, SOURCE)
        assert await inline(client, uri, 0, 0) == []
        assert any(m.type == types.MessageType.Error for m in client.messages)
    finally:
        assert await stop_client(client) == 0
