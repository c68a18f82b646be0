"""`graftlm convert HF_DIR OUT.gguf --type f16`: an HF safetensors folder to GGUF."""

from __future__ import annotations

import argparse

from graftlm.weights.convert import OUT_TYPES, convert


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("convert", help="convert an HF safetensors folder to GGUF", description=__doc__)
    p.add_argument("hf_dir", help="folder with config.json, *.safetensors and tokenizer files")
    p.add_argument("out", help="output .gguf path")
    p.add_argument(
        "--type", dest="out_type", default="f16", choices=sorted(OUT_TYPES), help="tensor type (default f16)"
    )
    p.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    path = convert(args.hf_dir, args.out, args.out_type)
    print(f"wrote {path}")
    return 0
