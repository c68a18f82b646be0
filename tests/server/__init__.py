"""Tests of graftlm.server; tests that need fastapi/uvicorn skip without the serve extra."""
