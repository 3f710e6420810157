"""LocalBackend: the text-level interface lsp/ uses, on a real tiny checkpoint."""
from __future__ import annotations

import asyncio
import dataclasses
import random
import threading
import time

import pytest

from stablelm_lsp.inference.api import GenerationError, GenerationRequest, PromptPart
from stablelm_lsp.inference.backend import LocalBackend, line_text_ids
from stablelm_lsp.inference.errors import EmptyPrompt, InvalidParameter, PromptTooLong

PROMPT = "def parse(text):\n    result = []\n    for line in text.splitlines():\n"


@pytest.fixture(scope="module")
def backend(stablelm_checkpoint):
    progress = []
    b = LocalBackend.load(stablelm_checkpoint, device="cpu", dtype="float32",
                          progress=lambda frac, what: progress.append(frac))
    assert progress and progress[-1] == 1.0
    yield b
    b.close()


def collect(backend, request, **kw):
    deltas: list[str] = []
    result = backend.generate(request, on_delta=deltas.append, **kw)
    return result, deltas


def test_info_describes_the_checkpoint(backend, stablelm_checkpoint):
    info = backend.info
    assert info.model_type == "stablelm" and info.path == str(stablelm_checkpoint)
    assert info.special.has_fim and info.special.fim_middle == "<fim_middle>"
    assert "<|endoftext|>" in info.stop_texts and "<file_sep>" in info.stop_texts
    assert info.max_positions == 512 and (info.device, info.dtype) == ("cpu", "float32")
    assert info.builtin is False


def test_count_tokens_parses_special_tokens(backend):
    assert backend.count_tokens("<fim_prefix>") == 1
    assert backend.count_tokens("<fim_prefix>" + PROMPT) == 1 + backend.count_tokens(PROMPT)


def test_streamed_deltas_concatenate_to_the_text(backend):
    request = GenerationRequest(PROMPT, max_new_tokens=40, use_model_stops=False)
    result, deltas = collect(backend, request)
    assert result.finish_reason == "length" and len(result.token_ids) == 40
    assert "".join(deltas) == result.text and all(deltas)
    raw = backend.tokenizer.decode_bytes(result.token_ids).decode("utf-8", errors="replace")
    assert result.text == raw
    assert result.prompt_tokens == backend.count_tokens(PROMPT)


def test_stop_string_spanning_tokens_ends_the_text_before_it(backend):
    request = GenerationRequest(PROMPT, max_new_tokens=40, use_model_stops=False)
    free = backend.generate(request)
    pieces = [backend.tokenizer.decode_bytes([t]).decode("utf-8", errors="replace")
              for t in free.token_ids]
    # a stop string made of the end of one token and the start of the next
    for i in range(3, len(pieces) - 1):
        stop = pieces[i][-2:] + pieces[i + 1][:2]
        at = len("".join(pieces[:i + 1])) - len(pieces[i][-2:])
        if len(stop) >= 3 and stop.strip() and free.text.find(stop) == at:
            break
    else:
        pytest.fail(f"no usable token boundary in {pieces!r}")
    result, deltas = collect(backend, GenerationRequest(PROMPT, max_new_tokens=40, stop=(stop,),
                                                        use_model_stops=False))
    assert result.finish_reason == "stop"
    assert result.text == free.text[:at]
    assert "".join(deltas) == result.text  # nothing shown had to be taken back
    assert result.token_ids == free.token_ids[:i + 2]


def test_reused_tokens_are_reported_across_calls(backend):
    first = backend.generate(GenerationRequest(PROMPT, max_new_tokens=4, key="file:///a.py"))
    more = backend.generate(GenerationRequest(PROMPT + "        if", max_new_tokens=4,
                                              key="file:///a.py"))
    assert first.prompt_tokens > 10
    assert more.reused_tokens >= first.prompt_tokens - 2  # the tokenization of the tail may shift


