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

from .settings import CHOICES, Settings, SettingsError

EXIT_USAGE = 2


def add_model_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None,
                   help="checkpoint folder or Hugging Face model id (default: the built-in model); "
                        "with --endpoint, the served model (a folder or Hub id also gives the "
                        "tokenizer prompts are built with)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default: auto)")
    p.add_argument("--dtype", default="auto", choices=CHOICES["dtype"],
                   help="auto: the checkpoint's dtype on GPU, float32 on CPU; int8: int8 weights "
                        "(quantized while loading; activations as auto)")
    p.add_argument("--allow-pickle", action="store_true",
                   help="allow pytorch_model.bin pickle weights (loaded with weights_only=True)")
    p.add_argument("--attention", default="auto", choices=CHOICES["attention"],
                   help="attention kernel: auto (flash-attn on CUDA when installed, the own kernel "
                        "for decode steps on a CPU), sdpa, flash, cpu")
    p.add_argument("--linear", default="auto",
                   choices=CHOICES["linear"],
                   help="linear layers' kernel: auto (the fastest measured on this machine per pass "
                        "length), or one forced: rows (own), torch, onednn (packed), onednn-plain, "
                        "widen (int8/16-bit weights widened per pass), q8 (int8 weights: the inputs "
                        "quantized to int8 too, per block of 32, as llama.cpp's Q8_0; never auto)")
    p.add_argument("--decode-step", default="off", choices=CHOICES["decode_step"],
                   help="run single-token steps captured: cuda-graph (CUDA), compile (torch.compile)")
    p.add_argument("--kv-dtype", default="auto", choices=CHOICES["kv_dtype"],
                   help="the KV cache's dtype: auto (float16 for int8 weights on a CPU: half the "
                        "bytes a decode step reads; else the model's), float32, float16, bfloat16 "
                        "(another than the model's: CPUs only)")
    p.add_argument("--no-speculation", dest="speculation", action="store_false",
                   help="one forward pass per generated token (no draft verification)")
    p.add_argument("--endpoint", metavar="URL",
                   help="generate on the inference engine at URL (vLLM, llama.cpp's server, Ollama, "
                        "any OpenAI-compatible server) instead of in this process; an API key is "
                        "read from $STABLELM_LSP_API_KEY")
    p.add_argument("--endpoint-kind", choices=CHOICES["endpoint_kind"],
                   help="the engine's kind (default: auto, detected from the server)")
    p.add_argument("--debug", action="store_true", help="show tracebacks for errors")


def model_flags(args: argparse.Namespace) -> dict:
    """The model arguments as settings (JSON names), those given only."""
    flags = {"model": args.model, "device": args.device, "dtype": args.dtype,
             "allowPickle": args.allow_pickle or None, "attention": args.attention,
             "linear": args.linear,
             "decodeStep": args.decode_step, "kvDtype": args.kv_dtype, "speculation": False if not args.speculation else None,
             "endpoint": args.endpoint, "endpointKind": args.endpoint_kind}
    return {k: v for k, v in flags.items() if v is not None}


def open_backend(args: argparse.Namespace):
    """The backend the model arguments name (inference.load.load_backend)."""
    from stablelm_lsp.inference.load import load_backend

    settings = Settings().merged(model_flags(args))
    return load_backend(settings.model, settings.backend_options())


def user_errors() -> tuple[type[BaseException], ...]:
    """Exception types that mean bad input, not a bug."""
    from stablelm_lsp.inference.api import GenerationError
    from stablelm_lsp.inference.load import ModelError

    return (ModelError, GenerationError, SettingsError, FileNotFoundError, IsADirectoryError,
            UnicodeDecodeError)


def quiet_libraries() -> None:
    """pygls logs every message body at INFO, torch its caches' statistics at exit, httpx each
    request to a remote engine: WARNING for them unless debugging."""
    for name in ("pygls", "torch", "httpx", "httpcore"):
        logging.getLogger(name).setLevel(logging.WARNING)


def run_guarded(args: argparse.Namespace, func: Callable[[argparse.Namespace], int]) -> int:
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO if not args.debug else logging.DEBUG,
                            stream=sys.stderr, format="stablelm-lsp: %(message)s")
        if not args.debug:
            quiet_libraries()
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
