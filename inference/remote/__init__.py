"""Remote inference engines behind the `Backend` interface (backend.py: RemoteBackend): vLLM,
llama.cpp's server, Ollama and any OpenAI-compatible server. engines.py holds their wire formats
(no I/O), client.py the HTTP (httpx), describe.py what is asked of an engine when it is
(re)connected."""
