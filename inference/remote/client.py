"""HTTP to an inference engine, on httpx: JSON requests, streamed answers, and every failure
turned into one `EngineFault` that says what went wrong in words a user can act on.

The API key goes into the Authorization header and nowhere else: httpx shows that header as
`[secure]` in its reprs, and no message built here contains headers. TLS certificates are
verified (httpx's default; SSL_CERT_FILE / SSL_CERT_DIR name other authorities).
"""
from __future__ import annotations

import asyncio
import json
import logging
from contextlib import asynccontextmanager
from typing import Any, AsyncIterator

import httpx
from httpx_sse import EventSource, SSEError

from .engines import check_endpoint, display_url, error_message

log = logging.getLogger(__name__)

CONNECT_TIMEOUT_S = 3.0
PROBE_TIMEOUT_S = 3.0       # a status route (models, version) answers at once when the engine is up
STALL_TIMEOUT_S = 30.0      # longest silence inside a streamed answer
MAX_ERROR_CHARS = 300       # of an engine's error message, in ours


class EngineFault(Exception):
    """Something the engine did or failed to do. `fault` names the kind (unreachable, timeout,
    disconnected, tls, protocol, auth, http-NNN); `blocking` faults mean the engine is down until
    a probe succeeds, the others concern one request."""

    def __init__(self, fault: str, message: str, blocking: bool = True):
        super().__init__(message)
        self.fault = fault
        self.message = message
        self.blocking = blocking


