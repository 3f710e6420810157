"""Fill-in-the-middle completion prompts: pure functions of document lines, special-token text
and a token counter (budget.py).

A prompt is a sequence of `PromptPart`s: the template's own text and special tokens are special,
document text, paths and the repository name are plain, so special-token text in a document
(this project's own sources quote `<fim_middle>`) reaches the model as ordinary text.

The layout keeps the engine's KV cache valid while the user types:

    [context: other files' heads and recently edited chunks (ring.py), stable]
    [prefix: lines before the cursor line]  [suffix: rest of the cursor line, following lines]
    [middle marker + cursor line up to cursor]

Typing inside a line only appends to the last part. The prefix is cut at line boundaries, its first
line always a multiple of `CHUNK_LINES`, and its token budget does not depend on the cursor line, so
the prompt's start stays put while typing and moves in steps of whole chunks as the file grows.
"""
from __future__ import annotations

import string
from dataclasses import dataclass
from typing import Sequence

from ..api import PromptPart, SpecialTokens, join_parts, prompt_text
from .budget import (MAX_CHARS_PER_TOKEN, CountText, CountTokens, excerpt, take_backwards,
                     take_forwards, text_counter)
from .lines import line_content

CHUNK_LINES = 16           # prefix and context cuts fall on multiples of this many lines
MIDDLE_SHARE = 1 / 8       # budget reserved for the cursor line, so typing never moves the prefix
SUFFIX_SHARE = 0.2         # the suffix's guaranteed share; it gets more when the prefix is short
CONTEXT_SHARE = 0.25       # at most this much for other files (heads and ring chunks)
MIDDLE_CUT_STEP = 256      # a cursor line too long for its budget is cut at multiples of this
NEXT_LINES = 8             # lines after the cursor line handed to post-processing

# Built-in layouts, written in the same template language users can override them with.
FIM_REPO_TEMPLATE = "{context}{file_sep}{fim_prefix}{path}\n{prefix}{fim_suffix}{suffix}{fim_middle}{middle}"
FIM_TEMPLATE = "{fim_prefix}{prefix}{fim_suffix}{suffix}{fim_middle}{middle}"
PREFIX_TEMPLATE = "{prefix}{middle}"

_TEXT_FIELDS = ("context", "prefix", "suffix", "middle", "path", "repo")
_SPECIAL_FIELDS = ("fim_prefix", "fim_suffix", "fim_middle", "fim_pad", "file_sep", "repo_name",
                   "eos", "bos")


class TemplateError(ValueError):
    """A prompt template that cannot be rendered for this model."""


class PromptTemplate:
    """A prompt layout with `{field}` placeholders (`{{`/`}}` for literal braces).

    Text fields: context, prefix, suffix, middle, path, repo. Special tokens: fim_prefix, fim_suffix,
    fim_middle, fim_pad, file_sep, repo_name, eos, bos (an error if the model's tokenizer lacks one).
    For the cache to survive typing, `{middle}` should come last.
    """

    def __init__(self, source: str):
        try:
            parsed = list(string.Formatter().parse(source))
        except ValueError as exc:   # unbalanced braces
            raise TemplateError(f"prompt template: {exc}") from None
        fields = []
        for _, name, spec, conversion in parsed:
            if name is None:
                continue
            if spec or conversion or not name.isidentifier():
                raise TemplateError(f"prompt template: field {{{name}}} must be a plain name")
            fields.append(name)
        unknown = sorted({f for f in fields if f not in _TEXT_FIELDS + _SPECIAL_FIELDS})
        if unknown:
            raise TemplateError(f"prompt template: unknown field(s) {', '.join(unknown)}; known: "
                                f"{', '.join(_TEXT_FIELDS + _SPECIAL_FIELDS)}")
        for required in ("prefix", "middle"):
            if required not in fields:
                raise TemplateError(f"prompt template: needs a {{{required}}} field")
        self.source = source
        self.fields = frozenset(fields)
        self._pieces = [(literal, name) for literal, name, _, _ in parsed]

    def missing_specials(self, special: SpecialTokens) -> list[str]:
        return [f for f in _SPECIAL_FIELDS if f in self.fields and getattr(special, f) is None]

    def render(self, special: SpecialTokens,
               **text: str | Sequence[PromptPart]) -> tuple[PromptPart, ...]:
        """The template's literal text and special tokens as special parts, the text fields
        (missing ones empty) as plain parts; a field given as parts (the context) is inserted
        as they are."""
        missing = self.missing_specials(special)
        if missing:
            raise TemplateError(f"prompt template uses {', '.join(missing)}, which this model's "
                                "tokenizer does not have")
        parts: list[PromptPart] = []
        for literal, name in self._pieces:
            parts.append(PromptPart(literal, special=True))
            if name in _SPECIAL_FIELDS:
                parts.append(PromptPart(getattr(special, name), special=True))
            elif name is not None:
                value = text.get(name, "")
                parts.extend([PromptPart(value)] if isinstance(value, str) else value)
        return join_parts(parts)


