#!/usr/bin/env bash
# The GPU checks, in one go, on a machine with a CUDA GPU and PyTorch + transformers installed
# (kronfluence and einconv wheels in .whl/ if that machine lacks them):
#   OUT=bench/out bash bench/gpu_check.sh
# 1. the CUDA tests (tests/core/test_cuda.py, and the one-call API on the GPU in tests/core/test_scoring.py);
# 2. bench/bench_core.py on the GPU, with kronfluence on the same GPU, for the three model sizes;
# 3. with SCALE=1, bench/bench_scale.py at pythia-410m (100 queries, rank 32, bf16; SCALE_SHAPE=dolly-3b for
#    the paper's case-study size; bf16 against float64 on a tiny model: tests/core/test_half.py).
set -o pipefail
OUT=${OUT:-bench/out}
mkdir -p "$OUT"
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)"
timeout "${TEST_TIMEOUT:-240}" python3 -m pytest -q -p no:cacheprovider tests/core/test_cuda.py \
  tests/core/test_scoring.py -k "cuda or gpu" 2>&1 | tee "$OUT/gpu_tests.log" | tail -15
timeout "${BENCH_TIMEOUT:-330}" python3 bench/bench_core.py --device cuda --sizes "${SIZES:-small,large,base}" \
  --lengths 512,128 --docs "${DOCS:-128}" --cache-mib 16384 --out "$OUT/core_gpu.json" 2>&1 | tee "$OUT/core_gpu.log" \
  | grep -v '^{'
if [ "${SCALE:-0}" = 1 ]; then
  timeout "${SCALE_TIMEOUT:-400}" python3 bench/bench_scale.py --device cuda --dtype bfloat16 \
    --shape "${SCALE_SHAPE:-pythia-410m}" --queries 100 --ranks 32 --docs 32 --doc-length 256 --memory-gib 40 \
    --out "$OUT/scale_gpu.jsonl" 2>&1 | tee "$OUT/scale_gpu.log" | tail -5
fi
