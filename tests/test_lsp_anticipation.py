"""End to end, the real server over stdio and a tiny StarCoder2-style checkpoint: completions
prepared before they are asked for (after a suggestion is shown, at stablelm/didFocus, after a
timeout), used only for exactly their state; choices for explicit requests; the context ring."""
from __future__ import annotations

import asyncio
import time

import pytest
import pytest_asyncio
from lsprotocol import types

from lsp_testing import (SOURCE, TIMEOUT_S, change, inline, inline_params, open_document,
                         start_client, status, stop_client)
from stablelm_lsp.lsp.documents import Cursor, after_insertion

pytestmark = pytest.mark.asyncio(loop_scope="module")


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def shared(starcoder2_checkpoint, tmp_path_factory):
    state = tmp_path_factory.mktemp("anticipation")
    client, _ = await start_client(starcoder2_checkpoint, state)
    yield client, state
    await stop_client(client)


def opened(shared, name: str) -> tuple:
    """(client, uri) of a new document `name` holding SOURCE."""
    client, state = shared
    uri = (state / "proj" / name).as_uri()
    open_document(client, uri, SOURCE)
    return client, uri


async def computed_again(client, uri: str, version: int, cursor: tuple[int, int],
                         shown: list) -> list:
    """The items at `cursor` computed by the model now: a character typed and deleted there
    (versions `version` and `version + 1`) leaves nothing prepared or shown for it. The
    character is one no item of `shown` starts with (typing through a suggestion keeps it)."""
    before = await counters(client)
    starts = {item.insert_text[:1] for item in shown}
    typed = next(c for c in "#@$" if c not in starts)
    change(client, uri, version, cursor, cursor, typed)
    change(client, uri, version + 1, cursor, (cursor[0], cursor[1] + 1), "")
    items = await inline(client, uri, *cursor)
    assert (await counters(client))["modelRuns"] == before["modelRuns"] + 1
    return items


async def counters(client) -> dict:
    return (await status(client))["counters"]


async def idle(client) -> dict:
    """The counters once no background request runs any more."""
    deadline = time.monotonic() + TIMEOUT_S
    while (current := await counters(client))["backgroundRunning"]:
        assert time.monotonic() < deadline, f"background work still running: {current}"
        await asyncio.sleep(0.02)
    return current


def accept(client, uri: str, version: int, item: types.InlineCompletionItem,
           cursor: tuple[int, int]) -> tuple[int, int]:
    """Insert `item` as an editor does (over its range, if any); returns the cursor after it."""
    start = (item.range.start.line, item.range.start.character) if item.range else cursor
    end = (item.range.end.line, item.range.end.character) if item.range else cursor
    change(client, uri, version, start, end, item.insert_text)
    after = after_insertion(Cursor(*start), item.insert_text)
    return after.line, after.index


def items_of(items):
    return [(i.insert_text, i.range) for i in items]


async def test_after_an_accept_the_next_completion_is_ready_and_exact(shared):
    client, uri = opened(shared, "accept.py")
    (item,) = await inline(client, uri, 12, 14)          # at the end of "        print(line)"
    await client.workspace_execute_command_async(types.ExecuteCommandParams(
        "stablelm.accepted", item.command.arguments))
    cursor = accept(client, uri, 2, item, (12, 14))
    before = await idle(client)
    run = (await status(client))["lastRun"]["run"]
    prepared = await inline(client, uri, *cursor)
    after = await counters(client)
    assert after["prepared"] == before["prepared"] + 1
    assert after["modelRuns"] == before["modelRuns"]
    assert (await status(client))["lastRun"]["run"] == run          # the model did not run

    # The same state computed by the model now: the same items.
    assert items_of(await computed_again(client, uri, 3, cursor, prepared)) == items_of(prepared)


