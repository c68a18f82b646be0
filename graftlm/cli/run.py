"""`graftlm run`: generate a continuation of one prompt, streamed to stdout."""

from __future__ import annotations

import argparse
import sys

from graftlm.cli.common import add_model_args, add_sampling_args, load_llm, sampling_overrides, summary

DEFAULT_PROMPT = "The capital of France is"


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "run",
        help="generate text from a prompt",
        description="Generate a continuation of a prompt; the text streams to stdout, a speed summary to stderr.",
    )
    add_model_args(parser)
    parser.add_argument(
        "--prompt", "-p", default=DEFAULT_PROMPT, help=f"the prompt (default: {DEFAULT_PROMPT!r})"
    )
    parser.add_argument("--echo", action="store_true", help="print the prompt before the continuation")
    add_sampling_args(parser)
    parser.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    llm = load_llm(args)
    out = sys.stdout
    if args.echo:
        out.write(args.prompt)
        out.flush()

    def show(piece: str) -> None:
        out.write(piece)
        out.flush()

    result = llm.engine.generate(args.prompt, on_text=show, **sampling_overrides(args))
    out.write("\n")
    out.flush()
    print(summary(result), file=sys.stderr)
    return 0
