"""The `graftlm` command: one parser, one small module per subcommand.

Each module in COMMANDS defines `register(subparsers)`, which adds its parser and sets
`func=main` through `set_defaults`. A GraftError ends the command with its message and exit
code 2, never a traceback.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from graftlm.errors import GraftError

# Order is the order `graftlm --help` lists them in.
COMMANDS = ["run", "chat", "serve", "bench", "inspect", "convert", "eval_long", "config"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="graftlm", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more log output (-vv for debug)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in COMMANDS:
        try:
            module = importlib.import_module(f"graftlm.cli.{name}")
        except ModuleNotFoundError as exc:
            if exc.name == f"graftlm.cli.{name}":
                continue  # subcommand not built yet
            raise
        module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    level = logging.WARNING - 10 * min(args.verbose + 1, 2) if args.verbose else logging.INFO
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    try:
        return int(args.func(args) or 0)
    except GraftError as exc:
        print(f"graftlm: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
