"""A checkpoint's tokenizer: tokenizer.json through `tokenizers`, specials from tokenizer_config.json.

Besides encode/decode it offers the raw bytes of every token, so generation can stream text
without ever splitting a multi-byte character.
"""
from __future__ import annotations

import json
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING

from tokenizers import Tokenizer as _HFTokenizer

from stablelm_lsp.inference.api import SpecialTokens

from .errors import CheckpointError

if TYPE_CHECKING:
    from .config import ModelConfig

# Spellings of the special tokens across code models' vocabularies.
_SPECIAL_NAMES = {
    "fim_prefix": ("<fim_prefix>", "<|fim_prefix|>", "<fim-prefix>"),
    "fim_suffix": ("<fim_suffix>", "<|fim_suffix|>", "<fim-suffix>"),
    "fim_middle": ("<fim_middle>", "<|fim_middle|>", "<fim-middle>"),
    "fim_pad": ("<fim_pad>", "<|fim_pad|>", "<fim-pad>"),
    "file_sep": ("<file_sep>", "<|file_sep|>"),
    "repo_name": ("<repo_name>", "<|repo_name|>", "<reponame>"),
}


def _bytes_to_unicode() -> dict[str, int]:
    """GPT-2's byte-level alphabet, inverted: printable stand-in character -> byte."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(bs, cs)}


def _token_text(value) -> str | None:
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) and value else None


class Tokenizer:
    def __init__(self, tok: _HFTokenizer, tokenizer_config: dict | None = None,
                 eos_token_ids: tuple[int, ...] = (), bos_token_id: int | None = None,
                 chat_template: str | None = None):
        self._tok = tok
        # a second instance that treats special-token text as plain text (user content)
        self._plain = _HFTokenizer.from_str(tok.to_str())
        self._plain.encode_special_tokens = True
        cfg = tokenizer_config or {}
        self.model_max_length = cfg.get("model_max_length")
        eos_text = _token_text(cfg.get("eos_token"))
        eos_ids = list(eos_token_ids)
        if eos_text is not None and tok.token_to_id(eos_text) is not None:
            eos_ids.insert(0, tok.token_to_id(eos_text))
        self.eos_ids: tuple[int, ...] = tuple(dict.fromkeys(eos_ids))
        bos_text = _token_text(cfg.get("bos_token"))
        self.bos_id = tok.token_to_id(bos_text) if bos_text else bos_token_id
        found = {field: next((n for n in names if tok.token_to_id(n) is not None), None)
                 for field, names in _SPECIAL_NAMES.items()}
        self.special = SpecialTokens(
            eos=self.id_to_token(self.eos_ids[0]) if self.eos_ids else None,
            bos=self.id_to_token(self.bos_id) if self.bos_id is not None else None,
            **found,
        )
        stops = set(self.eos_ids)
        for text in found.values():
            if text is not None:
                stops.add(tok.token_to_id(text))
        endoftext = tok.token_to_id("<|endoftext|>")
        if endoftext is not None:
            stops.add(endoftext)
        self.stop_ids: frozenset[int] = frozenset(stops)
        self.chat_template = chat_template
        self.added_special: dict[str, int] = {
            t.content: i for i, t in tok.get_added_tokens_decoder().items() if t.special}

    @classmethod
    def from_folder(cls, path: Path, cfg: "ModelConfig | None" = None) -> "Tokenizer":
        file = path / "tokenizer.json"
        if not file.exists():
            raise CheckpointError(f"{path}: no tokenizer.json")
        try:
            tok = _HFTokenizer.from_file(str(file))
        except Exception as exc:  # tokenizers raises a bare Exception for bad files
            raise CheckpointError(f"{file}: cannot read the tokenizer ({exc})") from None
        tcfg: dict = {}
        tcfg_file = path / "tokenizer_config.json"
        if tcfg_file.exists():
            try:
                tcfg = json.loads(tcfg_file.read_text(encoding="utf-8"))
            except (OSError, ValueError):
                raise CheckpointError(f"{tcfg_file}: not valid JSON") from None
        template = tcfg.get("chat_template")
        if isinstance(template, list):  # [{name, template}, ...]: take the default one
            by_name = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
            template = by_name.get("default") or next(iter(by_name.values()), None)
        jinja = path / "chat_template.jinja"
        if jinja.exists():
            template = jinja.read_text(encoding="utf-8")
        return cls(tok, tcfg, eos_token_ids=cfg.eos_token_ids if cfg else (),
                   bos_token_id=cfg.bos_token_id if cfg else None,
                   chat_template=template if isinstance(template, str) else None)

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, parse_special: bool = True, add_special_tokens: bool = False) -> list[int]:
        """Token ids of `text`. With parse_special=False, special-token text (say a literal
        "<|endoftext|>" in a source file) is encoded as ordinary text."""
        tok = self._tok if parse_special else self._plain
        return tok.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def token_to_id(self, token: str) -> int | None:
        return self._tok.token_to_id(token)

    def id_to_token(self, token_id: int) -> str | None:
        return self._tok.id_to_token(token_id)

    @cached_property
    def token_bytes(self) -> list[bytes]:
        """The bytes each token id stands for (specials: their text), for byte-exact streaming."""
        table: list[bytes] = []
        decoder = json.loads(self._tok.to_str()).get("decoder") or {}
        kinds = {decoder.get("type")} | {d.get("type") for d in decoder.get("decoders", []) or []}
        byte_level = "ByteLevel" in kinds
        inverse = _bytes_to_unicode() if byte_level else {}
        added = {i: t.content for i, t in self._tok.get_added_tokens_decoder().items()}
        for i in range(self.vocab_size):
            piece = self._tok.id_to_token(i)
            if piece is None:
                table.append(b"")
            elif i in added:
                table.append(added[i].encode("utf-8"))
            elif byte_level and all(c in inverse for c in piece):
                table.append(bytes(inverse[c] for c in piece))
            elif len(piece) == 6 and piece.startswith("<0x") and piece.endswith(">"):
                table.append(bytes([int(piece[3:5], 16)]))  # sentencepiece byte fallback
            else:
                table.append(piece.replace("\u2581", " ").encode("utf-8"))
        return table

    def decode_bytes(self, ids) -> bytes:
        table = self.token_bytes
        return b"".join(table[i] for i in ids)
