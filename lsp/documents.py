"""Open documents as the client sees them: lines, versions and position encodings.

A document is kept as a list of lines, each with its own terminator (the last one has none), so
that an incremental edit touches only the lines it spans and a prompt can be cut from the lines
around the cursor without joining a 5 MB buffer on every keystroke. Positions arrive in the
encoding negotiated at initialize (utf-16 by default) and are turned into Python string indices
(code points) here and nowhere else. `relative_path` names a document's URI as prompts show it.
"""
from __future__ import annotations

import enum
import os
from dataclasses import dataclass
from pathlib import PurePosixPath
from typing import Sequence

from pygls.uris import to_fs_path

from stablelm_lsp.inference.prompts.lines import line_content, split_lines


class PositionEncoding(str, enum.Enum):
    """How a position's `character` counts: LSP's three encodings."""

    UTF8 = "utf-8"
    UTF16 = "utf-16"
    UTF32 = "utf-32"


class EditError(ValueError):
    """An edit that cannot apply (end before start): the document no longer matches the client."""


def _units(char: str, encoding: PositionEncoding) -> int:
    code = ord(char)
    if encoding is PositionEncoding.UTF16:
        return 2 if code > 0xFFFF else 1
    if encoding is PositionEncoding.UTF8:
        return 1 if code < 0x80 else 2 if code < 0x800 else 3 if code < 0x10000 else 4
    return 1


def column_to_index(content: str, column: int, encoding: PositionEncoding) -> int:
    """Index into `content` (a line without terminator) of an LSP column.

    Columns past the end clamp to the end, as LSP asks; a column inside a character that takes
    several code units (half of a surrogate pair) rounds down to that character's start.
    """
    if column <= 0:
        return 0
    if encoding is PositionEncoding.UTF32 or content.isascii():
        return min(column, len(content))
    units = 0
    for index, char in enumerate(content):
        units += _units(char, encoding)
        if units > column:
            return index
    return len(content)


def index_to_column(content: str, index: int, encoding: PositionEncoding) -> int:
    """LSP column of the string index `index` in `content`."""
    head = content[:index]
    if encoding is PositionEncoding.UTF32 or head.isascii():
        return len(head)
    if encoding is PositionEncoding.UTF16:
        return len(head.encode("utf-16-le")) // 2
    return len(head.encode("utf-8"))


@dataclass(frozen=True)
class Cursor:
    """A position inside a document: line number and string index into that line's content."""

    line: int
    index: int


