"""`moray`: the command line. Each subcommand lives in its own module.

    moray plan --config configs/gpt4.yaml       # moray.platform.cli_plan
    moray convert --from-hf DIR --out DIR       # moray.platform.cli_convert
    moray route --config regions.yaml           # moray.platform.cli_route

A command module defines `add_parser(subparsers)`, which adds its parser and
sets `func` (called with the parsed args, returns an exit code), and may define
`USER_ERRORS`, the exception types that mean "the request is wrong" (printed
as one line, exit code 2) rather than a bug (a traceback). Only the module of
the command being run is imported, so `moray plan` never imports torch or Ray.
To add a command: one line in COMMANDS and a module.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from typing import List, Optional

COMMANDS = {  # name -> (module, one-line help)
    "plan": ("moray.platform.cli_plan", "capacity planner: parameters, FLOPs, memory, layouts, days, cost, serving"),
    "convert": ("moray.platform.cli_convert", "convert checkpoints between Hugging Face Mixtral and moray"),
    "export": ("moray.platform.cli_export", "export a training checkpoint as a Hugging Face or moray model directory"),
    "route": ("moray.platform.cli_route", "multi-region router: one address in front of several serving regions"),
}


def _chosen(argv: List[str]) -> Optional[str]:
    return next((a for a in argv if not a.startswith("-")), None)


def build_parser(argv: List[str]) -> tuple[argparse.ArgumentParser, Optional[object]]:
    """The top-level parser with the chosen command's full parser, the others as one-line stubs."""
    parser = argparse.ArgumentParser(prog="moray", description="Train and serve GPT-4-class MoE transformers on Ray.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    chosen, module = _chosen(argv), None
    for name, (module_name, help_text) in COMMANDS.items():
        if name == chosen:
            module = importlib.import_module(module_name)
            module.add_parser(sub)
        else:
            sub.add_parser(name, help=help_text, add_help=False)
    return parser, module


def main(argv: Optional[List[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser, module = build_parser(argv)
    args = parser.parse_args(argv)
    if args.command is None or not hasattr(args, "func"):
        parser.print_help()
        return 2
    user_errors = getattr(module, "USER_ERRORS", ())
    try:
        return int(args.func(args) or 0)
    except user_errors as err:
        print(f"moray {args.command}: error: {err}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # `moray plan --json | head`: the reader left; not an error of ours
        sys.stdout = open(os.devnull, "w")
        return 0


if __name__ == "__main__":
    sys.exit(main())
