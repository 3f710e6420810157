"""Chat prompts: pure functions of messages, editor context, tokenizer facts and a token counter.

The conversation is rendered with the model's chat template (chat_template.py) as parts: the
template's text special, the messages' contents plain. Editor context (the current file and the
selected code) goes into the last user message, within a token budget (budget.py). When the whole conversation does not fit, the oldest turns go first; the system
message and the last user message are always kept. Follow-up turns render their history exactly as
the turn before rendered it (`ConversationMemory`), so the prompt of turn N+1 starts with the
prompt and reply of turn N and the engine reuses that part of its KV cache.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Sequence

from ..api import PRIORITY_CHAT, GenerationRequest, ModelInfo, PromptPart, prompt_text
from ..lru import LRU
from .budget import CountText, CountTokens, excerpt, take_forwards, text_counter
from .chat_template import ChatFormatError, ChatMessage, ChatTemplate

CHAT_MAX_NEW_TOKENS = 512           # reply length; the engine shortens it to the positions left
REPLY_SHARE = 0.25                  # at most this share of the positions is kept for the reply
MAX_CONVERSATION_CHARS = 2_000_000  # refused before any tokenizing: bounds the work per request
CONTEXT_SHARE = 0.5                 # at most this share of the prompt budget for editor context
MIN_FILE_TOKENS = 32                # a smaller remainder of the context budget shows no file excerpt
FENCE_TOKENS = 8                    # a code block's fences, language tag and blank line
HISTORY_SLACK = 0.25                # a cut leaves this share of the budget free for later turns


class MessageTooLong(ChatFormatError):
    """The system message and the last user message alone exceed the prompt budget."""


@dataclass(frozen=True)
class EditorContext:
    """What the editor shows: one file and, optionally, a selection or cursor in it."""

    path: str                       # how the file is named to the model
    language: str                   # LSP languageId, used as the code fence's info string
    lines: Sequence[str]            # the file's lines, terminators included
    selection: str = ""             # the selected text ("" for none)
    first_line: int | None = None   # 0-based lines the selection spans (the cursor line when the
    last_line: int | None = None    # selection is empty), None: no position, show the file's top


@dataclass(frozen=True)
class ChatPrompt:
    parts: tuple[PromptPart, ...]   # the rendered prompt, generation prompt included
    tokens: int                     # its token count
    conversation: tuple[ChatMessage, ...]  # every message, context folded into the last one
    first_kept: int                 # index in `conversation` of the first message after the
                                    # system message that made it into the prompt
    context_tokens: int = 0         # tokens of editor context in the last message

    @property
    def text(self) -> str:
        return prompt_text(self.parts)


def check_messages(messages: Sequence[ChatMessage]) -> None:
    """One optional system message first, a non-empty question from the user last, and no more
    text than MAX_CONVERSATION_CHARS."""
    if not messages:
        raise ChatFormatError("there are no messages")
    for i, message in enumerate(messages):
        if message.role == "system" and i != 0:
            raise ChatFormatError(f"messages[{i}] is a system message; only the first message may be one")
    total = sum(len(m.content) for m in messages)
    if total > MAX_CONVERSATION_CHARS:
        raise MessageTooLong(f"the messages hold {total} characters; at most "
                             f"{MAX_CONVERSATION_CHARS} are accepted")
    if messages[-1].role != "user":
        raise ChatFormatError("the last message must be the user's")
    if not messages[-1].content.strip():
        raise ChatFormatError("the last message is empty")


def prepare_turn(info: ModelInfo, messages: Sequence[ChatMessage], *,
                 count_tokens: CountTokens, context: EditorContext | None = None,
                 keep_from: int = 0, max_new_tokens: int = CHAT_MAX_NEW_TOKENS,
                 temperature: float = 0.0, key: str | None = None
                 ) -> tuple[ChatPrompt, GenerationRequest]:
    """The prompt and the generation request answering `messages[-1]` with the model `info`
    describes. The prompt gets the positions the reply does not reserve."""
    check_messages(messages)
    template = ChatTemplate.for_model(info)
    reserve = min(max_new_tokens, int(info.max_positions * REPLY_SHARE))
    prompt = build_chat_prompt(messages, template, count_tokens=count_tokens,
                               budget=info.max_positions - reserve, context=context,
                               keep_from=keep_from)
    # No token healing: the prompt ends with the template's generation prompt, not user text.
    system = prompt.conversation[:1] if prompt.conversation[0].role == "system" else ()
    kept = system + prompt.conversation[prompt.first_kept:]
    request = GenerationRequest(prompt_parts=prompt.parts, max_new_tokens=max_new_tokens,
                                temperature=temperature, stop=template.stop_texts, key=key,
                                token_healing=False, priority=PRIORITY_CHAT,
                                messages=tuple((m.role, m.content) for m in kept))
    return prompt, request


def build_chat_prompt(messages: Sequence[ChatMessage], template: ChatTemplate, *,
                      count_tokens: CountTokens, budget: int,
                      context: EditorContext | None = None, keep_from: int = 0) -> ChatPrompt:
    """The prompt for answering `messages[-1]` within `budget` tokens.

    keep_from: index of the first message after the system message to consider (an earlier
    turn's `first_kept`): history dropped once stays dropped, so the prompt's start holds still.
    count_tokens counts prompt parts.
    """
    system = list(messages[:1]) if messages[0].role == "system" else []
    last = messages[-1]
    history_start = min(max(keep_from, len(system)), len(messages) - 1)

    def tokens_with(last_message: ChatMessage, start: int) -> int:
        kept = system + list(messages[start:-1]) + [last_message]
        return count_tokens(template.render_parts(kept))

    count_text = text_counter(count_tokens)
    base = tokens_with(last, len(messages) - 1)
    if base > budget:
        raise MessageTooLong(f"the last message needs {base} tokens in the prompt; the chat model "
                             f"takes at most {budget}")
    context_tokens = 0
    if context is not None:
        room = min(budget - base, int(budget * CONTEXT_SHARE))
        # Joining context and question can merge a token or two across the seam: shrink and retry.
        while room > 0:
            block = render_context(context, room, count_text)
            with_context = replace(last, content=block + last.content)
            total = tokens_with(with_context, len(messages) - 1)
            if total <= budget:
                last, context_tokens, base = with_context, total - base, total
                break
            room -= max(total - budget, 1)
    conversation = tuple(messages[:-1]) + (last,)

    # History: everything from history_start if it fits; otherwise cut at the oldest user turns
    # until the prompt fits in (1 - HISTORY_SLACK) of the budget, so the next turns append.
    cuts = [i for i in range(history_start, len(messages) - 1)
            if i == history_start or messages[i].role == "user"] + [len(messages) - 1]
    first_kept = cuts[0]
    if tokens_with(last, first_kept) > budget:
        target = max(int(budget * (1 - HISTORY_SLACK)), base)
        lo, hi = 1, len(cuts) - 1   # tokens fall as the cut moves later; cuts[-1] keeps none
        while lo < hi:
            mid = (lo + hi) // 2
            if tokens_with(last, cuts[mid]) <= target:
                hi = mid
            else:
                lo = mid + 1
        first_kept = cuts[lo]
    parts = template.render_parts(system + list(conversation[first_kept:]))
    return ChatPrompt(parts, count_tokens(parts), conversation, first_kept, context_tokens)


def render_context(context: EditorContext, budget: int, count_tokens: CountText) -> str:
    """The context block put before the question: the file around the selection (or cursor),
    then the selection itself, as much as `budget` allows ("" when nothing fits).
    count_tokens counts message text (plain)."""
    selection_block = ""
    selection = context.selection.splitlines(keepends=True) if context.selection.strip() else []
    if selection:
        header = f"Selected code from {context.path}{_line_span(context.first_line, context.last_line)}"
        end, _ = take_forwards(selection, 0, budget - count_tokens(header) - FENCE_TOKENS,
                               count_tokens)
        if end:
            note = "" if end == len(selection) else " (its beginning)"
            selection_block = f"{header}{note}:\n" + _fenced("".join(selection[:end]), context.language)
    file_block = ""
    file_budget = budget - count_tokens(selection_block)
    if file_budget >= MIN_FILE_TOKENS and context.lines:
        header_tokens = count_tokens(f"From the file {context.path}, lines :\n") + 4  # + numbers
        lo, hi = excerpt(context.lines, context.first_line or 0,
                         file_budget - header_tokens - FENCE_TOKENS, count_tokens)
        if hi > lo:
            whole = lo == 0 and hi == len(context.lines)
            title = f"The file {context.path}:\n" if whole else \
                f"From the file {context.path}{_line_span(lo, hi - 1)}:\n"
            file_block = title + _fenced("".join(context.lines[lo:hi]), context.language)
    return "".join(block + "\n" for block in (file_block, selection_block) if block)


def _line_span(first: int | None, last: int | None) -> str:
    if first is None:
        return ""
    last = first if last is None else last
    return f", line {first + 1}" if last == first else f", lines {first + 1}-{last + 1}"


def _fenced(code: str, language: str) -> str:
    """A markdown code block whose fence is longer than any backtick run inside the code."""
    longest, run = 0, 0
    for ch in code:
        run = run + 1 if ch == "`" else 0
        longest = max(longest, run)
    fence = "`" * max(3, longest + 1)
    if not code.endswith("\n"):
        code += "\n"
    return f"{fence}{language}\n{code}{fence}\n"


class ConversationMemory:
    """Recent conversations as they were rendered, keyed by the client's messages.

    Clients resend the whole history each turn, without the editor context that was folded into
    earlier questions. A follow-up whose messages extend a remembered conversation gets that
    conversation back (contexts and history cut included), so its prompt extends the earlier
    prompt and reply.
    """

    def __init__(self, max_entries: int = 16):
        self._entries: LRU[tuple[ChatMessage, ...], ChatPrompt] = LRU(max_entries)

    def resolve(self, messages: Sequence[ChatMessage]) -> tuple[list[ChatMessage], int]:
        """(messages with remembered contexts restored, keep_from) for a new request."""
        for n in range(len(messages) - 1, 0, -1):
            prompt = self._entries.get(tuple(messages[:n]))
            if prompt is not None:
                return list(prompt.conversation) + list(messages[n:]), prompt.first_kept
        return list(messages), 0

    def remember(self, messages: Sequence[ChatMessage], prompt: ChatPrompt) -> None:
        self._entries.put(tuple(messages), prompt)
