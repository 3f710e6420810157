"""`stablelm-lsp` command line: one sub-command per job.

Each sub-command lives in its own module with a `register(subparsers)` that adds its parser and
sets `func(args) -> int`. Errors the user can fix print one line to stderr and exit 2
(`--debug` shows the traceback instead).
"""
from __future__ import annotations

import argparse
import sys

from . import chat_cli, complete, generate, serve


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="stablelm-lsp", description=__doc__.splitlines()[0])
    parser.add_argument("--debug", action="store_true", help="show tracebacks for errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    generate.register(sub)
    serve.register(sub)
    complete.register(sub)
    chat_cli.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    # Editors start `stablelm-lsp --stdio [options]`: server options first means `serve`.
    first = next((i for i, a in enumerate(argv) if a != "--debug"), None)
    if first is not None and argv[first].startswith("--") and argv[first] != "--help":
        argv.insert(first, "serve")
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help(sys.stderr)
        return 2
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
