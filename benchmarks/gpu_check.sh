#!/usr/bin/env bash
# One GPU check, < 8 minutes on one GPU: benchmarks/gpu_bench.py (coupling samples/s with the
# numerics check, stage-1/2 step time and peak memory at batch 16 and 64, fast paths against the
# eager reference), then the 512 rehearsal through real Snakemake with its GPU jobs on the GPU,
# then the cost plan of the 512 preset from the measured figures.
#
#   bash benchmarks/gpu_check.sh OUTDIR            # on a GPU node
#   bash benchmarks/gpu_check.sh OUTDIR --smoke    # CPU: gpu_bench.py --smoke, a smaller rehearsal
#
# Without CUDA the script runs the smoke mode and says so. Written into OUTDIR:
#   gpu_bench.json            both parts of gpu_bench.py merged (the format `remeanflow plan --bench` reads)
#   gpu_bench_sampler.json, gpu_bench_train.json   the two runs it was merged from
#   rehearsal_metrics.json    eval/stage2/metrics.json of the rehearsal
#   plan512.json, plan512.txt the 512 preset's cost plan from gpu_bench.json
#   timings.json              wall time, exit status and time limit of every step
#   logs/<step>.log, overlay.yaml, assets/, run/ (the rehearsal's working folder)
# Each step runs under `timeout` with a share of the whole budget; the first failing step stops
# the script (its log's tail is printed) and timings.json records it.
set -euo pipefail

