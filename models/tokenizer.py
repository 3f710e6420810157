"""A checkpoint's tokenizer: tokenizer.json through `tokenizers`, specials from tokenizer_config.json.

Besides encode/decode it offers the raw bytes of every token, so generation can stream text
without ever splitting a multi-byte character, and the tokens extending a given token's bytes
(token healing). Prompts made of parts are encoded so that special-token text counts only in the
prompt format's own parts (`encode_parts`).
"""
from __future__ import annotations

import bisect
import json
import re
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

from tokenizers import Encoding as _HFEncoding
from tokenizers import Tokenizer as _HFTokenizer

from .errors import CheckpointError
from .prompt_parts import PromptPart, SpecialTokens, join_parts, prompt_text

if TYPE_CHECKING:
    from .config import ModelConfig

# Spellings of the special tokens across code models' vocabularies.
SPECIAL_NAMES = {
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


def _config_token_ids(folder: Path) -> tuple[tuple[int, ...], int | None]:
    """(eos ids, bos id) from config.json, if it is there and has them."""
    try:
        raw = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return (), None
    if not isinstance(raw, dict):
        return (), None
    eos = raw.get("eos_token_id")
    eos_ids = tuple(e for e in (eos if isinstance(eos, list) else [eos])
                    if isinstance(e, int) and not isinstance(e, bool))
    bos = raw.get("bos_token_id")
    return eos_ids, bos if isinstance(bos, int) and not isinstance(bos, bool) else None


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
                 for field, names in SPECIAL_NAMES.items()}
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
        added = tok.get_added_tokens_decoder()
        self.added_special: dict[str, int] = {t.content: i for i, t in added.items() if t.special}
        self._added_ids = frozenset(added)

    @classmethod
    def from_folder(cls, path: Path, cfg: "ModelConfig | None" = None) -> "Tokenizer":
        """The tokenizer in checkpoint folder `path`. cfg: its parsed config.json; without it
        (a model served by a remote engine, of any family) config.json's token ids are read
        as far as they are there."""
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
        eos_ids, bos_id = (cfg.eos_token_ids, cfg.bos_token_id) if cfg else _config_token_ids(path)
        return cls(tok, tcfg, eos_token_ids=eos_ids, bos_token_id=bos_id,
                   chat_template=template if isinstance(template, str) else None)

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, parse_special: bool = True, add_special_tokens: bool = False) -> list[int]:
        """Token ids of `text`. With parse_special=False, special-token text (say a literal
        "<|endoftext|>" in a source file) is encoded as ordinary text."""
        tok = self._tok if parse_special else self._plain
        return tok.encode(text, add_special_tokens=add_special_tokens).ids

    def encode_parts(self, parts: Sequence[PromptPart], add_special_tokens: bool = False) -> list[int]:
        """Token ids of a prompt made of parts: special-token text becomes special tokens in the
        special parts only; in plain parts it is ordinary text.

        The parts are joined and encoded in one piece, giving exactly the ids of the joined
        text, unless special-token text lies in (or across the edge of) a plain part. Such a
        part is then encoded on its own as plain text, the text around it on its own."""
        parts = join_parts(parts)
        text = prompt_text(parts)
        isolated: list[tuple[int, int]] = []    # spans of plain parts holding special-token text
        matches = [m.span() for m in self._special_pattern.finditer(text)] \
            if self._special_pattern is not None else []
        start = 0
        for part in parts:
            end = start + len(part.text)
            if not part.special and any(s < end and start < e for s, e in matches):
                isolated.append((start, end))
            start = end
        if not isolated:
            return self._tok.encode(text, add_special_tokens=add_special_tokens).ids
        pieces: list[_HFEncoding] = []
        done = 0
        for start, end in isolated:
            if done < start:
                pieces.append(self._tok.encode(text[done:start], add_special_tokens=False))
            pieces.append(self._plain.encode(text[start:end], add_special_tokens=False))
            done = end
        if done < len(text):
            pieces.append(self._tok.encode(text[done:], add_special_tokens=False))
        merged = _HFEncoding.merge(pieces)
        if add_special_tokens:
            merged = self._tok.post_process(merged)
        return merged.ids

    @cached_property
    def _special_pattern(self) -> re.Pattern | None:
        """Any special token's text, longest first (the tokenizer's leftmost-longest match)."""
        if not self.added_special:
            return None
        texts = sorted(self.added_special, key=len, reverse=True)
        return re.compile("|".join(map(re.escape, texts)))

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

    @cached_property
    def _ordinary_by_bytes(self) -> tuple[list[bytes], list[int]]:
        """(bytes, ids) of every ordinary token (added tokens excluded), sorted by bytes."""
        pairs = sorted((b, i) for i, b in enumerate(self.token_bytes)
                       if b and i not in self._added_ids)
        return [b for b, _ in pairs], [i for _, i in pairs]

    def is_added(self, token_id: int) -> bool:
        """A token of the added vocabulary (specials, control tokens): never extended by healing."""
        return token_id in self._added_ids

    def ids_starting_with(self, prefix: bytes) -> list[int]:
        """Ordinary tokens whose bytes start with `prefix` (a binary search in a table sorted
        once per tokenizer)."""
        keys, ids = self._ordinary_by_bytes
        lo = bisect.bisect_left(keys, prefix)
        # The first byte string after every string starting with `prefix`: the prefix with its
        # last byte below 0xff incremented (nothing when it is all 0xff).
        stripped = prefix.rstrip(b"\xff")
        if not stripped:
            return ids[lo:]
        hi = bisect.bisect_left(keys, stripped[:-1] + bytes([stripped[-1] + 1]), lo)
        return ids[lo:hi]
