"""Documents quoting special tokens (this project's own sources do) complete as text: the real
server over stdio on a tiny StarCoder2-style checkpoint, compared with the in-process engine given
the prompt's parts, whose token ids hold the documents' plain encoding and no special id but the
prompt format's own."""
from __future__ import annotations

import dataclasses

import pytest
import pytest_asyncio

from lsp_testing import inline, open_document, start_client, stop_client
from stablelm_lsp.inference.backend import LocalBackend
from stablelm_lsp.lsp.completion import Completer
from stablelm_lsp.lsp.documents import Cursor, split_lines
from stablelm_lsp.lsp.settings import Settings

pytestmark = pytest.mark.asyncio(loop_scope="module")

SOURCE = '''EOS = "<|endoftext|>"
MIDDLE = "<fim_middle>"


def split_at_markers(text):
    """Split text at the FIM middle marker; <fim_suffix> is left alone."""
    parts = text.split(MIDDLE)
    return [part.strip() for part in parts]
'''
# (line, character): mid-word (token healing applies), after a quoted marker, at a line start.
CURSORS = [(6, 20), (1, 22), (7, 4)]


@pytest.fixture(scope="module")
def model(starcoder2_checkpoint):
    return starcoder2_checkpoint


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def server(model, tmp_path_factory):
    state = tmp_path_factory.mktemp("special-text-server")
    client, _ = await start_client(model, state)
    uri = (state / "proj" / "markers.py").as_uri()
    open_document(client, uri, SOURCE)
    yield client, uri
    await stop_client(client)


@pytest.fixture(scope="module")
def reference(model):
    backend = LocalBackend.load(model, device="cpu", dtype="float32")
    yield backend
    backend.close()


@pytest.mark.parametrize("line, character", CURSORS)
async def test_completion_equals_the_engine_on_the_plain_encoding(server, reference, line, character):
    client, uri = server
    items = await inline(client, uri, line, character)

    tok = reference.tokenizer
    completer = Completer(reference, Settings())
    pending = completer.prepare(split_lines(SOURCE), Cursor(line, character), path="markers.py",
                                repo="proj")
    ids = tok.encode_parts(pending.request.prompt_parts, add_special_tokens=True)
    # Only the layout's markers are special ids; the whole-string encoding would have turned
    # the quoted markers into special ids too (the prompt this test guards against).
    layout = ["<repo_name>", "<file_sep>", "<fim_prefix>", "<fim_suffix>", "<fim_middle>"]
    assert [tok.id_to_token(i) for i in ids if tok.is_added(i)] == layout
    assert tok.token_to_id("<|endoftext|>") in tok.encode(pending.prompt.text, parse_special=True)
    for quoted in ('EOS = "<|endoftext|>"\nMIDDLE = "<fim_middle>"\n',
                   "; <fim_suffix> is left alone."):
        if quoted in pending.prompt.text:
            plain = tok.encode(quoted, parse_special=False)[1:-1]   # its edges may merge
            assert any(ids[i:i + len(plain)] == plain for i in range(len(ids)))
    assert pending.request.token_healing

    result = reference.generate(dataclasses.replace(pending.request, time_budget_s=None))
    expected = completer.finish(pending, result)
    assert [item.insert_text for item in items] == ([expected.text] if expected else [])
