"""Options shared by the generating subcommands (run, chat, ...) and the model loading they do."""

from __future__ import annotations

import argparse
import importlib
import logging
import os
from pathlib import Path
from typing import Any

import torch

from graftlm import userconfig
from graftlm.errors import GraftError

log = logging.getLogger(__name__)


def add_model_args(parser: argparse.ArgumentParser) -> None:
    """MODEL (optional: the demo model), --rules, --device, --threads."""
    parser.add_argument(
        "model", nargs="?", metavar="MODEL", help="GGUF file or HF folder (default: the demo model)"
    )
    parser.add_argument(
        "--rules",
        metavar="RULES",
        help="injection rules: a YAML file, builtin:NAME, 'auto' (default on a CPU: graftlm's operators on "
        "the quantized weights) or 'none' (plain torch modules, weights dequantized to --device's dtype)",
    )
    parser.add_argument(
        "--device", default=None, help="device for the model's inputs and dense layers (default: cpu)"
    )
    add_budget_args(parser)
    add_sparse_args(parser)
    parser.add_argument(
        "--threads",
        type=at_least(0, " (0: the number of physical cores)"),
        metavar="N",
        help="torch CPU threads (default, or 0: the number of physical cores available)",
    )
    parser.add_argument(
        "--no-mmap",
        dest="mmap",
        action="store_false",
        help="read a GGUF's weights into RAM instead of memory-mapping the file: a slower load, pages the "
        "kernel cannot drop under memory pressure, the same resident memory once every weight is used",
    )


def add_sparse_args(parser: argparse.ArgumentParser) -> None:
    """--sparse [KEY=VALUE,...]: block-sparse attention for long contexts (attention.sparse)."""
    parser.add_argument(
        "--sparse",
        nargs="?",
        const="",
        metavar="KEY=VALUE,...",
        help="block-sparse decode attention over a block KV cache (GQA models; docs/long-context.md). "
        "Keys: block_size (128), initial_blocks (1), local_window (512), topk (16), anchor_type "
        "(max|mean|quest|dynamic, default quest), anchor_num (1), head_select (shared|per_head), "
        "preselect (false), preselect_blocks (64), observe (32), dense_layers (0), kv_dtype, "
        "cache_tokens; e.g. --sparse topk=8,preselect=true",
    )


def sparse_settings(args: argparse.Namespace) -> Any:
    """SparseSettings from --sparse, or None when it is not given."""
    text = getattr(args, "sparse", None)
    if text is None:
        return None
    from graftlm.ops.attention.sparse import SparseSettings

    try:
        return SparseSettings.parse(text)
    except ValueError as exc:
        raise GraftError(f"--sparse: {exc}") from None


def add_budget_args(parser: argparse.ArgumentParser) -> None:
    """--gpu-memory, --cpu-memory, --gpu-weights: rules planned from memory budgets
    (graftlm/inject/placement.py). Unset flags stay None, so loaders without budgets still work."""
    parser.add_argument(
        "--gpu-memory",
        metavar="SIZE",
        help="plan the placement from a GPU budget (e.g. 12GiB) on --device (cuda:0 when it is cpu): "
        "dense part first, then routed experts",
    )
    parser.add_argument(
        "--cpu-memory", metavar="SIZE", help="CPU budget the routed experts left for the CPU must fit"
    )
    parser.add_argument(
        "--gpu-weights",
        choices=("dtype", "int4"),
        help="with --gpu-memory: accelerator weights at the load dtype (default) or int4 (linear.gpu, experts.gpu)",
    )


