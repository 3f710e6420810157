"""Chat prompts: pure functions of messages, editor context, tokenizer facts and a token counter.

A checkpoint's chat template (tokenizer_config.json or chat_template.jinja) is rendered exactly as
transformers' `apply_chat_template(..., tokenize=False)` renders it: a sandboxed jinja2
environment with trim_blocks and lstrip_blocks, the `raise_exception` and `strftime_now` helpers,
and the tokenizer's `bos_token`/`eos_token` as variables. Without a template the Zephyr format
(stablelm-zephyr-3b's own template) is used:

    <|system|>\\n{system}<|endoftext|>\\n<|user|>\\n{question}<|endoftext|>\\n<|assistant|>\\n

The prompt is returned as parts (api.PromptPart): what the template writes is special, the
messages' contents are plain, so a message quoting `<|endoftext|>` or `<|user|>` stays text.
`ChatTemplate.render_parts` finds the contents by rendering once more with a sentinel in place of
each one, and checks that the parts join to exactly the text the template renders.

Editor context (the current file and the selected code) goes into the last user message, within a
token budget. When the whole conversation does not fit, the oldest turns go first; the system
message and the last user message are always kept. Follow-up turns render their history exactly as
the turn before rendered it (`ConversationMemory`), so the prompt of turn N+1 starts with the
prompt and reply of turn N and the engine reuses that part of its KV cache.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass, replace
from datetime import datetime
from functools import lru_cache
from typing import Any, Callable, Mapping, Sequence

from .api import (CountTokens, GenerationError, GenerationRequest, ModelInfo, PromptPart,
                  join_parts, prompt_text, text_counter)
from .lru import LRU

ROLES = ("system", "user", "assistant")

# stablelm-zephyr-3b's chat template (identical to HuggingFaceH4/zephyr-7b-beta's).
ZEPHYR_TEMPLATE = (
    "{% for message in messages %}\n"
    "{% if message['role'] == 'user' %}\n"
    "{{ '<|user|>\n' + message['content'] + eos_token }}\n"
    "{% elif message['role'] == 'system' %}\n"
    "{{ '<|system|>\n' + message['content'] + eos_token }}\n"
    "{% elif message['role'] == 'assistant' %}\n"
    "{{ '<|assistant|>\n'  + message['content'] + eos_token }}\n"
    "{% endif %}\n"
    "{% if loop.last and add_generation_prompt %}\n"
    "{{ '<|assistant|>' }}\n"
    "{% endif %}\n"
    "{% endfor %}"
)
ZEPHYR_EOS = "<|endoftext|>"   # the Zephyr format's end of turn when a tokenizer names no EOS
# A completion model prompted in the Zephyr format may go on to write the next user turn itself.
ZEPHYR_STOPS = ("<|user|>", "<|system|>")

CHAT_MAX_NEW_TOKENS = 512           # reply length; the engine shortens it to the positions left
REPLY_SHARE = 0.25                  # at most this share of the positions is kept for the reply
MAX_CONVERSATION_CHARS = 2_000_000  # refused before any tokenizing: bounds the work per request
MAX_CHARS_PER_TOKEN = 16            # longer context lines are not even counted (minified files)
CONTEXT_SHARE = 0.5                 # at most this share of the prompt budget for editor context
MIN_FILE_TOKENS = 32                # a smaller remainder of the context budget shows no file excerpt
FENCE_TOKENS = 8                    # a code block's fences, language tag and blank line
HISTORY_SLACK = 0.25                # a cut leaves this share of the budget free for later turns
# Characters that bracket the sentinels standing for message contents: Unicode noncharacters,
# the first pair found in neither the template nor the messages is used.
_SENTINEL_MARKS = [(chr(c), chr(c + 1)) for c in range(0xFDD0, 0xFDF0, 2)]


class ChatFormatError(GenerationError):
    """Messages or a template that cannot make a prompt; the message says what to fix."""


class MessageTooLong(ChatFormatError):
    """The system message and the last user message alone exceed the prompt budget."""


@dataclass(frozen=True)
class ChatMessage:
    role: str       # system | user | assistant
    content: str


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


def parse_messages(raw: Any) -> list[ChatMessage]:
    """Client JSON -> checked messages (see `check_messages`)."""
    if not isinstance(raw, (list, tuple)) or not raw:
        raise ChatFormatError("messages must be a non-empty list of {role, content} objects")
    messages: list[ChatMessage] = []
    for i, item in enumerate(raw):
        if not isinstance(item, Mapping):
            raise ChatFormatError(f"messages[{i}] must be an object with role and content")
        role, content = item.get("role"), item.get("content")
        if role not in ROLES:
            raise ChatFormatError(f"messages[{i}].role is {role!r}; expected one of {', '.join(ROLES)}")
        if not isinstance(content, str):
            raise ChatFormatError(f"messages[{i}].content must be a string")
        messages.append(ChatMessage(role, content))
    check_messages(messages)
    return messages


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


class ChatTemplate:
    """A jinja chat template, compiled and rendered the way transformers does it."""

    def __init__(self, source: str, *, bos_token: str | None = None, eos_token: str | None = None):
        self.source = source
        self._variables = {k: v for k, v in (("bos_token", bos_token), ("eos_token", eos_token)) if v}
        try:
            self._compiled = _compile(source)
        except Exception as exc:   # jinja2.TemplateSyntaxError and friends
            raise ChatFormatError(f"the chat template cannot be compiled: {exc}") from None

    @classmethod
    def for_model(cls, info: ModelInfo) -> "ChatTemplate":
        """The checkpoint's template, or Zephyr's when it has none."""
        bos, eos = info.special.bos, info.special.eos
        if info.chat_template:
            return cls(info.chat_template, bos_token=bos, eos_token=eos)
        return cls(ZEPHYR_TEMPLATE, bos_token=bos, eos_token=eos or ZEPHYR_EOS)

    @property
    def stop_texts(self) -> tuple[str, ...]:
        """Stop strings beyond the model's own end-of-sequence tokens."""
        return ZEPHYR_STOPS if self.source == ZEPHYR_TEMPLATE else ()

    def render(self, messages: Sequence[ChatMessage], add_generation_prompt: bool = True) -> str:
        return self._render([m.content for m in messages], messages, add_generation_prompt)

    def render_parts(self, messages: Sequence[ChatMessage],
                     add_generation_prompt: bool = True) -> tuple[PromptPart, ...]:
        """`render`'s text as parts: the messages' contents plain, the rest special.

        The template is rendered a second time with a sentinel for each content; the text
        between sentinels is the template's own. A content may come out as it is, stripped
        (`| trim`) or JSON-escaped (`| tojson`); the parts must join to exactly `render`'s text.
        A template that treats the sentinels otherwise (branches on a content, cuts it) makes
        that check fail: the whole prompt is then one special part, as transformers encodes it.
        """
        text = self.render(messages, add_generation_prompt)
        contents = [m.content for m in messages]
        seen = self.source + "".join(contents)
        marks = next(((a, b) for a, b in _SENTINEL_MARKS if a not in seen and b not in seen), None)
        if marks is not None:
            open_mark, close_mark = marks
            sentinels = [f"{open_mark}{i}{close_mark}" for i in range(len(messages))]
            pieces = re.split(f"{open_mark}([0-9]+){close_mark}",
                              self._render(sentinels, messages, add_generation_prompt))
            parts = _match_contents(text, pieces, contents)
            if parts is not None:
                return parts
        return (PromptPart(text, special=True),)

    def _render(self, contents: Sequence[str], messages: Sequence[ChatMessage],
                add_generation_prompt: bool) -> str:
        try:
            return self._compiled.render(
                messages=[{"role": m.role, "content": c} for m, c in zip(messages, contents)],
                tools=None, documents=None, add_generation_prompt=add_generation_prompt,
                **self._variables)
        except Exception as exc:   # raise_exception() in the template, undefined names, sandbox
            raise ChatFormatError(f"the chat template refused the conversation: {exc}") from None