def test_cancel_from_the_delta_callback(backend):
    cancel = threading.Event()
    deltas = []

    def on_delta(text):
        deltas.append(text)
        cancel.set()

    result = backend.generate(GenerationRequest(PROMPT, max_new_tokens=100, use_model_stops=False),
                              cancel=cancel, on_delta=on_delta)
    assert result.finish_reason == "cancelled" and len(result.token_ids) < 100
    assert backend.generate(GenerationRequest(PROMPT, max_new_tokens=3)).prompt_tokens > 0


async def test_agenerate_cancelled_by_asyncio_stops_the_engine(backend):
    deltas: list[str] = []
    started = asyncio.Event()
    loop = asyncio.get_running_loop()

    def on_delta(text):
        deltas.append(text)
        loop.call_soon_threadsafe(started.set)

    task = asyncio.ensure_future(backend.agenerate(
        GenerationRequest(PROMPT, max_new_tokens=400, use_model_stops=False), on_delta=on_delta))
    await asyncio.wait_for(started.wait(), 30)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    # the worker stopped within a step: the next request runs at once
    result = await asyncio.wait_for(backend.agenerate(GenerationRequest(PROMPT, max_new_tokens=2)), 30)
    assert result.finish_reason in ("length", "eos")
    assert len(deltas) < 400


@pytest.mark.parametrize("request_kwargs, error", [
    (dict(prompt=""), EmptyPrompt),
    (dict(prompt=PROMPT, max_new_tokens=0), InvalidParameter),
    (dict(prompt=PROMPT, temperature=-1.0), InvalidParameter),
    (dict(prompt=PROMPT, top_p=2.0), InvalidParameter),
    (dict(prompt=PROMPT, stop="\n"), InvalidParameter),
    (dict(prompt=PROMPT, max_lines=0), InvalidParameter),
    (dict(prompt=PROMPT, time_budget_s=-1.0), InvalidParameter),
    (dict(prompt="x " * 600), PromptTooLong),
])
def test_bad_requests_raise_specific_errors_and_the_backend_lives_on(backend, request_kwargs, error):
    with pytest.raises(error) as info:
        backend.generate(GenerationRequest(**request_kwargs))
    assert isinstance(info.value, GenerationError)
    assert backend.generate(GenerationRequest(PROMPT, max_new_tokens=2)).finish_reason in ("length", "eos")


# -- prompts as parts: special-token text in content stays text ---------------------------------

def fim_parts(prefix: str, suffix: str, middle: str) -> tuple[PromptPart, ...]:
    return (PromptPart("<fim_prefix>", special=True), PromptPart(prefix),
            PromptPart("<fim_suffix>", special=True), PromptPart(suffix),
            PromptPart("<fim_middle>", special=True), PromptPart(middle))


def contains_run(ids: list[int], run: list[int]) -> bool:
    return any(ids[i:i + len(run)] == run for i in range(len(ids) - len(run) + 1))


def test_parts_without_special_text_encode_as_the_joined_prompt(backend):
    tok = backend.tokenizer
    parts = fim_parts(PROMPT, "\n    return result\n", "        result.")
    joined = "".join(p.text for p in parts)
    assert tok.encode_parts(parts) == tok.encode(joined, parse_special=True)
    assert backend.count_tokens(parts) == backend.count_tokens(joined) == len(tok.encode(joined))


def test_special_token_text_in_plain_parts_is_encoded_as_text(backend):
    tok = backend.tokenizer
    prefix = 'END = "<|endoftext|>"\nMARK = "<fim_middle>"\n'
    suffix = "\n# <fim_prefix> and <file_sep> are only text here\n"
    middle = "x = '<fim_suffix>'"
    ids = tok.encode_parts(fim_parts(prefix, suffix, middle))
    fim = [tok.token_to_id(t) for t in ("<fim_prefix>", "<fim_suffix>", "<fim_middle>")]
    # The format's three markers are the only special ids; each piece of content is its plain
    # encoding, exactly.
    assert [i for i in ids if tok.is_added(i)] == fim
    assert ids == ([fim[0]] + tok.encode(prefix, parse_special=False) + [fim[1]]
                   + tok.encode(suffix, parse_special=False) + [fim[2]]
                   + tok.encode(middle, parse_special=False))
    assert backend.count_tokens(fim_parts(prefix, suffix, middle)) == len(ids)
    # A str prompt is the format's own text: its special-token text is parsed (generate --prompt).
    assert tok.token_to_id("<|endoftext|>") in tok.encode_parts([PromptPart(prefix, special=True)])
    # Special-token text split across two plain parts stays text too.
    split = (PromptPart("a <|endof"), PromptPart("text|> b"))
    assert tok.encode_parts(split) == tok.encode("a <|endoftext|> b", parse_special=False)


