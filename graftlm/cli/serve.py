"""`graftlm serve`: OpenAI- and Ollama-compatible HTTP APIs and a chat page for one model.

Binds 127.0.0.1 unless told otherwise (there is no authentication). Host and port, like the model,
rules, threads and device, default from GRAFTLM_* variables and the user config file.
"""

from __future__ import annotations

import argparse
import ipaddress
import logging
from pathlib import Path

from graftlm import userconfig
from graftlm.cli.common import add_model_args, load_llm
from graftlm.errors import GraftError

log = logging.getLogger(__name__)


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "serve",
        help="serve a model over HTTP (OpenAI and Ollama APIs, web chat)",
        description=(
            "Serve a model over HTTP: /v1/chat/completions, /v1/completions, /v1/models (OpenAI), "
            "/api/chat, /api/generate, /api/tags, /api/show (Ollama), and a chat page at /."
        ),
    )
    add_model_args(parser)
    parser.add_argument("--host", metavar="ADDR", help="address to listen on (default: 127.0.0.1)")
    parser.add_argument("--port", type=int, metavar="PORT", help="port to listen on (default: 8000)")
    parser.add_argument(
        "--model-name", metavar="NAME", help="the name clients ask for (default: the file's stem)"
    )
    parser.add_argument(
        "--chat-template", metavar="FILE", help="a Jinja chat template, for tokenizers without one"
    )
    parser.add_argument(
        "--default-max-tokens",
        type=int,
        default=1024,
        metavar="N",
        help="tokens to generate when a chat request sets no limit (default: 1024, or what fits)",
    )
    parser.add_argument(
        "--max-queue", type=int, default=64, metavar="N", help="requests allowed to wait (default: 64)"
    )
    parser.set_defaults(func=main)


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def main(args: argparse.Namespace) -> int:
    try:
        import uvicorn

        from graftlm.server import create_app
    except ImportError as exc:
        raise GraftError(
            f"graftlm serve needs the 'serve' extra: pip install 'graftlm[serve]' ({exc})"
        ) from exc
    if args.default_max_tokens < 1 or args.max_queue < 1:
        raise GraftError("--default-max-tokens and --max-queue must be >= 1")
    userconfig.apply_defaults(args, ("host", "port"))
    llm = load_llm(args)
    if args.chat_template:
        try:
            llm.tokenizer.chat_template = Path(args.chat_template).read_text()
        except OSError as exc:
            raise GraftError(f"cannot read the chat template {args.chat_template}: {exc}") from exc
    app = create_app(
        llm,
        model_name=args.model_name,
        default_max_tokens=args.default_max_tokens,
        max_queue=args.max_queue,
    )
    if not _is_loopback(args.host):
        log.warning(
            "listening on %s: other machines can reach this server, which has no authentication", args.host
        )
    log.info("chat page: http://%s:%d/", args.host, args.port)
    # Open streams are cancelled (and their generations with them) 5 s after Ctrl-C.
    uvicorn.run(
        app, host=args.host, port=args.port, log_config=None, access_log=False, timeout_graceful_shutdown=5
    )
    return 0
