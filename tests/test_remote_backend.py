"""RemoteBackend against a real HTTP server answering in vLLM's, llama.cpp's, Ollama's and plain
OpenAI formats (tests/fake_engine.py): requests, streaming, cancellation, and every fault."""
from __future__ import annotations

import asyncio
import logging
import ssl
import subprocess
import threading
import time

import pytest

from fake_engine import FakeEngine, free_port
from stablelm_lsp.inference.api import GenerationRequest, PromptPart
from stablelm_lsp.inference.errors import EngineError, InvalidParameter
from stablelm_lsp.inference.remote.backend import ZERO_WIDTH_SPACE, RemoteBackend, RemoteOptions
from stablelm_lsp.inference.remote.engines import MAX_STOPS
from stablelm_lsp.models import Tokenizer

FIM = (PromptPart("<fim_prefix>", True), PromptPart("def f(x):\n    "), PromptPart("<fim_suffix>", True),
       PromptPart("\n"), PromptPart("<fim_middle>", True), PromptPart("ret"))


@pytest.fixture
def engines():
    started: list[FakeEngine] = []

    def make(kind: str = "vllm", **fields) -> FakeEngine:
        engine = FakeEngine(kind=kind, **fields).start()
        started.append(engine)
        return engine

    yield make
    for engine in started:
        engine.stop()


@pytest.fixture
def backends():
    made: list[RemoteBackend] = []

    def make(url: str, **options) -> RemoteBackend:
        backend = RemoteBackend.connect(RemoteOptions(url, **options))
        made.append(backend)
        return backend

    yield make
    for backend in made:
        backend.close()


@pytest.fixture(scope="module")
def tokenizer_dir(checkpoint_factory):
    return checkpoint_factory("starcoder2")


def generate(backend, **fields):
    deltas: list[str] = []
    request = GenerationRequest(prompt_parts=fields.pop("parts", FIM), **fields)
    return backend.generate(request, on_delta=deltas.append), deltas


def wait_until(test, timeout=10.0):
    deadline = time.monotonic() + timeout
    while not test():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


# -- detection and what each kind is sent ------------------------------------------------------

@pytest.mark.parametrize("kind", ["vllm", "llamacpp", "ollama", "openai"])
def test_kind_is_detected_and_the_answer_streamed(engines, backends, kind):
    engine = engines(kind, reply="urn x + 1\n", piece_chars=3)
    backend = backends(engine.url)
    assert backend.engine == kind and backend.health.ok
    result, deltas = generate(backend, stop=("\n",), key="doc")
    assert result.text == "urn x + 1" and "".join(deltas) == result.text and len(deltas) >= 3
    assert result.finish_reason in ("stop", "eos")
    body = engine.completions()[-1].body
    assert "\n" in (body["options"]["stop"] if kind == "ollama" else body["stop"])
    info = backend.info
    assert info.device == engine.url and info.dtype == kind and not info.builtin


def test_explicit_kind_skips_detection(engines, backends):
    engine = engines("llamacpp")
    backend = backends(engine.url, kind="vllm")
    assert backend.engine == "vllm"
    assert not any(r.path in ("/props", "/api/version") for r in engine.received)


@pytest.mark.parametrize("kind", ["vllm", "llamacpp"])
def test_token_ids_when_the_tokenizer_is_known_and_the_engine_takes_them(engines, backends,
                                                                         tokenizer_dir, kind):
    engine = engines(kind)
    backend = backends(engine.url, model=str(tokenizer_dir))
    generate(backend, key="doc")
    body = engine.completions()[-1].body
    expected = Tokenizer.from_folder(tokenizer_dir).encode_parts(FIM, add_special_tokens=True)
    assert body["prompt"] == expected
    # The setting named the tokenizer's folder; the engine serves one model, which is used.
    assert body["model"] == "tiny"


@pytest.mark.parametrize("kind", ["ollama", "openai"])
def test_text_prompts_with_the_fim_markers_elsewhere(engines, backends, tokenizer_dir, kind):
    engine = engines(kind)
    backend = backends(engine.url, model=str(tokenizer_dir))
    generate(backend)
    body = engine.completions()[-1].body
    assert body["prompt"] == "<fim_prefix>def f(x):\n    <fim_suffix>\n<fim_middle>ret"
    if kind == "ollama":
        assert body["raw"] is True and body["model"] == "tiny:latest"


