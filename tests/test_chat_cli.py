"""`stablelm-lsp chat` end to end (a real subprocess): one question, an interactive session from
stdin, a file as context, and bad input. Replies are compared with the in-process engine."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

from stablelm_lsp.inference.backend import LocalBackend
from stablelm_lsp.inference.prompts.chat import EditorContext, prepare_turn
from stablelm_lsp.inference.prompts.chat_template import ChatMessage
from stablelm_lsp.lsp.documents import split_lines

MAX_NEW_TOKENS = 40


def run_chat(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONIOENCODING": "utf-8"}
    return subprocess.run([sys.executable, "-m", "stablelm_lsp.lsp.cli", "chat", *args],
                          input=stdin, capture_output=True, encoding="utf-8", timeout=180, env=env)


@pytest.fixture(scope="module")
def backend(stablelm_checkpoint):
    b = LocalBackend.load(stablelm_checkpoint, device="cpu", dtype="float32")
    yield b
    b.close()


def reply(backend, messages, context=None, keep_from=0):
    prompt, request = prepare_turn(backend.info, messages, count_tokens=backend.count_tokens,
                                   context=context, keep_from=keep_from,
                                   max_new_tokens=MAX_NEW_TOKENS)
    return prompt, backend.generate(request).text


def test_one_question_prints_the_reply(stablelm_checkpoint, backend):
    out = run_chat("--model", str(stablelm_checkpoint), "--max-new-tokens", str(MAX_NEW_TOKENS),
                   "--system", "Be brief.", "What is a closure?")
    assert out.returncode == 0, out.stderr
    _, expected = reply(backend, [ChatMessage("system", "Be brief."),
                                  ChatMessage("user", "What is a closure?")])
    assert out.stdout == expected + "\n"


def test_interactive_session_keeps_the_history(stablelm_checkpoint, backend, tmp_path):
    source = tmp_path / "shapes.py"
    source.write_text("def area(r):\n    return 3.14 * r * r\n", encoding="utf-8")
    out = run_chat("--model", str(stablelm_checkpoint), "--max-new-tokens", str(MAX_NEW_TOKENS),
                   "--file", str(source), stdin="What does area do?\n\n   \nAnd for r = 2?\n")
    assert out.returncode == 0, out.stderr
    context = EditorContext("shapes.py", "py", split_lines(source.read_text(encoding="utf-8")))
    first_prompt, first = reply(backend, [ChatMessage("user", "What does area do?")], context)
    assert "return 3.14 * r * r" in first_prompt.text
    history = [*first_prompt.conversation, ChatMessage("assistant", first),
               ChatMessage("user", "And for r = 2?")]
    second_prompt, second = reply(backend, history, keep_from=first_prompt.first_kept)
    assert second_prompt.text.startswith(first_prompt.text + first)
    assert out.stdout == first + "\n\n" + second + "\n\n"


@pytest.mark.parametrize("args, words", [
    (["   "], "empty"),
    (["--file", "/definitely/not/here.py", "hi"], "here.py"),
    (["word " * 2000], "takes at most"),
    (["--max-new-tokens", "0", "hi"], "max_new_tokens"),
])
def test_bad_input_one_line_exit_2(stablelm_checkpoint, args, words):
    out = run_chat("--model", str(stablelm_checkpoint), *args)
    assert out.returncode == 2, out.stderr
    assert out.stdout == "" and "Traceback" not in out.stderr
    errors = [line for line in out.stderr.splitlines() if line.startswith("stablelm-lsp: error:")]
    assert len(errors) == 1 and words in errors[0], out.stderr