class EngineClient:
    """One engine's HTTP client (one connection pool); use from a single event loop."""

    def __init__(self, endpoint: str, api_key: str | None = None, user_agent: str = "stablelm-lsp"):
        self.endpoint = check_endpoint(endpoint)
        self.shown = display_url(self.endpoint)
        self.has_key = bool(api_key)
        headers = {"User-Agent": user_agent}
        if api_key:
            headers["Authorization"] = f"Bearer {api_key}"
        self._http = httpx.AsyncClient(
            base_url=self.endpoint, headers=headers, follow_redirects=False,
            timeout=httpx.Timeout(PROBE_TIMEOUT_S, connect=CONNECT_TIMEOUT_S))

    async def close(self) -> None:
        await self._http.aclose()

    async def get_json(self, path: str, timeout: float = PROBE_TIMEOUT_S,
                       missing_ok: bool = False) -> Any:
        """GET `path` -> its JSON; None for a 404 (or any 4xx but 401/403) when `missing_ok`,
        which detection uses to ask "is this route there?"."""
        return await self._json("GET", path, None, timeout, missing_ok)

    async def post_json(self, path: str, body: Any, timeout: float = PROBE_TIMEOUT_S,
                        missing_ok: bool = False) -> Any:
        return await self._json("POST", path, body, timeout, missing_ok)

    async def _json(self, method: str, path: str, body: Any, timeout: float, missing_ok: bool) -> Any:
        try:
            response = await self._http.request(method, path, json=body, timeout=timeout)
        except httpx.HTTPError as exc:
            raise self._transport_fault(exc, path, timeout, started=False) from None
        if missing_ok and 400 <= response.status_code < 500 and response.status_code not in (401, 403):
            return None
        if response.status_code >= 400:
            raise self._status_fault(response.status_code, _json_or_none(response.content), path)
        try:
            return response.json()
        except ValueError:
            if missing_ok:      # a web server's page, not an engine's route
                return None
            raise EngineFault("protocol", f"{self.shown}{path} did not answer with JSON") from None

    @asynccontextmanager
    async def stream(self, path: str, body: Any, first_byte_timeout: float,
                     ndjson: bool = False) -> AsyncIterator[AsyncIterator[Any]]:
        """POST `body` and yield an async iterator over the answer's JSON events (server-sent
        events, or JSON lines with `ndjson`: Ollama's native routes). Leaving the
        block (the end, an exception, a cancelled task) closes the connection, which is how
        the engines learn to stop generating."""
        request = self._http.build_request(
            "POST", path, json=body, timeout=httpx.Timeout(STALL_TIMEOUT_S, connect=CONNECT_TIMEOUT_S))
        try:
            # The headers may take long (a queue, a long prompt); the events then come steadily.
            response = await asyncio.wait_for(self._http.send(request, stream=True), first_byte_timeout)
        except asyncio.TimeoutError:
            raise EngineFault("timeout", f"the engine at {self.shown} did not answer {path} "
                                         f"within {first_byte_timeout:.1f} s") from None
        except httpx.HTTPError as exc:
            raise self._transport_fault(exc, path, first_byte_timeout, started=False) from None
        try:
            if response.status_code >= 400:
                try:
                    content = await response.aread()
                except httpx.HTTPError:
                    content = b""
                raise self._status_fault(response.status_code, _json_or_none(content), path)
            yield self._events(response, path, ndjson)
        finally:
            await response.aclose()

    async def _events(self, response: httpx.Response, path: str, ndjson: bool) -> AsyncIterator[Any]:
        try:
            if ndjson:
                async for line in response.aiter_lines():
                    if line.strip():
                        yield self._decode(line, path)
                return
            async for event in EventSource(response).aiter_sse():
                if event.data == "[DONE]":
                    return
                if event.data:
                    yield self._decode(event.data, path)
        except SSEError as exc:
            raise EngineFault("protocol", f"{self.shown}{path} did not stream events: {exc}") from None
        except httpx.HTTPError as exc:
            raise self._transport_fault(exc, path, STALL_TIMEOUT_S, started=True) from None

    def _decode(self, text: str, path: str) -> Any:
        try:
            return json.loads(text)
        except ValueError:
            raise EngineFault("protocol", f"{self.shown}{path} streamed something that is not "
                                          f"JSON: {text[:80]!r}") from None

    # -- faults ------------------------------------------------------------------------------

    def _transport_fault(self, exc: httpx.HTTPError, path: str, timeout: float,
                         started: bool) -> EngineFault:
        where = f"the engine at {self.shown}"
        if isinstance(exc, httpx.ConnectTimeout):
            return EngineFault("unreachable", f"cannot reach {where}: no connection within "
                                              f"{CONNECT_TIMEOUT_S:.0f} s")
        if isinstance(exc, httpx.ConnectError):
            reason = _root_cause(exc)
            if "CERTIFICATE" in reason.upper() or "SSL" in reason.upper():
                return EngineFault("tls", f"{where}: TLS certificate not accepted ({reason}); "
                                          "SSL_CERT_FILE can name your certificate authority")
            return EngineFault("unreachable", f"cannot reach {where}: {reason}")
        if isinstance(exc, httpx.TimeoutException):
            if started:
                return EngineFault("timeout", f"{where} stopped sending for {timeout:.0f} s "
                                              "in the middle of an answer")
            return EngineFault("timeout", f"{where} did not answer {path} within {timeout:.1f} s")
        if isinstance(exc, (httpx.RemoteProtocolError, httpx.ReadError, httpx.WriteError)):
            if started:
                return EngineFault("disconnected", f"{where} closed the connection in the "
                                                   "middle of an answer")
            return EngineFault("disconnected", f"{where} closed the connection: {_root_cause(exc)}")
        return EngineFault("unreachable", f"{where}: {type(exc).__name__}: {_root_cause(exc)}")

    def _status_fault(self, status: int, body: Any, path: str) -> EngineFault:
        detail = error_message(body)
        detail = f": {detail[:MAX_ERROR_CHARS]}" if detail else ""
        where = f"the engine at {self.shown}"
        if status in (401, 403):
            hint = ("it refused the API key in STABLELM_LSP_API_KEY" if self.has_key
                    else "it wants an API key: set STABLELM_LSP_API_KEY")
            return EngineFault("auth", f"{where} answered HTTP {status} ({hint}){detail}")
        if status >= 500 or status in (404, 408, 429):
            return EngineFault(f"http-{status}", f"{where} answered HTTP {status} to {path}{detail}")
        # Other 4xx: this request was refused; the engine itself is fine.
        return EngineFault(f"http-{status}", f"{where} refused the request (HTTP {status}){detail}",
                           blocking=False)


def _json_or_none(content: bytes) -> Any:
    try:
        return json.loads(content)
    except ValueError:
        return None


def _root_cause(exc: BaseException) -> str:
    """The innermost cause's message: `[Errno 111] Connection refused` rather than httpx's
    wrapper text."""
    while exc.__cause__ is not None or exc.__context__ is not None:
        exc = exc.__cause__ or exc.__context__
    return str(exc) or type(exc).__name__
