"""graftlm against llama.cpp on the same GGUF files, in the same run, with the same threads.

    python bench/compare_llamacpp.py [--models PATH ...] [--threads 1 2] [--repeat 3] [--rounds 1]
                                     [--llama-bench /opt/llamacpp/bin/llama-bench] [--out bench/results]

Defaults: the synthetic real-shape models from bench/make_models.py (if present) and the real
Gemma 3 270M Q4_K_M. For each model and thread count it runs llama-bench and `graftlm bench --rules
auto` (each in its own process, so peak RSS is the model's own), records the load average around
both, and prints a markdown table of tok/s and graftlm/llama.cpp ratios. JSON with every number
goes to --out; BENCHMARKS.md quotes these tables.

This machine's speed drifts by up to 2x over minutes, so one pair of runs can catch the two
engines in different phases. `--rounds N` measures each model and thread count N times, the two
engines alternating which goes first, and reports each round's ratios and their median (the tok/s
columns are then medians over rounds too).

Both decode at the same depth. `graftlm bench` decodes its tokens after the prompt (positions 512
to 640 by default), while llama-bench's `-n 128` decodes into an empty cache; so llama.cpp's decode
is measured with `-d 512` (the prompt's tokens in its cache first, `tg128 @ d512`), and its
prefill with `-p 512 -n 0`. Its decode at depth 0 is kept in the JSON as well
(`decode_tok_s_depth0`): 3-8% faster here (DeepSeek-V2-Lite shape, Gemma 3 270M; two threads).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from functools import partial
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
    """llama.cpp's prefill of `prompt` tokens, and its decode of `gen` tokens after `prompt` tokens
    in its cache (graftlm bench's decode positions) and, for reference, into an empty cache."""
    import graftlm

    env = dict(os.environ)
    if graftlm.WAIT_POLICY_SET_BY_GRAFTLM:  # llama.cpp keeps its own default thread waiting
        env.pop("OMP_WAIT_POLICY", None)
        env.pop("GOMP_SPINCOUNT", None)

    def run(*tests: str) -> list[dict]:
        cmd = [exe, "-m", str(model), "-t", str(threads), *tests, "-r", str(repeat), "-o", "json"]
        return json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True, env=env).stdout)

    rows = run("-p", str(prompt), "-n", "0") + run("-p", "0", "-n", str(gen), "-d", f"0,{prompt}")
    result = {
        "build": rows[0].get("build_commit"),
        "backend": rows[0].get("backends") or rows[0].get("backend"),
        "decode_depth": prompt,
    }
    for row in rows:
        if row.get("n_prompt", 0) > 0:
            kind = "prefill_tok_s"
        else:
            kind = "decode_tok_s" if row.get("n_depth", 0) == prompt else "decode_tok_s_depth0"
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


def _summary(model: str, threads: int, rounds: list[dict]) -> dict:
    """One table row from a model's rounds: each engine's numbers as medians over the rounds (peak RSS
    the highest), the ratios as medians of the per-round ratios. Per-run lists stay in `rounds`."""
    if len(rounds) == 1:
        return {"model": model, "threads": threads, **rounds[0], "rounds": rounds}

    def merged(engine: str) -> dict:
        out = {}
        for key, first in rounds[0][engine].items():
            values = [r[engine].get(key) for r in rounds]
            if isinstance(first, list):
                continue
            if isinstance(first, int | float) and not isinstance(first, bool) and None not in values:
                out[key] = max(values) if key == "peak_rss_mib" else statistics.median(values)
            else:
                out[key] = first  # the same in every round: build, machine, settings
        return out

    return {
        "model": model,
        "threads": threads,
        "llama_cpp": merged("llama_cpp"),
        "graftlm": merged("graftlm"),
        "prefill_ratio": statistics.median(r["prefill_ratio"] for r in rounds),
        "decode_ratio": statistics.median(r["decode_ratio"] for r in rounds),
        "load_avg": [min(r["load_avg"][0] for r in rounds), max(r["load_avg"][1] for r in rounds)],
        "time": f"{rounds[0]['time']} - {rounds[-1]['time']}",
        "rounds": rounds,
    }


def _each(row: dict, key: str) -> str:
    return " ".join(f"{x[key]:.2f}" for x in row["rounds"])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="*", type=Path)
    ap.add_argument("--threads", nargs="*", type=int, default=[1, 2])
    ap.add_argument("--prompt-tokens", type=int, default=512)
    ap.add_argument("--gen-tokens", type=int, default=128)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=1, help="alternating llama.cpp/graftlm rounds (median)")
    ap.add_argument("--llama-bench", default="/opt/llamacpp/bin/llama-bench")
    ap.add_argument("--out", type=Path, default=Path("bench/results"))
    args = ap.parse_args()
    models = args.models or default_models()
    args.out.mkdir(parents=True, exist_ok=True)
    rows = []
    for model in models:
        for t in args.threads:
            rounds = []
            for i in range(args.rounds):
                load_before = os.getloadavg()[0]
                common = (t, args.prompt_tokens, args.gen_tokens, args.repeat)
                engines = {
                    "llama_cpp": partial(llama_bench, args.llama_bench, model, *common),
                    "graftlm": partial(graftlm_bench, model, *common),
                }
                order = list(engines) if i % 2 == 0 else list(engines)[::-1]  # alternate who goes first
                runs = {name: engines[name]() for name in order}
                lc, gl = runs["llama_cpp"], runs["graftlm"]
                rounds.append(
                    {
                        "llama_cpp": lc,
                        "graftlm": gl,
                        "first": order[0],
                        "prefill_ratio": gl["prefill_tok_s"] / lc["prefill_tok_s"],
                        "decode_ratio": gl["decode_tok_s"] / lc["decode_tok_s"],
                        "load_avg": [round(load_before, 2), round(os.getloadavg()[0], 2)],
                        "time": time.strftime("%Y-%m-%d %H:%M"),
                    }
                )
                print(
                    json.dumps({"model": model.name, "threads": t, **rounds[-1]}), file=sys.stderr, flush=True
                )
            rows.append(_summary(model.name, t, rounds))
    (args.out / f"compare-{time.strftime('%Y%m%d-%H%M')}.json").write_text(json.dumps(rows, indent=1))
    print(
        f"machine: {rows[0]['graftlm']['machine'] if rows else '?'}; llama.cpp {rows[0]['llama_cpp']['build'] if rows else '?'}; "
        f"both decode after {args.prompt_tokens} tokens (llama-bench -d {args.prompt_tokens})"
    )
    print("| model | threads | prefill tok/s graftlm / llama.cpp (ratio) | decode tok/s graftlm / llama.cpp (ratio) "
          "| graftlm MB/token, GB/s | graftlm peak RSS MiB | load avg | per-round ratios, prefill; decode |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        g, c = r["graftlm"], r["llama_cpp"]
        print(
            f"| {r['model']} | {r['threads']} | {g['prefill_tok_s']:.1f} / {c['prefill_tok_s']:.1f} ({r['prefill_ratio']:.2f}x) "
            f"| {g['decode_tok_s']:.1f} / {c['decode_tok_s']:.1f} ({r['decode_ratio']:.2f}x) "
            f"| {g['bytes_per_token'] / 1e6:.0f}, {g['decode_gb_s']:.1f} | {g['peak_rss_mib']:.0f} | {r['load_avg'][0]}-{r['load_avg'][1]} "
            f"| {_each(r, 'prefill_ratio')}; {_each(r, 'decode_ratio')} |"
        )


if __name__ == "__main__":
    main()
