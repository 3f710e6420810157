"""`python -m stablelm_lsp.lsp`: the `stablelm-lsp` command."""
import sys

from .cli import main

sys.exit(main())
