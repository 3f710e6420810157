"""`stablelm-lsp generate` end to end (a real subprocess), against transformers' generate."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

transformers = pytest.importorskip("transformers")

PROMPT = "def fibonacci(n):\n    "


def run_cli(*args: str, timeout: int = 120) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.run([sys.executable, "-m", "stablelm_lsp.lsp.cli", *args], capture_output=True,
                          text=True, timeout=timeout, env=env)


def test_generate_json_matches_transformers(any_checkpoint):
    variant, path = any_checkpoint
    out = run_cli("generate", "--model", str(path), "--prompt", PROMPT, "--max-new-tokens", "24",
                  "--json", "--no-stop")
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout)
    tok = transformers.AutoTokenizer.from_pretrained(path)
    ref = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    ids = tok(PROMPT, return_tensors="pt").input_ids
    with torch.no_grad():
        expected = ref.generate(ids, max_new_tokens=24, do_sample=False, eos_token_id=None,
                                pad_token_id=0)[0, ids.shape[1]:].tolist()
    assert result["token_ids"] == expected
    assert result["text"] == tok.decode(expected)


def test_generate_prints_text(stablelm_checkpoint):
    out = run_cli("generate", "--model", str(stablelm_checkpoint), "--prompt", PROMPT,
                  "--max-new-tokens", "8", "--no-stop")
    assert out.returncode == 0, out.stderr
    as_json = json.loads(run_cli("generate", "--model", str(stablelm_checkpoint), "--prompt", PROMPT,
                                 "--max-new-tokens", "8", "--no-stop", "--json").stdout)
    assert out.stdout == as_json["text"] + "\n"
    assert out.stdout.strip(), "eight tokens of a random model still print something"
    # the engine options change how, not what
    for options in (["--no-speculation"], ["--decode-step", "static", "--attention", "sdpa"]):
        same = run_cli("generate", "--model", str(stablelm_checkpoint), "--prompt", PROMPT,
                       "--max-new-tokens", "8", "--no-stop", *options)
        assert same.returncode == 0 and same.stdout == out.stdout, (options, same.stderr)


@pytest.mark.parametrize("args, words", [
    (["--model", "/definitely/not/here"], "no such folder"),
    (["--model", "{tmp}"], "config.json"),
    (["--model", "{ckpt}", "--prompt", ""], "empty"),
    (["--model", "{ckpt}", "--max-new-tokens", "0"], "max"),
    (["--model", "{ckpt}", "--prompt", "x = 1\n" * 400], "positions"),
    (["--model", "{ckpt}", "--decode-step", "cuda-graph"] if not torch.cuda.is_available()
     else ["--model", "{ckpt}", "--attention", "flash", "--dtype", "float32"], "cannot use"),
])
def test_bad_input_one_line_exit_2(args, words, tmp_path, stablelm_checkpoint):
    args = [a.format(tmp=tmp_path, ckpt=stablelm_checkpoint) for a in args]
    if "--prompt" not in args:
        args += ["--prompt", PROMPT]
    out = run_cli("generate", *args)
    assert out.returncode == 2, out.stderr
    lines = [line for line in out.stderr.splitlines() if line.startswith("stablelm-lsp: error:")]
    assert len(lines) == 1 and words in lines[0].lower(), out.stderr
    assert "Traceback" not in out.stderr
    assert out.stdout == ""


def test_debug_flag_shows_traceback():
    out = run_cli("generate", "--model", "/definitely/not/here", "--prompt", "x", "--debug")
    assert out.returncode == 2 and "Traceback" in out.stderr
