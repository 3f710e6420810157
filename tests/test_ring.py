"""The context ring: chunks of recently edited text from other documents in the prompt's context.
Pure functions of text (inference/prompts/ring.py, fim.py)."""
from checkpoints import starcoder_specials
from stablelm_lsp.inference.api import prompt_text
from stablelm_lsp.inference.prompts.budget import TokenCounter
from stablelm_lsp.inference.prompts.fim import CHUNK_LINES, CONTEXT_SHARE, ContextFile, build_prompt
from stablelm_lsp.inference.prompts.lines import split_lines
from stablelm_lsp.inference.prompts.ring import CHUNK_RADIUS, RING_SIZE, EditRing

STARCODER = starcoder_specials()


def count(parts) -> int:
    """One token per 4 characters."""
    return -(-len(prompt_text(parts)) // 4)


def module(name: str, functions: int = 40) -> list[str]:
    return split_lines("".join(f"def {name}_{i}(value):\n    return value * {i} + OFFSET_{name}\n\n"
                               for i in range(functions)))


def test_an_edit_records_the_lines_around_it_and_refreshes_its_chunk():
    ring = EditRing()
    lines = module("alpha")
    ring.record("file:///a.py", "python", lines, 30)
    (chunk,) = ring.chunks
    assert chunk.start == 30 - CHUNK_RADIUS and chunk.lines == tuple(lines[22:39])
    assert chunk.lines[chunk.focus] == lines[30]
    lines[31] = "    return 0\n"
    ring.record("file:///a.py", "python", lines, 31)          # inside the same chunk: refreshed
    (refreshed,) = ring.chunks
    assert "    return 0\n" in refreshed.lines and refreshed.stamp > chunk.stamp
    ring.record("file:///a.py", "python", lines, 90)          # elsewhere: a second chunk
    assert len(ring.chunks) == 2


def test_the_ring_keeps_the_newest_chunks_and_drops_older_near_duplicates():
    ring = EditRing()
    for i in range(RING_SIZE + 4):
        ring.record(f"file:///m{i}.py", "python", module(f"m{i}"), 10)
    assert len(ring.chunks) == RING_SIZE
    assert ring.chunks[0].uri == "file:///m4.py" and ring.chunks[-1].uri == f"file:///m{RING_SIZE + 3}.py"
    # The same text edited in another copy: the older chunk goes.
    ring.record("file:///copy.py", "python", module(f"m{RING_SIZE + 3}"), 11)
    assert [c.uri for c in ring.chunks[-2:]] == [f"file:///m{RING_SIZE + 2}.py", "file:///copy.py"]


def test_selection_leaves_out_the_document_itself_other_languages_and_copies_of_its_region():
    ring = EditRing()
    here = module("here")
    ring.record("file:///here.py", "python", here, 40)          # the document's own edits
    ring.record("file:///copy.py", "python", list(here), 40)    # the same code open twice
    ring.record("file:///other.py", "python", module("other"), 40)
    ring.record("file:///other.js", "javascript", module("js"), 40)
    chosen = ring.select("file:///here.py", "python", here, 40)
    assert [c.uri for c in chosen] == ["file:///other.py"]


def test_selection_prefers_shared_names_then_recency():
    ring = EditRing()
    ring.record("file:///shapes.py", "python", split_lines(
        "import math\n\n\ndef circle_area(radius):\n    return math.pi * radius ** 2\n"), 3)
    ring.record("file:///io.py", "python", split_lines("def read_lines(path):\n    pass\n"), 0)
    ring.record("file:///log.py", "python", split_lines("def log_message(text):\n    pass\n"), 0)
    here = split_lines("from shapes import circle_area\n\nsize = circle_area(2)\n")
    chosen = ring.select("file:///main.py", "python", here, 2)
    # least relevant first: the shared name decides, then the newer of the other two
    assert [c.uri for c in chosen] == ["file:///io.py", "file:///log.py", "file:///shapes.py"]


def test_the_choice_holds_while_typing_in_a_block_and_changes_when_another_document_does():
    ring = EditRing()
    ring.record("file:///util.py", "python", module("util"), 20)
    ring.record("file:///misc.py", "python", module("misc"), 20)
    here = module("here")
    first = ring.select("file:///here.py", "python", here, 33)
    for typed in ("u", "ut", "util_3(", "misc_1 + util_2("):      # names that would rank otherwise
        here[33] = typed + "\n"
        ring.record("file:///here.py", "python", here, 33)
        assert ring.select("file:///here.py", "python", here, 33) is first
    ring.record("file:///misc.py", "python", module("misc"), 70)   # another document changes
    assert ring.select("file:///here.py", "python", here, 33) is not first
    moved = ring.select("file:///here.py", "python", here, 33 + CHUNK_LINES)   # another block
    assert ring.select("file:///here.py", "python", here, 33 + CHUNK_LINES) is moved


def test_ring_chunks_in_the_prompt_stay_within_budget_and_typing_only_appends():
    ring = EditRing()
    for i in range(RING_SIZE):
        ring.record(f"file:///lib{i}.py", "python", module(f"lib{i}"), 25)
    lines = module("main", 200)
    line = 150
    budget = 1024
    previous = None
    typed = "result = lib3_4(value) + lib7_1("
    for n in range(len(typed) + 1):
        lines[line] = typed[:n] + "\n"
        ring.record("file:///main.py", "python", lines, line)
        chunks = ring.select("file:///main.py", "python", lines, line)
        files = [c.context_file(c.uri.rsplit("/", 1)[-1]) for c in chunks]
        counter = TokenCounter(count)
        p = build_prompt(lines, line, n, special=STARCODER, count_tokens=counter,
                         context_tokens=budget, path="main.py", repo="proj", context_files=files)
        assert counter(p.parts) <= budget
        context = prompt_text(p.parts).split("<fim_prefix>")[0]
        assert len(context) // 4 <= CONTEXT_SHARE * budget + 2
        assert p.context_paths            # some chunks fit
        if previous is not None:
            assert p.text.startswith(previous.text)
        previous = p


def test_the_cursor_region_appears_once_even_when_the_document_was_closed_and_copied():
    here = module("here")
    ring = EditRing()
    ring.record("file:///here.py", "python", here, 30)       # edited, closed, opened again
    ring.record("file:///backup.py", "python", list(here), 31)
    ring.record("file:///helpers.py", "python", module("helpers"), 5)
    chunks = ring.select("file:///here.py", "python", here, 30)
    p = build_prompt(here, 30, 4, special=STARCODER, count_tokens=TokenCounter(count),
                     context_tokens=4096, path="here.py", repo="proj",
                     context_files=[c.context_file(c.uri[8:]) for c in chunks])
    assert p.context_paths == ("helpers.py",)
    assert p.text.count(here[28]) == 1 and p.text.count(here[31]) == 1


def test_a_chunk_cut_by_a_small_budget_keeps_the_lines_around_its_edit():
    lines = module("big")
    files = [ContextFile("big.py", lines, around=60)]
    p = build_prompt(split_lines("x = 1\n"), 1, 0, special=STARCODER, count_tokens=TokenCounter(count),
                     context_tokens=160, path="c.py", repo="r", context_files=files)
    context = p.text.split("<fim_prefix>")[0]
    assert lines[60] in context and lines[0] not in context