def test_generation_from_parts_runs_the_parts_encoding(backend):
    tok = backend.tokenizer
    parts = fim_parts('s = "<|endoftext|>"\n', "\n", "t = s")
    request = GenerationRequest(prompt_parts=parts, max_new_tokens=12, use_model_stops=False)
    result = backend.generate(request)
    ids = tok.encode_parts(parts, add_special_tokens=True)
    assert result.prompt_tokens == len(ids)
    direct = backend.engine.generate(ids, max_new_tokens=12)
    assert result.token_ids == direct.token_ids
    assert result.text == tok.decode_bytes(direct.token_ids).decode("utf-8", errors="replace")


@pytest.mark.parametrize("request_kwargs, error", [
    (dict(prompt="x", prompt_parts=(PromptPart("y"),)), InvalidParameter),
    (dict(prompt_parts="text"), InvalidParameter),
    (dict(prompt_parts=(("text", False),)), InvalidParameter),
    (dict(prompt_parts=(PromptPart(""), PromptPart("", special=True))), EmptyPrompt),
])
def test_bad_prompt_parts_are_refused(backend, request_kwargs, error):
    with pytest.raises(error):
        backend.generate(GenerationRequest(**request_kwargs))


# -- a blank cursor line gets text ----------------------------------------------------------------

def test_a_nonblank_first_token_puts_text_on_the_line(backend):
    tok = backend.tokenizer
    after_indent, at_column_0 = set(line_text_ids(tok, False)), set(line_text_ids(tok, True))
    assert after_indent < at_column_0 and not any(tok.is_added(i) for i in at_column_0)
    assert not any(tok.token_bytes[i].lstrip(b" \t").startswith(b"\n") for i in at_column_0)
    assert not any(tok.token_bytes[i].strip(b" \t") == b"" for i in after_indent)
    # indentation the cursor lacks may come first at column 0 only
    assert any(tok.token_bytes[i] == b"    " for i in at_column_0 - after_indent)
    # Prompts where the (random) model would end the line first: random text, drawn with fixed
    # seeds until a few are found (about one in 75 here).
    found = 0
    for seed in range(600):
        rng = random.Random(seed)
        text = tok.decode([rng.randrange(7, tok.vocab_size) for _ in range(12)])
        indent = rng.choice(["", "    "])
        allowed = at_column_0 if not indent else after_indent
        parts = (PromptPart(text),)
        free = backend.generate(GenerationRequest(prompt_parts=parts, max_new_tokens=1, use_model_stops=False))
        if free.token_ids[0] in allowed:
            continue
        found += 1
        got = backend.generate(GenerationRequest(prompt_parts=parts, max_new_tokens=6, use_model_stops=False,
                                                 nonblank_first_token=True, line_before=indent))
        assert got.token_ids[0] in allowed and not got.text.lstrip(" \t").startswith("\n")
        # the best allowed token, then the model's own continuation: the engine, same limit
        ids = tok.encode_parts(parts, add_special_tokens=True)
        direct = backend.engine.generate(ids, max_new_tokens=6, first_token_ids=sorted(allowed))
        assert direct.token_ids == got.token_ids
        if found == 3:
            break
    assert found == 3


# -- token healing ------------------------------------------------------------------------------

def last_token_extendable(backend, parts) -> tuple[list[int], bytes]:
    """The prompt's ids and the bytes of its last token, which other tokens must extend."""
    tok = backend.tokenizer
    ids = tok.encode_parts(parts, add_special_tokens=True)
    taken = tok.token_bytes[ids[-1]]
    assert len(tok.ids_starting_with(taken)) > 1, f"pick a prompt whose last token {taken!r} extends"
    return ids, taken


