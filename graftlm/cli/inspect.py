"""`graftlm inspect`: which rule, operator and device every module gets, without loading a weight.

The model is built on the meta device and the rules are matched against it, so this is instant
even for a 600B model. Byte counts are the parameters at `--dtype` (what loading at that dtype
holds); a module whose rule says `recursive: false` counts its whole subtree.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
from pathlib import Path
from typing import Any

import torch
from torch import nn

from graftlm.cli.common import add_budget_args
from graftlm.errors import GraftError, RuleError
from graftlm.inject import InjectionPlan, load_rules, plan
from graftlm.inject.apply import check_device
from graftlm.inject.placement import gpu_bytes, plan_placement
from graftlm.kernels.cpu.packed import auto_layout
from graftlm.ops.base import as_dtype
from graftlm.weights.gguf_source import GGUFSource

log = logging.getLogger(__name__)


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "inspect",
        help="show each module's rule, operator, device and size (reads no weights)",
        description=__doc__.splitlines()[0],
    )
    parser.add_argument(
        "model", nargs="?", metavar="MODEL", help="GGUF file or HF folder (default: the demo model)"
    )
    parser.add_argument(
        "--rules",
        default="auto",
        metavar="RULES",
        help="a YAML rule file, builtin:NAME, 'auto' (the built-in rules for the architecture; default) or 'none'",
    )
    parser.add_argument("--device", default="cpu", help="device of modules no rule places (default: cpu)")
    parser.add_argument("--dtype", default="float32", help="dtype the byte counts assume (default: float32)")
    parser.add_argument("--hf-dir", metavar="DIR", help="HF folder whose config overrides the GGUF's")
    parser.add_argument("--json", action="store_true", help="print the plan as JSON")
    parser.add_argument("--strict", action="store_true", help="a rule that matches no module is an error")
    add_budget_args(parser)
    parser.add_argument(
        "--write-rules", metavar="FILE", help="write the planned rules as a YAML file that reproduces them"
    )
    parser.set_defaults(func=main)


def human_bytes(n: int) -> str:
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} GiB"


# Operators that keep the file's quantized blocks (their `auto`/`gguf` layout), and those that keep
# int4 on an accelerator; any other module holds its weights at the plan's dtype.
_KEEP_BLOCKS = ("linear.cpu", "experts.cpu", "embedding.cpu")
_INT4 = ("linear.gpu", "experts.gpu")
# Bytes a weight takes in each torch layout (int4: 4 bits plus a bf16 scale and zero per 32);
# `gguf` keeps the file's blocks.
_WEIGHT_BYTES = {"int4": 0.625, "int8": 1.0, "bf16": 2.0, "f32": 4.0}


def _held_bytes(entry: dict, rule: Any, module: nn.Module | None, source: Any, itemsize: int) -> int:
    """What one planned module holds: for an operator on a GGUF's matrices, the layout it keeps them
    in (the stored blocks, sizes from the header, or the torch layout `auto_layout` or the rule
    picks); int4's 5/8 byte a weight for the accelerator int4 operators; else values at `itemsize`."""
    plain = entry["numel"] * itemsize
    op = getattr(getattr(rule, "op_cls", None), "op_name", None)
    if module is None or op not in (*_KEEP_BLOCKS, *_INT4):
        return plain
    layout = rule.kwargs.get("layout", "auto")
    if layout in _WEIGHT_BYTES:
        return int(entry["numel"] * _WEIGHT_BYTES[layout])
    if op in _INT4:
        return gpu_bytes(module, entry["path"], "int4", itemsize)
    if not isinstance(source, GGUFSource):
        return plain
    total = 0
    for name, p in module.named_parameters(prefix=entry["path"], recurse=entry["stops"]):
        if not source.has(name):
            total += p.numel() * itemsize
            continue
        for q in source.raw(name):
            kept = "gguf" if op == "embedding.cpu" or p.ndim < 2 else auto_layout(q.qtype, *q.shape[-2:])
            total += q.nbytes if kept == "gguf" else int(math.prod(q.shape) * _WEIGHT_BYTES[kept])
    return total


