"""`sdtrain` command line: one sub-command per module in `sdtrain.commands`.

Each command module defines `NAME`, `HELP`, `add_arguments(parser)` and `run(args) -> int`.
User errors (`sdtrain.errors.UserError`) print their message and exit with code 2. Every command takes
`--verbose`, which shows what `sdtrain.console` filters out (known third-party noise, library progress bars).
"""

from __future__ import annotations

import argparse
import importlib
import sys

from sdtrain import __version__
from sdtrain.errors import UserError

COMMAND_MODULES = ["train", "verify", "export", "inspect", "merge", "analyze", "install_comfyui", "install_webui",
                   "doctor"]


def _load_commands():
    commands = []
    for name in COMMAND_MODULES:
        try:
            commands.append(importlib.import_module(f"sdtrain.commands.{name}"))
        except ModuleNotFoundError as exc:  # a command not written yet
            if exc.name != f"sdtrain.commands.{name}":
                raise
    return commands


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sdtrain", description="DoRA trainer for Stable Diffusion 1.5 and SDXL")
    parser.add_argument("--version", action="version", version=f"sdtrain {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for module in _load_commands():
        p = sub.add_parser(module.NAME, help=module.HELP, description=module.HELP)
        module.add_arguments(p)
        p.add_argument("--verbose", action="store_true",
                       help="show every message of the libraries sdtrain uses, including known noise it hides")
        p.set_defaults(_run=module.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "_run", None):
        parser.print_help()
        return 2
    from sdtrain.console import setup_logging

    setup_logging(verbose=getattr(args, "verbose", False))
    try:
        return int(args._run(args) or 0)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
