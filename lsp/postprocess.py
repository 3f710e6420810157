"""From generated text to what the editor shows: pure functions of text.

Rules, in order: cut at stop texts and at a NUL character; one line when the cursor sits before other text on its line,
at most `max_lines` at the end of a line or on an empty line, except that a statement typed
partly (text before the cursor) is only completed to its end unless that line opens a block or
goes on (ends in `:`, an open bracket, a comma, a backslash, `=>` or `->`, before or after the
completion's first line: what follows belongs to it); cut what repeats the text after the
cursor (the rest of the line, the next lines); cut where the model loops (below); replace, rather
than duplicate, closing brackets and quotes the editor auto-inserted right of the cursor; no
trailing whitespace; nothing empty.

Loops, the way small models fail (`foo-level-level-level`, one line again and again), are cut
where the second copy starts. Real code repeats itself too (`0, 0, 0, 0`, `x[0][0]`, `'%s%s'`,
`# ====`, the same statement twice), so only repetition that cannot be much else counts, as in
Tabby's post-processing: a line ending in 3 copies of a unit of 4 or more characters with a word
in it and no space or comma (6 copies of shorter units or list items: `rwxrwxrwx`, `None, None`),
or a completion ending in 3 copies of a line or block of up to 4 lines with a letter or digit. Units
without a word (digits, punctuation, escapes, hex digits) never count, and a loop the model
escaped from (other text after it) is kept.
"""
from __future__ import annotations

import re
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
    # A NUL is no code (a broken model's bytes); inserted, it would make the document binary.
    text = cut_at_stops(generated, stops).split("\x00", 1)[0]
    multiline = is_multiline_position(line_after)
    lines = text.split("\n")
    lines = lines[:max(max_lines, 1) if multiline else 1]
    if len(lines) > 1 and line_before.strip() and not continues(line_before) \
            and not continues(line_before + lines[0]):
        lines = lines[:1]
    lines = _cut_repeated_lines(lines, line_before, next_lines)
    lines = _cut_loops(lines, line_before)
    if not multiline:
        lines = [_cut_repeated_rest_of_line(lines[0], line_after)] if lines else []
    lines = [line.rstrip() for line in lines]
    while lines and not lines[-1]:
        lines.pop()
    text = "\n".join(lines)
    if not text.strip():
        return None
    return _absorb_closers(text, line_before, line_after)


CONTINUES = (":", "(", "[", "{", ",", "\\", "=>", "->")


def continues(line: str) -> bool:
    """Whether `line` opens a block or goes on into the next line."""
    return line.rstrip().endswith(CONTINUES)


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


# -- loops ------------------------------------------------------------------------------------

LOOP_COPIES = 3             # copies of a unit ending a line, or of lines ending a completion
LIST_LOOP_COPIES = 6        # ... of a unit shorter than 4 characters or with a space or comma
SHORT_UNIT_CHARS = 4
MAX_UNIT_CHARS = 32
MAX_BLOCK_LINES = 4         # lines of a repeated block

_WORD = re.compile(r"[^\W\d_]{2,}")     # two letters in a row
_ESCAPE = re.compile(r"\\(?:x[0-9a-fA-F]{0,2}|u[0-9a-fA-F]{0,4}|U[0-9a-fA-F]{0,8}|.)")
_HEX = re.compile(r"[0-9a-fA-F]+")
_LIST_SEPARATOR = re.compile(r"[\s,;]")
_ALNUM = re.compile(r"[^\W_]")


def _has_word(text: str) -> bool:
    """Whether `text` has two letters in a row that are not part of an escape or a hex number."""
    text = _ESCAPE.sub("", text)
    return any(not _HEX.fullmatch(word) for word in _WORD.findall(text))


def _cut_loops(lines: list[str], line_before: str) -> list[str]:
    """`lines` up to where the model started looping (see the module docstring)."""
    for i, line in enumerate(lines):
        start = len(line_before) if i == 0 else 0
        whole = line_before + line if i == 0 else line
        cut = _looping_tail(whole.rstrip())
        if cut is not None:
            return lines[:i] + [whole[start:max(cut, start)]]
    return _cut_repeated_last_lines(lines, line_before)


def _looping_tail(line: str) -> int | None:
    """Where the second copy starts when `line` ends in a loop of a short unit, else None."""
    n = len(line)
    for period in range(2, min(MAX_UNIT_CHARS, n // LOOP_COPIES) + 1):
        start = n - period                  # the periodic tail is line[start:]
        while start > 0 and line[start - 1] == line[start - 1 + period]:
            start -= 1
        copies = (n - start) // period
        if copies < LOOP_COPIES:
            continue
        unit = line[start:start + period]
        if len(set(unit)) == 1 or not _has_word(unit):
            continue    # `xxxx`, `# ====`, `0, 0, 0`, `"\\t\\t"`, `#fafafa`
        if (period < SHORT_UNIT_CHARS or _LIST_SEPARATOR.search(unit)) \
                and copies < LIST_LOOP_COPIES:
            continue    # `rwxrwxrwx`, `None, None, None`
        return start + period
    return None


def _cut_repeated_last_lines(lines: list[str], line_before: str) -> list[str]:
    """Drop the copies after the first when the completion ends with the same line (or block of
    lines) again and again. Blank lines are skipped over; the cursor line counts whole; a last
    line that is the start of its copy (cut by the token budget) counts as a copy; lines without
    a letter or digit (`#`, `...`, `}`) do not count."""
    whole = [line_before + lines[0], *lines[1:]] if lines else []
    rows = [i for i, line in enumerate(whole) if line.strip()]
    texts = [whole[i].rstrip() for i in rows]
    last = len(texts) - 1
    for period in range(1, MAX_BLOCK_LINES + 1):
        partial = last - period >= 0 and texts[last] != texts[last - period] \
            and texts[last - period].startswith(texts[last])
        end = last - 1 if partial else last       # the last complete line of the tail
        start = end - period + 1
        while start > 0 and texts[start - 1] == texts[start - 1 + period]:
            start -= 1
        if start < 0 or (end + 1 - start) // period < LOOP_COPIES:
            continue
        block = texts[start:start + period]
        if (period > 1 and len(set(block)) == 1) \
                or not any(_ALNUM.search(_ESCAPE.sub("", line)) for line in block):
            continue
        return lines[:rows[start + period - 1] + 1]
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