def default_template(special: SpecialTokens) -> PromptTemplate:
    """The layout the model's special tokens allow: repository FIM, plain FIM or prefix only."""
    if special.has_fim and special.file_sep:
        return PromptTemplate(FIM_REPO_TEMPLATE)
    if special.has_fim:
        return PromptTemplate(FIM_TEMPLATE)
    return PromptTemplate(PREFIX_TEMPLATE)


@dataclass(frozen=True)
class ContextFile:
    """Another file offered as context: its head, or a chunk of it (the context ring, ring.py)."""

    path: str
    lines: Sequence[str]       # with terminators
    # A chunk: the line it is about (an edit); when the budget is short, the lines nearest it
    # are kept. None: the head of a file, cut at CHUNK_LINES boundaries.
    around: int | None = None


@dataclass(frozen=True)
class Prompt:
    parts: tuple[PromptPart, ...]
    line_before: str           # the cursor line up to the cursor (all of it)
    line_after: str            # the cursor line after the cursor, without terminator
    next_lines: tuple[str, ...]  # contents of the lines after the cursor line
    prefix_start: int          # first document line in the prompt
    suffix_end: int            # first document line after the prompt's suffix
    middle_start: int          # index in the cursor line where the prompt's copy of it starts
    context_paths: tuple[str, ...]
    tokens: int                # estimate: the sum of the pieces' counts

    @property
    def text(self) -> str:
        return prompt_text(self.parts)


