"""Token ids to text deltas without ever splitting a multi-byte UTF-8 character.

Byte-level tokenizers can end a token in the middle of a character (an emoji is often two or
three tokens). Each token's bytes go through an incremental UTF-8 decoder that keeps an
incomplete sequence until the bytes that complete it arrive.
"""
from __future__ import annotations

import codecs
from typing import Callable


class Utf8StreamDecoder:
    def __init__(self, token_bytes: Callable[[list[int]], bytes]):
        """token_bytes: ids -> the raw bytes those tokens stand for (tokenizer.decode_bytes)."""
        self._token_bytes = token_bytes
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def push(self, token_id: int) -> str:
        """Text completed by this token ("" while a character is still incomplete)."""
        return self._utf8.decode(self._token_bytes([token_id]))

    def flush(self) -> str:
        """At the end: an incomplete trailing sequence becomes U+FFFD."""
        return self._utf8.decode(b"", final=True)
