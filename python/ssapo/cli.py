"""The `ssapo` command. Each subcommand lives in `ssapo.commands.<name>` and
exposes `add_parser(subparsers)` and `run(args) -> int`; heavy imports happen
inside `run`, so `ssapo --help` and `ssapo solve` start fast."""

from __future__ import annotations

import argparse
import importlib
import sys
from typing import List, Optional

# name -> module; a module missing here is simply not offered
COMMANDS = ["solve", "train", "bench", "export"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ssapo", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name in COMMANDS:
        try:
            mod = importlib.import_module(f"ssapo.commands.{name}")
        except ModuleNotFoundError as e:
            if e.name == f"ssapo.commands.{name}":
                continue
            raise
        mod.add_parser(sub)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    parser = build_parser()
    # `ssapo train` takes any RunConfig field as --field value: leave the unknown ones to it
    args, extra = parser.parse_known_args(argv)
    if extra and args.command != "train":
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    args.extra = extra
    from ssapo.errors import ConfigError

    try:
        return int(args.func(args) or 0)
    except ConfigError as e:  # a bad setting a command did not report itself: one line, no traceback
        print(f"ssapo {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
