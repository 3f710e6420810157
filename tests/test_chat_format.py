"""Chat prompt rendering: parity with transformers' apply_chat_template, budgets, history cuts,
editor context, and the append-only property that lets each turn reuse the cache of the last."""
from __future__ import annotations

import json
import shutil

import pytest

from stablelm_lsp.inference.api import ModelInfo, PromptPart, SpecialTokens, prompt_text
from stablelm_lsp.inference.prompts.chat import (
    CONTEXT_SHARE,
    ConversationMemory,
    EditorContext,
    MessageTooLong,
    build_chat_prompt,
    prepare_turn,
    render_context,
)
from stablelm_lsp.inference.prompts.chat_template import (ZEPHYR_TEMPLATE, ChatFormatError, ChatMessage,
                                                          ChatTemplate)
from stablelm_lsp.lsp.chat import parse_messages
from stablelm_lsp.models.tokenizer import Tokenizer

# stablelm-zephyr-3b's tokenizer_config.json "chat_template", character for character.
HUB_ZEPHYR_TEMPLATE = (
    "{% for message in messages %}\n{% if message['role'] == 'user' %}\n"
    "{{ '<|user|>\n' + message['content'] + eos_token }}\n{% elif message['role'] == 'system' %}\n"
    "{{ '<|system|>\n' + message['content'] + eos_token }}\n"
    "{% elif message['role'] == 'assistant' %}\n"
    "{{ '<|assistant|>\n'  + message['content'] + eos_token }}\n{% endif %}\n"
    "{% if loop.last and add_generation_prompt %}\n{{ '<|assistant|>' }}\n{% endif %}\n"
    "{% endfor %}"
)

# A template using what Hub templates use: namespace, raise_exception, tojson, loop controls,
# a `generation` block, bos_token, whitespace control.
STRICT_TEMPLATE = (
    "{{ bos_token }}{% set ns = namespace(turns=0) %}"
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}{{ '[SYS] ' + message['content'] | trim + '\n' }}{% continue %}{% endif %}"
    "{% if (message['role'] == 'user') != (ns.turns % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"
    "{% endif %}{% set ns.turns = ns.turns + 1 %}"
    "{% if message['role'] == 'user' %}[U{{ ns.turns }}] {{ message['content'] | tojson }}\n"
    "{% else %}[A] {% generation %}{{ message['content'] }}{% endgeneration %}{{ eos_token }}\n"
    "{% endif %}{% endfor %}"
    "{%- if add_generation_prompt %}[A] {% endif %}"
)

CONVERSATIONS = [
    [{"role": "user", "content": "What does this function do?"}],
    [{"role": "system", "content": "You are a careful reviewer."},
     {"role": "user", "content": "Explain:\n```py\ndef f(x):\n    return x * 2\n```"},
     {"role": "assistant", "content": "It doubles x."},
     {"role": "user", "content": "Héllo wörld ✓ 日本語 😀 and \"quotes\" <tags>"}],
    [{"role": "user", "content": "  leading and trailing spaces  \n\n"},
     {"role": "assistant", "content": "ok"},
     {"role": "user", "content": "literal <|endoftext|> and <fim_prefix> in text"}],
]


def info_for(tok: Tokenizer, max_positions: int = 512) -> ModelInfo:
    return ModelInfo(name="tiny", path="", model_type="stablelm", builtin=False,
                     max_positions=max_positions, special=tok.special, stop_texts=(),
                     chat_template=tok.chat_template)


def copy_with_chat_template(checkpoint, folder, template: str, weights: bool = False):
    """A copy of `checkpoint` in `folder` whose tokenizer_config.json carries `template`."""
    names = ["tokenizer.json", "tokenizer_config.json", "config.json"]
    if weights:
        names += [f.name for f in checkpoint.glob("*.safetensors")]
    for name in names:
        shutil.copy(checkpoint / name, folder / name)
    config = json.loads((folder / "tokenizer_config.json").read_text())
    config["chat_template"] = template
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    return folder


@pytest.fixture(scope="module")
def folder_with_template(stablelm_checkpoint, tmp_path_factory):
    return lambda template: copy_with_chat_template(
        stablelm_checkpoint, tmp_path_factory.mktemp("chat-template"), template)


