#!/usr/bin/env bash
# Run scripts/gpt2_austen_study.sh on a lent GPU machine: the data travels in ./.gpudata (git-
# ignored), the project runs from src/ under the image's python3, no checkpoints are written, and
# the run folders (metrics and configs) come back as one archive under $OUT.
# To run only the weight-norm stage at the tuned LR of docs/results-lm.md (on an H200 with the 9
# runs of each LR in parallel, about 2.5 minutes per LR: 304 s for 3x and 10x on 2026-11-28):
#   STAGES=wn LR=0.01 JOBS=9 T_WN=225 MULTS="3 10" bash scripts/gpu_lm_study.sh
# (MULTS="3 10" runs the 3x stage first, so that a lease cut short loses the 10x one.)
set -u
OUT=${OUT:-gpu_out}
mkdir -p "$OUT"
export PYTHONPATH=$PWD/src PYTHONUNBUFFERED=1 STRUCTLIN="python3 -m structlin_lab.cli"
export JOBS=${JOBS:-6} T_TUNE=${T_TUNE:-100} T_SCALING=${T_SCALING:-200} T_WN=${T_WN:-110}
pack() {
  tar czf "$OUT/gpt2_runs.tgz" --exclude=checkpoints runs/gpt2_austen_* 2>/dev/null
  ls -la "$OUT"
}
trap pack EXIT
bash scripts/gpt2_austen_study.sh "$PWD/.gpudata" train.ckpt_every=0 >"$OUT/study.log" 2>&1
echo "study rc=$?"
grep -v '^\[' "$OUT/study.log" | tail -60
