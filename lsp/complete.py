"""`stablelm-lsp complete FILE --line L --character C`: print what the server would answer there.

Same prompt building, same post-processing as `textDocument/inlineCompletion` (no other open
buffers, so no repository context beyond the file's own path). Positions are LSP's: zero-based,
the character counted in UTF-16 code units unless `--encoding` says otherwise.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .common import EXIT_USAGE, add_model_arguments, run_guarded
from .serve import add_setting_arguments, settings_from_args


def _non_negative(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError("positions are zero-based and cannot be negative")
    return value


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("complete", help="print the completion the server would give at a position",
                       description=__doc__.splitlines()[0])
    p.add_argument("file", type=Path, help="UTF-8 source file")
    p.add_argument("--line", type=_non_negative, required=True, help="zero-based line")
    p.add_argument("--character", type=_non_negative, required=True, help="zero-based column")
    p.add_argument("--encoding", default="utf-16", choices=["utf-16", "utf-8", "utf-32"],
                   help="unit of --character (default utf-16, as LSP)")
    p.add_argument("--root", type=Path, default=None,
                   help="workspace folder the file's path is given relative to (default: the "
                        "current directory when it holds the file)")
    p.add_argument("--json", action="store_true",
                   help="print the inline completion list as the server sends it")
    add_model_arguments(p)
    add_setting_arguments(p)
    p.set_defaults(func=lambda args: run_guarded(args, _complete))


def _complete(args: argparse.Namespace) -> int:
    import uuid

    from lsprotocol import types
    from pygls.protocol import default_converter
    from pygls.uris import from_fs_path

    from stablelm_lsp.inference.load import load_backend
    from stablelm_lsp.inference.prompts.fim import TemplateError

    from .completion import Completer
    from .documents import Document, PositionEncoding, relative_path
    from .items import inline_item
    from .settings import SettingsError

    try:
        settings = settings_from_args(args)
    except SettingsError as exc:
        return _usage_error(str(exc))
    path = args.file.resolve()
    text = path.read_text(encoding="utf-8")
    uri = from_fs_path(str(path))
    doc = Document(uri, text, 0)
    if doc.binary:
        return _usage_error(f"{args.file} holds NUL characters: not a text file")
    encoding = PositionEncoding(args.encoding)
    cursor = doc.cursor(args.line, args.character, encoding)
    root = (args.root or Path.cwd()).resolve()
    rel, repo = relative_path(uri, [from_fs_path(str(root))])

    backend = load_backend(settings.model, settings.backend_options())
    try:
        completer = Completer(backend, settings)
        completion = completer.complete(doc.lines, cursor, path=rel, repo=repo, key=uri)
    except TemplateError as exc:
        return _usage_error(str(exc))
    finally:
        backend.close()
    if args.json:
        items = [] if completion is None else [
            inline_item(completion, cursor, doc, encoding, uuid.uuid4().hex)]
        answer = default_converter().unstructure(types.InlineCompletionList(items=items))
        json.dump(answer, sys.stdout, ensure_ascii=False)
        sys.stdout.write("\n")
    elif completion is not None:
        sys.stdout.write(completion.text + "\n")
    else:
        print("stablelm-lsp: no completion at this position", file=sys.stderr)
    return 0


def _usage_error(message: str) -> int:
    print(f"stablelm-lsp: error: {message}", file=sys.stderr)
    return EXIT_USAGE
