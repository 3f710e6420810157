"""The shipped built-in model (models/builtin/) and the scripts that train and evaluate it."""
from __future__ import annotations

import dataclasses
import json
import math
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from stablelm_lsp.inference.backend import LocalBackend
from stablelm_lsp.lsp.completion import Completer
from stablelm_lsp.lsp.documents import Cursor
from stablelm_lsp.lsp.settings import Settings
from stablelm_lsp.models import builtin_model_path, load_model

REPO = Path(__file__).resolve().parents[1]
TRAINING = REPO / "training"
BUILTIN = builtin_model_path()
FIM_TOKENS = ["<|endoftext|>", "<fim_prefix>", "<fim_middle>", "<fim_suffix>", "<fim_pad>",
              "<file_sep>", "<repo_name>"]

# Documents with an obvious next line: (text before the cursor, pattern the completed cursor line
# must match). A trained model gets most of them; random weights of the same shape get none.
OBVIOUS_LINES = [
    ("class Point:\n    def __init__(self", r"    def __init__\(self[,)].*"),
    ("if __name__ == ", r"if __name__ == (\"__main__\"|'__main__'):"),
    ("def main():\n    for i in range(", r"    for i in range\(.*\):"),
    ("import os\nimport sys\n\n\ndef main(argv):\n    if len(argv) < 2:\n        print(\"usage\")\n"
     "        return 1\n    with open(argv[1]) as f:\n        for line in f", r"        for line in f.*:"),
    ("class Stack:\n    def __init__(self):\n        self.items = []\n\n    def push(self, item):\n"
     "        self.items.", r"        self\.items\.append\(item\)"),
    ("try:\n    import json\nexcept ImportError", r"except ImportError.*:"),
]


def completed_lines(backend, documents=OBVIOUS_LINES, token_healing: bool = True) -> list[str]:
    """The cursor line after the server's completion pipeline (token healing as the server
    does it, or turned off), for each (text before the cursor, pattern) document."""
    completer = Completer(backend, Settings(max_new_tokens=24, max_lines=1))
    out = []
    for before, _ in documents:
        lines = (before + "\n").splitlines(keepends=True)
        cursor = Cursor(len(lines) - 1, len(lines[-1].rstrip("\n")))
        pending = completer.prepare(lines, cursor, path="example.py")
        assert pending.request.token_healing     # the server's default
        request = dataclasses.replace(pending.request, token_healing=token_healing)
        shown = completer.finish(pending, backend.generate(request))
        out.append(lines[-1].rstrip("\n") + (shown.text.split("\n")[0] if shown else ""))
    return out


def obvious_hits(backend) -> int:
    return sum(bool(re.fullmatch(pattern, line))
               for (_, pattern), line in zip(OBVIOUS_LINES, completed_lines(backend)))


@pytest.fixture(scope="module")
def builtin_backend():
    backend = LocalBackend.load(BUILTIN, device="cpu", dtype="float32")
    yield backend
    backend.close()


