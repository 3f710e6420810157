"""`stablelm-lsp chat`: ask a chat model a question, the reply streamed to stdout.

Without a question it is an interactive session: one question per line of stdin, each reply
followed by a blank line; history is kept and later turns reuse the cache of earlier ones.
Ctrl-C stops the reply being written; Ctrl-C at the prompt or end of input ends the session.
"""
from __future__ import annotations

import argparse
import sys
import threading
from pathlib import Path

from stablelm_lsp.inference.prompts.chat import CHAT_MAX_NEW_TOKENS

from .common import add_model_arguments, open_backend, run_guarded


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("chat", help="chat with a model (interactive without a question)",
                       description="Answer QUESTION with a chat model, streaming the reply; "
                                   "without QUESTION, read one question per line from stdin.")
    add_model_arguments(p)
    p.add_argument("question", nargs="?", help="the question (omit for an interactive session)")
    p.add_argument("--system", metavar="TEXT", help="a system message")
    p.add_argument("--file", metavar="PATH", help="a source file to talk about (sent as context "
                   "with the first question)")
    p.add_argument("--max-new-tokens", type=int, default=CHAT_MAX_NEW_TOKENS, metavar="N",
                   help=f"longest reply in tokens (default {CHAT_MAX_NEW_TOKENS})")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.set_defaults(func=lambda args: run_guarded(args, _chat))


def _chat(args: argparse.Namespace) -> int:
    from stablelm_lsp.inference.prompts.chat import EditorContext, check_messages, prepare_turn
    from stablelm_lsp.inference.prompts.chat_template import ChatFormatError, ChatMessage

    from .documents import split_lines

    context = None
    if args.file:
        path = Path(args.file)
        context = EditorContext(path.name, path.suffix.lstrip("."),
                                split_lines(path.read_text(encoding="utf-8")))
    conversation: list[ChatMessage] = [ChatMessage("system", args.system)] if args.system else []
    if args.question is not None:   # refused before the model loads
        check_messages([*conversation, ChatMessage("user", args.question)])
    backend = open_backend(args)
    keep_from = 0
    interactive = args.question is None
    questions = iter([args.question]) if not interactive else _read_questions()

    for question in questions:
        conversation.append(ChatMessage("user", question))
        try:
            prompt, request = prepare_turn(backend.info, conversation,
                                           count_tokens=backend.count_tokens, context=context,
                                           keep_from=keep_from, max_new_tokens=args.max_new_tokens,
                                           temperature=args.temperature)
        except ChatFormatError as exc:    # one line and exit 2 (common.run_guarded) when not asked
            if not interactive:
                raise
            print(f"stablelm-lsp: {exc}", file=sys.stderr)
            conversation.pop()
            continue
        context = None      # the file stays in the history, inside the first question
        cancel = threading.Event()
        shown: list[str] = []

        def on_delta(delta: str) -> None:
            shown.append(delta)
            _write(delta)

        try:
            backend.generate(request, cancel=cancel, on_delta=on_delta)
        except KeyboardInterrupt:   # the reply so far stays in the history, as it is cached
            if not interactive:
                raise
            cancel.set()
        _write("\n\n" if interactive else "\n")
        reply = "".join(shown)
        conversation = list(prompt.conversation) + [ChatMessage("assistant", reply)]
        keep_from = prompt.first_kept
    return 0


def _write(text: str) -> None:
    sys.stdout.write(text)
    sys.stdout.flush()


def _read_questions():
    """Non-empty lines of stdin; a prompt on stderr when a person is typing."""
    tty = sys.stdin.isatty()
    while True:
        if tty:
            print("> ", end="", file=sys.stderr, flush=True)
        try:
            line = sys.stdin.readline()
        except KeyboardInterrupt:
            return
        if not line:
            return
        if line.strip():
            yield line.rstrip("\n")
