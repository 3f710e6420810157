"""Tiny real checkpoints for tests, built with transformers' own classes and `save_pretrained`.

Every variant the project supports gets a random model of a few hundred thousand parameters in
the exact Hub layout (config.json, model.safetensors, tokenizer.json, tokenizer_config.json),
with a byte-level BPE tokenizer trained here by `tokenizers` that has the code models' special
tokens. Usable from scripts too: `python tests/checkpoints.py VARIANT OUT_DIR`.
"""
from __future__ import annotations

import json
import sys
import sysconfig
from pathlib import Path

SPECIAL_TOKENS = ["<|endoftext|>", "<fim_prefix>", "<fim_middle>", "<fim_suffix>", "<fim_pad>",
                  "<file_sep>", "<repo_name>"]


def starcoder_specials():
    """The SpecialTokens a tokenizer built here (StarCoder2's special tokens) exposes."""
    from stablelm_lsp.inference.api import SpecialTokens

    return SpecialTokens(eos="<|endoftext|>", fim_prefix="<fim_prefix>", fim_suffix="<fim_suffix>",
                         fim_middle="<fim_middle>", fim_pad="<fim_pad>", file_sep="<file_sep>",
                         repo_name="<repo_name>")

# variant -> (transformers config class name, config fields)
VARIANTS: dict[str, tuple[str, dict]] = {
    # stablelm-3b-4e1t / stable-code-3b: partial rotary 0.25, no biases, untied
    "stablelm-3b": ("StableLmConfig", dict(partial_rotary_factor=0.25, rope_theta=10000.0)),
    # stablelm-2-1_6b: qkv bias
    "stablelm-2-1.6b": ("StableLmConfig", dict(use_qkv_bias=True, partial_rotary_factor=0.25)),
    # stablelm-2-12b: per-head qk layernorm, parallel residual, grouped-query attention
    "stablelm-2-12b": ("StableLmConfig", dict(qk_layernorm=True, use_parallel_residual=True,
                                              num_key_value_heads=2, partial_rotary_factor=0.25)),
    "persimmon": ("PersimmonConfig", dict(qk_layernorm=True, partial_rotary_factor=0.5,
                                          hidden_act="relu2", rope_theta=25000.0)),
    # starcoder2-3b/7b: GQA, biases, tied head, sliding window (shorter than the tests' sequences)
    "starcoder2": ("Starcoder2Config", dict(num_key_value_heads=2, use_bias=True, sliding_window=16,
                                            tie_word_embeddings=True)),
    "starcoder2-untied": ("Starcoder2Config", dict(num_key_value_heads=2, use_bias=True,
                                                   sliding_window=16, tie_word_embeddings=False)),
}

SIZES = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=4,
             max_position_embeddings=512)


def training_corpus(limit_bytes: int = 400_000) -> list[str]:
    """Python source from the interpreter's standard library (present on every machine)."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    texts, total = [], 0
    for name in ("textwrap.py", "functools.py", "contextlib.py", "dataclasses.py", "argparse.py",
                 "json/encoder.py", "json/decoder.py", "string.py", "typing.py"):
        f = stdlib / name
        if f.exists():
            text = f.read_text(encoding="utf-8", errors="replace")
            texts.append(text)
            total += len(text)
        if total >= limit_bytes:
            break
    texts.append("héllo wörld ✓ 日本語 😀 emoji and accents\n" * 20)
    return texts


def build_tokenizer(out_dir: Path, vocab_size: int = 640) -> int:
    """Train a byte-level BPE tokenizer; write tokenizer.json + tokenizer_config.json."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(training_corpus(), trainer=trainer)
    out_dir.mkdir(parents=True, exist_ok=True)
    tok.save(str(out_dir / "tokenizer.json"))
    (out_dir / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<|endoftext|>",
        "eos_token": "<|endoftext|>", "unk_token": None, "model_max_length": SIZES["max_position_embeddings"],
        "clean_up_tokenization_spaces": False,
    }, indent=2))
    return tok.get_vocab_size()


def build_tiny_checkpoint(variant: str, out_dir: str | Path, seed: int = 0, **overrides) -> Path:
    """Random `variant` model + tokenizer saved in Hub format under out_dir; returns out_dir."""
    import torch
    import transformers

    out_dir = Path(out_dir)
    vocab = build_tokenizer(out_dir)
    cls_name, fields = VARIANTS[variant]
    kwargs = {**SIZES, **fields, **overrides, "vocab_size": vocab, "bos_token_id": 0, "eos_token_id": 0}
    config = getattr(transformers, cls_name)(**kwargs)
    model_cls = getattr(transformers, cls_name.replace("Config", "ForCausalLM"))
    torch.manual_seed(seed)
    model = model_cls(config).eval()
    with torch.no_grad():  # larger-than-init random weights: peaked logits, every bias exercised
        for name, p in model.named_parameters():
            if "norm" in name and name.endswith("weight"):
                p.copy_(1.0 + 0.2 * torch.randn_like(p))
            else:
                p.copy_(0.15 * torch.randn_like(p))
    model.save_pretrained(out_dir)
    return out_dir


if __name__ == "__main__":
    if len(sys.argv) != 3 or sys.argv[1] not in VARIANTS:
        sys.exit(f"usage: python {sys.argv[0]} {{{','.join(VARIANTS)}}} OUT_DIR")
    print(build_tiny_checkpoint(sys.argv[1], sys.argv[2]))
