"""A small HTTP server answering like vLLM, llama.cpp's server, Ollama or a plain OpenAI-compatible
server, in their documented formats, for the remote backend's tests.

Real HTTP on a real socket (http.server, one thread per connection, chunked transfer encoding as
those servers use): what it answers is scripted by the test (`reply`, pace, failures), and it
records what it received and whether a client went away in the middle of an answer.

Formats (from the engines' docs and sources):
- vLLM: GET /version, GET /v1/models (with max_model_len), POST /tokenize {model, prompt,
  add_special_tokens} -> {count, max_model_len, tokens}; completions stream OpenAI chunks with
  `stop_reason`, then a usage chunk (choices []) when stream_options.include_usage; more than 4
  stop strings or a `suffix` are refused with 400 {object: "error", message, type, param, code}.
- llama.cpp: GET /props {default_generation_settings: {n_ctx}, total_slots, ...}, GET /health,
  POST /tokenize {content, add_special, parse_special} -> {tokens}; completions take token ids,
  cache_prompt / id_slot / n_indent / t_max_predict_ms, keep each slot's last prompt and report
  the common prefix in `timings.cache_n` and `usage.prompt_tokens_details.cached_tokens`; errors
  {error: {code, message, type}}.
- Ollama: GET /api/version, POST /api/show {template, parameters, model_info}, POST
  /api/generate streams JSON lines {response, done, done_reason, prompt_eval_count, eval_count};
  errors {error: "..."}.
- OpenAI-compatible: /v1/models, /v1/completions (text prompts only), /v1/chat/completions;
  anything else 404 {detail: "Not Found"} (FastAPI's answer).
"""
from __future__ import annotations

import json
import socket
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Callable

KINDS = ("vllm", "llamacpp", "ollama", "openai")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Received:
    path: str
    body: Any
    headers: dict


@dataclass
class FakeEngine:
    kind: str = "vllm"
    model: str = "tiny"
    port: int = field(default_factory=free_port)
    context: int = 512
    slots: int = 2
    api_key: str | None = None
    tokenizer: Any = None           # a models.Tokenizer: real ids for /tokenize and id prompts
    template: str = "{{ .Prompt }}"     # Ollama's template for the model
    # What completions generate: the text (or a function of the request body), streamed in
    # pieces of `piece_chars` characters, one piece per token, `delay_s` apart.
    reply: str | Callable[[dict], str] = "return x\n"
    piece_chars: int = 2
    delay_s: float = 0.0
    header_delay_s: float = 0.0     # before the status line of a completion
    fail_status: int | None = None  # completions answer this HTTP error
    die_after: int | None = None    # pieces sent before the connection is cut mid-answer

    def __post_init__(self) -> None:
        assert self.kind in KINDS, self.kind
        self.received: list[Received] = []
        self.streams_finished = 0   # answers sent to the end
        self.disconnects = 0        # answers the client walked away from
        self.slot_prompts: dict[int, list] = {}
        self._server: ThreadingHTTPServer | None = None
        self._connections: set[socket.socket] = set()
        self._lock = threading.Lock()
        self.changed = threading.Condition(self._lock)

    # -- life --------------------------------------------------------------------------------

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> "FakeEngine":
        engine = self

        class Handler(_Handler):
            fake = engine

        class Server(ThreadingHTTPServer):
            request_queue_size = 64     # a real server's backlog: clients connect in parallel

            def handle_error(self, request, client_address) -> None:
                pass    # a client that went away (the tests look at what was sent instead)

        server = Server(("127.0.0.1", self.port), Handler)
        server.daemon_threads = True
        self._server = server
        threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05},
                         daemon=True).start()
        return self

    def stop(self) -> None:
        """Stop listening and cut every open connection (a crash or a restart)."""
        server, self._server = self._server, None
        if server is None:
            return
        server.shutdown()
        server.server_close()
        with self._lock:
            connections = list(self._connections)
        for conn in connections:
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def completions(self) -> list[Received]:
        return [r for r in self.received if r.path in ("/v1/completions", "/api/generate",
                                                       "/v1/chat/completions")]

    def wait_for(self, test: Callable[[], bool], timeout: float = 10.0) -> bool:
        deadline = time.monotonic() + timeout
        with self.changed:
            while not test():
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self.changed.wait(left)
        return True

    def _note(self, **counts: int) -> None:
        with self.changed:
            for name, n in counts.items():
                setattr(self, name, getattr(self, name) + n)
            self.changed.notify_all()


class _Cut(Exception):
    """The scripted death of the connection."""


