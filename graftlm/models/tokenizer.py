"""Tokenizers from GGUF metadata (converted by transformers) or from an HF folder."""

from __future__ import annotations

import hashlib
import logging
import os
from pathlib import Path

from transformers import AutoTokenizer, PreTrainedTokenizerBase, PreTrainedTokenizerFast

from graftlm.errors import GGUFFormatError, GraftError

log = logging.getLogger(__name__)

# Chat templates for model families whose GGUF files often ship without one (base models).
_FAMILY_TEMPLATES = {
    "gemma3": (
        "{{ bos_token }}"
        "{% set sys = messages[0]['content'] | trim + '\\n\\n' if messages and messages[0]['role'] == 'system' else '' %}"
        "{% for m in (messages[1:] if sys else messages) %}"
        "{% set role = 'model' if m['role'] == 'assistant' else m['role'] %}"
        "{{ '<start_of_turn>' + role + '\\n' + (sys if loop.first else '') + m['content'] | trim + '<end_of_turn>\\n' }}"
        "{% endfor %}"
        "{% if add_generation_prompt %}{{ '<start_of_turn>model\\n' }}{% endif %}"
    ),
}


def _cache_dir(path: Path) -> Path:
    """Where the converted tokenizer of this exact file is kept (name, size and mtime decide)."""
    st = path.stat()
    key = hashlib.sha1(f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}".encode()).hexdigest()[:16]
    root = Path(
        os.environ.get(
            "GRAFTLM_CACHE", Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "graftlm"
        )
    )
    return root / "tokenizers" / key


def tokenizer_from_gguf(path: str, arch: str, chat_template: str | None) -> PreTrainedTokenizerBase:
    """The GGUF's vocabulary as an HF tokenizer, converted once and then read from a cache.

    Converting a large SentencePiece vocabulary (Gemma's 262K tokens) takes transformers tens of
    seconds; the converted tokenizer loads in about one. The cache is read back as the plain
    `tokenizers` pipeline it saved (tokenizer.json), not through the class transformers names for
    the architecture: that class rebuilds its own pipeline around the vocabulary, which is not the
    converted one when the file's tokenizer is not the architecture's usual kind (a byte-level BPE
    vocabulary in a gemma3 file: the rebuilt one failed on every space). The first run returns the
    same reloaded tokenizer, so a file tokenizes the same on every run.
    """
    p = Path(path)
    cache = _cache_dir(p)
    if not (cache / "tokenizer_config.json").is_file():
        tok = _convert_gguf_tokenizer(p)
        try:
            tok.save_pretrained(str(cache))
        except OSError as exc:
            log.info("could not cache the tokenizer in %s (%s)", cache, exc)
            _set_chat_template(tok, chat_template, arch, path)
            return tok
    try:
        tok = PreTrainedTokenizerFast.from_pretrained(str(cache))
    except (ValueError, KeyError, OSError, TypeError) as exc:
        log.warning("ignoring unreadable tokenizer cache %s (%s)", cache, exc)
        tok = _convert_gguf_tokenizer(p)
    _set_chat_template(tok, chat_template, arch, path)
    return tok


def _convert_gguf_tokenizer(p: Path) -> PreTrainedTokenizerBase:
    """The GGUF vocabulary converted by transformers.

    AutoTokenizer picks the model's own tokenizer class, but only for architectures whose config
    transformers can read from GGUF; PreTrainedTokenizerFast runs the same vocabulary converter for
    the others. A vocabulary the converter or the `tokenizers` library rejects (which raises a bare
    Exception) is a GGUFFormatError naming the file.
    """
    try:
        try:
            return AutoTokenizer.from_pretrained(str(p.parent), gguf_file=p.name)
        except ValueError as exc:
            if "is not supported" not in str(exc):
                raise
            return PreTrainedTokenizerFast.from_pretrained(str(p.parent), gguf_file=p.name)
    except Exception as exc:  # noqa: BLE001 - see the docstring
        raise GGUFFormatError(
            f"{p}: no tokenizer can be built from the GGUF vocabulary ({type(exc).__name__}: {exc})"
        ) from None


def tokenizer_from_folder(folder: str, arch: str) -> PreTrainedTokenizerBase:
    try:
        tok = AutoTokenizer.from_pretrained(folder)
    except (ValueError, KeyError, OSError, TypeError) as exc:
        raise GraftError(f"{folder}: cannot load the tokenizer ({exc})") from None
    _set_chat_template(tok, tok.chat_template, arch, folder)
    return tok


def _set_chat_template(tok: PreTrainedTokenizerBase, template: str | None, arch: str, where: str) -> None:
    if template:
        tok.chat_template = template
    elif arch in _FAMILY_TEMPLATES:
        log.info("%s has no chat template; using graftlm's built-in %s template", where, arch)
        tok.chat_template = _FAMILY_TEMPLATES[arch]
