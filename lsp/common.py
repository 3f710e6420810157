"""What the CLI's sub-commands share: model arguments, loading, and the error policy.

Errors a user can fix (bad path, bad checkpoint, bad request) print one line on stderr and exit
with code 2; `--debug` shows the traceback instead.
"""
from __future__ import annotations

import argparse
import logging
import sys
import traceback
from typing import Callable

log = logging.getLogger("stablelm_lsp")

EXIT_USAGE = 2


def add_model_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None,
                   help="checkpoint folder or Hugging Face model id (default: the built-in model)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default: auto)")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16", "int8"],
                   help="auto: the checkpoint's dtype on GPU, float32 on CPU; int8: int8 weights "
                        "(quantized while loading; activations as auto)")
    p.add_argument("--allow-pickle", action="store_true",
                   help="allow pytorch_model.bin pickle weights (loaded with weights_only=True)")
    p.add_argument("--attention", default="auto", choices=["auto", "sdpa", "flash", "cpu"],
                   help="attention kernel: auto (flash-attn on CUDA when installed, the own kernel "
                        "for decode steps on a CPU), sdpa, flash, cpu")
    p.add_argument("--linear", default="auto",
                   choices=["auto", "rows", "torch", "onednn", "onednn-plain", "widen"],
                   help="linear layers' kernel: auto (the fastest measured on this machine per pass "
                        "length), or one forced: rows (own), torch, onednn (packed), onednn-plain, "
                        "widen (int8/16-bit weights widened per pass)")
    p.add_argument("--decode-step", default="off", choices=["off", "static", "compile", "cuda-graph"],
                   help="run single-token steps captured: cuda-graph (CUDA), compile (torch.compile)")
    p.add_argument("--no-speculation", dest="speculation", action="store_false",
                   help="one forward pass per generated token (no draft verification)")
    p.add_argument("--debug", action="store_true", help="show tracebacks for errors")


def model_path(model: str | None) -> str:
    """The configured model, or the built-in one (saying so on stderr)."""
    if model:
        return model
    from stablelm_lsp.models import builtin_model_path

    path = builtin_model_path()
    log.info("using the built-in model (%s); pass --model with a checkpoint folder or Hub id "
             "(e.g. stabilityai/stable-code-3b) for real completions", path)
    return str(path)


def load_backend(args: argparse.Namespace):
    from stablelm_lsp.inference.backend import LocalBackend

    from .backends import engine_options

    return LocalBackend.load(model_path(args.model), device=args.device, dtype=args.dtype,
                             allow_pickle=args.allow_pickle, **engine_options(args))


def user_errors() -> tuple[type[BaseException], ...]:
    """Exception types that mean bad input, not a bug."""
    from stablelm_lsp.inference.api import GenerationError
    from stablelm_lsp.models.errors import ModelError

    return (ModelError, GenerationError, FileNotFoundError, IsADirectoryError, UnicodeDecodeError)


def run_guarded(args: argparse.Namespace, func: Callable[[argparse.Namespace], int]) -> int:
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO if not args.debug else logging.DEBUG,
                            stream=sys.stderr, format="stablelm-lsp: %(message)s")
    try:
        return func(args)
    except KeyboardInterrupt:
        return 130
    except user_errors() as exc:
        if args.debug:
            traceback.print_exc()
        else:
            print(f"stablelm-lsp: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