def test_checkpoint_files_ship_within_30_mb():
    names = ["config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "TRAINING.md"]
    for name in names:
        assert (BUILTIN / name).is_file(), name
    total = sum(p.stat().st_size for p in BUILTIN.iterdir() if p.is_file())
    assert total <= 30 * 1024 * 1024, f"{total / 2**20:.1f} MiB"
    config = json.loads((BUILTIN / "config.json").read_text())
    assert config["model_type"] == "stablelm"


def test_tokenizer_has_fim_tokens():
    tok = load_model(BUILTIN, device="cpu").tokenizer
    assert tok.token_to_id("<|endoftext|>") == 0
    for name in FIM_TOKENS:
        ids = tok.encode(name, parse_special=True)
        assert ids == [tok.token_to_id(name)], name
    assert tok.special.has_fim and tok.special.file_sep == "<file_sep>"
    stops = {tok.id_to_token(i) for i in tok.stop_ids}
    assert {"<|endoftext|>", "<fim_prefix>", "<fim_middle>", "<fim_suffix>", "<file_sep>"} <= stops
    text = "def f(x):\n    return x ** 2  # ünïcode\n"
    assert tok.decode(tok.encode(text)) == text


def test_transformers_and_our_loader_agree():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    hf_tok = AutoTokenizer.from_pretrained(BUILTIN)
    assert hf_tok.eos_token == "<|endoftext|>" and hf_tok.bos_token == "<|endoftext|>"
    hf = AutoModelForCausalLM.from_pretrained(BUILTIN, dtype=torch.float32).eval()
    ours = load_model(BUILTIN, device="cpu", dtype="float32")
    assert ours.config.model_type == "stablelm"
    prompt = "<fim_prefix>import os\n<fim_suffix>\n<fim_middle>def main("
    ids = ours.tokenizer.encode(prompt, parse_special=True)
    assert ids == hf_tok(prompt, add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        expected = hf(torch.tensor([ids])).logits
    got = ours.model(torch.tensor([ids]))
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)


def test_builtin_model_completes_obvious_lines(builtin_backend):
    lines = completed_lines(builtin_backend)
    hits = [bool(re.fullmatch(p, line)) for (_, p), line in zip(OBVIOUS_LINES, lines)]
    assert sum(hits) >= len(OBVIOUS_LINES) - 1, list(zip(lines, hits))


# Partly typed words (TRAINING.md: "`fina` -> nothing" without token healing): (text before the
# cursor, pattern the completed cursor line must match).
PARTLY_TYPED = [
    ("def f():\n    try:\n        x = compute()\n    except ValueError:\n        x = None\n    fina",
     r"    finally:"),
    ("class Stack:\n    def __init__(self):\n        self.items = []\n\n    def push(self, item):\n"
     "        self.items.app", r"        self\.items\.append\(item\)"),
    ("import os\n\n\ndef main():\n    path = os.pa", r"    path = os\.path\b.*"),
    ("if __name__ == '__ma", r"if __name__ == '__main__':"),
    ("class Point:\n    def __in", r"    def __init__\(.*\):"),
    ("def f(x):\n    if isinst", r"    if isinstance\(.*"),
    ("import sys\n\n\ndef main():\n    for arg in sys.ar", r"    for arg in sys\.argv\b.*:"),
    # words the tokenizer splits in two when typed partly (`ret` + `ur`): both tokens taken back
    ("def f(x):\n    y = x + 1\n    retur", r"    return\b.*"),
    ("x = Fa", r"x = False"),
]


def test_token_healing_completes_partly_typed_words(builtin_backend):
    healed = completed_lines(builtin_backend, PARTLY_TYPED)
    plain = completed_lines(builtin_backend, PARTLY_TYPED, token_healing=False)
    hits = [bool(re.fullmatch(p, line)) for (_, p), line in zip(PARTLY_TYPED, healed)]
    plain_hits = [bool(re.fullmatch(p, line)) for (_, p), line in zip(PARTLY_TYPED, plain)]
    assert sum(hits) >= len(PARTLY_TYPED) - 1, list(zip(healed, hits))
    assert sum(plain_hits) < sum(hits) - 2, list(zip(plain, plain_hits))


def test_a_partly_typed_statement_stops_generating_at_its_end(builtin_backend):
    """The README's example: `self.items.` at the end of its line, 8 lines allowed. The request
    stops at the first newline (postprocess would keep that one line only), the text shown is
    the same as generating on, and fewer tokens were run."""
    example = Path(__file__).resolve().parents[1] / "examples" / "example.py"
    lines = example.read_text().splitlines(keepends=True)
    completer = Completer(builtin_backend, Settings(max_new_tokens=48, max_lines=8))
    pending = completer.prepare(lines, Cursor(17, 19), path="example.py")   # README: --line 17
    assert pending.prompt.line_before == "        self.items."
    assert pending.request.continued_by and pending.request.max_lines == 8
    stopped = builtin_backend.generate(pending.request)
    free = builtin_backend.generate(dataclasses.replace(pending.request, continued_by=None))
    assert stopped.finish_reason == "stop" and "\n" not in stopped.text
    assert free.text.startswith(stopped.text + "\n")
    assert completer.finish(pending, stopped) == completer.finish(pending, free)
    assert completer.finish(pending, stopped).text == "append(item)"
    assert len(stopped.token_ids) < len(free.token_ids)
    # a line that opens a block is generated on: `def pop(self` -> `):` and its body
    block = lines[:18] + ["\n", "    def pop(self\n"] + lines[18:]
    pending = completer.prepare(block, Cursor(19, len("    def pop(self")), path="example.py")
    result = builtin_backend.generate(pending.request)
    first, _, rest = result.text.partition("\n")
    assert (pending.prompt.line_before + first).rstrip().endswith(":") and rest.strip(), result.text
    assert not pending.request.nonblank_first_token


def test_a_blank_cursor_line_gets_text(builtin_backend):
    """On a blank line the request asks for a first token that does not end the line (after
    auto-indentation: not more spaces either); mid-line it does not."""
    completer = Completer(builtin_backend, Settings(max_new_tokens=16, max_lines=1))
    doc = ["import os\n", "import sys\n", "\n", "\n", "def main(argv):\n", "    \n", "    return 0\n"]
    for line, col, indent in ((5, 4, "    "), (2, 0, "")):
        pending = completer.prepare(doc, Cursor(line, col), path="example.py")
        request = pending.request
        assert request.nonblank_first_token and request.line_before == indent
        result = builtin_backend.generate(request)
        assert result.text.strip() and not result.text.lstrip(" \t").startswith("\n")
        if indent:
            assert result.text[:1] not in (" ", "\t")
    pending = completer.prepare(doc, Cursor(6, 6), path="example.py")     # "    re|turn 0"
    assert not pending.request.nonblank_first_token


def test_random_weights_fail_the_obvious_lines(tmp_path):
    """The completion test above means something: the same architecture and tokenizer with
    untrained weights completes none of the lines."""
    from transformers import AutoConfig, AutoModelForCausalLM

    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(BUILTIN / name, tmp_path / name)
    torch.manual_seed(0)
    config = AutoConfig.from_pretrained(BUILTIN)
    AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path)
    backend = LocalBackend.load(tmp_path, device="cpu", dtype="float32")
    try:
        assert obvious_hits(backend) == 0
    finally:
        backend.close()