def test_special_token_text_in_a_document_reaches_a_text_engine_as_text(engines, backends,
                                                                         tokenizer_dir):
    engine = engines("openai")
    backend = backends(engine.url, model=str(tokenizer_dir))
    parts = (PromptPart("<fim_prefix>", True), PromptPart("s = '<fim_middle>'\n"),
             PromptPart("<fim_middle>", True))
    generate(backend, parts=parts)
    prompt = engine.completions()[-1].body["prompt"]
    assert prompt == f"<fim_prefix>s = '<{ZERO_WIDTH_SPACE}fim_middle>'\n<fim_middle>"


def test_at_most_four_stop_strings_the_request_first(engines, backends, tokenizer_dir):
    engine = engines("vllm")
    backend = backends(engine.url, model=str(tokenizer_dir))
    result, _ = generate(backend, stop=("\n", "A", "B"))
    body = engine.completions()[-1].body
    assert len(body["stop"]) == MAX_STOPS and body["stop"][:3] == ["\n", "A", "B"]
    assert body["stop_token_ids"]   # the model's special stops go as token ids
    assert result.text == "return x"


def test_llamacpp_extras(engines, backends, tokenizer_dir):
    engine = engines("llamacpp", slots=2)
    backend = backends(engine.url, model=str(tokenizer_dir))
    generate(backend, key="a", max_lines=4, indent=4, time_budget_s=2.0)
    generate(backend, key="b")
    generate(backend, key="a")
    generate(backend, key="c")      # a third document takes the least recently used slot (b's)
    bodies = [r.body for r in engine.completions()]
    assert [b["id_slot"] for b in bodies] == [0, 1, 0, 1]
    assert all(b["cache_prompt"] is True for b in bodies)
    assert bodies[0]["n_indent"] == 4 and bodies[0]["t_max_predict_ms"] == 2000
    assert "n_indent" not in bodies[1]      # single-line requests have no indentation limit
    assert bodies[0]["min_p"] == 0.0 and bodies[0]["top_k"] == -1


def test_cached_tokens_are_reported(engines, backends, tokenizer_dir):
    engine = engines("llamacpp")
    backend = backends(engine.url, model=str(tokenizer_dir))
    first, _ = generate(backend, key="doc")
    typed = FIM[:-1] + (PromptPart("retu"),)
    second, _ = generate(backend, parts=typed, key="doc")
    assert first.reused_tokens == 0 and first.prompt_tokens > 10
    assert second.prompt_tokens - 3 <= second.reused_tokens < second.prompt_tokens


def test_without_a_tokenizer_the_engine_tells_special_tokens_and_token_sizes(engines, backends,
                                                                            tokenizer_dir):
    engine = engines("vllm", tokenizer=Tokenizer.from_folder(tokenizer_dir))
    backend = backends(engine.url, model="tiny")
    special = backend.info.special
    assert (special.fim_prefix, special.fim_middle, special.file_sep) == \
        ("<fim_prefix>", "<fim_middle>", "<file_sep>")
    text = "def read_lines(path):\n    return open(path).read().splitlines()\n"
    assert backend.count_tokens(text) >= len(engine.tokenizer.encode(text)) * 0.7
    assert backend.info.max_positions == engine.context


def test_ollama_template_gives_the_markers(engines, backends):
    engine = engines("ollama", template="{{ if .Suffix }}<fim_prefix>{{ .Prompt }}<fim_suffix>"
                                        "{{ .Suffix }}<fim_middle>{{ else }}{{ .Prompt }}{{ end }}")
    backend = backends(engine.url, model="tiny")
    assert backend.info.special.has_fim and backend.info.max_positions == engine.context


def test_a_model_the_engine_does_not_serve(engines, backends):
    engine = engines("ollama")
    engine.model = "other"
    backend = backends(engine.url, model="tiny")
    assert backend.health.fault == "model-missing" and "other" in backend.health.message


def test_chat_goes_to_the_chat_route_without_a_tokenizer(engines, backends):
    engine = engines("vllm", reply="Hello there.")
    backend = backends(engine.url)
    messages = (("system", "Be brief."), ("user", "Hi"))
    result, deltas = generate(backend, parts=(PromptPart("<|user|>Hi", True),), messages=messages,
                              max_new_tokens=50)
    received = engine.completions()[-1]
    assert received.path == "/v1/chat/completions"
    assert received.body["messages"] == [{"role": "system", "content": "Be brief."},
                                         {"role": "user", "content": "Hi"}]
    assert result.text == "Hello there." and "".join(deltas) == result.text