def report(
    p: InjectionPlan, dtype: torch.dtype = torch.float32, model: nn.Module | None = None, source: Any = None
) -> dict[str, Any]:
    """The plan as plain data. Byte counts are what each module holds once loaded: with `model` and
    `source`, operators that keep the file's blocks count those; everything else is at `dtype`."""
    itemsize = torch.empty(0, dtype=dtype).element_size()
    data = p.to_dict()
    totals: dict[str, int] = {}
    for module in data["modules"]:
        del module["param_bytes"]  # at the meta model's dtype; report at `dtype` instead
        rule = p.rules[module["rule"]] if module["rule"] is not None else None
        sub = model.get_submodule(module["path"]) if model is not None else None
        module["bytes"] = _held_bytes(module, rule, sub, source, itemsize) if module["numel"] else 0
        totals[module["device"]] = totals.get(module["device"], 0) + module["bytes"]
    data["totals"] = totals
    data["dtype"] = str(dtype).removeprefix("torch.")
    return data


def format_report(data: dict[str, Any]) -> str:
    rows = [("MODULE", "CLASS", "RULE", "OPERATOR", "DEVICE", "BYTES")]
    for m in data["modules"]:
        rule = "-" if m["rule"] is None else str(m["rule"])
        op = m["op"] or "-"
        if m["stops"]:
            op += " (whole subtree)"
        rows.append((m["path"] or "(root)", m["cls"], rule, op, m["device"], human_bytes(m["bytes"])))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    lines.append("")
    lines.append(
        f"rules: {data['rules']}; default device: {data['default_device']}; bytes: what each module "
        f"holds (operators on the file's blocks: those; the rest at {data['dtype']})"
    )
    lines.append("totals per device:")
    for device, n in sorted(data["totals"].items()):
        lines.append(f"  {device}: {human_bytes(n)}")
    if data["unmatched_rules"]:
        lines.append("rules that matched no module:")
        for r in data["unmatched_rules"]:
            where = f"{r['file']}: rule {r['rule']}" + (f" (line {r['line']})" if r["line"] else "")
            optional = " (optional)" if r["optional"] else ""
            lines.append(f"  rule {r['index']} -> {r['op']}{optional}  [{where}]")
    else:
        lines.append("every rule matched at least one module")
    return "\n".join(lines)


def main(args: argparse.Namespace) -> int:
    from graftlm.weights.open import open_weights

    if args.model:
        path = args.model
    else:
        from graftlm.models.demo import demo_model_path

        path = demo_model_path()
    try:
        dtype = as_dtype(args.dtype)
    except ValueError as exc:
        raise GraftError(str(exc)) from None
    files = open_weights(path, hf_dir=args.hf_dir)
    device, spec, placement = args.device, None if args.rules == "none" else args.rules, None
    if args.gpu_memory is not None or args.cpu_memory is not None:
        if args.gpu_memory is None:
            raise GraftError("--cpu-memory plans a GPU + CPU split and needs --gpu-memory as well")
        if args.rules != "auto":
            raise GraftError("--gpu-memory plans the rules itself: pass --rules or a memory budget, not both")
        device = "cuda:0" if device == "cpu" else device
        placement = plan_placement(
            files.meta_model,
            files.config,
            device=device,
            gpu_memory=args.gpu_memory,
            cpu_memory=args.cpu_memory,
            source=files.source,
            dtype=dtype,
            gpu_weights=args.gpu_weights or "dtype",
        )
        spec = placement.rules
    elif args.write_rules:
        raise GraftError("--write-rules writes a planned placement: give --gpu-memory")
    rules = load_rules(spec, arch=files.arch, device=device)
    p = plan(files.meta_model, rules, default_device=device, strict=args.strict)
    data = report(p, dtype, files.meta_model, files.source)
    if placement is not None:
        data["placement"] = placement.summary()
        if args.write_rules:
            Path(args.write_rules).write_text(placement.to_yaml())
            data["placement"] += f"; rules written to {args.write_rules}"
    for device in sorted(data["totals"]):  # a plan for another machine is fine; say it will not run here
        try:
            check_device(device, "this plan")
        except RuleError as exc:
            log.warning("%s; loading it here would fail", exc)
    if args.json:
        json.dump(data, sys.stdout, indent=1)
        sys.stdout.write("\n")
    else:
        print(format_report(data))
        if placement is not None:
            print(data["placement"])
    return 0