def _cut_middle(line_before: str, budget: int, count: CountText) -> int:
    """Start index of the cursor line's text kept in the prompt: 0 unless the line is too long,
    then a multiple of MIDDLE_CUT_STEP so that typing does not move it on every key."""
    lowest = max(0, len(line_before) - budget * MAX_CHARS_PER_TOKEN)
    lo = -(-lowest // MIDDLE_CUT_STEP)                     # in steps
    hi = -(-len(line_before) // MIDDLE_CUT_STEP)           # this many steps leaves nothing
    while lo < hi:   # binary search: fewer tokens the later the line is cut
        mid = (lo + hi) // 2
        if count(line_before[mid * MIDDLE_CUT_STEP:]) <= budget:
            hi = mid
        else:
            lo = mid + 1
    return min(lo * MIDDLE_CUT_STEP, len(line_before))


def build_prompt(
    lines: Sequence[str],
    line: int,
    index: int,
    *,
    special: SpecialTokens,
    count_tokens: CountTokens,
    context_tokens: int,
    path: str = "",
    repo: str = "",
    context_files: Sequence[ContextFile] = (),
    template: PromptTemplate | None = None,
) -> Prompt:
    """The prompt for a cursor at string index `index` of line `line` of `lines`.

    `context_files` are ordered least to most relevant; the most relevant end up nearest the
    current file. `count_tokens` counts prompt parts; it should be a `TokenCounter`: the same
    lines are counted again on every keystroke.
    """
    template = template or default_template(special)
    cursor_line = lines[line]
    content = line_content(cursor_line)
    line_before, line_after = content[:index], content[index:]
    terminator = cursor_line[len(content):]
    uses_suffix = "suffix" in template.fields

    def render(**fields: str | Sequence[PromptPart]) -> tuple[PromptPart, ...]:
        return template.render(special, path=path, repo=repo, **fields)

    count_text = text_counter(count_tokens)
    overhead = count_tokens(render())
    budget = max(context_tokens - overhead, 0)
    middle_reserve = int(budget * MIDDLE_SHARE)

    context, context_paths, context_used = (), (), 0
    if "context" in template.fields and special.file_sep:
        context, context_paths, context_used = _render_context(
            context_files, int(budget * CONTEXT_SHARE), special, repo, count_tokens)

    # Suffix lines start with the rest of the cursor line; its guaranteed share is reserved
    # before the prefix is cut, whatever the prefix leaves over goes to it afterwards.
    suffix_lines = [line_after + terminator, *lines[line + 1:]] if uses_suffix else []
    suffix_share = int(budget * SUFFIX_SHARE)
    _, suffix_reserved = take_forwards(suffix_lines, 0, suffix_share, count_text)

    prefix_budget = max(budget - context_used - middle_reserve - suffix_reserved, 0)
    prefix_start, prefix_used = take_backwards(lines, line, prefix_budget, count_text,
                                               CHUNK_LINES)

    suffix_budget = max(budget - context_used - middle_reserve - prefix_used, 0)
    suffix_count, suffix_used = take_forwards(suffix_lines, 0, suffix_budget, count_text)

    middle_budget = max(budget - context_used - prefix_used - suffix_used, 0)
    middle_start = _cut_middle(line_before, middle_budget, count_text)
    middle = line_before[middle_start:]

    parts = render(
        context=context,
        prefix="".join(lines[prefix_start:line]),
        suffix="".join(suffix_lines[:suffix_count]),
        middle=middle,
    )
    return Prompt(
        parts=parts,
        line_before=line_before,
        line_after=line_after,
        next_lines=tuple(line_content(x) for x in lines[line + 1:line + 1 + NEXT_LINES]),
        prefix_start=prefix_start,
        suffix_end=line + max(suffix_count, 1),
        middle_start=middle_start,
        context_paths=context_paths,
        tokens=overhead + context_used + prefix_used + suffix_used + count_text(middle),
    )


def _render_context(files: Sequence[ContextFile], budget: int, special: SpecialTokens, repo: str,
                    count_tokens: CountTokens
                    ) -> tuple[tuple[PromptPart, ...], tuple[str, ...], int]:
    """`<repo_name>repo<file_sep>path\\ncode...` for as many files (heads cut at chunk boundaries,
    ring chunks around their edited line) as `budget` holds, the most relevant (last) first ->
    (parts, paths, tokens)."""
    head = (PromptPart(special.repo_name, special=True), PromptPart(repo)) \
        if special.repo_name and repo else ()
    used = count_tokens(head)
    count_text = text_counter(count_tokens)
    pieces: list[tuple[str, tuple[PromptPart, ...]]] = []
    for file in reversed(files):
        header = (PromptPart(special.file_sep, special=True), PromptPart(f"{file.path}\n"))
        header_cost = count_tokens(header)
        if used + header_cost >= budget:
            break
        room = budget - used - header_cost
        if file.around is None:
            start, (end, cost) = 0, take_forwards(file.lines, 0, room, count_text, CHUNK_LINES)
        else:
            start, end = excerpt(file.lines, file.around, room, count_text)
            cost = sum(map(count_text, file.lines[start:end]))
        if end == start:
            continue
        pieces.append((file.path, header + (PromptPart("".join(file.lines[start:end])),)))
        used += header_cost + cost
    pieces.reverse()
    parts = join_parts(head + tuple(part for _, file_parts in pieces for part in file_parts))
    return parts, tuple(p for p, _ in pieces), used
