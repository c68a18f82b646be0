"""`graftlm serve` wiring: model name, host and port precedence, loopback by default."""

from __future__ import annotations

import importlib
import logging
from pathlib import Path
from typing import Any

import pytest

uvicorn = pytest.importorskip("uvicorn", reason="the server needs the 'serve' extra (uvicorn)")

from graftlm import userconfig  # noqa: E402
from graftlm.cli import main  # noqa: E402


@pytest.fixture
def captured(tiny_llm: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    """uvicorn.run records its arguments instead of serving; graftlm.api.load returns the tiny model."""
    for setting in userconfig.SETTINGS.values():
        monkeypatch.delenv(setting.env, raising=False)
    monkeypatch.setenv("GRAFTLM_CONFIG", str(tmp_path / "config.toml"))
    seen: dict[str, Any] = {}

    def run(app: Any, **kwargs: Any) -> None:
        seen.update(app=app, **kwargs)

    def load(path: Any, rules: Any = None, device: str = "cpu") -> Any:
        seen.update(path=path, rules=rules, device=device)
        return tiny_llm

    monkeypatch.setattr(uvicorn, "run", run)
    monkeypatch.setattr(importlib.import_module("graftlm.api"), "load", load)
    return seen


def test_defaults_bind_loopback_and_name_the_model_by_its_file(captured: dict[str, Any]) -> None:
    assert main(["serve", "some/model.gguf", "--threads", "1"]) == 0
    assert (captured["host"], captured["port"]) == ("127.0.0.1", 8000)
    assert captured["path"] == "some/model.gguf" and captured["device"] == "cpu"
    assert captured["app"].state.served.name == "tiny"  # the stem of the file the model came from
    assert captured["access_log"] is False  # the app logs one line per request itself


def test_cli_beats_environment_beats_file(
    captured: dict[str, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "config.toml").write_text('port = 8100\nhost = "127.0.0.3"\nmodel = "m.gguf"\n')
    monkeypatch.setenv("GRAFTLM_PORT", "8200")
    assert main(["serve", "--threads", "1", "--model-name", "my-moe"]) == 0
    assert (captured["host"], captured["port"]) == ("127.0.0.3", 8200)
    assert captured["path"] == str(tmp_path / "m.gguf")
    assert captured["app"].state.served.name == "my-moe"
    assert main(["serve", "--threads", "1", "--port", "8300"]) == 0
    assert captured["port"] == 8300


def test_a_public_address_is_warned_about(captured: dict[str, Any], caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="graftlm.cli.serve")
    assert main(["serve", "x.gguf", "--threads", "1", "--host", "0.0.0.0"]) == 0
    assert captured["host"] == "0.0.0.0"
    assert any("no authentication" in r.getMessage() for r in caplog.records)
