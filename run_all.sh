#!/usr/bin/env bash
# Reproduce the paper's Table 2: five ASR teachers (one per fold), then the eight
# student configurations {BLSTM, TCN} x {soft, self-attention} x {without, with
# attention transfer} on every fold (five for IEMOCAP), then `python satn.py report`. The students
# without transfer may run beside the teachers; those with transfer wait for them. Beside
# Table 2's rows: the causal (streaming) TCN + self-attention student, without and with transfer.
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
PY=${PYTHON:-python}
SATN="$(dirname "$0")/satn.py"   # paths given by the user stay relative to where they called from
DATA=() RUNS=runs JOBS= DRY=0 AT_WEIGHT=1.0 EXTRA=()
while [ $# -gt 0 ]; do
    case "$1" in
        --data|--runs|--jobs|--at-weight)
            [ $# -ge 2 ] || { echo "run_all.sh: $1 needs a value" >&2; exit 2; }
            set -- "$1=$2" "${@:3}" ;;
    esac
    case "$1" in
        --data=*) DATA=(--data "${1#*=}") ;;
        --runs=*) RUNS=${1#*=} ;;
        --jobs=*) JOBS=${1#*=} ;;
        --at-weight=*) AT_WEIGHT=${1#*=} ;;
        --dry-run) DRY=1 ;;
        -h|--help) awk 'NR > 1 && !/^#/ {exit} NR > 1' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
        --fold|--fold=*|--name|--name=*|--encoder|--encoder=*|--attention|--attention=*|--resume|--no-resume|--causal|--no-causal)
            echo "run_all.sh: $1 is set by run_all.sh itself for each training" >&2; exit 2 ;;
        *) EXTRA+=("$1") ;;
    esac
    shift
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
TRANSFER=1 FOLDS=5
if [ "$DRY" = 0 ]; then
    mkdir -p "$RUNS/logs"
    rm -f "$RUNS"/logs/*.failed
    # Write the demo corpus and the feature cache once, before parallel jobs could race for them.
    "$PY" "$SATN" prepare "${DATA[@]}" --runs "$RUNS" | tee "$RUNS/logs/prepare.log"
    case ${PIPESTATUS[0]} in
        0) ;;
        3) TRANSFER=0; echo "run_all.sh: no transcripts: no teachers, and the rows with attention transfer are skipped" ;;
        *) exit 1 ;;
    esac
    FOLDS=$(sed -n 's/^folds: //p' "$RUNS/logs/prepare.log")
elif [ ${#DATA[@]} -gt 0 ]; then
    OUT=$("$PY" "$SATN" prepare "${DATA[@]}" --folds-only); [ $? = 3 ] && TRANSFER=0
    FOLDS=$(echo "$OUT" | sed -n 's/^folds: //p')
fi
[ -n "$FOLDS" ] || { echo "run_all.sh: could not count the sessions of the corpus" >&2; exit 1; }
trap 'echo "run_all.sh: interrupted; call it again to resume" >&2; exit 130' INT
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
    for k in $(seq "$FOLDS"); do run "teacher-fold$k" "$PY" "$SATN" teacher --fold "$k" "${COMMON[@]}"; done
fi
# The student configurations (run names without "-at", and their options): Table 2's four, then
# the causal student (satn.py's REPORT_ROWS gives each its label in the report).
CONFIG_NAMES=(blstm-soft blstm-self tcn-soft tcn-self tcn-self-causal)
CONFIG_OPTIONS=("--encoder blstm --attention soft" "--encoder blstm --attention self" "--encoder tcn --attention soft"
                "--encoder tcn --attention self" "--encoder tcn --attention self --causal")
# The rows without transfer do not need the teachers: they fill free slots meanwhile.
for at in 0 1; do
    if [ "$at" = 1 ]; then
        [ "$TRANSFER" = 0 ] && break
        drain   # every teacher has finished before a student imitates one
    fi
    for i in "${!CONFIG_NAMES[@]}"; do
        w=0; [ "$at" = 1 ] && w=$AT_WEIGHT
        for k in $(seq "$FOLDS"); do
            # shellcheck disable=SC2086  # the options are words
            run "student-${CONFIG_NAMES[$i]}$([ "$at" = 1 ] && echo -at)-fold$k" \
                "$PY" "$SATN" student ${CONFIG_OPTIONS[$i]} --at-weight "$w" --fold "$k" "${COMMON[@]}"
        done
    done
done
drain
if [ "$DRY" = 1 ]; then printf '%q ' "$PY" "$SATN" report --runs "$RUNS"; echo; exit 0; fi
"$PY" "$SATN" report --runs "$RUNS" || FAILED=$((FAILED + 1))
echo "run_all.sh: finished in $(( ($(date +%s) - START) / 60 )) min $(( ($(date +%s) - START) % 60 )) s, $FAILED failed run(s)"
[ "$FAILED" = 0 ]
