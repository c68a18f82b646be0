"""The HTTP server behind `graftlm serve`: OpenAI- and Ollama-compatible APIs and a chat page.

Needs the `serve` extra (fastapi, uvicorn). `create_app(llm)` is the entry point.
"""

from graftlm.server.app import create_app

__all__ = ["create_app"]
