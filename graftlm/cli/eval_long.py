"""`graftlm eval-long MODEL --task TASK --length N`: long-context retrieval accuracy under dense
and block-sparse attention.

The task's samples are generated (seeded, deterministic) and fitted to each length in the model's
own tokens, chat template included; every setting runs every sample greedily on one loaded model.
A table gives the accuracy (%) per setting and length, and prefill and decode tok/s.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from graftlm.cli.common import add_model_args, load_llm
from graftlm.errors import GraftError
from graftlm.longctx import eval as longeval
from graftlm.longctx.tasks import DEFAULT_DEPTHS, TASKS, PromptFormat, build_samples, get_task


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "eval-long",
        help="long-context retrieval accuracy, dense vs block-sparse attention",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_model_args(p)
    p.add_argument("--task", required=True, choices=list(TASKS), help="the task")
    p.add_argument(
        "--length",
        action="append",
        metavar="N[,N...]",
        help="prompt length(s) in the model's tokens, chat template included (repeatable; default 4096)",
    )
    p.add_argument(
        "--depths",
        default=",".join(f"{d:g}" for d in DEFAULT_DEPTHS),
        metavar="D,D,...",
        help="needle depths, fractions of the haystack (default 0,0.1,...,0.9)",
    )
    p.add_argument(
        "--samples",
        type=int,
        metavar="N",
        help="samples per length, taking the depths in turn (default: one per depth)",
    )
    p.add_argument(
        "--seed", type=int, default=0, metavar="S", help="seed of the generated samples (default 0)"
    )
    p.add_argument(
        "--setting",
        action="append",
        default=[],
        metavar="NAME=K=V,...",
        help="an attention setting to compare (repeatable): SparseSettings fields, e.g. 'dense=enabled=false', "
        "'top8=topk=8,anchor_type=quest', plus budget=N to size the blocks to 1/N of the length "
        "(default: dense and sparse at a 1/8 budget)",
    )
    p.add_argument(
        "--ladder",
        action="store_true",
        help="compare dense; sparse; + preselect; + dense_layers=1 (all at a 1/8 budget)",
    )
    p.add_argument(
        "--no-chat", action="store_true", help="raw text prompts even when there is a chat template"
    )
    p.add_argument(
        "--no-answer-prefix",
        action="store_true",
        help="do not start the answer ('The pass key is', RULER's answer prefix) after the prompt",
    )
    p.add_argument(
        "--max-new-tokens",
        type=int,
        metavar="N",
        help="tokens to generate (default 16 for passkey and number_string, 48 for kv_retrieval, 24 for niah)",
    )
    p.add_argument("--by-depth", action="store_true", help="also give the accuracy per depth")
    p.add_argument("--json", type=Path, metavar="PATH", help="write every sample's result to PATH")
    p.set_defaults(func=main)


def _ints(values: list[str] | None, default: int) -> list[int]:
    out = []
    for item in ",".join(values or [str(default)]).split(","):
        try:
            n = int(item)
        except ValueError:
            raise GraftError(f"--length takes whole numbers, got {item!r}") from None
        if n < 1:
            raise GraftError(f"--length must be positive, got {n}")
        out.append(n)
    return list(dict.fromkeys(out))


def _depths(text: str) -> list[float]:
    try:
        depths = [float(d) for d in text.split(",") if d.strip()]
    except ValueError:
        raise GraftError(f"--depths takes fractions separated by commas, got {text!r}") from None
    bad = [d for d in depths if not 0.0 <= d <= 1.0]
    if bad or not depths:
        raise GraftError(f"--depths must be fractions in 0..1, got {text!r}")
    return depths


def main(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    task = get_task(args.task)
    lengths = _ints(args.length, 4096)
    depths = _depths(args.depths)
    if args.samples is not None and args.samples < 1:
        raise GraftError("--samples must be at least 1")
    n_samples = args.samples or len(depths)
    max_new = args.max_new_tokens or task.max_new_tokens
    settings = [longeval.parse_setting(s) for s in args.setting]
    if args.sparse is not None:  # the model flags' --sparse: one more setting
        settings.append(longeval.parse_setting(f"--sparse={args.sparse}"))
    if args.ladder:
        settings = longeval.ladder_settings() + settings
    settings = settings or longeval.default_settings()
    names = [s.name for s in settings]
    if len(set(names)) != len(names):
        raise GraftError(f"settings need distinct names, got {', '.join(names)}")

    # Loaded once with the operator when any setting is sparse; each setting configures it.
    args.sparse = "" if longeval.needs_sparse(settings) else None
    llm = load_llm(args)
    context = longeval.model_context(llm)
    budgets = {n: longeval.prompt_budget(n, context, max_new) for n in lengths}
    chat = llm.engine.has_chat_template and not args.no_chat
    fmt = PromptFormat(llm.tokenizer, llm.engine.encode_chat if chat else None, not args.no_answer_prefix)

    with tqdm(total=len(lengths) * n_samples, desc="prompts", unit="sample", disable=None) as bar:
        samples = build_samples(
            task, fmt, lengths, depths, n_samples, args.seed, budgets, on_sample=lambda _: bar.update()
        )
    with tqdm(total=len(settings) * len(samples), desc="samples", unit="sample", disable=None) as bar:

        def progress(result: longeval.Result) -> None:
            bar.set_postfix_str(f"{result.setting} @{result.length}", refresh=False)
            bar.update()

        reports = longeval.evaluate(llm, samples, settings, max_new, on_result=progress)

    print(
        f"{task.name}: {n_samples} samples per length (seed {args.seed}), "
        f"{'chat template' if chat else 'raw prompts'}, greedy, {max_new} new tokens at most"
    )
    print(longeval.format_table(reports, lengths, by_depth=args.by_depth))
    if args.json:
        doc = {
            "task": task.name,
            "model": str(getattr(getattr(llm, "files", None), "path", args.model)),
            "lengths": lengths,
            "depths": depths,
            "samples_per_length": n_samples,
            "seed": args.seed,
            "chat": chat,
            "answer_prefix": not args.no_answer_prefix,
            "max_new_tokens": max_new,
            "settings": [r.to_dict() for r in reports],
        }
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(doc, indent=1) + "\n")
        print(f"wrote {args.json}", file=sys.stderr)
    return 0