def test_chat_uses_the_local_template_when_the_tokenizer_is_known(engines, backends, tokenizer_dir):
    engine = engines("llamacpp", reply="Hello.")
    backend = backends(engine.url, model=str(tokenizer_dir))
    parts = (PromptPart("<|user|>\n", True), PromptPart("Hi"), PromptPart("<|assistant|>\n", True))
    result, _ = generate(backend, parts=parts, messages=(("user", "Hi"),))
    assert engine.completions()[-1].path == "/v1/completions" and result.text == "Hello."


def test_text_rules_apply_to_the_stream(engines, backends):
    engine = engines("vllm", reply="a\nb\nc\nd\ne\n", piece_chars=3)
    backend = backends(engine.url)
    result, deltas = generate(backend, max_lines=2)
    assert result.text == "a\nb\n" and result.finish_reason == "max_lines"
    assert "".join(deltas) == result.text


def test_length_and_bad_requests(engines, backends):
    engine = engines("vllm", reply="0123456789")
    backend = backends(engine.url)
    result, _ = generate(backend, max_new_tokens=2)
    assert result.finish_reason == "length" and result.text == "0123"
    with pytest.raises(InvalidParameter):
        generate(backend, max_new_tokens=0)
    with pytest.raises(InvalidParameter):
        generate(backend, stop="\n")


# -- cancellation ------------------------------------------------------------------------------

def test_cancel_closes_the_stream(engines, backends):
    engine = engines("vllm", reply="x" * 400, piece_chars=1, delay_s=0.01)
    backend = backends(engine.url)
    cancel = threading.Event()
    deltas: list[str] = []

    def on_delta(delta: str) -> None:
        deltas.append(delta)
        if len(deltas) == 5:
            cancel.set()

    request = GenerationRequest(prompt_parts=FIM, max_new_tokens=400)
    result = backend.generate(request, cancel=cancel, on_delta=on_delta)
    assert result.finish_reason == "cancelled" and 5 <= len(result.text) < 100
    assert engine.wait_for(lambda: engine.disconnects == 1), "the engine did not see the client go"
    assert engine.streams_finished == 0


def test_newer_request_for_the_same_document_supersedes(engines, backends):
    engine = engines("llamacpp", reply="y" * 300, piece_chars=1, delay_s=0.01)
    backend = backends(engine.url)
    results = {}

    def first() -> None:
        results["old"] = backend.generate(GenerationRequest(prompt_parts=FIM, max_new_tokens=300,
                                                            key="doc"))

    thread = threading.Thread(target=first)
    thread.start()
    engine.wait_for(lambda: len(engine.completions()) == 1)
    time.sleep(0.1)
    engine.reply = "new"
    newer, _ = generate(backend, key="doc")
    thread.join(10)
    assert results["old"].finish_reason == "superseded" and newer.text == "new"
    assert engine.wait_for(lambda: engine.disconnects == 1)


async def test_cancelling_the_awaiting_task_closes_the_stream(engines, backends):
    engine = engines("ollama", reply="z" * 300, piece_chars=1, delay_s=0.01)
    backend = backends(engine.url)
    task = asyncio.ensure_future(backend.agenerate(GenerationRequest(prompt_parts=FIM,
                                                                     max_new_tokens=300)))
    await asyncio.sleep(0.3)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert await asyncio.to_thread(engine.wait_for, lambda: engine.disconnects == 1)


def test_time_budget_ends_a_slow_answer_with_what_came(engines, backends):
    engine = engines("vllm", reply="w" * 200, piece_chars=1, delay_s=0.02)
    backend = backends(engine.url)
    start = time.monotonic()
    result, _ = generate(backend, max_new_tokens=200, time_budget_s=0.5)
    assert result.finish_reason == "time" and 0 < len(result.text) < 200
    assert time.monotonic() - start < 2.0


# -- faults ------------------------------------------------------------------------------------

def test_engine_down_at_start_then_up(engines, backends):
    port = free_port()
    backend = backends(f"http://127.0.0.1:{port}")
    changes = []
    backend.on_health_change(changes.append)
    assert not backend.health.ok and backend.health.fault == "unreachable"
    assert "cannot reach the engine at http://127.0.0.1" in backend.health.message
    start = time.monotonic()
    with pytest.raises(EngineError) as raised:
        generate(backend)
    assert time.monotonic() - start < 0.5 and raised.value.fault == "unreachable"
    engines("llamacpp", port=port)
    wait_until(lambda: backend.health.ok, timeout=20)
    assert changes[-1].ok and backend.engine == "llamacpp"
    result, _ = generate(backend, stop=("\n",))
    assert result.text == "return x"


