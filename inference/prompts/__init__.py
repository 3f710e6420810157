"""Text-level prompting, pure functions of text, special-token text and a token counter:
`budget` (counting and spending a token budget by whole lines), `lines` (text as lines with
their terminators), `fim` (fill-in-the-middle completion prompts), `chat_template` (a
checkpoint's jinja chat template rendered as transformers does) and `chat` (chat prompts with
editor context and history cuts). Prompts are sequences of `PromptPart`s (api.py)."""