def _match_contents(text: str, pieces: list[str], contents: Sequence[str]
                    ) -> tuple[PromptPart, ...] | None:
    """Parts of `text` from a sentinel rendering split into [template text, content index,
    template text, ...]; None when they cannot make up `text` exactly."""
    parts: list[PromptPart] = []
    at = 0
    for i, piece in enumerate(pieces):
        if i % 2 == 0:      # the template's own text
            if not text.startswith(piece, at):
                return None
            parts.append(PromptPart(piece, special=True))
            at += len(piece)
            continue
        content = contents[int(piece)]
        following = pieces[i + 1]
        for shown in (content, content.strip(), _json_inner(content), _json_inner(content.strip())):
            if text.startswith(shown, at) and text.startswith(following, at + len(shown)):
                parts.append(PromptPart(shown))
                at += len(shown)
                break
        else:
            return None
    return join_parts(parts) if at == len(text) else None


def _json_inner(text: str) -> str:
    """`text` as the chat templates' tojson writes it, without the quotes (which enclose the
    sentinel too, so they are template text)."""
    return json.dumps(text, ensure_ascii=False)[1:-1]


@lru_cache(maxsize=8)
def _compile(source: str):
    """transformers' `_compile_jinja_template` (utils/chat_template_utils.py), minus the
    assistant-mask tracking: `{% generation %}` blocks render their body unchanged."""
    import jinja2
    from jinja2.ext import Extension
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class GenerationBlock(Extension):
        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

        def _body(self, caller):
            return caller()

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        # jinja's own tojson escapes HTML characters; templates expect plain JSON
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                          sort_keys=sort_keys)

    def strftime_now(format):
        return datetime.now().strftime(format)

    class TemplateDict:
        # dict() and dict.fromkeys() only: no attribute access on the type itself
        def __call__(self, *args, **kwargs):
            return dict(*args, **kwargs)

        def fromkeys(self, *args, **kwargs):
            return dict.fromkeys(*args, **kwargs)

    class TemplateNamespace(jinja2.utils.Namespace):
        # no underscore attributes: they would reach CPython internals
        def __init__(*args, **kwargs):
            self, args = args[0], args[1:]
            attrs = dict(*args, **kwargs)
            for name in attrs:
                TemplateNamespace._check_name(name)
            jinja2.utils.Namespace.__init__(self, attrs)

        def __setitem__(self, name, value):
            TemplateNamespace._check_name(name)
            jinja2.utils.Namespace.__setitem__(self, name, value)

        @staticmethod
        def _check_name(name):
            if isinstance(name, str) and name.startswith("_"):
                raise jinja2.exceptions.SecurityError(
                    f"chat templates cannot store underscore attributes on a namespace ({name!r})")

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[GenerationBlock, jinja2.ext.loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = strftime_now
    env.globals["dict"] = TemplateDict()
    env.globals["namespace"] = TemplateNamespace
    return env.from_string(source)


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
    request = GenerationRequest(prompt_parts=prompt.parts, max_new_tokens=max_new_tokens,
                                temperature=temperature, stop=template.stop_texts, key=key,
                                token_healing=False, priority=1)
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


def render_context(context: EditorContext, budget: int, count_tokens: Callable[[str], int]) -> str:
    """The context block put before the question: the file around the selection (or cursor),
    then the selection itself, as much as `budget` allows ("" when nothing fits).
    count_tokens counts message text (plain)."""
    selection_block = ""
    selection = context.selection.splitlines(keepends=True) if context.selection.strip() else []
    if selection:
        header = f"Selected code from {context.path}{_line_span(context.first_line, context.last_line)}"
        kept = _fit_prefix(selection, budget - count_tokens(header) - FENCE_TOKENS, count_tokens)
        if kept:
            note = "" if len(kept) == len(selection) else " (its beginning)"
            selection_block = f"{header}{note}:\n" + _fenced("".join(kept), context.language)
    file_block = ""
    file_budget = budget - count_tokens(selection_block)
    if file_budget >= MIN_FILE_TOKENS and context.lines:
        header_tokens = count_tokens(f"From the file {context.path}, lines :\n") + 4  # + numbers
        lo, hi = _excerpt(context.lines, context.first_line or 0,
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


def _line_cost(line: str, budget: int, count_tokens: Callable[[str], int]) -> int | None:
    """Tokens of one line, None when it cannot fit `budget` (not counted when obviously huge)."""
    if len(line) > max(budget, 0) * MAX_CHARS_PER_TOKEN:
        return None
    cost = count_tokens(line)
    return cost if cost <= budget else None


def _fit_prefix(lines: Sequence[str], budget: int, count_tokens: Callable[[str], int]) -> list[str]:
    """The leading lines whose tokens sum to at most `budget`."""
    kept: list[str] = []
    for line in lines:
        cost = _line_cost(line, budget, count_tokens)
        if cost is None:
            break
        kept.append(line)
        budget -= cost
    return kept


def _excerpt(lines: Sequence[str], center: int, budget: int,
             count_tokens: Callable[[str], int]) -> tuple[int, int]:
    """lines[lo:hi] around `center`, grown a line below then a line above while the budget lasts;
    a side that no longer fits stops growing and leaves the rest to the other."""
    center = min(max(center, 0), len(lines) - 1)
    lo, hi = center, center
    down = up = True
    while (down or up) and budget > 0:
        if down:
            cost = _line_cost(lines[hi], budget, count_tokens) if hi < len(lines) else None
            if cost is None:
                down = False
            else:
                hi, budget = hi + 1, budget - cost
        if up:
            cost = _line_cost(lines[lo - 1], budget, count_tokens) if lo > 0 else None
            if cost is None:
                up = False
            else:
                lo, budget = lo - 1, budget - cost
    return lo, hi


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