def test_training_loss_is_next_token_cross_entropy():
    """The trainer's loss on pre-shifted labels equals transformers' loss on unshifted ones (a
    model trained on a double shift learns to predict the token after next)."""
    sys.path.insert(0, str(TRAINING))
    try:
        import train_builtin
    finally:
        sys.path.remove(str(TRAINING))
    model = train_builtin.build_model(vocab_size=300, hidden=32, layers=2, heads=2, context=16, seed=0)
    rows = [list(range(1, 18)), list(range(40, 50))]          # one full row, one padded
    inputs, labels = train_builtin.batch_tensors(rows, context=16, pad_id=4)
    unshifted = torch.full_like(inputs, -100)
    unshifted[0] = torch.tensor(rows[0][:16])
    unshifted[1, :10] = torch.tensor(rows[1])
    # transformers drops the first label of each row; ours scores rows[0][16] in addition.
    labels[0, -1] = -100
    expected = model(input_ids=inputs, labels=unshifted).loss
    torch.testing.assert_close(train_builtin.next_token_loss(model, inputs, labels), expected)


def _train_tiny(out: Path, seed: int = 7, *extra: str) -> None:
    subprocess.run(
        [sys.executable, str(TRAINING / "train_builtin.py"), "--out", str(out), "--seed", str(seed),
         "--max-files", "12", "--held-out", "0.3", "--vocab-size", "400", "--hidden", "32",
         "--layers", "2", "--heads", "2", "--context", "64", "--batch-size", "4", "--steps", "4",
         "--warmup", "2", "--eval-every", "2", "--eval-rows", "4", "--save-every", "0", *extra],
        check=True, capture_output=True, text=True, timeout=120)


