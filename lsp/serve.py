"""`stablelm-lsp serve` (also plain `stablelm-lsp --stdio`): run the language server.

Command-line settings are the server's starting point; the editor's initializationOptions and
workspace/didChangeConfiguration override them.
"""
from __future__ import annotations

import argparse
import os
import sys

from .common import EXIT_USAGE, add_model_arguments, model_flags
from .settings import Settings, SettingsError

SERVE_FLAGS = ("--stdio", "--tcp")


def add_setting_arguments(p: argparse.ArgumentParser) -> None:
    """Flags for the completion settings (defaults: settings.Settings)."""
    p.add_argument("--max-new-tokens", type=int, metavar="N")
    p.add_argument("--max-lines", type=int, metavar="N", help="lines of a multi-line completion")
    p.add_argument("--temperature", type=float, help="0 = greedy (default)")
    p.add_argument("--context-tokens", type=int, metavar="N", help="prompt budget in tokens")
    p.add_argument("--template", help="prompt template, e.g. "
                   "'{fim_prefix}{prefix}{fim_suffix}{suffix}{fim_middle}{middle}'")
    p.add_argument("--timeout-ms", type=int, metavar="MS", help="generation time budget")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("serve", help="run the language server (the default with --stdio/--tcp)",
                       description="Run the language server on stdio (default) or TCP.")
    transport = p.add_mutually_exclusive_group()
    transport.add_argument("--stdio", action="store_true", help="talk LSP on stdin/stdout (default)")
    transport.add_argument("--tcp", action="store_true", help="listen for one client on TCP")
    p.add_argument("--host", default="127.0.0.1", help="TCP address to bind (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=2087, help="TCP port (default 2087; 0: any free)")
    add_model_arguments(p)
    add_setting_arguments(p)
    p.add_argument("--debounce-ms", type=int, metavar="MS",
                   help=f"longest wait before a request runs the model (default {Settings.debounce_ms})")
    p.add_argument("--debounce-min-ms", type=int, metavar="MS",
                   help="shortest wait: the wait adapts to the typing rhythm and the model's "
                        f"latency between the two (default {Settings.debounce_min_ms})")
    p.add_argument("--no-anticipate", action="store_true",
                   help="compute completions only when asked (not after a suggestion is shown, "
                        "where the cursor rests, or after a timeout)")
    p.add_argument("--chat-model", help="checkpoint for chat (default: the completion model)")
    p.add_argument("--chat-max-new-tokens", type=int, metavar="N",
                   help=f"longest chat reply in tokens (default {Settings.chat_max_new_tokens})")
    p.add_argument("--stats-file", metavar="PATH",
                   help="where completion counts are kept (default "
                        "$XDG_STATE_HOME/stablelm-lsp/stats.json)")
    p.add_argument("--no-prefix-cache", action="store_true",
                   help="recompute every prompt from scratch (for measurements)")
    p.add_argument("--log-file", metavar="PATH", help="log here instead of stderr")
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    p.set_defaults(func=_serve)


def settings_from_args(args: argparse.Namespace) -> Settings:
    """Settings with the flags given on the command line; raises SettingsError."""
    flags = {
        **model_flags(args),
        "maxNewTokens": args.max_new_tokens, "maxLines": args.max_lines,
        "temperature": args.temperature, "contextTokens": args.context_tokens,
        "template": args.template, "timeoutMs": args.timeout_ms,
        "debounceMs": getattr(args, "debounce_ms", None),
        "debounceMinMs": getattr(args, "debounce_min_ms", None),
        "anticipate": False if getattr(args, "no_anticipate", False) else None,
        "chatModel": getattr(args, "chat_model", None),
        "chatMaxNewTokens": getattr(args, "chat_max_new_tokens", None),
        "statsFile": getattr(args, "stats_file", None),
        "prefixCache": False if getattr(args, "no_prefix_cache", False) else None,
    }
    return Settings().merged({k: v for k, v in flags.items() if v is not None})


def _serve(args: argparse.Namespace) -> int:
    # OpenMP threads that spin between parallel regions (the default, ACTIVE for a while) made
    # the server's requests 2.5-3x slower on a 2-core machine busy with other work (a 1000-token
    # request of the 160M benchmark model: 14-17 s against 5-6 s passive, interleaved runs; the
    # tiny test model's: 2-23 s against 0.2-0.3 s). An editor's helper shares the machine: wait
    # passively unless the user chose otherwise. Read by the OpenMP runtime when torch loads it.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    from .process import configure_logging, serve_stdio, serve_tcp
    from .server import StableLMServer

    try:
        settings = settings_from_args(args)
    except SettingsError as exc:
        print(f"stablelm-lsp: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    configure_logging(args.log_file, "debug" if args.debug else args.log_level)
    server = StableLMServer(settings)
    if args.tcp:
        return serve_tcp(server, args.host, args.port)
    return serve_stdio(server)
