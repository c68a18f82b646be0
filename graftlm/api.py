"""The public Python API: `graftlm.load(path) -> LLM`."""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from graftlm.engine.generate import Engine, GenerationResult
from graftlm.models.loader import load_module_params, weight_tensors
from graftlm.weights.open import ModelFiles, open_weights

log = logging.getLogger(__name__)


class LLM:
    """A loaded model: `.model` (a torch module returning HF-style logits), `.tokenizer`, `.config`."""

    def __init__(
        self, model: nn.Module, tokenizer, config, *, files: ModelFiles | None = None, device: str = "cpu"
    ):
        self.model = model
        self.tokenizer = tokenizer
        self.config = config
        self.files = files
        self.device = torch.device(device)
        self.engine = Engine(model, tokenizer, device=self.device)

    def generate(self, prompt: str | list[int], **kwargs: Any) -> GenerationResult:
        """Generate from a prompt string or token ids; kwargs are SamplingParams fields and callbacks."""
        return self.engine.generate(prompt, **kwargs)

    def chat(self, messages: list[dict], **kwargs: Any) -> GenerationResult:
        """One assistant turn for `messages`, with the model's chat template."""
        return self.engine.generate(self.engine.encode_chat(messages), **kwargs)

    def __repr__(self) -> str:
        return f"LLM({type(self.model).__name__}, path={self.files.path if self.files else None!r}, device={self.device})"


def load(
    path: str | Path,
    rules: Any = None,
    device: str = "cpu",
    *,
    dtype: torch.dtype = torch.float32,
    hf_dir: str | Path | None = None,
    progress: bool = True,
    gpu_memory: str | int | None = None,
    cpu_memory: str | int | None = None,
    gpu_weights: str = "dtype",
    sparse: Any = None,
    mmap: bool = True,
) -> LLM:
    """Load a GGUF file or HF folder into its transformers architecture.

    `rules=None` (or "none", as on the command line) keeps every module a plain torch module on
    `device`; otherwise `rules` is
    "auto", "builtin:NAME", a YAML path or a list of rule dicts (see docs/rules.md).
    `gpu_memory` ("12GiB") plans the rules from a budget instead (graftlm/inject/placement.py):
    the dense part and as many routed-expert layers as fit go to `device` ("cuda:0" when left
    at "cpu"), the rest to the CPU, checked against `cpu_memory` when given; `gpu_weights="int4"`
    keeps the accelerator's linear and expert weights int4 (linear.gpu, experts.gpu).
    `sparse` (a dict, "key=value,..." or SparseSettings; True for the defaults) puts a block-sparse
    attention operator (`attention.sparse`, graftlm/ops/attention/sparse.py) on every decoder
    attention module, before `rules`; `configure_sparse(llm.model, ...)` changes its settings later.
    `mmap=False` reads a GGUF's tensors into RAM (GGUFFile.read_into_memory) instead of leaving them
    memory-mapped: pages the kernel cannot drop; resident memory is the same once every weight is used.
    """
    start = time.perf_counter()
    if isinstance(rules, str) and rules == "none":
        rules = None
    files = open_weights(path, hf_dir=hf_dir, mmap=mmap, progress=progress)
    model = files.meta_model
    if gpu_memory is not None or cpu_memory is not None or gpu_weights != "dtype":
        rules, device = _placed_rules(files, rules, device, dtype, gpu_memory, cpu_memory, gpu_weights)
    if rules is None and (sparse is None or sparse is False):
        from graftlm.inject.apply import check_device

        check_device(device, "the requested device")
        loaded = load_module_params(model, "", files.source, device=device, dtype=dtype, progress=progress)
        log.info(
            "loaded %d tensors (%.0f MB at %s) from %s as %s in %.1f s",
            len(loaded),
            sum(t.numel() * t.element_size() for t in weight_tensors(model).values()) / 1e6,
            str(dtype).removeprefix("torch."),
            files.path,
            type(model).__name__,
            time.perf_counter() - start,
        )
        if getattr(files.config, "tie_word_embeddings", False):
            model.tie_weights()  # loading replaced the shared Parameter; point the head at it again
    else:
        from graftlm import inject

        ruleset = inject.load_rules(rules, arch=files.arch, device=device)
        if sparse is not None and sparse is not False:
            ruleset = _with_sparse(ruleset, sparse)
        plan = inject.plan(model, ruleset, default_device=device)
        model = inject.apply(model, plan, source=files.source, config=files.config, dtype=dtype)
    _finish(model, files)
    tokenizer = files.load_tokenizer()
    return LLM(model, tokenizer, files.config, files=files, device=device)


def _with_sparse(ruleset: Any, sparse: Any) -> Any:
    """`ruleset` with the block-sparse attention rule tried first."""
    import dataclasses

    from graftlm.inject import RuleSet, load_rules
    from graftlm.ops.attention.sparse import sparse_rules

    first = load_rules(sparse_rules(sparse))
    # The sparse rule takes every decoder attention module, so the given rules' own attention rules
    # match nothing by design: optional, so that planning does not warn about them.
    given = [
        dataclasses.replace(r, optional=True) if r.op.startswith("attention.") else r for r in ruleset.rules
    ]
    rules = [dataclasses.replace(r, index=i) for i, r in enumerate([*first.rules, *given])]
    return RuleSet(rules, f"sparse attention + {ruleset.source}")


def _placed_rules(
    files: ModelFiles,
    rules: Any,
    device: str,
    dtype: torch.dtype,
    gpu_memory: str | int | None,
    cpu_memory: str | int | None,
    gpu_weights: str,
) -> tuple[list[dict], str]:
    from graftlm.inject.placement import PlacementError, plan_placement

    if gpu_memory is None:
        raise PlacementError("cpu_memory and gpu_weights plan a GPU + CPU split and need gpu_memory as well")
    if rules not in (None, "auto"):
        raise PlacementError("gpu_memory plans the rules itself: pass rules or a memory budget, not both")
    gpu = "cuda:0" if str(device) == "cpu" else str(device)
    placement = plan_placement(
        files.meta_model,
        files.config,
        device=gpu,
        gpu_memory=gpu_memory,
        cpu_memory=cpu_memory,
        source=files.source,
        dtype=dtype,
        gpu_weights=gpu_weights,
    )
    log.info("%s", placement.summary())
    return placement.rules, gpu


def _finish(model: nn.Module, files: ModelFiles) -> None:
    """Check that every parameter is loaded and apply file-level hooks."""
    leftover = [n for n, p in model.named_parameters() if p.is_meta]
    if leftover:
        raise RuntimeError(f"parameters left on the meta device after loading: {leftover[:5]}")
    if files.gguf is not None and "rope_freqs.weight" in files.gguf.tensors:
        _apply_rope_freqs(model, files)


def _apply_rope_freqs(model: nn.Module, files: ModelFiles) -> None:
    """Llama-3-style RoPE scaling: llama.cpp divides each frequency by the file's `rope_freqs`."""
    rope = getattr(files.config, "rope_parameters", None) or {}
    if rope.get("rope_type", "default") != "default":
        log.info(
            "%s: rope_freqs ignored, the HF config already gives RoPE type %s", files.path, rope["rope_type"]
        )
        return
    factors = files.source.dequantized("rope_freqs.weight")  # type: ignore[attr-defined]
    for sub in model.modules():
        inv = getattr(sub, "inv_freq", None)
        if isinstance(inv, torch.Tensor) and inv.shape == factors.shape:
            sub.inv_freq = inv / factors.to(inv)
            if isinstance(getattr(sub, "original_inv_freq", None), torch.Tensor):
                sub.original_inv_freq = sub.inv_freq.clone()