async def test_typing_that_diverges_discards_what_was_prepared(shared):
    client, uri = opened(shared, "diverge.py")
    (item,) = await inline(client, uri, 12, 14)
    text = item.insert_text
    before = await idle(client)
    # Typing the suggestion's first character keeps what was prepared for accepting it.
    change(client, uri, 2, (12, 14), (12, 14), text[0])
    assert (await counters(client))["discarded"] == before["discarded"]
    (rest,) = await inline(client, uri, 12, 15)
    assert rest.insert_text == text[1:]
    # A character the suggestion does not have: discarded, and the next request runs the model.
    wrong = "@" if text[1] != "@" else "#"
    change(client, uri, 3, (12, 15), (12, 15), wrong)
    after = await counters(client)
    assert after["discarded"] == before["discarded"] + 1
    await inline(client, uri, 12, 16)
    final = await counters(client)
    assert final["modelRuns"] == after["modelRuns"] + 1 and final["prepared"] == after["prepared"]


async def test_what_was_prepared_answers_no_other_state(shared):
    client, uri = opened(shared, "elsewhere.py")
    await inline(client, uri, 12, 14)       # prepares the state after accepting this
    before = await idle(client)
    await inline(client, uri, 10, 4)        # the cursor moved: no edit, another prompt
    after = await counters(client)
    assert after["modelRuns"] == before["modelRuns"] + 1 and after["prepared"] == before["prepared"]


async def test_did_focus_prepares_that_position_and_bad_params_are_ignored(shared):
    client, uri = opened(shared, "focus.py")
    client.protocol.notify("stablelm/didFocus", {"uri": uri})                 # no position
    client.protocol.notify("stablelm/didFocus", {"uri": 3, "position": {"line": 0}})
    client.protocol.notify("stablelm/didFocus", {"uri": uri, "position": {"line": 6, "character": 8}})
    before = await idle(client)
    assert before["backgroundDone"] >= 1
    focused = await inline(client, uri, 6, 8)
    after = await counters(client)
    assert after["prepared"] == before["prepared"] + 1 and after["modelRuns"] == before["modelRuns"]
    # exact: the model gives the same at the same state
    assert items_of(await computed_again(client, uri, 2, (6, 8), focused)) == items_of(focused)
    # Any edit discards a focus preparation.
    client.protocol.notify("stablelm/didFocus", {"uri": uri, "position": {"line": 10, "character": 4}})
    change(client, uri, 4, (0, 0), (0, 0), "# edited\n")
    assert (await idle(client))["discarded"] > after["discarded"]


async def test_a_request_cut_by_its_time_budget_is_finished_in_the_background(shared):
    client, uri = opened(shared, "timeout.py")
    client.workspace_did_change_configuration(types.DidChangeConfigurationParams(
        settings={"stablelm": {"timeoutMs": 1}}))
    try:
        assert await inline(client, uri, 10, 11) == []           # out of time before any token
        before = await idle(client)
        assert before["backgroundDone"] >= 1
        (item,) = await inline(client, uri, 10, 11)
        assert item.insert_text
        assert (await counters(client))["prepared"] == before["prepared"] + 1
    finally:
        client.workspace_did_change_configuration(types.DidChangeConfigurationParams(
            settings={"stablelm": {"timeoutMs": 600000}}))


async def test_explicit_requests_get_distinct_choices_automatic_ones_one(shared):
    client, uri = opened(shared, "choices.py")
    (automatic,) = await inline(client, uri, 11, 4)
    params = inline_params(uri, 11, 4)
    params.context.trigger_kind = types.InlineCompletionTriggerKind.Invoked
    change(client, uri, 2, (0, 0), (0, 0), "")       # forget what was shown: compute again
    result = await client.text_document_inline_completion_async(params)
    texts = [i.insert_text for i in result.items]
    assert len(texts) == 3 and len(set(texts)) == 3, texts
    assert texts[0] == automatic.insert_text                       # the greedy one first
    assert len({tuple(i.command.arguments[0].values()) for i in result.items}) == 3


async def test_recently_edited_chunks_of_other_documents_reach_the_prompt_even_once_closed(shared):
    client, helper = opened(shared, "helpers.py")
    main = helper.replace("helpers.py", "main.py")
    change(client, helper, 2, (3, 4), (3, 15), "load_settings")       # def read_config -> ...
    client.text_document_did_close(types.DidCloseTextDocumentParams(
        types.TextDocumentIdentifier(helper)))
    open_document(client, main, "import helpers\n\nvalues = helpers.load_settings(path)\n")
    await inline(client, main, 2, 9)
    assert (await status(client))["lastRun"]["contextFiles"] == ["helpers.py"]
