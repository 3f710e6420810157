"""LocalBackend: the text-level interface lsp/ uses, on a real tiny checkpoint."""
from __future__ import annotations

import asyncio
import threading

import pytest

from stablelm_lsp.inference.api import GenerationError, GenerationRequest
from stablelm_lsp.inference.backend import LocalBackend
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