@pytest.mark.parametrize("template", [HUB_ZEPHYR_TEMPLATE, STRICT_TEMPLATE], ids=["zephyr", "strict"])
@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_rendering_equals_transformers_apply_chat_template(folder_with_template, template,
                                                           add_generation_prompt):
    transformers = pytest.importorskip("transformers")
    folder = folder_with_template(template)
    reference = transformers.AutoTokenizer.from_pretrained(folder)
    tok = Tokenizer.from_folder(folder)
    ours = ChatTemplate.for_model(info_for(tok))
    for conversation in CONVERSATIONS:
        expected = reference.apply_chat_template(conversation, tokenize=False,
                                                 add_generation_prompt=add_generation_prompt)
        rendered = ours.render(parse_messages(conversation), add_generation_prompt)
        assert rendered == expected
        # ... and tokenized as transformers tokenizes it
        assert tok.encode(rendered) == reference.apply_chat_template(
            conversation, tokenize=True, add_generation_prompt=add_generation_prompt,
            return_dict=False)


def test_template_errors_are_reported_like_transformers(folder_with_template):
    transformers = pytest.importorskip("transformers")
    folder = folder_with_template(STRICT_TEMPLATE)
    reference = transformers.AutoTokenizer.from_pretrained(folder)
    bad = [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]
    with pytest.raises(Exception, match="must alternate"):
        reference.apply_chat_template(bad, tokenize=False)
    ours = ChatTemplate.for_model(info_for(Tokenizer.from_folder(folder)))
    with pytest.raises(ChatFormatError, match="must alternate"):
        ours.render(parse_messages(bad))
    with pytest.raises(ChatFormatError, match="cannot be compiled"):
        ChatTemplate("{% for m in messages %}")


def test_without_a_template_the_zephyr_format_is_used(stablelm_checkpoint):
    tok = Tokenizer.from_folder(stablelm_checkpoint)
    assert tok.chat_template is None
    template = ChatTemplate.for_model(info_for(tok))
    assert template.source == ZEPHYR_TEMPLATE == HUB_ZEPHYR_TEMPLATE
    assert template.render([ChatMessage("user", "Why?")]) == \
        "<|user|>\nWhy?<|endoftext|>\n<|assistant|>\n"
    assert template.render([ChatMessage("system", "Be brief."), ChatMessage("user", "Why?")]) == \
        "<|system|>\nBe brief.<|endoftext|>\n<|user|>\nWhy?<|endoftext|>\n<|assistant|>\n"
    assert "<|user|>" in template.stop_texts


def test_zephyr_without_an_eos_token_ends_turns_with_endoftext():
    info = ModelInfo("m", "", "persimmon", False, 512, SpecialTokens(), ())
    assert ChatTemplate.for_model(info).render([ChatMessage("user", "hi")]) == \
        "<|user|>\nhi<|endoftext|>\n<|assistant|>\n"


@pytest.mark.parametrize("raw, message", [
    ([], "non-empty list"),
    (None, "non-empty list"),
    ([{"role": "robot", "content": "x"}], "role is 'robot'"),
    ([{"role": "user"}], "content must be a string"),
    (["hello"], "must be an object"),
    ([{"role": "user", "content": "a"}, {"role": "system", "content": "s"},
      {"role": "user", "content": "b"}], "only the first message"),
    ([{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}], "must be the user's"),
    ([{"role": "user", "content": "  \n"}], "empty"),
    ([{"role": "user", "content": "x" * 2_000_001}], "characters"),
])
def test_bad_messages_are_refused_with_a_reason(raw, message):
    with pytest.raises(ChatFormatError, match=message):
        parse_messages(raw)


def count_words(text: str) -> int:
    """A stand-in token count for budget arithmetic: words and line breaks."""
    return len(text.split()) + text.count("\n")


def count_parts(parts) -> int:
    """count_words for prompt parts, as the prompt builders count."""
    return count_words(prompt_text(parts))


def zephyr() -> ChatTemplate:
    return ChatTemplate(ZEPHYR_TEMPLATE, eos_token="<|endoftext|>")


def conversation(turns: int, words: int = 20) -> list[ChatMessage]:
    messages = [ChatMessage("system", "sys")]
    for i in range(turns):
        messages.append(ChatMessage("user", f"q{i} " + "w " * words))
        messages.append(ChatMessage("assistant", f"a{i} " + "w " * words))
    messages.append(ChatMessage("user", "last question"))
    return messages


