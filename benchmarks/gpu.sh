#!/usr/bin/env bash
# The prepared GPU run of issue 15 (about 8 minutes on an H200). Needs only the GPU image
# (torch, triton, numpy, PyYAML; no network): the project runs from src/. Writes under $OUT:
#   machine.txt      nvidia-smi, torch/CUDA/triton versions
#   gpu_tests.log    the CUDA tests (layers, Triton kernels and the op at real shapes, trainer)
#   gpu_bench.json   layers and GPT-2 rows, the targets (benchmarks/gpu_bench.py)
#   gpu_bench.md     the same as tables
# Usage there:  bash benchmarks/gpu.sh
set -u
OUT=${OUT:-gpu_out}
mkdir -p "$OUT"
export PYTHONPATH=$PWD/src PYTHONUNBUFFERED=1 OUT
PY=${PYTHON:-python3}
{ nvidia-smi; $PY -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__, torch.cuda.get_device_name())"; } >"$OUT/machine.txt" 2>&1
tail -2 "$OUT/machine.txt"
echo "== CUDA tests (time-boxed)"
timeout 120 $PY -m pytest -q -p no:cacheprovider -x \
    tests/layers/test_cuda_layers.py tests/layers/test_triton.py tests/lab/train/test_cuda_train.py \
    >"$OUT/gpu_tests.log" 2>&1
echo "rc=$?"; tail -5 "$OUT/gpu_tests.log"
echo "== benchmark (layers then GPT-2, each time-boxed inside)"
timeout 420 $PY benchmarks/gpu_bench.py --device cuda --out "$OUT" \
    --layer-seconds "${LAYER_SECONDS:-170}" --model-seconds "${MODEL_SECONDS:-190}" \
    2>&1 | tee "$OUT/gpu_bench.log" | grep -v "^W" | tail -40
echo "bench rc=${PIPESTATUS[0]}"
