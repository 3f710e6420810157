"""stablelm_lsp.lsp."""