def test_history_is_cut_from_the_oldest_turn_keeping_system_and_last():
    messages = conversation(turns=10)
    full = build_chat_prompt(messages, zephyr(), count_tokens=count_parts, budget=10_000)
    assert full.first_kept == 1 and full.text == zephyr().render(messages)
    prompt = build_chat_prompt(messages, zephyr(), count_tokens=count_parts, budget=200)
    assert prompt.tokens <= 200
    assert prompt.text.startswith("<|system|>\nsys<|endoftext|>\n<|user|>\nq")
    assert prompt.text.endswith("<|user|>\nlast question<|endoftext|>\n<|assistant|>\n")
    kept = prompt.conversation[prompt.first_kept:]
    assert kept[0].role == "user" and prompt.first_kept > 1
    assert prompt.text == zephyr().render([messages[0], *kept])
    # The cut leaves room: the next turn appends instead of moving the prompt's start again.
    assert prompt.tokens <= 200 * 0.75
    follow_up = [*prompt.conversation, ChatMessage("assistant", "short"), ChatMessage("user", "more")]
    again = build_chat_prompt(follow_up, zephyr(), count_tokens=count_parts, budget=200,
                              keep_from=prompt.first_kept)
    assert again.first_kept == prompt.first_kept
    assert again.text.startswith(prompt.text + "short")


def test_a_last_message_over_the_budget_is_refused():
    messages = [ChatMessage("system", "sys"), ChatMessage("user", "w " * 500)]
    with pytest.raises(MessageTooLong, match="takes at most 100"):
        build_chat_prompt(messages, zephyr(), count_tokens=count_parts, budget=100)


def file_lines(n: int) -> list[str]:
    return [f"line_{i} = {i}\n" for i in range(n)]


def test_context_shows_the_selection_and_the_whole_small_file():
    lines = ["def double(x):\n", "    return x * 2\n", "\n", "print(double(3))\n"]
    context = EditorContext("pkg/mod.py", "python", lines, "    return x * 2\n", 1, 1)
    prompt = build_chat_prompt([ChatMessage("user", "Explain")], zephyr(),
                               count_tokens=count_parts, budget=500, context=context)
    question = prompt.conversation[-1].content
    assert question == ("The file pkg/mod.py:\n```python\n" + "".join(lines) + "```\n\n"
                        "Selected code from pkg/mod.py, line 2:\n```python\n    return x * 2\n```\n\n"
                        "Explain")
    assert prompt.context_tokens == count_words(question) - count_words("Explain")


def test_a_large_file_is_cut_around_the_selection_within_the_context_share():
    lines = file_lines(5000)
    context = EditorContext("big.py", "python", lines, "".join(lines[2500:2503]), 2500, 2502)
    budget = 400
    prompt = build_chat_prompt([ChatMessage("user", "Why?")], zephyr(),
                               count_tokens=count_parts, budget=budget, context=context)
    assert prompt.tokens <= budget and prompt.context_tokens <= budget * CONTEXT_SHARE
    question = prompt.conversation[-1].content
    assert "Selected code from big.py, lines 2501-2503:" in question
    assert "line_2499 = 2499\n" in question and "line_2503 = 2503\n" in question
    assert "line_0 = 0\n" not in question
    header = question.split("\n", 1)[0]
    first, last = (int(n) for n in header.rsplit(" ", 1)[1].rstrip(":").split("-"))
    assert first <= 2501 <= 2503 <= last and f"line_{first - 1} = " in question


def test_context_for_a_file_without_a_position_starts_at_its_top():
    context = EditorContext("big.py", "python", file_lines(5000))
    block = render_context(context, 100, count_words)
    assert block.startswith("From the file big.py, lines 1-") and "line_0 = 0\n" in block
    assert count_words(block) <= 100


def test_code_with_backtick_fences_gets_a_longer_fence():
    lines = ["Use:\n", "```sh\n", "make\n", "```\n"]
    block = render_context(EditorContext("README.md", "markdown", lines), 200, count_words)
    assert block == "The file README.md:\n````markdown\n" + "".join(lines) + "````\n\n"