usage() { echo "usage: $0 OUTDIR [--smoke]" >&2; exit 2; }
[[ $# -ge 1 && $# -le 2 ]] || usage
OUT=$1
SMOKE=0
if [[ $# -eq 2 ]]; then [[ $2 == --smoke ]] || usage; SMOKE=1; fi

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
# The interpreter of the checkout's venv when there is one, else python3 from PATH (a cluster module).
PY=${PYTHON:-$REPO/.venv/bin/python}
[[ -x $PY ]] || PY=$(command -v python3)
mkdir -p "$OUT/logs"
OUT=$(cd "$OUT" && pwd)

if [[ $SMOKE -eq 0 ]] && ! "$PY" -c 'import sys, torch; sys.exit(not torch.cuda.is_available())'; then
    echo "gpu_check: no CUDA device visible to $PY: running the CPU smoke check instead (no GPU figures)"
    SMOKE=1
fi
if [[ $SMOKE -eq 1 ]]; then
    MODE=cpu-smoke
    BUDGET=${GPU_CHECK_BUDGET_S:-600}  # a loaded 2-core CPU; the GPU run must fit 8 minutes
    BENCH_ARGS=(--smoke)
else
    MODE=gpu
    BUDGET=${GPU_CHECK_BUDGET_S:-470}  # 8 minutes less a margin for start-up and the plan
    # One timed repeat of the sampler (256 samples x 63 NFE x 2 nets per repeat) and three training
    # steps after one warm-up: the compiles and the first calls are most of the time.
    BENCH_ARGS=(--sampler-repeats 1 --train-repeats 3 --warmup 1)
fi

START=$(date +%s)
STEPS=()

write_timings() {
    local IFS=,
    printf '{"format": "remeanflow.gpu-check/1", "mode": "%s", "budget_s": %s, "total_s": %s, "steps": {%s}}\n' \
        "$MODE" "$BUDGET" "$(( $(date +%s) - START ))" "${STEPS[*]}" > "$OUT/timings.json"
}

# step NAME SHARE_S CMD...: run CMD with its output in logs/NAME.log under `timeout`, with at most
# SHARE_S seconds and never past the whole budget.
step() {
    local name=$1 share=$2; shift 2
    local left=$(( BUDGET - ($(date +%s) - START) ))
    local limit=$(( share < left ? share : left ))
    if (( limit < 5 )); then
        STEPS+=("\"$name\": {\"seconds\": 0, \"rc\": 124, \"timeout_s\": 0}")
        write_timings
        echo "gpu_check: budget of ${BUDGET} s spent before step $name" >&2
        exit 124
    fi
    echo "gpu_check: $name (at most ${limit} s; log $OUT/logs/$name.log)"
    local t0 rc=0
    t0=$(date +%s.%N)
    timeout --kill-after=10 "$limit" "$@" > "$OUT/logs/$name.log" 2>&1 || rc=$?
    local seconds
    seconds=$(awk -v a="$t0" -v b="$(date +%s.%N)" 'BEGIN { printf "%.1f", b - a }')
    STEPS+=("\"$name\": {\"seconds\": $seconds, \"rc\": $rc, \"timeout_s\": $limit}")
    write_timings
    if (( rc != 0 )); then
        echo "gpu_check: step $name FAILED (exit $rc$([[ $rc -eq 124 ]] && echo ', timed out')); last lines of its log:" >&2
        tail -n 30 "$OUT/logs/$name.log" >&2
        exit "$rc"
    fi
    echo "gpu_check: $name done in ${seconds} s"
}

# The rehearsal's overlay: GPU jobs on the GPU with the preset's fp16 teacher, or (smoke) sizes
# small enough for a CPU in about a minute.
if [[ $MODE == gpu ]]; then
    cat > "$OUT/overlay.yaml" <<'EOF'
# gpu_check.sh: the rehearsal's GPU jobs on the GPU, teacher arithmetic as in presets/imagenet512.yaml
couplings: {precision: fp16}
resources:
  couplings: {gpu: 1}
  train: {gpu: 1}
  evaluate: {gpu: 1}
EOF
else
    # Provided FID reference statistics (zero mean, identity covariance): computing them runs
    # Inception over the rehearsal's 1000 images, ~2.5 of the smoke's ~5 minutes on a 2-core CPU.
    "$PY" -c 'import sys, numpy as np; np.savez(sys.argv[1], mu=np.zeros(2048), sigma=np.eye(2048))' \
        "$OUT/ref_stats_smoke.npz"
    cat > "$OUT/overlay.yaml" <<EOF
# gpu_check.sh --smoke: the rehearsal at even smaller sizes on the CPU
couplings: {index_mode: random, num_samples: 128, batch: 64, num_shards: 1}
time_embedding: {steps: 5, batch: 64}
train:
  batch_size: 4
  checkpoint_every: 2
  snapshot_every: 2
  window_chunks: 1
  stage1: {iterations: 2}
  stage2: {iterations: 2}
evaluate:
  num_samples: 4
  fid_samples: 4
  shards: 1
  ref_stats: {source: $OUT/ref_stats_smoke.npz}
EOF
fi

# 1. gpu_bench.py in two processes, so that a slow part leaves the other's figures.
SHARE_BENCH=$(( BUDGET * 32 / 100 ))
step bench_sampler "$SHARE_BENCH" "$PY" "$REPO/benchmarks/gpu_bench.py" "${BENCH_ARGS[@]}" --parts sampler \
    --json "$OUT/gpu_bench_sampler.json"
step bench_train "$SHARE_BENCH" "$PY" "$REPO/benchmarks/gpu_bench.py" "${BENCH_ARGS[@]}" --parts train \
    --json "$OUT/gpu_bench_train.json"
step bench_merge 30 "$PY" "$REPO/benchmarks/gpu_bench.py" --merge "$OUT/gpu_bench_sampler.json" \
    "$OUT/gpu_bench_train.json" --json "$OUT/gpu_bench.json"

# 2. The 512 rehearsal: assets, then the whole DAG through Snakemake.
step rehearsal_assets 60 "$PY" -m remeanflow rehearsal-assets --preset "$REPO/presets/rehearsal512.yaml" \
    --out "$OUT/assets"
GPU_RESOURCES=()
[[ $MODE == gpu ]] && GPU_RESOURCES=(--resources gpu=1)  # one GPU: its jobs one at a time
step rehearsal_run "$BUDGET" "$PY" -m snakemake --cores all "${GPU_RESOURCES[@]}" --directory "$OUT/run" \
    --snakefile "$REPO/Snakefile" --configfile "$REPO/presets/rehearsal512.yaml" "$OUT/assets/assets.yaml" \
    "$OUT/overlay.yaml"
cp "$OUT/run/results/rehearsal512/eval/stage2/metrics.json" "$OUT/rehearsal_metrics.json"

# 3. What the measured figures say the paper's 512 run costs.
# (stdout only into the files: the log keeps anything the command says on stderr)
step plan 30 bash -c '"$1" -m remeanflow plan --configfile "$2" --bench "$3" --json > "$4" &&
    "$1" -m remeanflow plan --configfile "$2" --bench "$3" > "$5"' plan "$PY" "$REPO/presets/imagenet512.yaml" \
    "$OUT/gpu_bench.json" "$OUT/plan512.json" "$OUT/plan512.txt"

write_timings
echo "gpu_check: $MODE check done in $(( $(date +%s) - START )) s; results in $OUT"
