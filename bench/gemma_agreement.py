"""Top-1 agreement with llama.cpp on the real Gemma 3 270M, for several ways of running it.

    python bench/gemma_agreement.py

Uses the reference in tests/data/gemma3_llamacpp_ref.json (tools/llamacpp_reference.py records
it): teacher-forced top-1 over every position, near ties (llama.cpp's margin < 0.1, we pick its
second) counted as agreement, and the disagreements where llama.cpp's margin exceeds 0.5 listed.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

import graftlm
from graftlm.models.demo import demo_model_path

REF = Path(__file__).parent.parent / "tests" / "data" / "gemma3_llamacpp_ref.json"
ALL_BF16 = [
    {"match": {"name": r"^(model\.layers\.|lm_head$)", "class": "torch.nn.Linear"},
     "replace": {"class": "linear.cpu", "kwargs": {"layout": "bf16"}}},
    {"match": {"name": r"^model\.rotary_emb$"}, "replace": {"class": "rope"}},
]  # fmt: skip
SETTINGS = {"rules=None (fp32)": None, 'rules="auto"': "auto", "linear.cpu layout bf16": ALL_BF16}


def agreement(llm, ref: dict) -> tuple[int, int, list]:
    agree = total = 0
    confident = []
    for p in ref["prompts"]:
        with torch.inference_mode():
            ours = (
                llm.model(torch.tensor([p["prompt_ids"] + p["generated_ids"]])).logits[0].argmax(-1).tolist()
            )
        for i, (ids, vals) in enumerate(zip(p["topk_ids"], p["topk_logits"])):
            total += 1
            margin = vals[0] - vals[1]
            if ours[i] == ids[0] or (margin < 0.1 and ours[i] == ids[1]):
                agree += 1
            elif margin > 0.5:
                confident.append(f"{p['name']}/{i} ({margin:.3f})")
    return agree, total, confident


def main() -> None:
    ref = json.loads(REF.read_text())
    torch.set_num_threads(2)
    for name, rules in SETTINGS.items():
        agree, total, confident = agreement(graftlm.load(demo_model_path(), rules=rules, progress=False), ref)
        print(f"{name:26s} {agree}/{total} = {agree / total:.3f}; margin > 0.5 disagreements: {confident}")


if __name__ == "__main__":
    main()
