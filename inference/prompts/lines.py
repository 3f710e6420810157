"""Text as lines, each with its own terminator (as LSP counts line breaks): how documents are
kept (lsp/documents.py) and how prompts cut them."""
from __future__ import annotations

import re

_LINE_BREAK = re.compile(r"\r\n|\r|\n")


def split_lines(text: str) -> list[str]:
    """Lines with their terminators (\\n, \\r\\n or \\r, as LSP counts them); never empty."""
    lines: list[str] = []
    start = 0
    for match in _LINE_BREAK.finditer(text):
        lines.append(text[start:match.end()])
        start = match.end()
    lines.append(text[start:])
    return lines


def line_content(line: str) -> str:
    """`line` without its terminator."""
    if line.endswith("\r\n"):
        return line[:-2]
    if line.endswith(("\n", "\r")):
        return line[:-1]
    return line