class _Handler(BaseHTTPRequestHandler):
    fake: FakeEngine
    protocol_version = "HTTP/1.1"

    def log_message(self, *args) -> None:     # quiet
        pass

    def setup(self) -> None:
        super().setup()
        with self.fake._lock:
            self.fake._connections.add(self.connection)

    def finish(self) -> None:
        with self.fake._lock:
            self.fake._connections.discard(self.connection)
        try:
            super().finish()
        except OSError:
            pass

    # -- plumbing ----------------------------------------------------------------------------

    def _body(self) -> Any:
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length) if length else b""
        try:
            return json.loads(raw) if raw else None
        except ValueError:
            return raw.decode("utf-8", "replace")

    def _json(self, status: int, data: Any) -> None:
        payload = json.dumps(data).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    def _error(self, status: int, message: str) -> None:
        kind = self.fake.kind
        if kind == "vllm":
            body = {"object": "error", "message": message, "type": "BadRequestError",
                    "param": None, "code": status}
        elif kind == "ollama":
            body = {"error": message}
        elif kind == "llamacpp":
            body = {"error": {"code": status, "message": message, "type": "invalid_request_error"}}
        else:
            body = {"error": {"message": message, "type": "invalid_request_error", "code": status}}
        self._json(status, body)

    def _chunk(self, data: bytes) -> None:
        self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
        self.wfile.flush()

    def _authorized(self) -> bool:
        key = self.fake.api_key
        if key is None or self.path == "/health":
            return True
        if self.headers.get("Authorization") == f"Bearer {key}":
            return True
        self._error(401, "Invalid API key")
        return False

    # -- routes ------------------------------------------------------------------------------

    def do_GET(self) -> None:
        fake = self.fake
        with fake.changed:
            fake.received.append(Received(self.path, None, dict(self.headers)))
        if not self._authorized():
            return
        kind, path = fake.kind, self.path
        if path == "/v1/models":
            entry = {"id": fake.model + (":latest" if kind == "ollama" else ""), "object": "model",
                     "created": 0, "owned_by": kind}
            if kind == "vllm":
                entry.update(root=fake.model, max_model_len=fake.context)
            return self._json(200, {"object": "list", "data": [entry]})
        if kind == "vllm" and path == "/version":
            return self._json(200, {"version": "0.11.0"})
        if kind == "llamacpp" and path == "/props":
            return self._json(200, {"default_generation_settings": {"n_ctx": fake.context,
                                                                    "params": {}},
                                    "total_slots": fake.slots, "model_path": "/m/tiny.gguf",
                                    "bos_token": "<|endoftext|>", "eos_token": "<|endoftext|>",
                                    "build_info": "b0000-fake", "chat_template": ""})
        if kind == "llamacpp" and path == "/health":
            return self._json(200, {"status": "ok"})
        if kind == "ollama" and path == "/api/version":
            return self._json(200, {"version": "0.12.6"})
        self._json(404, {"detail": "Not Found"} if kind in ("openai", "vllm") else
                   {"error": {"code": 404, "message": "File Not Found", "type": "not_found_error"}}
                   if kind == "llamacpp" else {"error": "404 page not found"})

    def do_POST(self) -> None:
        fake = self.fake
        body = self._body()
        with fake.changed:
            fake.received.append(Received(self.path, body, dict(self.headers)))
            fake.changed.notify_all()
        if not self._authorized():
            return
        kind, path = fake.kind, self.path
        if path == "/tokenize" and kind in ("vllm", "llamacpp"):
            text = body.get("prompt" if kind == "vllm" else "content", "")
            tokens = fake.tokenizer.encode(text) if fake.tokenizer else list(range(len(text) // 4 + 1))
            answer = {"tokens": tokens}
            if kind == "vllm":
                answer.update(count=len(tokens), max_model_len=fake.context)
            return self._json(200, answer)
        if kind == "ollama" and path == "/api/show":
            if body.get("model") not in (fake.model, fake.model + ":latest"):
                return self._error(404, f"model '{body.get('model')}' not found")
            return self._json(200, {"template": fake.template,
                                    "parameters": f"num_ctx {fake.context}\nstop \"<|endoftext|>\"",
                                    "model_info": {"general.architecture": "starcoder2",
                                                   "starcoder2.context_length": 16384}})
        chat = path == "/v1/chat/completions"
        if path == ("/api/generate" if kind == "ollama" else "/v1/completions") or chat:
            return self._complete(body, chat)
        self._json(404, {"detail": "Not Found"})

    def _complete(self, body: dict, chat: bool) -> None:
        fake = self.fake
        if fake.header_delay_s:
            time.sleep(fake.header_delay_s)
        if fake.fail_status is not None:
            return self._error(fake.fail_status, f"scripted failure {fake.fail_status}")
        ollama = fake.kind == "ollama" and not chat
        options = body.get("options", {}) if ollama else body
        prompt = body.get("messages") if chat else body.get("prompt")
        if not chat and isinstance(prompt, list) and fake.kind not in ("vllm", "llamacpp"):
            return self._error(400, "prompt must be a string")
        if not chat and isinstance(prompt, list) and not all(isinstance(t, int) for t in prompt):
            return self._error(400, "prompt must be a string or a list of token ids")
        stops = options.get("stop") or []
        if fake.kind == "vllm" and len(stops) > 4:
            return self._error(400, "at most 4 stop strings")
        if fake.kind == "vllm" and body.get("suffix"):
            return self._error(400, "suffix is not currently supported")
        if isinstance(prompt, str) and fake.tokenizer is not None:
            prompt_ids = fake.tokenizer.encode(prompt)
        else:
            prompt_ids = prompt if isinstance(prompt, list) and not chat else []
        cached = 0
        if fake.kind == "llamacpp":
            slot = body.get("id_slot", -1)
            slot = slot if isinstance(slot, int) and slot >= 0 else 0
            previous = fake.slot_prompts.get(slot % fake.slots, [])
            while cached < min(len(previous), len(prompt_ids)) and previous[cached] == prompt_ids[cached]:
                cached += 1
            fake.slot_prompts[slot % fake.slots] = list(prompt_ids)
        reply = fake.reply(body) if callable(fake.reply) else fake.reply
        max_tokens = options.get("num_predict" if ollama else "max_tokens") or 16
        pieces = [reply[i:i + fake.piece_chars] for i in range(0, len(reply), fake.piece_chars)]
        finish, stop_reason = "stop", None
        text = "".join(pieces)
        hits = [(text.find(s), s) for s in stops if s and s in text]
        if hits:
            cut, stop_reason = min(hits)
            text = text[:cut]
            pieces = [text[i:i + fake.piece_chars] for i in range(0, len(text), fake.piece_chars)]
        if len(pieces) > max_tokens:
            pieces, finish, stop_reason = pieces[:max_tokens], "length", None
        self.send_response(200)
        self.send_header("Content-Type", "application/x-ndjson" if ollama else "text/event-stream")
        self.send_header("Transfer-Encoding", "chunked")
        self.send_header("Cache-Control", "no-cache")
        self.end_headers()
        usage = {"prompt_tokens": len(prompt_ids), "completion_tokens": len(pieces),
                 "total_tokens": len(prompt_ids) + len(pieces),
                 "prompt_tokens_details": {"cached_tokens": cached}}
        try:
            for n, piece in enumerate(pieces):
                if fake.die_after is not None and n >= fake.die_after:
                    raise _Cut()
                if fake.delay_s:
                    time.sleep(fake.delay_s)
                self._send_event(self._event(piece, None, None, chat, ollama))
            final = self._event("", finish, stop_reason, chat, ollama)
            if ollama:
                final.update(prompt_eval_count=len(prompt_ids), eval_count=len(pieces))
            elif fake.kind == "llamacpp":
                final.update(usage=usage, timings={"cache_n": cached,
                                                   "prompt_n": len(prompt_ids) - cached,
                                                   "predicted_n": len(pieces)})
            self._send_event(final)
            if fake.kind == "vllm" and (body.get("stream_options") or {}).get("include_usage"):
                self._send_event({"id": "cmpl-fake", "object": "text_completion", "created": 0,
                                  "model": fake.model, "choices": [], "usage": usage})
            if not ollama:
                self._chunk(b"data: [DONE]\n\n")
            self.wfile.write(b"0\r\n\r\n")
            self.wfile.flush()
        except _Cut:
            self.close_connection = True
            try:
                self.connection.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            return
        except OSError:         # the client closed the connection
            fake._note(disconnects=1)
            self.close_connection = True
            return
        fake._note(streams_finished=1)

    def _event(self, text: str, finish: str | None, stop_reason: str | None, chat: bool,
               ollama: bool) -> dict:
        fake = self.fake
        if ollama:
            event = {"model": fake.model, "created_at": "2026-01-01T00:00:00Z", "response": text,
                     "done": finish is not None}
            if finish is not None:
                event["done_reason"] = finish
            return event
        if chat:
            choice = {"index": 0, "delta": {"content": text} if text else {},
                      "finish_reason": finish}
            return {"id": "chatcmpl-fake", "object": "chat.completion.chunk", "created": 0,
                    "model": fake.model, "choices": [choice]}
        choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish}
        if fake.kind == "vllm":
            choice["stop_reason"] = stop_reason
        return {"id": "cmpl-fake", "object": "text_completion", "created": 0, "model": fake.model,
                "choices": [choice]}

    def _send_event(self, event: dict) -> None:
        data = json.dumps(event).encode()
        self._chunk(data + b"\n" if self.fake.kind == "ollama" and "response" in event
                    else b"data: " + data + b"\n\n")