def add_sampling_args(parser: argparse.ArgumentParser, max_new_tokens: int = 128) -> None:
    """The SamplingParams flags."""
    group = parser.add_argument_group("sampling")
    group.add_argument("--max-new-tokens", type=int, default=max_new_tokens, metavar="N")
    group.add_argument("--temperature", type=float, default=0.0, metavar="T", help="0 = greedy (default)")
    group.add_argument("--top-k", type=int, default=0, metavar="K", help="0 = off (default)")
    group.add_argument("--top-p", type=float, default=1.0, metavar="P")
    group.add_argument("--seed", type=int, metavar="S", help="seed for sampling (default: random)")
    group.add_argument(
        "--stop", action="append", default=[], metavar="STR", help="stop string (repeatable; not printed)"
    )
    group.add_argument(
        "--ignore-eos", action="store_true", help="keep generating past end-of-sequence tokens"
    )


def sampling_overrides(args: argparse.Namespace) -> dict[str, Any]:
    """The SamplingParams fields the sampling flags set."""
    return {
        "max_new_tokens": args.max_new_tokens,
        "temperature": args.temperature,
        "top_k": args.top_k,
        "top_p": args.top_p,
        "seed": args.seed,
        "stop": list(args.stop),
        "ignore_eos": args.ignore_eos,
    }


def physical_cores() -> int:
    """Physical cores this process may run on (hyper-threads share a core's memory bandwidth)."""
    try:
        allowed = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        allowed = os.cpu_count() or 1
    cores: set[tuple[str, str]] = set()
    physical, core = "0", None
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            key, value = key.strip(), value.strip()
            if key == "physical id":
                physical = value
            elif key == "core id":
                core = value
            elif not line.strip() and core is not None:
                cores.add((physical, core))
                core = None
        if core is not None:
            cores.add((physical, core))
    except OSError:
        pass
    return max(1, min(len(cores) or allowed, allowed))


def at_least(low: int, note: str = ""):
    """An argparse type: a whole number >= `low` (`note` says what the bound means)."""

    def parse(text: str) -> int:
        try:
            n = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
        if n < low:
            raise argparse.ArgumentTypeError(f"must be >= {low}{note}, got {n}")
        return n

    return parse


def set_threads(threads: int | None) -> int:
    """Set torch's intra-op threads: `threads`, or the physical core count."""
    n = threads if threads and threads > 0 else physical_cores()
    torch.set_num_threads(n)
    log.debug("using %d threads", n)
    return n


def load_llm(args: argparse.Namespace) -> Any:
    """Set threads, then load args.model (or the demo model) with graftlm.api.load."""
    # Flags left unset take their defaults from GRAFTLM_* variables, the user config, built-ins.
    userconfig.apply_defaults(args, ("model", "rules", "threads", "device"))
    set_threads(args.threads)
    if args.model:
        path: Path | str = args.model
    else:
        from graftlm.models.demo import demo_model_path

        path = demo_model_path()
    # Looked up at call time, so tests can substitute graftlm.api.load.
    api = importlib.import_module("graftlm.api")
    budgets = {
        k: v
        for k in ("gpu_memory", "cpu_memory", "gpu_weights")
        if (v := getattr(args, k, None)) is not None  # only when set: loaders without budgets still work
    }
    rules = cli_rules(args.rules, args.device, budgets)
    sparse = sparse_settings(args)
    if sparse is not None:  # only when set: loaders without it still work
        budgets["sparse"] = sparse
    if getattr(args, "mmap", True) is False:  # likewise
        budgets["mmap"] = False
    return api.load(path, rules=rules, device=args.device, **budgets)


def cli_rules(rules: str | None, device: str | None, budgets: dict) -> str | None:
    """The rules a CLI run uses: as given ('none' meaning no rules), else the built-in fast CPU
    operators when the model runs on the CPU and no memory budget plans the rules instead."""
    if rules is not None:
        return None if rules == "none" else rules
    if budgets or str(device or "cpu").split(":")[0] != "cpu":
        return None
    return "auto"


def summary(result: Any) -> str:
    """One line of token counts and speeds for a GenerationResult."""
    return (
        f"prompt {result.prompt_tokens} tokens, generated {len(result.token_ids)} tokens ({result.finish_reason}) | "
        f"prefill {result.prefill_tokens_per_second:.1f} tok/s, decode {result.decode_tokens_per_second:.1f} tok/s"
    )
