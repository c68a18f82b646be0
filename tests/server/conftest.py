"""A live graftlm server on a free loopback port, serving a tiny random MoE model (GGUF)."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import torch

CHAT_TEMPLATE = (
    "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant:{% endif %}"
)
MAX_BODY_BYTES = 256 * 1024
MODEL_NAME = "tiny"


@pytest.fixture(scope="session")
def tiny_llm(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """graftlm.load of a tiny qwen3_moe GGUF, with a plain chat template added."""
    pytest.importorskip("fastapi", reason="the server needs the 'serve' extra (fastapi)")
    pytest.importorskip("uvicorn", reason="the server needs the 'serve' extra (uvicorn)")
    import graftlm
    from graftlm.weights.convert import convert
    from tests.models.tiny import make_model

    torch.set_num_threads(1)
    folder = tmp_path_factory.mktemp("server_model")
    make_model("qwen3_moe", folder / "hf")
    convert(folder / "hf", folder / f"{MODEL_NAME}.gguf", "f32")
    llm = graftlm.load(folder / f"{MODEL_NAME}.gguf", progress=False)
    llm.tokenizer.chat_template = CHAT_TEMPLATE
    return llm


class LiveServer:
    """uvicorn running create_app(llm) on a thread of this process."""

    def __init__(self, llm: Any) -> None:
        import uvicorn

        from graftlm.server import create_app

        self.llm = llm
        self.app = create_app(llm, max_body_bytes=MAX_BODY_BYTES, default_max_tokens=32)
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.bind(("127.0.0.1", 0))
        self.port = sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        config = uvicorn.Config(self.app, log_config=None, access_log=False, timeout_graceful_shutdown=2)
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(
            target=self.server.run, kwargs={"sockets": [sock]}, name="test-uvicorn", daemon=True
        )
        self.thread.start()
        self.wait_for(lambda: self.server.started, timeout=20, what="the server to start")

    @property
    def worker(self) -> Any:
        return self.app.state.served.worker

    def stats(self) -> dict[str, Any]:
        return self.worker.snapshot()

    def wait_for(self, predicate: Callable[[], Any], timeout: float = 10.0, what: str = "a condition") -> Any:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            value = predicate()
            if value:
                return value
            time.sleep(0.02)
        raise AssertionError(f"timed out after {timeout} s waiting for {what}")

    def wait_idle(self, timeout: float = 20.0) -> None:
        """Until no request runs or waits, so the test may use the engine itself."""

        def idle() -> bool:
            s = self.stats()
            return s["active"] is None and s["queued"] == 0

        self.wait_for(idle, timeout, "the server to be idle")

    def finished(self, job_id_prefix: str = "", since: int = 0) -> list[dict[str, Any]]:
        return [r for r in self.stats()["recent"][since:] if r["id"].startswith(job_id_prefix)]

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(10)


@pytest.fixture(scope="session")
def live_server(tiny_llm: Any) -> Iterator[LiveServer]:
    server = LiveServer(tiny_llm)
    yield server
    server.stop()


@pytest.fixture
def reference(live_server: LiveServer) -> Any:
    """The LLM itself, for expected outputs; used only while the server is idle."""
    live_server.wait_idle()
    return live_server.llm


@pytest.fixture
def slow_model(live_server: LiveServer, monkeypatch: pytest.MonkeyPatch) -> dict[str, float]:
    """Every model call sleeps `delay["seconds"]` first, so a generation lasts long enough to
    disconnect from it; restored (after the server is idle again) at the end of the test."""
    engine = live_server.llm.engine
    original = engine.forward
    delay = {"seconds": 0.03}

    def forward(*args: Any, **kwargs: Any) -> Any:
        time.sleep(delay["seconds"])
        return original(*args, **kwargs)

    live_server.wait_idle()
    monkeypatch.setattr(engine, "forward", forward)
    yield delay
    delay["seconds"] = 0.0
    live_server.wait_idle()