def test_engine_dying_mid_answer_then_restarting(engines, backends):
    engine = engines("vllm", reply="v" * 100, piece_chars=1, die_after=10)
    backend = backends(engine.url)
    with pytest.raises(EngineError) as raised:
        generate(backend, max_new_tokens=100)
    assert raised.value.fault == "disconnected" and not backend.health.ok
    assert "closed the connection in the middle of an answer" in str(raised.value)
    engine.die_after = None
    wait_until(lambda: backend.health.ok)
    result, _ = generate(backend, max_new_tokens=100)
    assert result.text == "v" * 100


def test_engine_restarting_between_requests(engines, backends):
    engine = engines("llamacpp")
    backend = backends(engine.url)
    engine.stop()
    with pytest.raises(EngineError):
        generate(backend)
    assert backend.health.fault == "unreachable"
    engine.start()
    wait_until(lambda: backend.health.ok, timeout=20)
    assert generate(backend, stop=("\n",))[0].text == "return x"


def test_server_errors_then_recovery(engines, backends):
    engine = engines("llamacpp", fail_status=500)
    backend = backends(engine.url)
    for _ in range(3):
        with pytest.raises(EngineError) as raised:
            generate(backend)
    assert raised.value.fault == "http-500"
    assert "HTTP 500" in backend.health.message and "scripted failure 500" in backend.health.message
    engine.fail_status = None
    wait_until(lambda: backend.health.ok)
    wait_until(lambda: _succeeds(backend))


def _succeeds(backend) -> bool:
    try:
        generate(backend)
        return True
    except EngineError:
        return False


def test_a_refused_request_does_not_stop_the_next(engines, backends):
    engine = engines("openai", fail_status=400)
    backend = backends(engine.url)
    with pytest.raises(EngineError) as raised:
        generate(backend)
    assert raised.value.fault == "http-400" and "refused the request" in str(raised.value)
    assert not backend.health.ok
    engine.fail_status = None
    result, _ = generate(backend, stop=("\n",))        # no waiting for a probe
    assert result.text == "return x" and backend.health.ok


def test_slow_headers_time_out_within_the_budget(engines, backends):
    engine = engines("vllm")
    backend = backends(engine.url)
    engine.header_delay_s = 2.0
    start = time.monotonic()
    with pytest.raises(EngineError) as raised:
        generate(backend, time_budget_s=0.3)
    assert time.monotonic() - start < 1.0
    assert raised.value.fault == "timeout" and "did not answer" in str(raised.value)
    engine.header_delay_s = 0.0
    wait_until(lambda: backend.health.ok)


def test_api_key_is_sent_and_never_shown(engines, backends, caplog):
    secret = "sk-test-0123456789abcdef"
    engine = engines("vllm", api_key=secret)
    caplog.set_level(logging.DEBUG)
    without = backends(engine.url)
    assert without.health.fault == "auth" and "set STABLELM_LSP_API_KEY" in without.health.message
    wrong = backends(engine.url, api_key="sk-wrong-key")
    assert wrong.health.fault == "auth" and "refused the API key" in wrong.health.message
    assert "sk-wrong-key" not in wrong.health.message
    good = backends(engine.url, api_key=secret)
    assert good.health.ok
    generate(good)
    assert engine.completions()[-1].headers["Authorization"] == f"Bearer {secret}"
    assert secret not in repr(good.options) and secret not in caplog.text


def test_api_key_from_the_environment(engines, backends, monkeypatch):
    monkeypatch.setenv("STABLELM_LSP_API_KEY", "sk-env")
    engine = engines("openai", api_key="sk-env")
    assert backends(engine.url).health.ok


def test_bad_endpoint_and_kind_are_refused():
    with pytest.raises(InvalidParameter, match="http"):
        RemoteOptions("localhost:8000")
    with pytest.raises(InvalidParameter, match="endpointKind"):
        RemoteOptions("http://localhost:8000", kind="tgi")


def test_tls_certificates_are_verified(tmp_path, backends):
    key, cert = tmp_path / "key.pem", tmp_path / "cert.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key),
                    "-out", str(cert), "-days", "1", "-subj", "/CN=127.0.0.1"],
                   check=True, capture_output=True)
    engine = FakeEngine("vllm")
    engine.start()
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    engine._server.socket = context.wrap_socket(engine._server.socket, server_side=True)
    try:
        backend = backends(f"https://127.0.0.1:{engine.port}")
        assert backend.health.fault == "tls" and "certificate" in backend.health.message.lower()
    finally:
        engine.stop()
