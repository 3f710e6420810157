"""`stablelm-lsp generate`: complete a prompt with a checkpoint, printing the text (or JSON)."""
from __future__ import annotations

import argparse
import json
import sys

from .common import add_model_arguments, open_backend, run_guarded


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("generate", help="complete a prompt (greedy by default)",
                       description="Complete PROMPT with a checkpoint and print the generated text.")
    add_model_arguments(p)
    p.add_argument("--prompt", required=True, help="the prompt text (special tokens are parsed)")
    p.add_argument("--max-new-tokens", type=int, default=64, metavar="N")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--json", action="store_true",
                   help='print one JSON object {"text", "token_ids", ...} instead of the text')
    p.add_argument("--no-stop", action="store_true",
                   help="generate exactly N tokens, ignoring end-of-sequence and stop tokens")
    p.set_defaults(func=lambda args: run_guarded(args, _generate))


def _generate(args: argparse.Namespace) -> int:
    from stablelm_lsp.inference.api import GenerationRequest

    backend = open_backend(args)
    request = GenerationRequest(
        prompt=args.prompt, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
        top_k=args.top_k, top_p=args.top_p, seed=args.seed, use_model_stops=not args.no_stop)
    on_delta = None
    if not args.json:
        def on_delta(delta: str) -> None:
            sys.stdout.write(delta)
            sys.stdout.flush()
    result = backend.generate(request, on_delta=on_delta)
    if args.json:
        json.dump({"text": result.text, "token_ids": result.token_ids,
                   "finish_reason": result.finish_reason, "prompt_tokens": result.prompt_tokens,
                   "model": backend.info.name}, sys.stdout, ensure_ascii=False)
    sys.stdout.write("\n")
    return 0