HEALING_MIDDLES = ["    for line in text.spl", "    result.app", "        if not li",
                   "    x = 'héllo wör", "    s = '日本 hél"]


@pytest.mark.parametrize("middle", HEALING_MIDDLES)
def test_healing_regenerates_the_last_token_and_returns_only_new_text(backend, middle):
    tok = backend.tokenizer
    parts = fim_parts(PROMPT, "\n    return result\n", middle)
    ids, taken = last_token_extendable(backend, parts)
    request = GenerationRequest(prompt_parts=parts, max_new_tokens=16, use_model_stops=False,
                                token_healing=True)
    result, deltas = collect(backend, request)
    # The first token extends the taken-back token; one more token than asked (the regenerated
    # one does not count); the text starts right after the prompt's end.
    assert tok.token_bytes[result.token_ids[0]].startswith(taken)
    assert result.prompt_tokens == len(ids) - 1 and len(result.token_ids) == 17
    generated = tok.decode_bytes(result.token_ids)
    assert result.text == generated[len(taken):].decode("utf-8", errors="replace")
    assert "".join(deltas) == result.text
    # Exactly the engine's run on the shortened prompt with the first token limited.
    direct = backend.engine.generate(ids[:-1], max_new_tokens=17,
                                     first_token_ids=tok.ids_starting_with(taken))
    assert direct.token_ids == result.token_ids


def test_healing_takes_back_a_partly_typed_word_split_into_several_tokens(backend):
    """`retur` typed as `ret` + `ur`: both are taken back and the first token must spell them
    (` return`), rather than `ur` again, which models answer by ending the text."""
    tok = backend.tokenizer
    found = None
    for word_id in range(tok.vocab_size):
        word = tok.token_bytes[word_id]
        if tok.is_added(word_id) or not word.startswith(b" ") or len(word) < 5 or not word[1:].isalpha():
            continue
        for cut in range(len(word) - 1, 2, -1):
            middle = "    x =" + word[:cut].decode()
            ids = tok.encode_parts(fim_parts(PROMPT, "\n", middle), add_special_tokens=True)
            tail = tok.decode_bytes(ids[-2:])
            if tail.endswith(word[:cut]) and word[:cut] not in tok.token_bytes[ids[-1]] \
                    and tok.token_bytes[ids[-2]] != b" ":
                found = middle, word[:cut], ids
                break
        if found:
            break
    assert found, "no word of the tiny vocabulary splits in two when typed partly"
    middle, typed, ids = found
    parts = fim_parts(PROMPT, "\n", middle)
    result = backend.generate(GenerationRequest(prompt_parts=parts, max_new_tokens=6,
                                                use_model_stops=False, token_healing=True))
    taken_back = len(ids) - result.prompt_tokens
    assert taken_back >= 2
    taken = tok.decode_bytes(ids[-taken_back:])
    assert taken.endswith(typed) and tok.token_bytes[result.token_ids[0]].startswith(taken)
    generated = tok.decode_bytes(result.token_ids)
    assert result.text == generated[len(taken):].decode("utf-8", errors="replace")
    direct = backend.engine.generate(ids[:-taken_back], max_new_tokens=7,
                                     first_token_ids=tok.ids_starting_with(taken))
    assert direct.token_ids == result.token_ids


def test_healing_with_a_stop_string_matches_the_text_after_the_prompt(backend):
    parts = fim_parts(PROMPT, "\n", "    result.app")
    free = backend.generate(GenerationRequest(prompt_parts=parts, max_new_tokens=24,
                                              use_model_stops=False, token_healing=True))
    stop = free.text[3:5]
    assert len(stop) == 2 and free.text.find(stop) == 3, free.text
    result, deltas = collect(backend, GenerationRequest(
        prompt_parts=parts, max_new_tokens=24, use_model_stops=False, token_healing=True,
        stop=(stop,)))
    assert result.finish_reason == "stop" and result.text == free.text[:3]
    assert "".join(deltas) == result.text


