#!/usr/bin/env bash
# The GPT-2-on-Austen study of docs/results-lm.md, end to end:
#   1. tune the one learning rate: dense at the base width, five LRs (gpt2_austen_lr_tune.yaml);
#   2. dense vs BTT (and BTT with the head structured) at that LR (gpt2_austen_scaling.yaml);
#   3. weight-norm stability at 10x and 3x that LR, three seeds (gpt2_austen_wn_stability.yaml).
# Usage: scripts/gpt2_austen_study.sh DATA_DIR [KEY=VALUE ...]
#   DATA_DIR holds austen.txt.gz and gpt2.tiktoken (e.g. ../shared/data); KEY=VALUE overrides go
#   to every run (e.g. train.ckpt_every=0). JOBS (default 2) runs go in parallel. Each stage can
#   be time-boxed with T_TUNE, T_SCALING, T_WN (seconds; the default is no limit). STRUCTLIN
#   (default "structlin") is the command to call. Finished runs are skipped when re-run.
#   STAGES (default "tune scaling wn") picks stages; LR=... skips reading the tuned rate from
#   runs/gpt2_austen_lr_tune, e.g. `STAGES=wn LR=0.01 scripts/gpt2_austen_study.sh DATA_DIR`.
#   MULTS (default "10 3") lists the weight-norm stage's LR multiples, in the order they run.
set -uo pipefail
DATA=${1:?usage: scripts/gpt2_austen_study.sh DATA_DIR [KEY=VALUE ...]}
shift
JOBS=${JOBS:-2}
read -r -a SL <<<"${STRUCTLIN:-structlin}"
SETS=("data.source=$DATA/austen.txt.gz" "data.tokenizer_file=$DATA/gpt2.tiktoken" "$@")
cd "$(dirname "$0")/.."

boxed() {  # boxed SECONDS CMD...: run CMD, under `timeout` when SECONDS is set
  local t=$1
  shift
  if [ -n "$t" ]; then timeout "$t" "$@"; else "$@"; fi
}

STAGES=" ${STAGES:-tune scaling wn} "
MULTS=${MULTS:-10 3}
for mult in $MULTS; do  # checked before any stage runs
  [[ $mult =~ ^[0-9]+([.][0-9]+)?$ ]] || { echo "MULTS: expected numbers, got '$mult'" >&2; exit 2; }
done
stage() { [[ $STAGES == *" $1 "* ]]; }

if stage tune; then
  boxed "${T_TUNE:-}" "${SL[@]}" sweep configs/sweeps/gpt2_austen_lr_tune.yaml --jobs "$JOBS" \
    --set "${SETS[@]}"
fi
LR=${LR:-$("${PYTHON:-python3}" - <<'PY'
from structlin_lab.scaling.results import collect_runs
rows = [r for r in collect_runs(["runs/gpt2_austen_lr_tune"])
        if r["status"] == "finished" and r["final_test_loss"] is not None]
if not rows:
    raise SystemExit("no finished learning-rate tuning run in runs/gpt2_austen_lr_tune")
print(min(rows, key=lambda r: r["final_test_loss"])["lr"])
PY
)} || exit 1
echo "tuned learning rate: $LR"
if stage scaling; then
  boxed "${T_SCALING:-}" "${SL[@]}" sweep configs/sweeps/gpt2_austen_scaling.yaml --jobs "$JOBS" \
    --set "${SETS[@]}" "optim.lr=$LR"
fi
if stage wn; then
  for mult in $MULTS; do
    HIGH=$("${PYTHON:-python3}" -c "print(repr($mult * $LR))")
    boxed "${T_WN:-}" "${SL[@]}" sweep configs/sweeps/gpt2_austen_wn_stability.yaml \
      --jobs "$JOBS" --set "${SETS[@]}" "optim.lr=$HIGH"
  done
fi
for d in runs/gpt2_austen_lr_tune runs/gpt2_austen_scaling runs/gpt2_austen_wn_stability; do
  [ -d "$d" ] && "${SL[@]}" results "$d" --csv "$d.csv" --json "$d.json"
done
exit 0
