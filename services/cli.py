"""The `rose` command: one subcommand per service, plus setup and the local mesh."""

from __future__ import annotations

import argparse
import importlib
import sys

from shared.config import Settings

# subcommand -> (module with `main(settings, args)`, role whose settings it reads, help)
COMMANDS = {
    "setup": ("services.setup", "run", "make the o200k vocabulary and the tiny default checkpoint if missing"),
    "run": ("services.launcher", "run", "start redis, gateway, 2 formatters, scheduler and a worker; serve until Ctrl-C"),
    "gateway": ("services.gateway.main", "gateway", "the OpenAI-compatible HTTP gateway"),
    "formatter": ("services.formatter.main", "formatter", "the Harmony formatter"),
    "scheduler": ("services.scheduler.main", "scheduler", "the scheduler (admission, routing, prefix index)"),
    "worker": ("services.worker.main", "worker", "a model worker"),
    "curve-keys": ("services.curve_keys", "curve-keys", "write CURVE key pairs for the internal ZeroMQ links"),
    "make-checkpoint": ("services.worker.model.make_checkpoint", "checkpoint", "write a random gpt-oss checkpoint"),
}


def build_parser(chosen: str | None = None) -> argparse.ArgumentParser:
    """The parser; only the chosen subcommand's module is imported for its own flags."""
    parser = argparse.ArgumentParser(prog="rose", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (module, role, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text)
        Settings.add_arguments(p, role)
        if name == chosen:
            extra = getattr(importlib.import_module(module), "add_arguments", None)
            if extra is not None:
                extra(p)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    chosen = next((a for a in argv if not a.startswith("-")), None)
    args = build_parser(chosen if chosen in COMMANDS else None).parse_args(argv)
    module, _, _ = COMMANDS[args.command]
    settings = Settings.from_args(args)
    return importlib.import_module(module).main(settings, args) or 0


if __name__ == "__main__":
    sys.exit(main())
