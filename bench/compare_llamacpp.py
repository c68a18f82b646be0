"""graftlm against llama.cpp on the same GGUF files, in the same run, with the same threads.

    python bench/compare_llamacpp.py [--models PATH ...] [--threads 1 2] [--repeat 3]
                                     [--llama-bench /opt/llamacpp/bin/llama-bench] [--out bench/results]

Defaults: the synthetic real-shape models from bench/make_models.py (if present) and the real
Gemma 3 270M Q4_K_M. For each model and thread count it runs `llama-bench -p 512 -n 128` and
`graftlm bench --rules auto` (each in its own process, so peak RSS is the model's own), records
the load average around both, and prints a markdown table of tok/s and graftlm/llama.cpp ratios.
JSON with every number goes to --out; BENCHMARKS.md quotes these tables.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

BENCH_DIR = Path.home() / ".cache" / "graftlm" / "bench"


def default_models() -> list[Path]:
    models = [BENCH_DIR / f"{m}-4l-q4_k_m.gguf" for m in ("dsv2lite", "qwen2moe")]
    try:
        from graftlm.models.demo import demo_model_path

        models.append(demo_model_path())
    except Exception as exc:  # noqa: BLE001 - the demo extra is optional here
        print(f"demo model unavailable: {exc}", file=sys.stderr)
    return [m for m in models if m.exists()]


def llama_bench(exe: str, model: Path, threads: int, prompt: int, gen: int, repeat: int) -> dict:
    import graftlm

    env = dict(os.environ)
    if graftlm.WAIT_POLICY_SET_BY_GRAFTLM:  # llama.cpp keeps its own default thread waiting
        env.pop("OMP_WAIT_POLICY", None)
        env.pop("GOMP_SPINCOUNT", None)
    out = subprocess.run(
        [
            exe,
            "-m",
            str(model),
            "-t",
            str(threads),
            "-p",
            str(prompt),
            "-n",
            str(gen),
            "-r",
            str(repeat),
            "-o",
            "json",
        ],
        check=True,
        capture_output=True,
        text=True,
        env=env,
    ).stdout
    rows = json.loads(out)
    result = {
        "build": rows[0].get("build_commit"),
        "backend": rows[0].get("backends") or rows[0].get("backend"),
    }
    for row in rows:
        kind = "prefill_tok_s" if row.get("n_prompt", 0) > 0 else "decode_tok_s"
        result[kind] = row["avg_ts"]
        result[kind.replace("tok_s", "stddev")] = row.get("stddev_ts")
    return result


def graftlm_bench(model: Path, threads: int, prompt: int, gen: int, repeat: int) -> dict:
    cmd = [
        sys.executable, "-m", "graftlm", "bench", str(model), "--rules", "auto", "--threads", str(threads),
        "--prompt-tokens", str(prompt), "--gen-tokens", str(gen), "--repeat", str(repeat), "--json",
    ]  # fmt: skip
    env = dict(os.environ, TQDM_DISABLE="1")
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, env=env).stdout
    return json.loads(out[out.index("{") :])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="*", type=Path)
    ap.add_argument("--threads", nargs="*", type=int, default=[1, 2])
    ap.add_argument("--prompt-tokens", type=int, default=512)
    ap.add_argument("--gen-tokens", type=int, default=128)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--llama-bench", default="/opt/llamacpp/bin/llama-bench")
    ap.add_argument("--out", type=Path, default=Path("bench/results"))
    args = ap.parse_args()
    models = args.models or default_models()
    args.out.mkdir(parents=True, exist_ok=True)
    rows = []
    for model in models:
        for t in args.threads:
            load_before = os.getloadavg()[0]
            lc = llama_bench(args.llama_bench, model, t, args.prompt_tokens, args.gen_tokens, args.repeat)
            gl = graftlm_bench(model, t, args.prompt_tokens, args.gen_tokens, args.repeat)
            row = {
                "model": model.name,
                "threads": t,
                "llama_cpp": lc,
                "graftlm": gl,
                "prefill_ratio": gl["prefill_tok_s"] / lc["prefill_tok_s"],
                "decode_ratio": gl["decode_tok_s"] / lc["decode_tok_s"],
                "load_avg": [round(load_before, 2), round(os.getloadavg()[0], 2)],
                "time": time.strftime("%Y-%m-%d %H:%M"),
            }
            rows.append(row)
            print(json.dumps(row), file=sys.stderr, flush=True)
    (args.out / f"compare-{time.strftime('%Y%m%d-%H%M')}.json").write_text(json.dumps(rows, indent=1))
    print(
        f"machine: {rows[0]['graftlm']['machine'] if rows else '?'}; llama.cpp {rows[0]['llama_cpp']['build'] if rows else '?'}"
    )
    print("| model | threads | prefill tok/s graftlm / llama.cpp (ratio) | decode tok/s graftlm / llama.cpp (ratio) "
          "| graftlm MB/token, GB/s | graftlm peak RSS MiB | load avg |")  # fmt: skip
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        g, c = r["graftlm"], r["llama_cpp"]
        print(
            f"| {r['model']} | {r['threads']} | {g['prefill_tok_s']:.1f} / {c['prefill_tok_s']:.1f} ({r['prefill_ratio']:.2f}x) "
            f"| {g['decode_tok_s']:.1f} / {c['decode_tok_s']:.1f} ({r['decode_ratio']:.2f}x) "
            f"| {g['bytes_per_token'] / 1e6:.0f}, {g['decode_gb_s']:.1f} | {g['peak_rss_mib']:.0f} | {r['load_avg'][0]}-{r['load_avg'][1]} |"
        )


if __name__ == "__main__":
    main()
