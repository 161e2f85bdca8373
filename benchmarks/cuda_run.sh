#!/usr/bin/env bash
# The CUDA figures of docs/performance.md, on a machine with an NVIDIA GPU, in one go (a lent GPU's time is
# short): the CUDA tests, the attention backends' cost per decode call (sdpa_backends.py), the GPU's limits
# and where a decode step's time goes (step_profile.py), and the served benchmark of compare.py on the GPU
# (tokens/s, TTFT, TPOT at concurrency 1/16/64, MFU/MBU).
#
#   bash benchmarks/cuda_run.sh OUT_DIR
#
# Expects tidellm and its dependencies importable by $PYTHON (default python3), a `tidellm` command on PATH
# (compare.py starts `tidellm serve`) and the default model in the tidellm cache ($TIDELLM_CACHE_DIR): the
# machine needs no network. Every step runs even if one before it failed; the exit code is the first failure.
set -uo pipefail
out=${1:?usage: cuda_run.sh OUT_DIR}
mkdir -p "$out"
cd "$(dirname "$0")/.."
py=${PYTHON:-python3}
rc=0
step() { # step NAME CMD...: run CMD, its output appended to OUT_DIR/run.log (and shown), remember a failure
    local name=$1
    shift
    echo "=== $name: $*" | tee -a "$out/run.log"
    "$@" 2>&1 | grep --line-buffered -v '^USDT:' | tee -a "$out/run.log" # (the profiler's start/stop lines)
    local s=${PIPESTATUS[0]}
    echo "=== $name: exit $s" | tee -a "$out/run.log"
    [ "$rc" -ne 0 ] || rc=$s
}
step gpu nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm,clocks.max.mem --format=csv
# Correctness: the model tests parametrized over devices, then parity with transformers (fp32, greedy) of the
# whole engine, which runs on the GPU by itself (device auto).
step tests_cuda "$py" -m pytest -q -p no:cacheprovider -rf tests/model_executor/test_llama.py -k cuda
step tests_parity "$py" -m pytest -q -p no:cacheprovider -rf tests/engine/test_parity.py
step sdpa_backends "$py" benchmarks/sdpa_backends.py
step step_profile "$py" benchmarks/step_profile.py --device cuda --json "$out/step_profile.json"
step compare "$py" benchmarks/compare.py --engines tidellm --device cuda --skip-setup --settle-s 0 \
    --out-dir "$out/compare" --name cuda --log-dir /tmp/tidellm-compare-cuda
tail -n 40 /tmp/tidellm-compare-cuda/tidellm-server.log >"$out/server-tail.log" 2>/dev/null
exit "$rc"
