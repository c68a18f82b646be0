"""The user config: CLI > environment > file > built-in, errors that name the file, `graftlm config`."""

from __future__ import annotations

import argparse
import importlib
from pathlib import Path
from typing import Any

import pytest

from graftlm import userconfig
from graftlm.cli import main
from graftlm.cli.common import load_llm


@pytest.fixture
def config_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """GRAFTLM_CONFIG points at an empty temporary file; no GRAFTLM_* setting is in the environment."""
    for setting in userconfig.SETTINGS.values():
        monkeypatch.delenv(setting.env, raising=False)
    path = tmp_path / "conf" / "config.toml"
    path.parent.mkdir()
    path.write_text("")
    monkeypatch.setenv("GRAFTLM_CONFIG", str(path))
    return path


def test_default_path_follows_xdg(tmp_path: Path) -> None:
    assert userconfig.config_path({"XDG_CONFIG_HOME": str(tmp_path)}) == tmp_path / "graftlm" / "config.toml"
    assert userconfig.config_path({}) == Path.home() / ".config" / "graftlm" / "config.toml"
    assert userconfig.config_path({"GRAFTLM_CONFIG": "/x/y.toml"}) == Path("/x/y.toml")


def test_precedence_cli_env_file_builtin(config_file: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config_file.write_text('port = 9000\nhost = "127.0.0.2"\nthreads = 3\nmodel = "models/m.gguf"\n')
    monkeypatch.setenv("GRAFTLM_PORT", "9100")
    monkeypatch.setenv("GRAFTLM_THREADS", "5")
    got = userconfig.resolve({"threads": 7})
    assert got["threads"] == userconfig.Resolved(7, "command line")
    assert got["port"] == userconfig.Resolved(9100, "environment (GRAFTLM_PORT)")
    assert got["host"] == userconfig.Resolved("127.0.0.2", f"file ({config_file})")
    assert got["model"].value == str(config_file.parent / "models" / "m.gguf")  # relative to the file
    assert got["device"] == userconfig.Resolved("cpu", "built-in")
    assert got["rules"] == userconfig.Resolved(None, "built-in")


def test_missing_file_gives_builtins(config_file: Path) -> None:
    config_file.unlink()
    got = userconfig.resolve()
    assert {k: v.value for k, v in got.items()} == {s.name: s.builtin for s in userconfig.SETTINGS.values()}
    assert got["host"].value == "127.0.0.1"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("port = 80\nmodle = 'x'\n", "unknown key(s) modle"),
        ("port = 'eighty'\n", "'port' must be an integer"),
        ("port = 70000\n", "'port' must be in 1..65535"),
        ("threads = 0\n", "'threads' must be >= 1"),
        ("threads = true\n", "'threads' must be an integer"),
        ("model = \n", "not valid TOML"),
    ],
)
def test_bad_files_name_the_file(config_file: Path, text: str, message: str) -> None:
    config_file.write_text(text)
    with pytest.raises(userconfig.UserConfigError) as err:
        userconfig.resolve()
    assert message in str(err.value) and str(config_file) in str(err.value)


def test_bad_environment_names_the_variable(config_file: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GRAFTLM_PORT", "http")
    with pytest.raises(userconfig.UserConfigError, match="GRAFTLM_PORT='http'"):
        userconfig.resolve()


def test_load_llm_takes_unset_flags_from_the_config(
    config_file: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config_file.write_text('model = "/models/from-file.gguf"\nrules = "auto"\ndevice = "meta"\nthreads = 1\n')
    monkeypatch.setenv("GRAFTLM_DEVICE", "cpu")
    calls: list[tuple[Any, ...]] = []
    api = importlib.import_module("graftlm.api")
    monkeypatch.setattr(
        api, "load", lambda path, rules=None, device="cpu": calls.append((path, rules, device))
    )
    load_llm(argparse.Namespace(model=None, rules=None, device=None, threads=None))
    load_llm(argparse.Namespace(model="cli.gguf", rules="r.yaml", device=None, threads=None))
    assert calls == [("/models/from-file.gguf", "auto", "cpu"), ("cli.gguf", "r.yaml", "cpu")]


def test_config_path_and_show(config_file: Path, monkeypatch: pytest.MonkeyPatch, capsys: Any) -> None:
    config_file.write_text("port = 8123\n")
    monkeypatch.setenv("GRAFTLM_HOST", "127.0.0.9")
    assert main(["config", "path"]) == 0
    assert capsys.readouterr().out.strip() == str(config_file)
    assert main(["config", "show"]) == 0
    out = capsys.readouterr().out
    assert f"# config file: {config_file} (found)" in out
    assert f"port = 8123  # file ({config_file})" in out
    assert 'host = "127.0.0.9"  # environment (GRAFTLM_HOST)' in out
    assert 'device = "cpu"  # built-in' in out
    assert "# model is not set" in out


def test_config_errors_are_cli_errors(config_file: Path, capsys: Any) -> None:
    config_file.write_text("colour = 'blue'\n")
    assert main(["config", "show"]) == 2
    assert "unknown key(s) colour" in capsys.readouterr().err
