"""One completion, from document lines and a cursor to the text to show: the steps the server and
`stablelm-lsp complete` share (prompt, request, post-processing), and type-through memory.
"""
from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from typing import Sequence

from stablelm_lsp.inference.api import Backend, GenerationRequest, GenerationResult
from stablelm_lsp.inference.prompts.budget import TokenCounter
from stablelm_lsp.inference.prompts.fim import (ContextFile, Prompt, PromptTemplate, TemplateError,
                                                build_prompt, default_template)

from .documents import Cursor
from .postprocess import CONTINUES, Completion, continues, is_multiline_position, postprocess
from .settings import Settings

# Positions kept free beyond the prompt budget and max new tokens: token counts of prompt pieces
# are summed per line, which can differ slightly from the count of the joined prompt.
POSITION_MARGIN = 16


@dataclass(frozen=True)
class PendingCompletion:
    prompt: Prompt
    request: GenerationRequest


class Completer:
    """Prompt building and post-processing for one backend under one set of settings."""

    def __init__(self, backend: Backend, settings: Settings):
        self.backend = backend
        self.settings = settings
        special = backend.info.special
        self.template = PromptTemplate(settings.template) if settings.template else default_template(special)
        missing = self.template.missing_specials(special)
        if missing:
            raise TemplateError(f"the prompt template uses {', '.join(missing)}, which "
                                f"{backend.info.name}'s tokenizer does not have")
        self.count_tokens = TokenCounter(backend.count_tokens)

    @property
    def context_tokens(self) -> int:
        """The prompt budget: the setting, within the model's positions."""
        room = self.backend.info.max_positions - self.settings.max_new_tokens - POSITION_MARGIN
        return max(min(self.settings.context_tokens, room), 1)

    def prepare(self, lines: Sequence[str], cursor: Cursor, *, path: str = "", repo: str = "",
                context_files: Sequence[ContextFile] = (), key: str | None = None) -> PendingCompletion:
        prompt = build_prompt(lines, cursor.line, cursor.index, special=self.backend.info.special,
                              count_tokens=self.count_tokens, context_tokens=self.context_tokens,
                              path=path, repo=repo, context_files=context_files,
                              template=self.template)
        multiline = is_multiline_position(prompt.line_after)
        # A statement typed partly is completed to its end, unless its line goes on (postprocess):
        # the request stops at the first newline then, instead of generating lines to throw away.
        partly_typed = multiline and bool(prompt.line_before.strip()) and not continues(prompt.line_before)
        blank = multiline and not prompt.line_before.strip()
        settings = self.settings
        request = GenerationRequest(
            prompt_parts=prompt.parts,
            max_new_tokens=settings.max_new_tokens,
            temperature=settings.temperature,
            stop=() if multiline else ("\n",),
            max_lines=settings.max_lines if multiline else None,
            continued_by=CONTINUES if partly_typed else None,
            line_before=prompt.line_before if partly_typed or blank else "",
            # On a blank line (indentation at most) the user is about to type something there.
            nonblank_first_token=blank,
            time_budget_s=settings.timeout_ms / 1000,
            key=key,
            # The prompt ends at the cursor, often inside a word: let the model choose its token.
            token_healing=True,
            indent=len(prompt.line_before) - len(prompt.line_before.lstrip(" \t")) if multiline else None,
        )
        return PendingCompletion(prompt, request)

    def finish(self, pending: PendingCompletion, result: GenerationResult) -> Completion | None:
        prompt = pending.prompt
        return postprocess(result.text, line_before=prompt.line_before, line_after=prompt.line_after,
                           next_lines=prompt.next_lines, max_lines=self.settings.max_lines,
                           stops=self.backend.info.stop_texts)

    def complete(self, lines: Sequence[str], cursor: Cursor, **kwargs) -> Completion | None:
        """Blocking: prompt, generation, post-processing."""
        pending = self.prepare(lines, cursor, **kwargs)
        return self.finish(pending, self.backend.generate(pending.request))


@dataclass
class Suggestion:
    """A completion shown to the editor, with the id its accept command carries."""

    completion: Completion
    id: str = field(default_factory=lambda: uuid.uuid4().hex)


@dataclass
class ShownCompletion:
    """The completions last shown for a document (one, or the choices of an explicit request),
    for answering from memory while the user types through them. Typing keeps those it follows;
    any other edit forgets them all."""

    suggestions: list[Suggestion]
    cursor: Cursor                  # where they were computed
    typed: str = ""                 # characters of them typed since

    def observe_insert(self, at: Cursor, end: Cursor, text: str) -> bool:
        """Account for an edit replacing [at, end) with `text`; False when it breaks the memory."""
        expected = Cursor(self.cursor.line, self.cursor.index + len(self.typed))
        typed = self.typed + text
        if at != expected or end != expected or "\n" in text or "\r" in text:
            return False
        kept = [s for s in self.suggestions if s.completion.text.startswith(typed)]
        if not kept:
            return False
        self.suggestions, self.typed = kept, typed
        return True

    def remainder(self, cursor: Cursor) -> list[Suggestion] | None:
        """What is left to show at `cursor`, if it is where typing through has led."""
        if cursor != Cursor(self.cursor.line, self.cursor.index + len(self.typed)):
            return None
        n = len(self.typed)
        rest = [Suggestion(Completion(s.completion.text[n:], s.completion.replace), s.id)
                for s in self.suggestions if s.completion.text[n:].strip()]
        return rest or None