class Document:
    """One open text document."""

    def __init__(self, uri: str, text: str, version: int, language_id: str = ""):
        self.uri = uri
        self.language_id = language_id
        self.version = version
        self.lines = split_lines(text)
        self.out_of_sync = False     # an edit failed to apply; nothing is served until resync
        self._nul_count = text.count("\x00")
        self._text: str | None = text

    @property
    def binary(self) -> bool:
        """Holds NUL characters: not text a code model should complete."""
        return self._nul_count > 0

    @property
    def text(self) -> str:
        if self._text is None:
            self._text = "".join(self.lines)
        return self._text

    def content(self, line: int) -> str:
        return line_content(self.lines[line])

    def cursor(self, line: int, character: int, encoding: PositionEncoding) -> Cursor:
        """The clamped cursor for an LSP position: past the last line means the end of the text."""
        if line < 0:
            return Cursor(0, 0)
        if line >= len(self.lines):
            last = len(self.lines) - 1
            return Cursor(last, len(self.content(last)))
        return Cursor(line, column_to_index(self.content(line), character, encoding))

    def column(self, cursor: Cursor, encoding: PositionEncoding) -> int:
        return index_to_column(self.content(cursor.line), cursor.index, encoding)

    def replace_all(self, text: str, version: int) -> None:
        self.lines = split_lines(text)
        self._text = text
        self.version = version
        self._nul_count = text.count("\x00")
        self.out_of_sync = False

    def replace_range(self, start: Cursor, end: Cursor, new_text: str, version: int) -> None:
        """Apply one incremental change; `start` and `end` come from `cursor()` (already clamped)."""
        if (end.line, end.index) < (start.line, start.index):
            self.out_of_sync = True
            raise EditError(f"edit range ends ({end.line}:{end.index}) before it starts "
                            f"({start.line}:{start.index})")
        # Re-split one line either side too: an edit can join "\r" and "\n" across the boundary.
        lo = max(start.line - 1, 0)
        hi = min(end.line + 1, len(self.lines) - 1)
        before = "".join(self.lines[lo:start.line]) + self.lines[start.line][:start.index]
        after = self.lines[end.line][end.index:] + "".join(self.lines[end.line + 1:hi + 1])
        replacement = split_lines(before + new_text + after)
        if hi < len(self.lines) - 1:
            # The chunk ended with line `hi`'s terminator: split_lines added an empty last line
            # that really is the start of line hi + 1, still in the list.
            replacement.pop()
        if start.line == end.line:
            removed = self.lines[start.line][start.index:end.index]
        else:
            removed = (self.lines[start.line][start.index:]
                       + "".join(self.lines[start.line + 1:end.line])
                       + self.lines[end.line][:end.index])
        self._nul_count += new_text.count("\x00") - removed.count("\x00")
        self.lines[lo:hi + 1] = replacement
        self._text = None
        self.version = version


class DocumentStore:
    """The documents the client has opened; URIs that are not open are never read from disk."""

    def __init__(self) -> None:
        self._documents: dict[str, Document] = {}

    def get(self, uri: str) -> Document | None:
        return self._documents.get(uri)

    def open(self, document: Document) -> None:
        self._documents[document.uri] = document

    def close(self, uri: str) -> Document | None:
        return self._documents.pop(uri, None)

    def __iter__(self):
        return iter(list(self._documents.values()))

    def __len__(self) -> int:
        return len(self._documents)


def relative_path(uri: str, root_uris: list[str]) -> tuple[str, str]:
    """(path of `uri` relative to the innermost root containing it, that root's folder name);
    the file name alone and no repository name outside every root."""
    path = to_fs_path(uri) if uri.startswith("file:") else None
    if path is None:       # untitled:, other schemes
        return uri.split(":", 1)[-1].lstrip("/"), ""
    best: tuple[str, str] | None = None
    for root_uri in root_uris:
        root = to_fs_path(root_uri) if root_uri.startswith("file:") else None
        if not root:
            continue
        try:
            rel = os.path.relpath(path, root)
        except ValueError:      # another drive
            continue
        if not rel.startswith(".."):
            candidate = (PurePosixPath(*rel.split(os.sep)).as_posix(), os.path.basename(root.rstrip(os.sep)))
            if best is None or len(candidate[0]) < len(best[0]):
                best = candidate
    return best or (os.path.basename(path), "")


def with_insertion(lines: Sequence[str], at: Cursor, text: str,
                   replace: int = 0) -> tuple[list[str], Cursor]:
    """`lines` with `text` inserted at `at` over the `replace` characters after it on its line, as
    an editor applies a completion item, and the cursor right after the inserted text."""
    line = lines[at.line]
    content = line_content(line)
    head = content[:at.index] + text
    new = split_lines(head + content[at.index + replace:] + line[len(content):])
    if line[len(content):]:
        new.pop()           # the line's own terminator made an empty last line: not a new one
    return [*lines[:at.line], *new, *lines[at.line + 1:]], after_insertion(at, text)


def after_insertion(at: Cursor, text: str) -> Cursor:
    """Where the cursor is after typing (or inserting) `text` at `at`."""
    breaks = len(split_lines(text)) - 1
    if not breaks:
        return Cursor(at.line, at.index + len(text))
    return Cursor(at.line + breaks, len(split_lines(text)[-1]))
