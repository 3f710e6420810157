"""A completion as the protocol's items: `InlineCompletionItem` and `CompletionItem`, each with
the `stablelm.accepted` command that counts it when the editor inserts it."""
from __future__ import annotations

from lsprotocol import types

from .documents import Cursor, Document, PositionEncoding
from .postprocess import Completion

SERVER_NAME = "stablelm-lsp"
ACCEPTED_COMMAND = "stablelm.accepted"


def replaced_range(doc: Document, cursor: Cursor, replace: int,
                   encoding: PositionEncoding) -> types.Range:
    """From `cursor` over the `replace` characters after it (closers the editor auto-inserted)."""
    start = types.Position(cursor.line, doc.column(cursor, encoding))
    end = types.Position(cursor.line, doc.column(Cursor(cursor.line, cursor.index + replace), encoding))
    return types.Range(start, end)


def accepted_command(completion_id: str) -> types.Command:
    return types.Command(title="Accept completion", command=ACCEPTED_COMMAND,
                         arguments=[{"id": completion_id}])


def inline_item(completion: Completion, cursor: Cursor, doc: Document, encoding: PositionEncoding,
                completion_id: str) -> types.InlineCompletionItem:
    """The inline completion item for `completion` at `cursor`: a range only when it replaces
    auto-inserted closers (without one, clients insert at the cursor)."""
    return types.InlineCompletionItem(
        insert_text=completion.text,
        range=replaced_range(doc, cursor, completion.replace, encoding) if completion.replace else None,
        command=accepted_command(completion_id),
    )


def completion_item(completion: Completion, cursor: Cursor, doc: Document,
                    encoding: PositionEncoding, completion_id: str) -> types.CompletionItem:
    """The `textDocument/completion` item for `completion` at `cursor`, labelled with its first
    line, sorted first and matched by any filter text."""
    first_line = completion.text.strip().split("\n", 1)[0]
    return types.CompletionItem(
        label=first_line[:80] or completion.text.strip()[:80],
        kind=types.CompletionItemKind.Text,
        detail=SERVER_NAME,
        insert_text_format=types.InsertTextFormat.PlainText,
        text_edit=types.TextEdit(range=replaced_range(doc, cursor, completion.replace, encoding),
                                 new_text=completion.text),
        filter_text="",
        sort_text="0",
        command=accepted_command(completion_id),
    )
