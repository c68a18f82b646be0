#!/usr/bin/env bash
# The checks a lent GPU machine is for, as one short run (see ../.library/device/README.md):
#   1. the CUDA-marked tests;
#   2. a DeepSeek-V2-Lite-shape 4-layer Q4_0 GGUF written by bench/make_models.py --type q4_0
#      (no llama.cpp there), benched CPU-only, hybrid (dense on the GPU, experts.cpu) and all-GPU
#      (int4 and plain bf16 modules);
#   3. the operator, kernel, injection and CLI suites on a machine where CUDA is available;
#   `threads`: CPU decode across thread counts and OpenMP wait policies on a 2-layer model, and
#   where a decode step's time goes (bench/decode_bounds.py), for machines with many cores.
# Logs go to $OUT (the device tool's folder) or /tmp/gpu-check. Python packages the machine lacks
# travel as wheels in .whl/ (gguf, transformers >= 5.20, pydantic, fastapi, ...).
#
#   bash tools/gpu_check.sh [tests|bench|all|threads]
set -u
what=${1:-all}
OUT=${OUT:-/tmp/gpu-check}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
if [ -d .whl ] && ls .whl/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl ||
        exit 1
    export PYTHONPATH=/tmp/site:$PWD
else
    export PYTHONPATH=$PWD
fi
{
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
    lscpu | grep -E 'Model name|^CPU\(s\)|Flags' | cut -c1-200
    python3 -c "import torch, transformers, gguf; print('torch', torch.__version__, 'transformers', transformers.__version__, 'cuda', torch.cuda.is_available())"
    (time python3 setup.py -q build_ext --inplace) 2>&1 | tail -4
    python3 -c "import graftlm._qkernels as q; print('C kernels', q.__file__)" || echo "no C kernels: torch fallbacks"
} 2>&1 | tee "$OUT/env.txt"

if [ "$what" = tests ] || [ "$what" = all ]; then
    timeout 150 python3 -m pytest -q -rs -m cuda -p no:cacheprovider tests 2>&1 | tee "$OUT/cuda-tests.txt"
fi

if [ "$what" = bench ] || [ "$what" = all ]; then
    model=/tmp/bench/dsv2lite-4l-q4_0.gguf
    (time timeout 150 python3 bench/make_models.py --out /tmp/bench --models dsv2lite --type q4_0) 2>&1 |
        grep -v writing | tail -5 | tee "$OUT/make.txt"
    sync  # a file just written is still being flushed: let that finish before timing anything
    cat "$model" >/dev/null
    run() {  # name, then graftlm bench flags
        local name=$1
        shift
        echo "== $name: $*" | tee -a "$OUT/bench.txt"
        timeout 100 python3 -m graftlm bench "$model" --prompt-tokens 512 --gen-tokens 64 --repeat 3 "$@" \
            2>&1 | grep -vE "WARNING|INFO" | tail -7 | tee -a "$OUT/bench.txt"
    }
    run cpu --threads "$(nproc)"
    run cpu-half --threads "$(($(nproc) / 2))"
    run hybrid --threads "$(nproc)" --gpu-memory 3GiB
    run gpu-int4 --threads "$(nproc)" --gpu-memory 100GiB --gpu-weights int4
    run gpu-plain --threads "$(nproc)" --device cuda --rules none
fi

if [ "$what" = tests ] || [ "$what" = all ]; then  # last: the CPU machines run these too
    timeout 200 python3 -m pytest -q -p no:cacheprovider tests/ops tests/kernels tests/inject tests/cli \
        2>&1 | tail -40 | tee "$OUT/tests.txt"
fi

if [ "$what" = threads ]; then
    small=/tmp/bench/dsv2lite-2l-q4_0.gguf
    python3 bench/make_models.py --out /tmp/bench --models dsv2lite --layers 2 --type q4_0 2>&1 | tail -1
    sweep() {  # threads, then environment assignments
        echo "== --threads $1 ${*:2}" | tee -a "$OUT/threads.txt"
        env "${@:2}" timeout 60 python3 -m graftlm bench "$small" --prompt-tokens 128 --gen-tokens 32 \
            --repeat 1 --threads "$1" 2>&1 | grep -E "^(prefill|decode)" | tee -a "$OUT/threads.txt"
    }
    for t in 1 2 4 8 16; do sweep $t; done
    sweep 16 OMP_WAIT_POLICY=ACTIVE
    sweep 16 OMP_WAIT_POLICY=PASSIVE
    for t in 2 16; do
        timeout 60 python3 bench/decode_bounds.py --model "$small" --threads $t --steps 16 2>&1 |
            grep -vE "WARNING|INFO|USDT" | tee -a "$OUT/threads.txt"
    done
fi
