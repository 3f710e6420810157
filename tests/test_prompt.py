"""Prompt building: layout, budgets, cache-friendly cuts, templates. Pure functions of text."""
import pytest

from stablelm_lsp.inference.api import PromptPart, SpecialTokens, prompt_text
from checkpoints import starcoder_specials
from stablelm_lsp.lsp.documents import split_lines
from stablelm_lsp.inference.prompts.budget import MAX_CHARS_PER_TOKEN, TokenCounter
from stablelm_lsp.inference.prompts.fim import (
    CHUNK_LINES,
    MIDDLE_CUT_STEP,
    ContextFile,
    PromptTemplate,
    TemplateError,
    build_prompt,
)

STARCODER = starcoder_specials()
FIM_ONLY = SpecialTokens(eos="<|endoftext|>", fim_prefix="<fim_prefix>", fim_suffix="<fim_suffix>",
                         fim_middle="<fim_middle>")
PLAIN = SpecialTokens(eos="<|endoftext|>")


class CharCounter:
    """A token counter charging one token per 4 characters; records how much text it was shown."""

    def __init__(self):
        self.chars_seen = 0

    def __call__(self, parts):
        text = prompt_text(parts)
        self.chars_seen += len(text)
        return -(-len(text) // 4)


def _prompt(text, line, index, special=FIM_ONLY, budget=4096, counter=None, **kw):
    counter = counter or TokenCounter(CharCounter())
    return build_prompt(split_lines(text), line, index, special=special, count_tokens=counter,
                        context_tokens=budget, **kw)


def test_fim_layout_puts_the_cursor_line_after_the_middle_marker():
    text = "def f(x):\n    return x + 1\n\nprint(f(2))\n"
    p = _prompt(text, 1, 11)   # cursor after "    return "
    assert p.text == ("<fim_prefix>def f(x):\n<fim_suffix>x + 1\n\nprint(f(2))\n"
                      "<fim_middle>    return ")
    assert (p.line_before, p.line_after) == ("    return ", "x + 1")
    assert p.next_lines == ("", "print(f(2))", "")


def test_repository_layout_with_other_files_nearest_last():
    files = [ContextFile("a.py", split_lines("A = 1\n")), ContextFile("b.py", split_lines("B = 2\n"))]
    p = _prompt("x = 1\ny", 1, 1, special=STARCODER, path="src/c.py", repo="proj",
                context_files=files)
    assert p.text == ("<repo_name>proj<file_sep>a.py\nA = 1\n<file_sep>b.py\nB = 2\n"
                      "<file_sep><fim_prefix>src/c.py\nx = 1\n<fim_suffix><fim_middle>y")
    assert p.context_paths == ("a.py", "b.py")


def test_prefix_only_for_models_without_fim_tokens():
    p = _prompt("import os\nos.pa\nrest()\n", 1, 5, special=PLAIN)
    assert p.text == "import os\nos.pa"


def test_typing_inside_a_line_only_appends_to_the_prompt():
    body = "".join(f"value_{i} = compute({i}, {i * 3})\n" for i in range(400))
    text = body + "\n" + body
    line = 400
    typed = "result = value_3 + value_4"
    previous = None
    for n in range(len(typed) + 1):
        lines = split_lines(text)
        lines[line] = typed[:n] + "\n"
        p = build_prompt(lines, line, n, special=STARCODER, count_tokens=TokenCounter(CharCounter()),
                         context_tokens=1024, path="a.py", repo="r")
        assert p.tokens <= 1024
        if previous is not None:
            assert p.text.startswith(previous.text)
            assert p.prefix_start == previous.prefix_start
        previous = p


def test_the_prefix_cut_moves_in_whole_chunks_as_lines_are_added():
    starts = []
    lines = ["    some_statement(argument_one, argument_two)\n"] * 300 + [""]
    for line in range(100, 300):
        p = build_prompt(lines, line, 0, special=FIM_ONLY, count_tokens=TokenCounter(CharCounter()),
                         context_tokens=600)
        assert p.prefix_start % CHUNK_LINES == 0
        starts.append(p.prefix_start)
    moves = sum(1 for a, b in zip(starts, starts[1:]) if a != b)
    assert all(b - a == CHUNK_LINES for a, b in zip(starts, starts[1:]) if a != b)
    assert 0 < moves <= 200 // CHUNK_LINES + 1


def test_budget_is_respected_and_split_between_prefix_and_suffix():
    lines = [f"line_{i} = {i}\n" for i in range(2000)]
    p = build_prompt(lines, 1000, 3, special=FIM_ONLY, count_tokens=TokenCounter(CharCounter()),
                     context_tokens=512)
    assert p.tokens <= 512
    prefix_lines = 1000 - p.prefix_start
    suffix_lines = p.suffix_end - 1000
    assert prefix_lines > 2 * suffix_lines > 0


def test_a_short_prefix_leaves_its_budget_to_the_suffix():
    lines = [f"line_{i} = {i}\n" for i in range(2000)]
    p = build_prompt(lines, 2, 0, special=FIM_ONLY, count_tokens=TokenCounter(CharCounter()),
                     context_tokens=512)
    assert p.prefix_start == 0
    assert p.tokens > 400    # most of the budget used, by the suffix


def test_context_files_take_at_most_their_share():
    big = split_lines("".join(f"helper_{i} = {i}\n" for i in range(5000)))
    p = _prompt("x = 1\n", 1, 0, special=STARCODER, budget=800, path="c.py", repo="r",
                context_files=[ContextFile("big.py", big)])
    assert p.context_paths == ("big.py",)
    context = p.text.split("<fim_prefix>")[0]
    assert len(context) // 4 <= 800 // 4 + 8
    assert p.text.startswith("<repo_name>r<file_sep>big.py\nhelper_0 = 0\n")


def test_huge_documents_and_lines_cost_bounded_tokenizer_work():
    counter = CharCounter()
    minified = "var a=1;" * 700_000          # one 5.6 MB line
    text = "head\n" + minified + "\n" + "x = 1\n" * 200_000
    lines = split_lines(text)
    for line, index in [(1, 3_000_000), (2, 0), (100_000, 2)]:
        p = build_prompt(lines, line, index, special=STARCODER, count_tokens=TokenCounter(counter),
                         context_tokens=1024, context_files=[ContextFile("m.js", lines)])
        assert p.tokens <= 1024
    assert counter.chars_seen < 3 * 4 * 1024 * MAX_CHARS_PER_TOKEN


def test_a_long_cursor_line_is_cut_in_coarse_steps():
    line = "x" * 20_000
    starts = [_prompt(line, 0, n, budget=512).middle_start for n in range(15_000, 15_600)]
    assert all(s > 0 and s % MIDDLE_CUT_STEP == 0 for s in starts)
    assert sum(1 for a, b in zip(starts, starts[1:]) if a != b) <= 600 // MIDDLE_CUT_STEP + 1


def test_user_template_and_its_errors():
    template = PromptTemplate("{fim_prefix}# {path}\n{prefix}{fim_suffix}{suffix}{fim_middle}{middle}")
    p = _prompt("a\nb", 1, 1, path="x.py", template=template)
    assert p.text == "<fim_prefix># x.py\na\n<fim_suffix><fim_middle>b"
    with pytest.raises(TemplateError, match="unknown field"):
        PromptTemplate("{prefix}{middle}{cursor}")
    with pytest.raises(TemplateError, match="needs a {middle}"):
        PromptTemplate("{prefix}")
    with pytest.raises(TemplateError, match="plain name"):
        PromptTemplate("{prefix!r}{middle}")
    with pytest.raises(TemplateError):
        PromptTemplate("{prefix}{middle")
    with pytest.raises(TemplateError, match="fim_prefix"):
        _prompt("a", 0, 1, special=PLAIN, template=template)
    literal = PromptTemplate("{{x}}{prefix}{middle}")
    assert _prompt("a\nb", 1, 1, template=literal).text == "{x}a\nb"


def test_document_text_paths_and_context_are_plain_parts_the_format_special():
    files = [ContextFile("a<file_sep>.py", split_lines("A = '<|endoftext|>'\n"))]
    text = 'MARK = "<fim_middle>"\nx = 1\nEND = "<|endoftext|>"\n'
    p = _prompt(text, 1, 3, special=STARCODER, path="src/<fim_pad>.py", repo="<repo_name>",
                context_files=files)
    special = [part.text for part in p.parts if part.special]
    plain = "".join(part.text for part in p.parts if not part.special)
    assert special == ["<repo_name>", "<file_sep>", "<file_sep><fim_prefix>", "\n", "<fim_suffix>",
                       "<fim_middle>"]
    assert plain == ("<repo_name>" "a<file_sep>.py\nA = '<|endoftext|>'\n" "src/<fim_pad>.py"
                     'MARK = "<fim_middle>"\n' ' 1\nEND = "<|endoftext|>"\n' "x =")
    assert p.text == "".join(part.text for part in p.parts)
    # Parts of one kind are never neighbours: an encoder joins nothing it should not.
    assert all(a.special != b.special for a, b in zip(p.parts, p.parts[1:]))


def test_template_literal_text_is_the_formats_own():
    template = PromptTemplate("<fim_prefix>## {path}\n{prefix}{fim_suffix}{suffix}{fim_middle}{middle}")
    p = _prompt("a\nb<fim_middle>", 1, 1, path="x.py", template=template)
    assert p.parts == (PromptPart("<fim_prefix>## ", special=True), PromptPart("x.py"),
                       PromptPart("\n", special=True), PromptPart("a\n"),
                       PromptPart("<fim_suffix>", special=True), PromptPart("<fim_middle>"),
                       PromptPart("<fim_middle>", special=True), PromptPart("b"))


def test_token_counter_caches_by_parts():
    seen = []

    def count(parts):
        seen.append(parts)
        return len(prompt_text(parts))

    counter = TokenCounter(count)
    assert counter([PromptPart("abc")]) == counter((PromptPart("ab"), PromptPart("c"))) == 3
    assert counter([PromptPart("abc", special=True)]) == 3
    assert counter([PromptPart("")]) == 0
    assert seen == [(PromptPart("abc"),), (PromptPart("abc", special=True),)]