def test_no_healing_after_a_special_part_an_unextendable_token_or_indentation(backend):
    tok = backend.tokenizer
    ends_special = (PromptPart(PROMPT), PromptPart("<fim_middle>", special=True))
    as_string = GenerationRequest(PROMPT + "    result.app", max_new_tokens=4, token_healing=True)
    ordinary = [i for i in range(tok.vocab_size) if not tok.is_added(i) and tok.token_bytes[i]]
    # A token that no other token extends: healing has nothing to choose from.
    final = next(i for i in ordinary if tok.ids_starting_with(tok.token_bytes[i]) == [i]
                 and tok.encode(tok.decode([i]), parse_special=False) == [i])
    unextendable = (PromptPart(PROMPT + tok.decode([final])),)
    # Indentation: the tokens extending a run of spaces are longer runs, never the word after it.
    indented = fim_parts(PROMPT, "\n", "        ")
    assert tok.token_bytes[tok.encode_parts(indented)[-1]] == b"        "
    for request in (GenerationRequest(prompt_parts=ends_special, max_new_tokens=4, token_healing=True),
                    as_string,
                    GenerationRequest(prompt_parts=unextendable, max_new_tokens=4, token_healing=True),
                    GenerationRequest(prompt_parts=indented, max_new_tokens=4, token_healing=True)):
        healed = backend.generate(request)
        plain = backend.generate(dataclasses.replace(request, token_healing=False))
        assert healed.token_ids == plain.token_ids and healed.prompt_tokens == plain.prompt_tokens


def test_tokens_extending_bytes_are_found_by_binary_search(backend):
    tok = backend.tokenizer
    table = tok.token_bytes
    for prefix in (b"", b" ", b"re", b"\xff", b"<fim", "é".encode()[:1]):
        expected = sorted(i for i, b in enumerate(table)
                          if b and b.startswith(prefix) and not tok.is_added(i))
        assert sorted(tok.ids_starting_with(prefix)) == expected


def test_typing_with_healing_reuses_the_cached_prompt(backend):
    """Each keystroke's prompt (its last token taken back) extends the cached one: only the
    word being typed is computed again."""
    typed = "        result.append(line.strip())"
    previous = None
    for n in range(8, len(typed) + 1):
        parts = fim_parts(PROMPT, "\n    return result\n", typed[:n])
        result = backend.generate(GenerationRequest(prompt_parts=parts, max_new_tokens=2,
                                                    token_healing=True, key="file:///typing.py"))
        if previous is not None:
            assert result.reused_tokens >= min(previous.prompt_tokens, result.prompt_tokens) - 3
        previous = result


def test_a_completion_overtakes_a_chat_reply_and_drafts_are_reported(backend):
    """A chat-priority request (1) lets a completion (0) run between its steps; repeating a
    greedy request drafts the whole previous completion."""
    order: list[str] = []
    done: dict = {}
    completion = threading.Thread(target=lambda: done.setdefault("doc", backend.generate(
        GenerationRequest(prompt=PROMPT, max_new_tokens=4, key="doc", use_model_stops=False),
        on_delta=lambda d: order.append("doc"))))

    def on_chat_delta(delta: str) -> None:
        order.append("chat")
        if order.count("chat") == 2:
            completion.start()
            while backend.engine.scheduler.pending < 2:
                time.sleep(0.001)

    chat = backend.generate(GenerationRequest(prompt="Hello there, ", max_new_tokens=24, key="chat:1",
                                              priority=1, use_model_stops=False),
                            on_delta=on_chat_delta)
    completion.join(10)
    assert done["doc"].finish_reason == "length" and order.count("chat") >= 4
    last_doc = max(i for i, who in enumerate(order) if who == "doc")
    assert last_doc < len(order) - 1 and order[:2] == ["chat", "chat"]   # the chat went on after
    again = backend.generate(GenerationRequest(prompt="Hello there, ", max_new_tokens=24, key="chat:1",
                                               use_model_stops=False))
    assert again.text == chat.text and again.accepted_tokens >= 20, again
