#!/usr/bin/env bash
# One-shot check on a lent GPU machine (the image's python3 has torch with CUDA; nothing is
# installed: the project runs from src/). Writes everything under $OUT (default ./gpu_out):
#   machine.txt          nvidia-smi and torch/CUDA versions
#   gpu_tests.log        the CUDA tests (tests/layers/test_cuda_layers.py, tests/lab/train/test_cuda_train.py)
#   bench_cuda_bf16.json the layer benchmark in bfloat16 at batch 8192 (issue: GPU numbers)
#   suite.log            the rest of the suite on this torch version (time-boxed, informative)
# Usage there:  bash benchmarks/gpu_check.sh
set -u
OUT=${OUT:-gpu_out}
mkdir -p "$OUT"
export PYTHONPATH=$PWD/src PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
{ nvidia-smi; $PY -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name())"; } >"$OUT/machine.txt" 2>&1
cat "$OUT/machine.txt" | tail -3
echo "== CUDA tests"
timeout 240 $PY -m pytest -q -p no:cacheprovider -o addopts="-ra" -n 4 \
    tests/layers/test_cuda_layers.py tests/lab/train/test_cuda_train.py >"$OUT/gpu_tests.log" 2>&1
echo "rc=$?"; tail -15 "$OUT/gpu_tests.log"
echo "== bench bf16 batch 8192"
timeout 150 $PY -m structlin_lab.cli bench --device cuda --dtype bfloat16 --batch 8192 \
    --d 1024 4096 --rank 1 4 --repeats 15 --inner 20 --out "$OUT/bench_cuda_bf16.json" 2>&1 | tee "$OUT/bench.log"
echo "== rest of the suite (time-boxed)"
timeout "${SUITE_TIMEOUT:-100}" $PY -m pytest -q -p no:cacheprovider -n 12 -x tests >"$OUT/suite.log" 2>&1
echo "suite rc=$?"; tail -5 "$OUT/suite.log"
