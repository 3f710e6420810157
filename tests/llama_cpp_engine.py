"""llama-cpp-python's OpenAI-compatible server as a real engine for tests, on a GGUF converted from
a test checkpoint with the converter of the same llama-cpp-python release.

`scripts/test.sh` installs it when STABLELM_TEST_REMOTE=1: the wheel (`llama-cpp-python[server]`,
built from source) and that release's source distribution, whose `vendor/llama.cpp` holds
`convert_hf_to_gguf.py` and its `gguf-py`, unpacked into LLAMA_CPP_SOURCE_CACHE.

The converter names a BPE tokenizer's pre-tokenizer by hashing how it splits a sample text and
refuses hashes it does not know, as is every tokenizer trained in a test session. Ours is GPT-2's
byte-level pre-tokenizer (tests/checkpoints.py), so the conversion runs in a small wrapper
(CONVERT) that answers "gpt-2" for it; nothing installed is changed.
"""
from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import re
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx

LLAMA_CPP_SOURCE_CACHE = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "stablelm-lsp"
SERVER_MODULES = ("llama_cpp", "uvicorn", "fastapi", "sse_starlette", "starlette_context",
                  "pydantic_settings")

CONVERT = """\
import runpy, sys
from pathlib import Path
source, model, out = Path(sys.argv[1]), sys.argv[2], sys.argv[3]
sys.path[:0] = [str(source), str(source / "gguf-py")]
from conversion.base import TextModel
TextModel.get_vocab_base_pre = lambda self, tokenizer: "gpt-2"
sys.argv = ["convert_hf_to_gguf.py", model, "--outfile", out, "--outtype", "f32"]
runpy.run_path(str(source / "convert_hf_to_gguf.py"), run_name="__main__")
"""

# llama-cpp-python's log line for a request that reused its KV cache (Llama.generate, verbose)
PREFIX_HIT = re.compile(r"Llama\.generate: (\d+) prefix-match hit, remaining (\d+) prompt tokens to eval")


def missing() -> str | None:
    """Why the real engine cannot run here, or None."""
    absent = [m for m in SERVER_MODULES if importlib.util.find_spec(m) is None]
    if absent:
        return (f"llama-cpp-python's server is not installed ({', '.join(absent)} missing): "
                "STABLELM_TEST_REMOTE=1 bash scripts/test.sh installs it")
    if converter_source() is None:
        return (f"no llama.cpp converter for llama-cpp-python {_version()} under "
                f"{LLAMA_CPP_SOURCE_CACHE}: STABLELM_TEST_REMOTE=1 bash scripts/test.sh unpacks it")
    return None


def _version() -> str:
    return importlib.metadata.version("llama_cpp_python")


def converter_source() -> Path | None:
    """vendor/llama.cpp of the installed release's source distribution."""
    source = LLAMA_CPP_SOURCE_CACHE / f"llama_cpp_python-{_version()}" / "vendor" / "llama.cpp"
    return source if (source / "convert_hf_to_gguf.py").exists() else None


def convert(checkpoint: Path, out: Path) -> Path:
    """`checkpoint` (Hub format) as a float32 GGUF file."""
    subprocess.run([sys.executable, "-c", CONVERT, str(converter_source()), str(checkpoint), str(out)],
                   check=True, capture_output=True, text=True)
    return out


@dataclass
class LlamaServer:
    process: subprocess.Popen
    url: str
    log: Path

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")

    def prefix_hits(self) -> list[tuple[int, int]]:
        """(tokens reused, tokens evaluated) of every request that reused the cache so far."""
        return [(int(a), int(b)) for a, b in PREFIX_HIT.findall(self.log_text())]

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(10)
        except subprocess.TimeoutExpired:
            self.process.kill()


def start_server(gguf: Path, log: Path, alias: str = "tiny", n_ctx: int = 2048,
                 timeout: float = 60.0) -> LlamaServer:
    """`python -m llama_cpp.server` on a free port; waits until it lists its model."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = log.open("w")
    process = subprocess.Popen(
        [sys.executable, "-m", "llama_cpp.server", "--model", str(gguf), "--model_alias", alias,
         "--host", "127.0.0.1", "--port", str(port), "--n_ctx", str(n_ctx), "--n_threads", "1",
         "--verbose", "True"],
        stdout=out, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    server = LlamaServer(process, f"http://127.0.0.1:{port}", log)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"llama_cpp.server exited with {process.returncode}:\n{server.log_text()}")
        try:
            if httpx.get(f"{server.url}/v1/models", timeout=1.0).status_code == 200:
                return server
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    server.stop()
    raise RuntimeError(f"llama_cpp.server did not start in {timeout:.0f} s:\n{server.log_text()}")
