#!/usr/bin/env bash
# Reproduce the paper's Table 2: five ASR teachers (one per fold), then the eight
# student configurations {BLSTM, TCN} x {soft, self-attention} x {without, with
# attention transfer} on all five folds, then `python satn.py report`. The students
# without transfer may run beside the teachers; those with transfer wait for them.
#
#   bash run_all.sh                      # the built-in demo corpus, demo-sized settings
#   bash run_all.sh --data /path/to/IEMOCAP_full_release
#   bash run_all.sh --data corpus.csv --jobs 4 --epochs 50
#   bash run_all.sh --dry-run            # print every training command, in dependency order
#
# Options: --data PATH, --runs DIR, --jobs N (trainings at once; GPUs are assigned
# round-robin through CUDA_VISIBLE_DEVICES when several are visible; default 1, or on
# a machine without a GPU one per core, up to 4, each with one thread), --at-weight W
# (W_AT of the transfer rows, default 1.0), --dry-run. Any other argument is passed
# to every training (so it must be an option of both `teacher` and `student`, e.g.
# --epochs, --seed, --device, --batch-size, --norm). Finished runs are skipped and
# unfinished ones resumed, so calling it again after an interruption continues.
set -uo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-python}
DATA=() RUNS=runs JOBS= DRY=0 AT_WEIGHT=1.0 EXTRA=()
while [ $# -gt 0 ]; do
    case "$1" in
        --data) DATA=(--data "$2"); shift 2 ;;
        --runs) RUNS=$2; shift 2 ;;
        --jobs) JOBS=$2; shift 2 ;;
        --at-weight) AT_WEIGHT=$2; shift 2 ;;
        --dry-run) DRY=1; shift ;;
        -h|--help) sed -n '2,18p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) EXTRA+=("$1"); shift ;;
    esac
done
NGPU=0
[ "$DRY" = 0 ] && NGPU=$($PY -c "import torch; print(torch.cuda.device_count())" 2>/dev/null || echo 0)
THREADS=()
if [ -z "$JOBS" ]; then
    JOBS=1
    if [ "$NGPU" = 0 ] && [ "$DRY" = 0 ]; then
        # Small CPU trainings use a second core poorly: run one per core, one thread each.
        JOBS=$(nproc 2>/dev/null || echo 1); [ "$JOBS" -gt 4 ] && JOBS=4
        THREADS=(--threads 1)
    fi
fi
case "$JOBS" in ''|*[!0-9]*|0) echo "run_all.sh: --jobs needs a positive integer, got '$JOBS'" >&2; exit 2 ;; esac
COMMON=("${DATA[@]}" --runs "$RUNS" --resume "${THREADS[@]}" "${EXTRA[@]}")
[ "$DRY" = 0 ] && mkdir -p "$RUNS/logs"
TRANSFER=1
if [ "$DRY" = 0 ]; then
    # Write the demo corpus and the feature cache once, before parallel jobs could race for them.
    $PY satn.py prepare "${DATA[@]}" --runs "$RUNS"
    case $? in
        0) ;;
        3) TRANSFER=0; echo "run_all.sh: no transcripts: no teachers, and the rows with attention transfer are skipped" ;;
        *) exit 1 ;;
    esac
fi
START=$(date +%s) FAILED=0 STARTED=0

run() {  # run <log name> <command...>: at most $JOBS at once
    local name=$1; shift
    if [ "$DRY" = 1 ]; then printf '%q ' "$@"; echo; return; fi
    while [ "$(jobs -rp | wc -l)" -ge "$JOBS" ]; do wait -n; done
    local env=()
    [ "$NGPU" -gt 1 ] && env=(env CUDA_VISIBLE_DEVICES=$((STARTED % NGPU)))
    STARTED=$((STARTED + 1))
    if [ "$JOBS" = 1 ]; then
        "${env[@]}" "$@" 2>&1 | tee "$RUNS/logs/$name.log"
        [ "${PIPESTATUS[0]}" = 0 ] || { FAILED=$((FAILED + 1)); echo "run_all.sh: $name failed (log: $RUNS/logs/$name.log)"; }
    else
        echo "run_all.sh: started $name (log: $RUNS/logs/$name.log)"
        rm -f "$RUNS/logs/$name.failed"
        ( t0=$(date +%s)
          if "${env[@]}" "$@" > "$RUNS/logs/$name.log" 2>&1; then
              echo "run_all.sh: finished $name in $(( $(date +%s) - t0 )) s: $(grep -E 'test( \([a-z]+ decoding\))?: (WA|PER)' "$RUNS/logs/$name.log" | head -1)"
          else
              echo "run_all.sh: $name failed (log: $RUNS/logs/$name.log)"; touch "$RUNS/logs/$name.failed"; exit 1
          fi ) &
    fi
}
drain() {  # wait for every background training; each failure left a .failed marker
    wait
    [ "$JOBS" = 1 ] || FAILED=$(find "$RUNS/logs" -name '*.failed' | wc -l)
}

if [ "$TRANSFER" = 1 ]; then
    for k in 1 2 3 4 5; do run "teacher-fold$k" $PY satn.py teacher --fold $k "${COMMON[@]}"; done
fi
# The rows without transfer do not need the teachers: they fill free slots meanwhile.
for at in 0 1; do
    if [ "$at" = 1 ]; then
        [ "$TRANSFER" = 0 ] && break
        drain   # every teacher has finished before a student imitates one
    fi
    for enc in blstm tcn; do
        for att in soft self; do
            w=0; [ "$at" = 1 ] && w=$AT_WEIGHT
            for k in 1 2 3 4 5; do
                run "student-$enc-$att$([ "$at" = 1 ] && echo -at)-fold$k" \
                    $PY satn.py student --encoder $enc --attention $att --at-weight $w --fold $k "${COMMON[@]}"
            done
        done
    done
done
drain
if [ "$DRY" = 1 ]; then printf '%q ' $PY satn.py report --runs "$RUNS"; echo; exit 0; fi
$PY satn.py report --runs "$RUNS"
echo "run_all.sh: finished in $(( ($(date +%s) - START) / 60 )) min $(( ($(date +%s) - START) % 60 )) s, $FAILED failed run(s)"
[ "$FAILED" = 0 ]
