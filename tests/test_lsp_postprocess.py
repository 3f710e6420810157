"""Post-processing of generated text into what the editor shows."""
import pytest

from stablelm_lsp.lsp.postprocess import Completion, is_multiline_position, postprocess


def _pp(generated, before="", after="", next_lines=(), max_lines=8, stops=()):
    return postprocess(generated, line_before=before, line_after=after, next_lines=next_lines,
                       max_lines=max_lines, stops=stops)


def test_stop_texts_cut_the_completion():
    assert _pp("x = 1<file_sep>junk", stops=("<file_sep>", "<|endoftext|>")) == Completion("x = 1")


def test_a_nul_character_ends_the_completion():
    assert _pp("x = 1\x00\ufffdjunk") == Completion("x = 1")
    assert _pp("\x00x") is None


def test_one_line_when_the_cursor_sits_before_other_text():
    assert _pp("value, 2\nmore\nlines", before="f(", after=", end)") == Completion("value, 2")
    assert not is_multiline_position(", end)")


def test_several_lines_at_the_end_of_a_line_bounded_by_max_lines():
    gen = "\n".join(f"line{i}" for i in range(20))
    c = _pp(gen, before="def f():", max_lines=3)
    assert c == Completion("line0\nline1\nline2")


def test_lines_repeating_the_next_document_line_are_cut():
    c = _pp("\n    x = 1\n    return x\nprint(f())", before="def f():",
            next_lines=("", "    return x", ""))
    assert c == Completion("\n    x = 1")


def test_a_completion_that_only_repeats_the_next_line_is_dropped():
    assert _pp("return x", before="    ", next_lines=("    return x",)) is None


def test_text_repeating_the_rest_of_the_line_is_cut():
    assert _pp('"hi", end="")', before="print(", after=', end="")') == Completion('"hi"')


def test_auto_closed_bracket_is_replaced_not_duplicated():
    assert _pp("a, b)", before="f(", after=")") == Completion("a, b)", replace=1)
    # The completion does not close it: plain insertion, the bracket stays.
    assert _pp("a, b", before="f(", after=")") == Completion("a, b")
    # It closes the inner call only: the outer closer is kept, re-inserted inside the range.
    assert _pp("1)", before="f(g(", after="))") == Completion("1))", replace=2)
    assert _pp("1", before="f(g(", after="))") == Completion("1")


def test_auto_closed_quotes_and_mixed_closers():
    assert _pp('hello")', before='print("', after='")') == Completion('hello")', replace=2)
    assert _pp("hello", before='print("', after='")') == Completion("hello")
    assert _pp("1]", before="f([", after="])") == Completion("1]", replace=1)


def test_multiline_completion_closing_the_block_replaces_the_auto_closed_brace():
    c = _pp("\n  return 1;\n}", before="function f() {", after="}")
    assert c == Completion("\n  return 1;\n}", replace=1)


@pytest.mark.parametrize("generated", ["", "   ", "\n\n  \n", "<|endoftext|>"])
def test_no_empty_items(generated):
    assert _pp(generated, before="x = ", stops=("<|endoftext|>",)) is None


def test_no_trailing_whitespace():
    assert _pp("a = 1   \n  b = 2 \t\n\n", before="") == Completion("a = 1\n  b = 2")


# -- repetition -------------------------------------------------------------------------------

def test_a_line_ending_in_a_repeated_word_is_cut_after_its_first_copy():
    assert _pp("level-level-level", before="x = foo-") == Completion("level")
    assert _pp("LevelLevelLevelLevelLev", before="class Foo") == Completion("Level")
    # Cut where the second copy starts.
    assert _pp("self.self.self.self", before="    return ") == Completion("self.")
    # The rest of the completion goes with it: the model was looping.
    assert _pp("bar-bar-bar\nnext_line()", before="x = foo-") == Completion("bar")
    # Looping list items need more copies than a word (see the kept cases below).
    assert _pp(" = ".join(["foo"] * 8), before="let ") == Completion("foo =")


def test_a_repeated_word_the_user_typed_alone_leaves_nothing_to_show():
    assert _pp("-level", before="x = foo-level-level") is None


@pytest.mark.parametrize("line", [    # each ends in its repetition, as a cut-off completion would
    "values = [0, 0, 0, 0, 0, 0, 0, 0",     # numbers
    "# ==========================",         # separator lines
    "path = '../../../../",
    "x[0][0][0]",
    "matrix = [[], [], [], [",
    "fmt = '%s%s%s%s",
    "bom = b'\\xff\\xff\\xff\\xff",
    "sep = '\\t\\t\\t",
    "    color: #fafafa",                   # hex digits
    "mode = '-rwxrwxrwx",                   # short units need more copies
    "args = (None, None, None",             # few list items with words
    "total = a + a + a",
    "print('ha ha ha",
])
def test_legitimate_repetition_inside_a_line_is_kept(line):
    assert _pp(line) == Completion(line)


def test_a_completion_ending_in_the_same_line_again_and_again_is_cut():
    looping = "\n".join(["result = compute(x)"] * 6)
    assert _pp(looping) == Completion("result = compute(x)")
    # Counted with the cursor line: the suggestion only repeats it.
    assert _pp("\n    x = x + 1\n    x = x + 1", before="    x = x + 1") is None
    # A last line cut short by the token budget is one more copy.
    assert _pp("a = 1\nfoo()\nfoo()\nfoo()\nfo") == Completion("a = 1\nfoo()")
    # Blank lines between the copies do not hide them.
    assert _pp("def f():\n    pass\n\npass\n\npass\n\npass") == Completion("def f():\n    pass\n\npass")


def test_a_completion_ending_in_a_repeated_block_of_lines_is_cut():
    block = "    x = read()\n    check(x)"
    assert _pp("\n".join([block] * 4), before="") == Completion(block)
    assert _pp("\n" + "\n".join([block] * 3), before="def f():") == Completion("\n" + block)


@pytest.mark.parametrize("generated", [
    "x = x + 1\nx = x + 1",                                 # twice: real code does that
    "show()\nassert shown()\nshow()\nassert shown()",         # a block twice: idempotence tests
    "counter.step()\ncounter.step()\ncounter.step()\nassert counter.value == 3",   # escaped
    "[0, 0, 0],\n [0, 0, 0],\n [0, 0, 1]]",
    "  }\n}\n",                                             # closers at different depths
    "#\n#\n#\n#",                                           # no letter or digit: comment blocks
    "...\n...\n...",
])
def test_legitimate_repeated_lines_are_kept(generated):
    assert _pp(generated) == Completion(generated.rstrip())


def test_a_partly_typed_statement_is_completed_to_its_end_unless_it_opens_a_block():
    gen = "append(item)\n\n    def get_lines(self):\n        return self.items"
    assert _pp(gen, before="        self.items.") == Completion("append(item)")
    # the line opens a block or goes on: what follows belongs to it
    assert _pp("items):\n    return len(items)", before="def count(") == \
        Completion("items):\n    return len(items)")
    assert _pp("\n    return 1", before="def one():") == Completion("\n    return 1")
    assert _pp("1,\n    2,\n]", before="x = [") == Completion("1,\n    2,\n]")
    # on an empty line, several lines as before
    assert _pp("x = 1\ny = 2", before="    ") == Completion("x = 1\ny = 2")