@pytest.fixture(scope="module")
def tiny_trained(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("tiny_builtin")
    _train_tiny(out)
    return out


def test_training_script_produces_a_loadable_checkpoint(tiny_trained):
    summary = json.loads((tiny_trained / "training_summary.json").read_text())
    assert summary["steps"] == 4 and math.isfinite(summary["final_train_loss"])
    assert [h["step"] for h in summary["history"]] == [2, 4]
    loaded = load_model(tiny_trained, device="cpu", dtype="float32")
    assert loaded.config.model_type == "stablelm" and loaded.config.num_layers == 2
    assert loaded.tokenizer.special.has_fim
    logits = loaded.model(torch.tensor([loaded.tokenizer.encode("<fim_prefix>x = 1<fim_suffix>")]))
    assert logits.shape[-1] == loaded.config.vocab_size and torch.isfinite(logits).all()


def test_training_is_reproducible(tiny_trained, tmp_path):
    _train_tiny(tmp_path)
    for name in ("model.safetensors", "tokenizer.json"):
        assert (tmp_path / name).read_bytes() == (tiny_trained / name).read_bytes(), name


def test_second_stage_continues_from_a_checkpoint(tiny_trained, tmp_path):
    _train_tiny(tmp_path, 8, "--init-from", str(tiny_trained), "--fim-rate", "0.9", "--hidden", "64")
    assert (tmp_path / "tokenizer.json").read_bytes() == (tiny_trained / "tokenizer.json").read_bytes()
    first = load_model(tiny_trained, device="cpu", dtype="float32")
    second = load_model(tmp_path, device="cpu", dtype="float32")
    assert second.config.hidden_size == 32                  # the checkpoint's shape, not --hidden
    assert json.loads((tmp_path / "training_summary.json").read_text())["init_from"] == str(tiny_trained)
    before, after = first.model.state_dict(), second.model.state_dict()
    assert before.keys() == after.keys()
    # Trained on from the first stage's weights: 4 AdamW steps at lr <= 2e-3 move each by < 0.01,
    # far less than a fresh initialisation (std 0.02) would differ.
    change = max((before[k] - after[k]).abs().max().item() for k in before)
    assert 0 < change < 0.01


def test_evaluate_script_prints_table_and_json(tiny_trained, tmp_path):
    dump = tmp_path / "cases.jsonl"
    proc = subprocess.run(
        [sys.executable, str(TRAINING / "evaluate.py"), "--model", str(tiny_trained), "--max-files", "12",
         "--held-out", "0.3", "--cases", "6", "--ppl-max-tokens", "300", "--max-new-tokens", "8",
         "--token-healing", "both", "--dump", str(dump)],
        check=True, capture_output=True, text=True, timeout=120)
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["cases"] == 6 and result["perplexity_tokens"] == 300
    for setting in ("line_start", "mid_line"):
        assert set(result[setting]["exact_match"]) >= {"model", "model, no healing", "line above",
                                                         "line below", "most frequent training line"}
    assert "line start exact" in proc.stdout
    # the dump holds every case; its exact matches add up to the table's
    cases = [json.loads(line) for line in dump.read_text().splitlines()]
    assert len(cases) == 12 and {c["setting"] for c in cases} == {"line start", "mid-line"}
    for setting, key in (("line start", "line_start"), ("mid-line", "mid_line")):
        for method, rate in result[key]["exact_match"].items():
            hits = sum(c["guesses"][method] == c["target"] for c in cases if c["setting"] == setting)
            assert round(hits / 6, 4) == rate, (setting, method)


def test_evaluate_rejects_a_missing_checkpoint(tmp_path):
    proc = subprocess.run([sys.executable, str(TRAINING / "evaluate.py"), "--model", str(tmp_path / "none"),
                           "--max-files", "12", "--held-out", "0.3"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.startswith("evaluate: ") and len(proc.stderr.strip().splitlines()) == 1


def _package_tree(root: Path) -> Path:
    """A package whose modules use the names a sibling module defines."""
    package = root / "pkg"
    package.mkdir(parents=True)
    (package / "geometry.py").write_text(
        "def circle_area(radius):\n    return 3.14159 * radius * radius\n\n\n"
        "def square_area(side):\n    return side * side\n")
    for i in range(8):
        (package / f"use_{i}.py").write_text(
            "from .geometry import circle_area, square_area\n\n\n"
            f"def total_{i}(values):\n    area = 0\n    for value in values:\n"
            "        area += circle_area(value) + square_area(value)\n    return area\n")
    return root


def test_repository_cases_use_a_siblings_names_and_the_ring_holds_the_definition(tmp_path):
    sys.path.insert(0, str(TRAINING))
    try:
        import evaluate
        from train_builtin import collect_sources, split_sources
    finally:
        sys.path.remove(str(TRAINING))
    sources = collect_sources(_package_tree(tmp_path))
    _, held = split_sources(sources, 0.5)
    cases = evaluate.repository_cases(sources, held, 100, seed=0)
    held_uses = [p for p, _ in held if "use_" in p]
    assert held_uses and len(cases) == 2 * len(held_uses)      # the import and the sum, per file
    texts = dict(sources)
    for k, case in enumerate(cases):
        assert case.sibling == "pkg/geometry.py" and case.name in ("circle_area", "square_area")
        assert case.name in texts[case.path].splitlines()[case.line]
        assert texts[case.sibling].splitlines()[case.definition] == f"def {case.name}({'radius' if case.name == 'circle_area' else 'side'}):"
        folder = {p: t for p, t in sources if p.startswith("pkg/")}
        ring = evaluate.session_ring(case, folder, __import__("random").Random(k))
        chunks = ring.select(f"file:///{case.path}", "python", texts[case.path].splitlines(True), case.line)
        assert any(f"def {case.name}(" in "".join(c.lines) for c in chunks)
        assert all(c.uri != f"file:///{case.path}" for c in chunks)


def test_evaluate_script_reports_the_repository_cases(tiny_trained, tmp_path):
    proc = subprocess.run(
        [sys.executable, str(TRAINING / "evaluate.py"), "--model", str(tiny_trained),
         "--data-root", str(_package_tree(tmp_path)), "--held-out", "0.5", "--cases", "0",
         "--ppl-max-tokens", "0", "--repo-cases", "3", "--max-new-tokens", "8"],
        check=True, capture_output=True, text=True, timeout=120)
    repo = json.loads(proc.stdout.strip().splitlines()[-1])["repository"]
    assert repo["cases"] == 3 and repo["packages"] == 1
    for setting in ("line_start", "mid_line"):
        assert set(repo[setting]["exact_match"]) == {"no other file", "sibling open (its head)",
                                                     "ring (sibling closed)", "sibling open + ring"}
        assert repo[setting]["definition_in_prompt"]["no other file"] == 0
    assert "repository-level infilling: 3 hidden lines" in proc.stdout
