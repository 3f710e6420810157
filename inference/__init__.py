"""stablelm_lsp.inference: generation. The text level (api.py's `Backend`, load.py's
`load_backend`, backend.py's `LocalBackend`, prompts/) in front of the engine on token ids
(engine.py and the caches, sampling, scheduling and kernels behind it)."""
