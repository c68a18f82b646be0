"""`graftlm chat`: an interactive conversation using the model's chat template.

Reads one user message per line from stdin (so it can be piped); `/reset` clears the history,
`/exit` or end of input quits. Ctrl-C during a reply cancels that reply only.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from graftlm.cli.common import add_model_args, add_sampling_args, load_llm, sampling_overrides, summary
from graftlm.engine.generate import ContextOverflowError
from graftlm.errors import GraftError

HELP = "commands: /reset clears the conversation, /exit quits"


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "chat",
        help="chat with a model interactively",
        description="Chat with a model through its chat template. " + HELP + ".",
    )
    add_model_args(parser)
    parser.add_argument("--system", metavar="TEXT", help="system prompt")
    parser.add_argument(
        "--chat-template", metavar="FILE", help="a Jinja chat template, for tokenizers without one"
    )
    parser.add_argument("--stats", action="store_true", help="print token counts and speeds after each reply")
    add_sampling_args(parser, max_new_tokens=512)
    parser.set_defaults(func=main)


def _read_line(interactive: bool) -> str | None:
    try:
        return input("> " if interactive else "")
    except EOFError:
        return None


def main(args: argparse.Namespace) -> int:
    llm = load_llm(args)
    engine = llm.engine
    if args.chat_template:
        try:
            engine.tokenizer.chat_template = Path(args.chat_template).read_text()
        except OSError as exc:
            raise GraftError(f"cannot read the chat template {args.chat_template}: {exc}") from exc
    engine.require_chat_template()
    system = [{"role": "system", "content": args.system}] if args.system else []
    history = list(system)
    overrides = sampling_overrides(args)
    interactive = sys.stdin.isatty()
    if interactive:
        print(HELP, file=sys.stderr)

    def show(piece: str) -> None:
        sys.stdout.write(piece)
        sys.stdout.flush()

    while True:
        line = _read_line(interactive)
        if line is None or line.strip() == "/exit":
            break
        text = line.strip()
        if not text:
            continue
        if text == "/reset":
            history = list(system)
            print("(conversation cleared)", file=sys.stderr)
            continue
        history.append({"role": "user", "content": text})
        try:
            ids = engine.encode_chat(history)
            result = engine.generate(ids, on_text=show, **overrides)
        except ContextOverflowError as exc:
            history.pop()
            print(f"\n{exc}; /reset starts a new conversation", file=sys.stderr)
            continue
        except KeyboardInterrupt:
            history.pop()
            print("\n(reply cancelled)", file=sys.stderr)
            continue
        sys.stdout.write("\n")
        sys.stdout.flush()
        history.append({"role": "assistant", "content": result.text})
        if args.stats:
            print(summary(result), file=sys.stderr)
    return 0
