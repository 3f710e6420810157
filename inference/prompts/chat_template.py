"""Chat templates: a checkpoint's jinja chat template rendered as transformers renders it.

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
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from datetime import datetime
from functools import lru_cache
from typing import Sequence

from ..api import GenerationError, ModelInfo, PromptPart, join_parts

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

# Characters that bracket the sentinels standing for message contents: Unicode noncharacters,
# the first pair found in neither the template nor the messages is used.
_SENTINEL_MARKS = [(chr(c), chr(c + 1)) for c in range(0xFDD0, 0xFDF0, 2)]


class ChatFormatError(GenerationError):
    """Messages or a template that cannot make a prompt; the message says what to fix."""


@dataclass(frozen=True)
class ChatMessage:
    role: str       # system | user | assistant
    content: str


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
