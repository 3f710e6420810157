"""stablelm_lsp.inference."""
