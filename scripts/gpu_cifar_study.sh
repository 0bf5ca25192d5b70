#!/usr/bin/env bash
# The paper's CIFAR-10 MLP scaling laws at real training length on one GPU
# (configs/sweeps/cifar10_mlp_scaling-gpu.yaml: six structures, six widths each, 100 epochs).
#
# On a lent GPU machine (no network; the image's python3 has torch, PyYAML, Pillow, scipy and
# matplotlib; the project runs from src/): copy the data next to the project first, e.g.
#   mkdir -p .gpudata && cp ../shared/data/cifar10-jpeg.tar.gz .gpudata/
# and carry .gpudata. Then:
#   bash scripts/gpu_cifar_study.sh
# Stages (STAGES, default "time core rest fit"), each time-boxed and resumable (finished runs are
# skipped, interrupted ones resume from their last checkpoint):
#   time  one epoch (T_EPOCHS) of the widest run of every structure, JOBS at a time: prints the
#         measured seconds, so the rest can be sized before it starts;
#   core  dense and BTT (the paper's central claim), then Monarch and low-rank;
#   rest  Kronecker and TT;
#   fit   power laws on train and test error against training MACs and against GPU-seconds,
#         compute multipliers against dense, and the figures.
# Everything lands under $OUT: the logs, fits (text), figures and an archive of the run folders
# (metrics and configs, no checkpoints).
# Environment: OUT (gpu_out), DATA (.gpudata/cifar10-jpeg.tar.gz), DATA_ROOT (the decoded-image
# cache, .gpudata/cache), JOBS (9), EPOCHS (100),
# T_TIME/T_CORE/T_REST (seconds per stage; empty means no limit), PYTHON (python3), SPEC (the sweep
# spec; its `out` is where the runs go), EXTRA_SET (more --set overrides, e.g. for a tiny CPU
# slice: "train.device=cpu train.steps=2"), ONLY (restrict the core and rest stages to the runs
# matching these patterns).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu_out}
DATA=${DATA:-.gpudata/cifar10-jpeg.tar.gz}
JOBS=${JOBS:-9}
EPOCHS=${EPOCHS:-100}
PY=${PYTHON:-python3}
SPEC=${SPEC:-configs/sweeps/cifar10_mlp_scaling-gpu.yaml}
STAGES=" ${STAGES:-time core rest fit} "
mkdir -p "$OUT"
export PYTHONPATH=$PWD/src${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
SL=("$PY" -m structlin_lab)

[[ $EPOCHS =~ ^[0-9]+([.][0-9]+)?$ ]] || { echo "EPOCHS: expected a number, got '$EPOCHS'" >&2; exit 2; }
[[ $JOBS =~ ^[1-9][0-9]*$ ]] || { echo "JOBS: expected a positive number, got '$JOBS'" >&2; exit 2; }
[ -e "$DATA" ] || { echo "DATA: no CIFAR-10 copy at '$DATA' (see the header)" >&2; exit 2; }
read -r -a EXTRA <<<"${EXTRA_SET:-}"
read -r -a ONLY_PATTERNS <<<"${ONLY:-}"
RUNS=$("$PY" -c "import sys; from structlin_lab.scaling.sweep import load_sweep; print(load_sweep(sys.argv[1]).out)" "$SPEC") \
  || { echo "SPEC: cannot read the sweep spec '$SPEC'" >&2; exit 2; }
SETS=("data.source=$DATA" "data.root=${DATA_ROOT:-.gpudata/cache}" "train.epochs=$EPOCHS" "${EXTRA[@]}")

boxed() {  # boxed SECONDS CMD...: run CMD, under `timeout` when SECONDS is set
  local t=$1
  shift
  if [ -n "$t" ]; then timeout "$t" "$@"; else "$@"; fi
}
stage() { [[ $STAGES == *" $1 "* ]]; }
sweep() {  # sweep LOG TIMEOUT PATTERN...: the runs whose names match a pattern (and ONLY)
  local log=$1 t=$2
  shift 2
  local patterns=("$@")
  if [ ${#ONLY_PATTERNS[@]} -gt 0 ]; then patterns=("${ONLY_PATTERNS[@]}"); fi
  boxed "$t" "${SL[@]}" sweep "$SPEC" --jobs "$JOBS" --set "${SETS[@]}" \
    --only "${patterns[@]}" >>"$OUT/$log" 2>&1
  echo "$log: rc=$? ($(date +%T))"
}

{ nvidia-smi 2>/dev/null | head -15
  "$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)"
} >"$OUT/machine.txt" 2>&1
"${SL[@]}" sweep "$SPEC" --dry-run --set "${SETS[@]}" >"$OUT/plan.txt" 2>&1 \
  || { cat "$OUT/plan.txt" >&2; exit 2; }

if stage time; then
  # One epoch of each structure's widest run, in a sweep of its own so the real runs start clean.
  "$PY" - "$SPEC" "$OUT/timing.yaml" <<'PY'
import sys
from pathlib import Path
import yaml
spec = Path(sys.argv[1]).resolve()
data = yaml.safe_load(spec.read_text())
data["base"] = str((spec.parent / data["base"]).resolve())
for entry in data["grid"]["structures"]:
    entry["widths"] = [max(entry["widths"])]
data["out"] = str(Path(sys.argv[2]).resolve().with_name("timing_runs"))
Path(sys.argv[2]).write_text(yaml.safe_dump(data))
PY
  start=$(date +%s)
  boxed "${T_TIME:-}" "${SL[@]}" sweep "$OUT/timing.yaml" --jobs "$JOBS" \
    --set "${SETS[@]}" "train.epochs=${T_EPOCHS:-1}" >"$OUT/timing.log" 2>&1
  echo "time: rc=$? $(($(date +%s) - start)) s for ${T_EPOCHS:-1} epoch(s) of the widest runs, $JOBS at a time"
  "$PY" - "$OUT/timing_runs" <<'PY' | tee -a "$OUT/timing.log"
import sys
from structlin_lab.scaling.results import collect_runs
for r in collect_runs([sys.argv[1]]):
    print(f"{r['name']:<28} {r['status']:<10} {r['wall_time_s'] or 0:7.1f} s of training")
PY
fi
stage core && sweep core.log "${T_CORE:-}" 'dense_*' 'btt_*' 'monarch_*' 'low_rank_*'
stage rest && sweep rest.log "${T_REST:-}" 'kron_*' 'tt_*'

if stage fit; then
  "${SL[@]}" results "$RUNS" --csv "$OUT/runs.csv" >"$OUT/results.txt" 2>&1
  for y in final_train_error final_test_error; do
    for x in train_macs wall_time_s; do
      "${SL[@]}" fit "$RUNS" --x "$x" --y "$y" --reference dense >"$OUT/fit_${y}_vs_${x}.txt" 2>&1
      echo "fit $y vs $x: rc=$?"
      "${SL[@]}" plot "$RUNS" --kind scaling --x "$x" --y "$y" \
        --out "$OUT/figures/${y}_vs_${x}" >>"$OUT/plots.log" 2>&1
    done
  done
  tail -n 20 "$OUT/fit_final_train_error_vs_train_macs.txt"
fi
tar czf "$OUT/cifar_runs.tgz" --exclude=checkpoints -C "$(dirname "$RUNS")" "$(basename "$RUNS")"
ls -la "$OUT"
