"""`graftlm config show|path`: the user's config file and the defaults in effect."""

from __future__ import annotations

import argparse
import json

from graftlm import userconfig


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "config",
        help="show the user config (defaults for model, rules, threads, device, host, port)",
        description=(
            "Defaults come from, in order: command-line flags, GRAFTLM_* environment variables, "
            "the config file, built-in values."
        ),
    )
    parser.add_argument(
        "action",
        choices=["show", "path"],
        help="show: each setting in effect and where it comes from; path: the config file's path",
    )
    parser.set_defaults(func=main)


def _toml_value(value: object) -> str:
    return json.dumps(value) if isinstance(value, str) else str(value)


def format_settings(settings: dict[str, userconfig.Resolved]) -> str:
    """TOML lines (valid as a config file) with the source of each value as a comment."""
    lines = []
    for name, resolved in settings.items():
        help_text = userconfig.SETTINGS[name].help
        if resolved.value is None:
            lines.append(f"# {name} is not set: {help_text}")
        else:
            lines.append(f"{name} = {_toml_value(resolved.value)}  # {resolved.source}")
    return "\n".join(lines)


def main(args: argparse.Namespace) -> int:
    path = userconfig.config_path()
    if args.action == "path":
        print(path)
        return 0
    state = "found" if path.is_file() else "not found"
    print(f"# config file: {path} ({state})")
    print(format_settings(userconfig.resolve()))
    return 0
