"""The user's config file: defaults for the model, rules, threads, device, host and port.

Each setting comes from the first place that gives it: a command-line flag, then an environment
variable (`GRAFTLM_MODEL`, `GRAFTLM_RULES`, `GRAFTLM_THREADS`, `GRAFTLM_DEVICE`, `GRAFTLM_HOST`,
`GRAFTLM_PORT`), then the config file, then the built-in default.

The file is `$GRAFTLM_CONFIG` if set, else `$XDG_CONFIG_HOME/graftlm/config.toml`, else
`~/.config/graftlm/config.toml`: flat TOML keys, for example

    model = "~/models/deepseek-v2-lite-q4_k_m.gguf"
    rules = "auto"
    threads = 8
    port = 8080

graftlm only reads it: nothing is copied into it or written beside it, and the package ships no
config with machine paths. A relative `model` path (or a `rules` YAML path) is relative to the
file's own folder; `~` is expanded.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from graftlm.errors import GraftError

if sys.version_info >= (3, 11):
    import tomllib
else:  # Python 3.10: the same parser, from PyPI
    import tomli as tomllib


class UserConfigError(GraftError):
    """The config file or a GRAFTLM_* variable holds an unknown key or a value of the wrong type."""


@dataclass(frozen=True)
class Setting:
    name: str
    kind: type  # str or int
    builtin: Any
    help: str

    @property
    def env(self) -> str:
        return f"GRAFTLM_{self.name.upper()}"


SETTINGS: dict[str, Setting] = {
    s.name: s
    for s in (
        Setting("model", str, None, "GGUF file or HF folder (built-in: the demo model)"),
        Setting(
            "rules",
            str,
            None,
            "injection rules: a YAML file, 'auto', 'builtin:NAME' or 'none' (built-in: 'auto' on a CPU device "
            "without a memory budget, else none)",
        ),
        Setting("threads", int, None, "torch CPU threads (built-in: the physical core count)"),
        Setting("device", str, "cpu", "device for the model's inputs and dense layers"),
        Setting("host", str, "127.0.0.1", "address `graftlm serve` listens on"),
        Setting("port", int, 8000, "port `graftlm serve` listens on"),
    )
}

_PATH_SETTINGS = ("model", "rules")


@dataclass(frozen=True)
class Resolved:
    value: Any
    source: str  # "command line", "environment (GRAFTLM_X)", "file (PATH)" or "built-in"


def config_path(environ: Mapping[str, str] | None = None) -> Path:
    """Where the config file is read from (it need not exist)."""
    env = os.environ if environ is None else environ
    if env.get("GRAFTLM_CONFIG"):
        return Path(env["GRAFTLM_CONFIG"]).expanduser()
    base = (
        Path(env["XDG_CONFIG_HOME"]).expanduser() if env.get("XDG_CONFIG_HOME") else Path.home() / ".config"
    )
    return base / "graftlm" / "config.toml"


def _check_value(setting: Setting, value: Any, where: str) -> Any:
    if setting.kind is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise UserConfigError(f"{where}: '{setting.name}' must be an integer, got {value!r}")
        if setting.name == "threads" and value < 1:
            raise UserConfigError(f"{where}: 'threads' must be >= 1, got {value}")
        if setting.name == "port" and not 0 < value < 65536:
            raise UserConfigError(f"{where}: 'port' must be in 1..65535, got {value}")
    elif not isinstance(value, str) or not value:
        raise UserConfigError(f"{where}: '{setting.name}' must be a non-empty string, got {value!r}")
    return value


def _resolve_path(name: str, value: str, folder: Path) -> str:
    """Expand ~, and make a relative file path relative to the config file's folder."""
    if name == "rules" and not value.endswith((".yaml", ".yml")):
        return value  # "auto", "builtin:NAME", "none"
    path = Path(value).expanduser()
    return str(path if path.is_absolute() else folder / path)


def read_file(path: Path) -> dict[str, Any]:
    """The settings in `path` ({} when it does not exist); errors name the file and the key."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return {}
    except OSError as exc:
        raise UserConfigError(f"cannot read the config file {path}: {exc}") from exc
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise UserConfigError(f"{path}: not valid TOML: {exc}") from exc
    unknown = sorted(set(data) - set(SETTINGS))
    if unknown:
        raise UserConfigError(f"{path}: unknown key(s) {', '.join(unknown)} (known: {', '.join(SETTINGS)})")
    values = {}
    for name, value in data.items():
        value = _check_value(SETTINGS[name], value, str(path))
        if name in _PATH_SETTINGS:
            value = _resolve_path(name, value, path.parent)
        values[name] = value
    return values


def _from_env(setting: Setting, environ: Mapping[str, str]) -> Any:
    raw = environ.get(setting.env)
    if raw is None or raw == "":
        return None
    if setting.kind is int:
        try:
            value: Any = int(raw)
        except ValueError:
            raise UserConfigError(f"{setting.env}={raw!r}: '{setting.name}' must be an integer") from None
        return _check_value(setting, value, setting.env)
    return os.path.expanduser(raw) if setting.name in _PATH_SETTINGS else raw


def resolve(
    cli: Mapping[str, Any] | None = None,
    names: Iterable[str] | None = None,
    *,
    environ: Mapping[str, str] | None = None,
    path: Path | None = None,
) -> dict[str, Resolved]:
    """Each setting in `names` (default: all) with its value and where it came from.

    `cli` holds the command-line values; None there means "not given on the command line".
    """
    cli = cli or {}
    env = os.environ if environ is None else environ
    path = config_path(env) if path is None else path
    file_values = read_file(path)
    out = {}
    for name in names or SETTINGS:
        setting = SETTINGS[name]
        if cli.get(name) is not None:
            out[name] = Resolved(cli[name], "command line")
        elif (value := _from_env(setting, env)) is not None:
            out[name] = Resolved(value, f"environment ({setting.env})")
        elif name in file_values:
            out[name] = Resolved(file_values[name], f"file ({path})")
        else:
            out[name] = Resolved(setting.builtin, "built-in")
    return out


def apply_defaults(args: argparse.Namespace, names: Iterable[str]) -> None:
    """Fill each attribute of `args` named in `names` that the command line left as None."""
    names = list(names)
    for name, resolved in resolve({n: getattr(args, n, None) for n in names}, names).items():
        setattr(args, name, resolved.value)
