"""Open a model path: a GGUF file, an HF folder with a GGUF, or an HF safetensors folder."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import transformers
from huggingface_hub.errors import StrictDataclassError
from torch import nn

from graftlm.errors import GGUFFormatError, GraftError, WeightMappingError
from graftlm.models.build import build_meta_model
from graftlm.models.config import config_from_gguf
from graftlm.models.loader import weight_shapes
from graftlm.weights.gguf_file import GGUFFile
from graftlm.weights.gguf_source import GGUFSource
from graftlm.weights.names import NameTable
from graftlm.weights.safetensors_source import SafetensorsSource
from graftlm.weights.source import WeightSource

log = logging.getLogger(__name__)


@dataclass
class ModelFiles:
    """Everything a model path provides, before any weight is read."""

    path: str
    source: WeightSource
    config: transformers.PretrainedConfig
    arch: str  # GGUF architecture name ("deepseek2", "qwen2moe", ...) or HF model_type for safetensors
    meta_model: nn.Module  # the architecture on the meta device, already checked against the source
    load_tokenizer: Callable[[], transformers.PreTrainedTokenizerBase]
    gguf: GGUFFile | None = None


def _check_vocab(config, file: GGUFFile) -> None:
    if "token_embd.weight" in file.tensors:
        rows = file.shape("token_embd.weight")[0]
        if getattr(config, "vocab_size", None) != rows:
            config.vocab_size = rows


# What metadata that describes no buildable model raises from config_from_gguf or transformers
# (whose configs validate their fields as huggingface_hub strict dataclasses).
_UNBUILDABLE = (
    ValueError,
    TypeError,
    ArithmeticError,
    IndexError,
    RuntimeError,
    AssertionError,  # torch's nn.Embedding asserts its padding_idx
    StrictDataclassError,
)
# Special tokens the config (pad) and transformers' GGUF tokenizer look up in the vocabulary.
_SPECIAL_TOKEN_IDS = ("bos_token_id", "eos_token_id", "unknown_token_id", "padding_token_id")


def _check_block_count(file: GGUFFile) -> None:
    """A damaged block count must not make transformers build a 2**31-entry `layer_types` first."""
    key = f"{file.arch}.block_count"
    try:
        layers = float(file.metadata.get(key))  # config_from_gguf calls int() on it
    except (TypeError, ValueError):
        return  # absent or not a number: config_from_gguf says so
    blocks = {n.split(".")[1] for n in file.tensors if n.startswith("blk.")}
    if not layers <= len(blocks):
        raise WeightMappingError(
            f"{file.path}: metadata '{key}' gives {file.metadata[key]} layers, "
            f"but the file has tensors for {len(blocks)}"
        )


def _gguf_config(file: GGUFFile):
    _check_block_count(file)
    try:
        config = config_from_gguf(file.arch, file.metadata, frozenset(file.tensors), path=file.path)
    except GraftError as exc:
        if file.path in str(exc):
            raise
        raise type(exc)(f"{file.path}: {exc}") from None
    except _UNBUILDABLE as exc:
        raise GGUFFormatError(
            f"{file.path}: the metadata makes no '{file.arch}' config ({type(exc).__name__}: {exc})"
        ) from None
    _check_vocab(config, file)
    return config


def _probe_shapes(config, file: GGUFFile) -> dict[str, tuple[int, ...]]:
    """The weight shapes `config` gives, found without allocating anything, to check against the file.

    build_meta_model creates each parameter on the CPU before moving it to the meta device, so
    damaged metadata (a head count of 2**24) must be caught before it runs.
    """
    try:
        with torch.device("meta"):
            probe = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    except _UNBUILDABLE as exc:
        raise GGUFFormatError(
            f"{file.path}: no '{type(config).__name__}' model can be built from this metadata "
            f"({type(exc).__name__}: {exc})"
        ) from None
    return weight_shapes(probe)


def _check_special_tokens(file: GGUFFile) -> None:
    """An id past the vocabulary's end: an IndexError in transformers' tokenizer, an assert in nn.Embedding."""
    n = file.array_len("tokenizer.ggml.tokens")
    for key in (f"tokenizer.ggml.{k}" for k in _SPECIAL_TOKEN_IDS):
        value = file.metadata.get(key)
        if n is not None and isinstance(value, int) and not -n <= value < n:
            raise GGUFFormatError(
                f"{file.path}: metadata '{key}' is {value}, but the vocabulary has {n} tokens"
            )


def open_weights(
    path: str | Path, *, hf_dir: str | Path | None = None, mmap: bool = True, progress: bool = True
) -> ModelFiles:
    """Open `path` and bind its weights to the HF architecture it describes.

    `path` may be a .gguf file, a folder holding config.json plus one .gguf (or plus safetensors),
    and `hf_dir` names an HF folder whose config and tokenizer override the GGUF's. `mmap=False`
    reads a GGUF's tensors into RAM instead of leaving them memory-mapped
    (GGUFFile.read_into_memory); safetensors are read by the safetensors library either way.
    """
    from graftlm.models.tokenizer import tokenizer_from_folder, tokenizer_from_gguf

    p = Path(path)
    if not p.exists():
        raise GraftError(f"{p}: no such file or folder")
    if p.is_dir():
        has_config = (p / "config.json").is_file()
        if has_config and any(p.glob("*.safetensors")):
            if not mmap:
                log.info(
                    "%s: safetensors weights are read by the safetensors library; mmap=False applies to GGUF",
                    p,
                )
            return _open_safetensors(p)
        ggufs = sorted(p.glob("*.gguf"))
        if len(ggufs) != 1:
            raise GraftError(
                f"{p}: a model folder needs config.json with *.safetensors, or exactly one .gguf "
                f"(found {len(ggufs)}: {', '.join(g.name for g in ggufs[:4])}); pass the file itself"
            )
        hf_dir = hf_dir or (p if has_config else None)
        p = ggufs[0]

    file = GGUFFile(p)
    if not mmap:
        file.read_into_memory(progress=progress)
    has_hf_tokenizer = hf_dir is not None and any(
        (Path(hf_dir) / n).is_file() for n in ("tokenizer.json", "tokenizer.model", "tokenizer_config.json")
    )
    if not has_hf_tokenizer:  # else neither the config nor the tokenizer comes from the GGUF
        _check_special_tokens(file)
    if hf_dir is not None:
        config = transformers.AutoConfig.from_pretrained(str(hf_dir))
    else:
        config = _gguf_config(file)
    shapes = _probe_shapes(config, file)
    source = GGUFSource(file, NameTable(file.arch, config, shapes, set(file.tensors)))
    source.check_shapes(shapes)
    model = build_meta_model(config)
    template = file.metadata.get("tokenizer.chat_template")
    if has_hf_tokenizer:
        load_tok = lambda: tokenizer_from_folder(str(hf_dir), file.arch)  # noqa: E731
    else:
        load_tok = lambda: tokenizer_from_gguf(file.path, file.arch, template)  # noqa: E731
    return ModelFiles(str(p), source, config, file.arch, model, load_tok, gguf=file)


def _open_safetensors(folder: Path) -> ModelFiles:
    from graftlm.models.tokenizer import tokenizer_from_folder

    config = transformers.AutoConfig.from_pretrained(str(folder))
    model = build_meta_model(config)
    source = SafetensorsSource(folder)
    source.check_shapes(weight_shapes(model))
    arch = config.model_type
    return ModelFiles(
        str(folder), source, config, arch, model, lambda: tokenizer_from_folder(str(folder), arch)
    )
