"""From generated text to what the editor shows: pure functions of text.

Rules, in order: cut at stop texts; one line when the cursor sits before other text on its line,
at most `max_lines` at the end of a line or on an empty line; cut what repeats the text after the
cursor (the rest of the line, the next lines); replace, rather than duplicate, closing brackets and
quotes the editor auto-inserted right of the cursor; no trailing whitespace; nothing empty.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

CLOSERS = ")]}\"'`"
_OPENER_OF = {")": "(", "]": "[", "}": "{"}
_QUOTES = "\"'`"


@dataclass(frozen=True)
class Completion:
    text: str                  # inserted at the cursor, replacing `replace` characters after it
    replace: int = 0           # characters right of the cursor (on its line) the text replaces


def is_multiline_position(line_after: str) -> bool:
    """Whether a completion may span lines: nothing but closing brackets/quotes after the cursor."""
    return all(c in CLOSERS or c.isspace() for c in line_after)


def cut_at_stops(text: str, stops: Sequence[str]) -> str:
    """`text` up to the first stop text (a backend that already stops at them leaves it as is)."""
    cut = len(text)
    for stop in stops:
        if stop and (found := text.find(stop)) != -1:
            cut = min(cut, found)
    return text[:cut]


def postprocess(
    generated: str,
    *,
    line_before: str,
    line_after: str,
    next_lines: Sequence[str],
    max_lines: int,
    stops: Sequence[str] = (),
) -> Completion | None:
    """The completion to show for `generated` at a cursor between `line_before` and `line_after`,
    or None when nothing useful is left."""
    text = cut_at_stops(generated, stops)
    multiline = is_multiline_position(line_after)
    lines = text.split("\n")
    lines = lines[:max(max_lines, 1) if multiline else 1]
    lines = _cut_repeated_lines(lines, line_before, next_lines)
    if not multiline:
        lines = [_cut_repeated_rest_of_line(lines[0], line_after)] if lines else []
    lines = [line.rstrip() for line in lines]
    while lines and not lines[-1]:
        lines.pop()
    text = "\n".join(lines)
    if not text.strip():
        return None
    return _absorb_closers(text, line_before, line_after)


def _cut_repeated_lines(lines: list[str], line_before: str, next_lines: Sequence[str]) -> list[str]:
    """Drop the completion from the first line that equals the next non-blank document line on."""
    following = next((x.strip() for x in next_lines if x.strip()), None)
    if following is None:
        return lines
    for i, line in enumerate(lines):
        whole = (line_before + line) if i == 0 else line
        if whole.strip() == following:
            return lines[:i]
    return lines


def _cut_repeated_rest_of_line(line: str, line_after: str) -> str:
    """Cut a one-line completion where it starts repeating the text right of the cursor."""
    rest = line_after.strip()
    if rest:
        found = line.find(rest)
        if found != -1:
            return line[:found]
    return line


def _open_stack(text: str) -> list[str]:
    """Brackets and quotes still open at the end of `text` (a rough scan: one line of code,
    backslash escapes inside strings, no comments)."""
    stack: list[str] = []
    escaped = False
    for char in text:
        in_string = bool(stack) and stack[-1] in _QUOTES
        if escaped:
            escaped = False
        elif in_string and char == "\\":
            escaped = True
        elif in_string:
            if char == stack[-1]:
                stack.pop()
        elif char in _QUOTES or char in "([{":
            stack.append(char)
        elif char in _OPENER_OF and stack and stack[-1] == _OPENER_OF[char]:
            stack.pop()
    return stack


def _absorb_closers(text: str, line_before: str, line_after: str) -> Completion:
    """Replace the auto-inserted closers right of the cursor that `text` already closes.

    The closers after the cursor are matched against what is still open after the cursor line's
    start plus the completion; those left without an opener are redundant. The completion then
    replaces the span up to the last redundant closer, re-inserting the needed ones inside it.
    """
    run = len(line_after) - len(line_after.lstrip(CLOSERS))
    if run == 0:
        return Completion(text)
    stack = _open_stack(line_before + text)
    kept: list[tuple[int, str]] = []
    last_redundant = -1
    for i, char in enumerate(line_after[:run]):
        opener = _OPENER_OF.get(char, char)
        if stack and stack[-1] == opener:
            stack.pop()
            kept.append((i, char))
        else:
            last_redundant = i
    if last_redundant < 0:
        return Completion(text)
    reinserted = "".join(char for i, char in kept if i < last_redundant)
    return Completion(text + reinserted, replace=last_redundant + 1)
