"""Documents: line splitting, position encodings, incremental edits."""
import random

import pytest

from stablelm_lsp.lsp.documents import (
    Cursor,
    Document,
    EditError,
    PositionEncoding,
    column_to_index,
    index_to_column,
    split_lines,
)

U8, U16, U32 = PositionEncoding.UTF8, PositionEncoding.UTF16, PositionEncoding.UTF32


def test_split_lines_counts_the_three_lsp_line_breaks_only():
    assert split_lines("a\nb\r\nc\rd") == ["a\n", "b\r\n", "c\r", "d"]
    assert split_lines("a\n") == ["a\n", ""]
    assert split_lines("") == [""]
    # Form feed, vertical tab and U+2028 are not line breaks in LSP (str.splitlines says they are).
    assert split_lines("a\x0cb\u2028c") == ["a\x0cb\u2028c"]


@pytest.mark.parametrize("encoding, column, index", [
    (U16, 0, 0), (U16, 1, 1), (U16, 3, 2), (U16, 4, 3), (U16, 2, 1),   # inside the pair: rounds down
    (U8, 1, 1), (U8, 5, 2), (U8, 7, 3), (U8, 3, 1),
    (U32, 2, 2), (U32, 3, 3),
    (U16, 99, 5), (U8, 99, 5), (U32, 99, 5),                         # past the end: clamped
])
def test_columns_to_indices_with_an_astral_character(encoding, column, index):
    line = "a\U0001F600é\u20acz"   # a, emoji (2 utf-16 units, 4 utf-8 bytes), é (2 bytes), € (3)
    assert column_to_index(line, column, encoding) == index


@pytest.mark.parametrize("encoding", list(PositionEncoding))
def test_index_to_column_inverts_column_to_index(encoding):
    line = "x\U0001F600y\u00e9\u4e2d\U0001F680"
    for index in range(len(line) + 1):
        assert column_to_index(line, index_to_column(line, index, encoding), encoding) == index


def test_cursor_clamps_past_the_last_line_to_the_end_of_the_text():
    doc = Document("file:///a", "ab\ncd", 1)
    assert doc.cursor(7, 0, U16) == Cursor(1, 2)
    assert doc.cursor(0, 50, U16) == Cursor(0, 2)


def _apply(doc, start, end, text):
    doc.replace_range(doc.cursor(*start, U32), doc.cursor(*end, U32), text, doc.version + 1)


def test_incremental_edits_match_edits_on_the_whole_text():
    rng = random.Random(0)
    alphabet = ["a", "b", "\n", "\r\n", "\r", "\U0001F600", " "]
    text = "start\r\nline two\nthree\r"
    doc = Document("file:///a", text, 0)
    for _ in range(400):
        lines = split_lines(text)
        a = (rng.randrange(len(lines) + 1), rng.randrange(8))
        b = (rng.randrange(len(lines) + 1), rng.randrange(8))
        start, end = sorted([a, b])
        new = "".join(rng.choice(alphabet) for _ in range(rng.randrange(4)))
        s, e = doc.cursor(*start, U32), doc.cursor(*end, U32)
        if (e.line, e.index) < (s.line, s.index):   # clamping can reorder two positions past EOF
            s, e = e, s
        offset = lambda c: sum(len(x) for x in lines[:c.line]) + c.index  # noqa: E731
        text = text[:offset(s)] + new + text[offset(e):]
        doc.replace_range(s, e, new, doc.version + 1)
        assert doc.lines == split_lines(text)
        assert doc.text == text


def test_an_edit_can_join_cr_and_lf_into_one_line_break():
    doc = Document("file:///a", "a\rb\nc", 0)
    _apply(doc, (1, 0), (1, 1), "")           # delete "b": "a\r\nc"
    assert doc.lines == ["a\r\n", "c"]


def test_an_edit_ending_before_it_starts_is_refused_and_marks_the_document():
    doc = Document("file:///a", "abc\ndef", 3)
    with pytest.raises(EditError):
        doc.replace_range(Cursor(1, 2), Cursor(0, 1), "x", 4)
    assert doc.out_of_sync and doc.text == "abc\ndef" and doc.version == 3


def test_binary_documents_are_recognised_and_recover_when_the_nul_goes():
    doc = Document("file:///a", "ab\x00c", 1)
    assert doc.binary
    _apply(doc, (0, 2), (0, 3), "")
    assert not doc.binary
    _apply(doc, (0, 0), (0, 0), "\x00\x00")
    assert doc.binary
