"""Streaming decode: deltas concatenate to the text and never split a multi-byte character."""
from __future__ import annotations

import pytest

from stablelm_lsp.inference.streaming import Utf8StreamDecoder
from stablelm_lsp.models import load_model


@pytest.fixture(scope="module")
def tokenizer(stablelm_checkpoint):
    return load_model(stablelm_checkpoint, device="cpu").tokenizer


# Characters the tiny tokenizer never saw whole: byte-level BPE spells them one byte per token.
TEXT = "x = 'Ωλ 𝄞 ☃ ok' # ∑ñ"


def test_multibyte_characters_split_over_tokens_come_out_whole(tokenizer):
    ids = tokenizer.encode(TEXT)
    decoder = Utf8StreamDecoder(tokenizer.decode_bytes)
    deltas = [decoder.push(i) for i in ids] + [decoder.flush()]
    assert "".join(deltas) == TEXT
    assert "\ufffd" not in "".join(deltas)
    # the test means something only if some character really spans several tokens
    assert any(d == "" for d in deltas[:-1])
    for d in deltas:
        d.encode("utf-8")  # each delta is whole characters (a lone surrogate would fail)


def test_incomplete_character_at_the_end_becomes_a_replacement(tokenizer):
    ids = tokenizer.encode("𝄞")
    assert len(ids) > 1
    decoder = Utf8StreamDecoder(tokenizer.decode_bytes)
    assert [decoder.push(i) for i in ids[:-1]] == [""] * (len(ids) - 1)
    assert decoder.flush() == "\ufffd"


def test_special_tokens_stream_as_their_text(tokenizer):
    eos = tokenizer.token_to_id("<|endoftext|>")
    decoder = Utf8StreamDecoder(tokenizer.decode_bytes)
    assert decoder.push(eos) == "<|endoftext|>"
