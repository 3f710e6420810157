"""The context ring: chunks of recently edited text, offered to the prompts of other documents.

Peers do this (llama.vim keeps a ring of edited and yanked chunks; Tabby and Continue add recently
edited ranges): what the user just wrote elsewhere is what the line at hand most likely uses.

`EditRing.record` is called for every edit the server sees: the lines around the edited line
become a chunk (a snapshot of their text), or refresh the chunk of the same document that already
covers that line. The ring keeps RING_SIZE chunks: a full ring drops its oldest one, and a chunk
whose lines mostly repeat the newest one is dropped (typing down a function makes overlapping
chunks). Closing a document keeps its chunks: they are snapshots.

`EditRing.select` chooses, for a cursor in one document, chunks of *other* documents of the same
language: by the identifiers they share with the lines around the cursor, then by recency.
Chunks that mostly repeat the cursor's own region (the same code open twice, a copy) are left
out. The choice is kept while the cursor stays in one CHUNK_LINES block and no other document is
edited, so that typing does not change the prompt's start and the KV cache stays valid; it is
made again when the cursor moves to another block or another document changes.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from functools import cached_property
from typing import Sequence

from ..lru import LRU
from .fim import CHUNK_LINES, ContextFile

RING_SIZE = 16             # chunks kept
CHUNK_RADIUS = 8           # lines kept either side of the edited line
SIMILAR = 0.5              # share of the smaller chunk's lines found in the other: the same region
MAX_SELECTED = 8           # chunks offered to one prompt (its context budget decides how many fit)
_SELECTIONS = 256          # (document, block) choices remembered

_IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_]{2,}")
# Words of many languages' syntax: shared by all code, they say nothing about relevance.
_COMMON = frozenset("""
and as assert async await break case catch class const continue def default del elif else enum
except export extends false final finally for from func function global if impl import in interface
is lambda let match mod new nil none nonlocal not null or package pass private protected pub public
raise return self static struct super switch this throw true try type typeof use var void while
with yield None True False int str bool float list dict len print string char
""".split())


def identifiers(lines: Sequence[str]) -> frozenset[str]:
    """The names used in `lines` (three characters or more, common keywords left out)."""
    return frozenset(word for line in lines for word in _IDENTIFIER.findall(line)
                     if word not in _COMMON)


def _line_set(lines: Sequence[str]) -> frozenset[str]:
    return frozenset(stripped for line in lines if (stripped := line.strip()))


def similar(a: frozenset[str], b: frozenset[str]) -> bool:
    """Whether two regions, as sets of their non-blank stripped lines, are mostly the same."""
    if not a or not b:
        return False
    return len(a & b) > SIMILAR * min(len(a), len(b))


@dataclass(frozen=True, eq=False)
class Chunk:
    """Lines around an edit, as they were after it."""

    uri: str                    # the document's
    language: str               # its language id
    start: int                  # index of the first line in the document when recorded
    lines: tuple[str, ...]      # with terminators
    focus: int                  # index in `lines` of the edited line
    stamp: int                  # larger: edited more recently

    @cached_property
    def line_set(self) -> frozenset[str]:
        return _line_set(self.lines)

    @cached_property
    def identifiers(self) -> frozenset[str]:
        return identifiers(self.lines)

    def context_file(self, path: str) -> ContextFile:
        """The chunk as prompt context, shown under `path` (its document's, as prompts name it)."""
        return ContextFile(path, self.lines, around=self.focus)


@dataclass
class EditRing:
    size: int = RING_SIZE
    _chunks: list[Chunk] = field(default_factory=list)     # oldest first
    _clock: int = 0
    _selected: LRU = field(default_factory=lambda: LRU(_SELECTIONS))

    @property
    def chunks(self) -> tuple[Chunk, ...]:
        return tuple(self._chunks)

    def record(self, uri: str, language: str, lines: Sequence[str], line: int) -> None:
        """An edit of document `uri` (now `lines`) at line `line`."""
        if not lines:
            return
        line = min(max(line, 0), len(lines) - 1)
        self._clock += 1
        start = max(0, line - CHUNK_RADIUS)
        chunk = Chunk(uri, language, start, tuple(lines[start:line + CHUNK_RADIUS + 1]),
                      line - start, self._clock)
        self._chunks = [c for c in self._chunks
                        if not (c.uri == uri and c.start <= line < c.start + len(c.lines))
                        and not similar(c.line_set, chunk.line_set)]
        self._chunks.append(chunk)
        del self._chunks[:-self.size]

    def select(self, uri: str, language: str, lines: Sequence[str], cursor_line: int
               ) -> tuple[Chunk, ...]:
        """Chunks of other documents for a cursor at `cursor_line` of document `uri` (`lines`),
        least relevant first (prompts put the most relevant nearest the cursor's file)."""
        others = [c for c in self._chunks if c.uri != uri and c.language == language]
        if not others:
            return ()
        block = cursor_line // CHUNK_LINES
        version = others[-1].stamp          # changes when another document is edited
        remembered = self._selected.get((uri, block))
        if remembered is not None and remembered[0] == version:
            return remembered[1]
        # The cursor's block and the blocks either side of it.
        region = lines[max(0, (block - 1) * CHUNK_LINES):(block + 2) * CHUNK_LINES]
        names, own = identifiers(region), _line_set(region)
        candidates = [c for c in others if not similar(c.line_set, own)]
        # Shared names first; among equals the more recent (recency adds less than one name).
        recency = {id(c): rank / len(candidates) for rank, c in enumerate(candidates)}
        ranked = sorted(candidates, key=lambda c: len(c.identifiers & names) + recency[id(c)])
        chosen = tuple(ranked[-MAX_SELECTED:])
        self._selected.put((uri, block), (version, chosen))
        return chosen
