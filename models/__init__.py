"""stablelm_lsp.models."""
