"""What a tokenizer needs to know about a prompt: its parts (special or plain text) and the
text of the special tokens a prompt format may use.

A prompt built from documents is a sequence of `PromptPart`s: the prompt format's own text (FIM
markers, file separators, chat role markers, BOS) is special, everything that came from documents,
messages or file paths is plain, so that a file quoting `<|endoftext|>` cannot end the prompt
(`Tokenizer.encode_parts`). inference/api.py offers these as part of the `Backend` interface.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence


@dataclass(frozen=True)
class SpecialTokens:
    """Text of the special tokens a prompt format may use; None when the tokenizer lacks one."""

    eos: str | None = None
    bos: str | None = None
    fim_prefix: str | None = None
    fim_suffix: str | None = None
    fim_middle: str | None = None
    fim_pad: str | None = None
    file_sep: str | None = None
    repo_name: str | None = None

    @property
    def has_fim(self) -> bool:
        return bool(self.fim_prefix and self.fim_suffix and self.fim_middle)


@dataclass(frozen=True)
class PromptPart:
    """A piece of a prompt. special=True: the prompt format's own text, where special-token text
    (`<fim_middle>`, `<|user|>`) becomes the special token. special=False: content (documents,
    messages, paths), encoded as ordinary text whatever it contains."""

    text: str
    special: bool = False


def join_parts(parts: Sequence[PromptPart]) -> tuple[PromptPart, ...]:
    """`parts` without empty ones, neighbours of the same kind joined into one."""
    joined: list[PromptPart] = []
    for part in parts:
        if not part.text:
            continue
        if joined and joined[-1].special == part.special:
            joined[-1] = PromptPart(joined[-1].text + part.text, part.special)
        else:
            joined.append(part)
    return tuple(joined)


def prompt_text(parts: Sequence[PromptPart]) -> str:
    return "".join(part.text for part in parts)