def test_a_huge_line_is_not_counted():
    calls = []

    def counting(text: str) -> int:
        calls.append(len(text))
        return count_words(text)

    lines = ["x = 1\n", "y" * 5_000_000 + "\n", "z = 2\n"]
    render_context(EditorContext("min.js", "javascript", lines), 200, counting)
    assert max(calls) < 10_000


def test_follow_up_prompts_extend_the_previous_prompt_and_reply():
    memory = ConversationMemory()
    context = EditorContext("a.py", "python", ["x = 1\n"], "x = 1\n", 0, 0)
    raw = [ChatMessage("system", "sys"), ChatMessage("user", "What is x?")]
    messages, keep_from = memory.resolve(raw)
    first = build_chat_prompt(messages, zephyr(), count_tokens=count_parts, budget=1000,
                              context=context, keep_from=keep_from)
    memory.remember(raw, first)
    reply = "x is one."
    # The client resends its own history, without the context the server folded in.
    raw2 = [*raw, ChatMessage("assistant", reply), ChatMessage("user", "And y?")]
    messages, keep_from = memory.resolve(raw2)
    second = build_chat_prompt(messages, zephyr(), count_tokens=count_parts, budget=1000,
                               keep_from=keep_from)
    assert second.text.startswith(first.text + reply)
    assert "x = 1" in second.text.split("<|assistant|>")[0]
    # A conversation the memory has not seen renders from scratch.
    assert memory.resolve([ChatMessage("user", "new")]) == ([ChatMessage("user", "new")], 0)


def test_prepare_turn_keeps_positions_for_the_reply(stablelm_checkpoint):
    tok = Tokenizer.from_folder(stablelm_checkpoint)
    info = info_for(tok, max_positions=512)
    messages = [ChatMessage("user", "w " * 300)]
    prompt, request = prepare_turn(info, messages, count_tokens=lambda p: len(tok.encode_parts(p)),
                                   key="chat:1", temperature=0.5)
    assert request.prompt_parts == prompt.parts and request.key == "chat:1"
    assert not request.token_healing and request.priority == 1   # completions go first
    assert request.temperature == 0.5 and request.stop == ("<|user|>", "<|system|>")
    assert prompt.tokens == len(tok.encode(prompt.text)) <= 512 - 128
    with pytest.raises(MessageTooLong):
        prepare_turn(info, [ChatMessage("user", "w " * 450)],
                     count_tokens=lambda p: len(tok.encode_parts(p)))


@pytest.mark.parametrize("template", [HUB_ZEPHYR_TEMPLATE, STRICT_TEMPLATE], ids=["zephyr", "strict"])
def test_message_contents_are_plain_parts_and_the_template_text_special(stablelm_checkpoint, template):
    tok = Tokenizer.from_folder(stablelm_checkpoint)
    ours = ChatTemplate(template, bos_token="<|endoftext|>", eos_token="<|endoftext|>")
    system = [{"role": "system", "content": "  <|user|> spaced system  \n"}]
    for conversation in CONVERSATIONS + [system + CONVERSATIONS[0]]:
        messages = parse_messages(conversation)
        parts = ours.render_parts(messages)
        assert prompt_text(parts) == ours.render(messages)
        contents = [p.text for p in parts if not p.special]
        # Each content as the template shows it: as it is, trimmed or JSON-escaped.
        assert len(contents) == len(messages)
        for content, message in zip(contents, messages):
            assert content in (message.content, message.content.strip(),
                               json.dumps(message.content, ensure_ascii=False)[1:-1])
        # The special ids are the template's own: those of the same turns with harmless text.
        harmless = [ChatMessage(m.role, "x") for m in messages]
        ids = tok.encode_parts(parts)
        assert [i for i in ids if tok.is_added(i)] == \
            [i for i in tok.encode_parts(ours.render_parts(harmless)) if tok.is_added(i)]


def test_a_template_that_changes_contents_otherwise_renders_as_one_special_part():
    shouting = ChatTemplate("{% for m in messages %}<|user|>{{ m['content'] | upper }}{% endfor %}")
    messages = [ChatMessage("user", "quiet <|endoftext|>")]
    assert shouting.render_parts(messages) == (
        PromptPart("<|user|>QUIET <|ENDOFTEXT|>", special=True),)
