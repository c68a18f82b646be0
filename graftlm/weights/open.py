"""Open a model path: a GGUF file, an HF folder with a GGUF, or an HF safetensors folder."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import transformers
from torch import nn

from graftlm.errors import GraftError
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


def open_weights(path: str | Path, *, hf_dir: str | Path | None = None) -> ModelFiles:
    """Open `path` and bind its weights to the HF architecture it describes.

    `path` may be a .gguf file, a folder holding config.json plus one .gguf (or plus safetensors),
    and `hf_dir` names an HF folder whose config and tokenizer override the GGUF's.
    """
    from graftlm.models.tokenizer import tokenizer_from_folder, tokenizer_from_gguf

    p = Path(path)
    if not p.exists():
        raise GraftError(f"{p}: no such file or folder")
    if p.is_dir():
        has_config = (p / "config.json").is_file()
        if has_config and any(p.glob("*.safetensors")):
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
    if hf_dir is not None:
        config = transformers.AutoConfig.from_pretrained(str(hf_dir))
    else:
        config = config_from_gguf(file.arch, file.metadata, frozenset(file.tensors), path=str(p))
        _check_vocab(config, file)
    model = build_meta_model(config)
    shapes = weight_shapes(model)
    source = GGUFSource(file, NameTable(file.arch, config, shapes, set(file.tensors)))
    source.check_shapes(shapes)
    template = file.metadata.get("tokenizer.chat_template")
    has_hf_tokenizer = hf_dir is not None and any(
        (Path(hf_dir) / n).is_file() for n in ("tokenizer.json", "tokenizer.model", "tokenizer_config.json")
    )
    if has_hf_tokenizer:
        load_tok = lambda: tokenizer_from_folder(str(hf_dir), file.arch)  # noqa: E731
    else:
        load_tok = lambda: tokenizer_from_gguf(str(p), file.arch, template)  # noqa: E731
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
