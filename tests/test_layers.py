"""The layering is enforced: import-linter's contracts in pyproject.toml (lsp, then inference,
then models, each importing only the layers below it; lsp reaching models only through
inference) hold for the code, and a reverse import breaks them."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LAYERS = ("lsp", "inference", "models")


def lint_imports(pythonpath: Path | None = None) -> subprocess.CompletedProcess:
    """import-linter on the project's contracts; the packages found through `pythonpath` when
    given, else the installed (editable) ones."""
    env = dict(os.environ)
    if pythonpath is not None:
        env["PYTHONPATH"] = str(pythonpath)
    command = [str(Path(sys.executable).with_name("lint-imports")), "--no-cache", "--no-logo",
               str(ROOT / "pyproject.toml")]
    return subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)


def test_the_code_keeps_the_layers():
    run = lint_imports()
    assert run.returncode == 0, run.stdout + run.stderr
    assert "2 kept, 0 broken" in run.stdout


def copy_sources(tmp_path: Path) -> Path:
    """The three packages' Python files as the package `stablelm_lsp` under tmp_path."""
    for layer in LAYERS:
        for source in (ROOT / layer).rglob("*.py"):
            target = tmp_path / "stablelm_lsp" / layer / source.relative_to(ROOT / layer)
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(source, target)
    return tmp_path


def test_a_reverse_import_breaks_the_contracts(tmp_path):
    root = copy_sources(tmp_path)
    with open(root / "stablelm_lsp" / "models" / "errors.py", "a", encoding="utf-8") as f:
        f.write("\nfrom stablelm_lsp.inference import api  # an upward import\n")
    with open(root / "stablelm_lsp" / "lsp" / "stats.py", "a", encoding="utf-8") as f:
        f.write("\nfrom stablelm_lsp.models import config  # lsp skipping inference\n")
    run = lint_imports(root)
    assert run.returncode == 1, run.stdout + run.stderr
    assert "stablelm_lsp.models is not allowed to import stablelm_lsp.inference" in run.stdout
    assert "stablelm_lsp.lsp is not allowed to import stablelm_lsp.models" in run.stdout
    assert "0 kept, 2 broken" in run.stdout
