"""Remote inference engines behind the `Backend` interface (backend.py): vLLM, llama.cpp's
server, Ollama and any OpenAI-compatible server. engines.py holds their wire formats, client.py
the HTTP (httpx), describe.py what is asked of an engine when it is (re)connected."""
from .backend import API_KEY_ENV, RemoteBackend, RemoteOptions
from .engines import ENDPOINT_KINDS

__all__ = ["API_KEY_ENV", "ENDPOINT_KINDS", "RemoteBackend", "RemoteOptions"]
