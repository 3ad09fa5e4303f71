#!/usr/bin/env bash
# Reproduce the paper's Table 2: five ASR teachers (one per fold), then the baseline
# (utterance statistics + linear, `--encoder stats`) and the eight student configurations
# {BLSTM, TCN} x {soft, self-attention} x {without, with attention transfer} on every fold
# (five for IEMOCAP), then `python satn.py report`. The students without transfer may run
# beside the teachers; those with transfer wait for them. Beside Table 2's rows: the causal
# (streaming) TCN + self-attention student, without and with transfer.
#
#   bash run_all.sh                      # the built-in demo corpus, demo-sized settings
#   bash run_all.sh --data /path/to/IEMOCAP_full_release
#   bash run_all.sh --data corpus.csv --jobs 4 --epochs 50
#   bash run_all.sh --dry-run            # print every training command, in dependency order
#   bash run_all.sh --data D --slurm --partition=gpu --gres=gpu:1 --time=1-00:00:00 [--submit]
#   bash run_all.sh --data corpus.csv --recipe robust --runs runs-robust
#   bash run_all.sh --seeds 3            # every training with seeds 0, 1, 2 (fold{k}, fold{k}-seed1, ...)
#   bash run_all.sh --data corpus.csv --asr-data asr.csv   # one teacher from a separate ASR corpus
#
# Options: --data PATH, --asr-data PATH (train one teacher on that ASR corpus, whose speakers
# must not occur in --data, and let every fold's student imitate it, instead of one teacher per
# fold), --runs DIR, --jobs N (trainings at once; with several GPUs, those of an inherited
# CUDA_VISIBLE_DEVICES or else all, each training starts on the GPU running fewest of them;
# default 1, or on a machine without a GPU one per core, up to 4; without a GPU each training has
# one thread, unless --threads is given), --at-weight W (W_AT of the transfer rows, > 0, default 1.0), --recipe paper|robust (the students' training
# recipe, default paper; see `python satn.py student --help`), --seeds N (every teacher and
# student trained with seeds 0..N-1, a student of seed s imitating the teacher of seed s, or
# the one --asr-data teacher; seed 0's
# runs keep their folders, the others go to fold{k}-seed{s}; report then averages over folds x
# seeds), --dry-run. --slurm: write RUNS/slurm/ (the commands of --dry-run, a SLURM job for
# `prepare`, job arrays for the teachers and the students without transfer after it, one for
# the students with transfer after every teacher (afterok), the report after all students,
# logs per task in RUNS/slurm/logs) and, with --submit, submit it;
# the arguments after --slurm, up to a `--`, go to every sbatch call. Any other argument is
# passed to every training (so it must be an option of both `teacher` and `student`, e.g.
# --epochs, --seed, --device, --batch-size, --norm; checked before anything runs), except those
# run_all.sh sets itself, which are refused: --fold, --name, --encoder, --attention, --causal,
# --teacher, --resume. Needs bash 4 and flock (util-linux). Finished
# runs are skipped and unfinished ones resumed, so calling it again after an interruption
# continues. INT or TERM (Ctrl-C, kill, a scheduler's limit) stops the running trainings too.
set -uo pipefail
if [ "${BASH_VERSINFO[0]}" -lt 4 ]; then   # e.g. macOS's /bin/bash 3.2: no associative arrays, no `wait -n`
    echo "run_all.sh: needs bash 4 or newer, this is $BASH_VERSION (on macOS: brew install bash)" >&2; exit 2
fi
PY=${PYTHON:-python}
SATN="$(dirname "$0")/satn.py"   # paths given by the user stay relative to where they called from
DATA=() ASR=() RUNS=runs JOBS= DRY=0 AT_WEIGHT=1.0 RECIPE=() SEEDS= EXTRA=() SLURM=0 SUBMIT=0 IN_SBATCH=0 SBATCH=()
while [ $# -gt 0 ]; do
    if [ "$IN_SBATCH" = 1 ]; then   # after --slurm: sbatch's options, up to `--`
        case "$1" in
            --) IN_SBATCH=0 ;;
            --submit) SUBMIT=1 ;;
            *) SBATCH+=("$1") ;;
        esac
        shift; continue
    fi
    case "$1" in
        --data|--asr-data|--runs|--jobs|--at-weight|--recipe|--seeds)
            [ $# -ge 2 ] || { echo "run_all.sh: $1 needs a value" >&2; exit 2; }
            set -- "$1=$2" "${@:3}" ;;
    esac
    case "$1" in
        --data=*) DATA=(--data "${1#*=}") ;;
        --asr-data=*) ASR=(--asr-data "${1#*=}") ;;
        --runs=*) RUNS=${1#*=} ;;
        --jobs=*) JOBS=${1#*=} ;;
        --at-weight=*) AT_WEIGHT=${1#*=} ;;
        --recipe=*) RECIPE=(--recipe "${1#*=}") ;;
        --seeds=*) SEEDS=${1#*=} ;;
        --dry-run) DRY=1 ;;
        --slurm) SLURM=1 DRY=1 IN_SBATCH=1 ;;
        --submit) SUBMIT=1 ;;
        -h|--help) awk 'NR > 1 && !/^#/ {exit} NR > 1' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
        --fold|--fold=*|--name|--name=*|--encoder|--encoder=*|--attention|--attention=*|--resume|--no-resume|--teacher|--teacher=*|--causal|--no-causal)
            echo "run_all.sh: $1 is set by run_all.sh itself for each training" >&2; exit 2 ;;
        *) EXTRA+=("$1") ;;
    esac
    shift
done
NGPU=0
[ "$DRY" = 0 ] && NGPU=$("$PY" -c "import torch; print(torch.cuda.device_count())" 2>/dev/null || echo 0)
# The GPUs to spread the trainings over: those this script was given (CUDA_VISIBLE_DEVICES, e.g. a
# scheduler's allocation), else all of them.
if [ -n "${CUDA_VISIBLE_DEVICES:-}" ]; then IFS=, read -ra GPUS <<< "$CUDA_VISIBLE_DEVICES"; else GPUS=($(seq 0 $((NGPU - 1)))); fi
THREADS=()
if [ -z "$JOBS" ]; then
    JOBS=1
    if [ "$NGPU" = 0 ] && [ "$DRY" = 0 ]; then
        # Small CPU trainings use a second core poorly: run one per core, one thread each.
        JOBS=$(nproc 2>/dev/null || echo 1); [ "$JOBS" -gt 4 ] && JOBS=4
        THREADS=(--threads 1)
    fi
fi
positive_int() {  # positive_int OPTION VALUE: prints VALUE as a decimal integer > 0 (00 is 0), or fails naming OPTION
    local digits=${2#"${2%%[!0]*}"}   # without leading zeros; more than 9 digits would overflow bash's arithmetic
    case "$2" in ''|*[!0-9]*) ;; *) [ ${#digits} -le 9 ] && [ "$((10#$2))" -gt 0 ] && { echo "$((10#$2))"; return 0; } ;; esac
    echo "run_all.sh: $1 needs a positive integer below 10^9, got '$2'" >&2; return 2
}
JOBS=$(positive_int --jobs "$JOBS") || exit 2
if [ "$NGPU" = 0 ] && [ "$DRY" = 0 ] && [ ${#THREADS[@]} = 0 ] && [ "$JOBS" -gt 1 ]; then
    # --jobs N on a CPU: one thread per training too, unless --threads says otherwise
    case " ${EXTRA[*]} " in *" --threads "*|*" --threads="*) ;; *) THREADS=(--threads 1) ;; esac
fi
[ -n "$RUNS" ] || { echo "run_all.sh: --runs needs a folder name, got ''" >&2; exit 2; }
if [ -n "$SEEDS" ]; then
    SEEDS=$(positive_int --seeds "$SEEDS") || exit 2
    for a in "${EXTRA[@]}"; do
        case "$a" in --seed|--seed=*) echo "run_all.sh: give either --seeds N (seeds 0..N-1) or --seed S, not both" >&2; exit 2 ;; esac
    done
fi
COMMON=("${DATA[@]}" --runs "$RUNS" --resume "${THREADS[@]}" "${EXTRA[@]}")
TRANSFER=1 FOLDS=5
SEED=0   # the --seed passed on to every training, if any (its teachers' folders are fold{k}-seed{S}, asr-seed{S})
for i in "${!EXTRA[@]}"; do
    case "${EXTRA[$i]}" in --seed=*) SEED=${EXTRA[$i]#*=} ;; --seed) SEED=${EXTRA[$((i + 1))]:-0} ;; esac
done
# Every option passed on must be one of both `teacher` and `student`, with a valid value: checked
# once here, not by each training after hours of others.
"$PY" -c 'import sys; sys.path.insert(0, sys.argv[1]); import satn; sys.exit(satn.check_shared_options(sys.argv[2:]))' \
    "$(dirname "$0")" --teacher-options "${ASR[@]}" "${COMMON[@]}" \
    --student-options "${COMMON[@]}" "${RECIPE[@]}" --at-weight "$AT_WEIGHT" || exit 2
# (a valid number by now) 0 would leave no rows with transfer and train the teachers for nothing
if awk -v w="$AT_WEIGHT" 'BEGIN { exit !(w + 0 == 0) }'; then
    echo "run_all.sh: --at-weight $AT_WEIGHT leaves no rows with transfer (the rows without it are trained anyway): give W_AT > 0" >&2; exit 2
fi
if [ "$DRY" = 0 ]; then
    mkdir -p "$RUNS/logs" || exit 1
    # One run_all.sh per runs folder: a second one would train into the same run folders.
    exec 9>>"$RUNS/.run_all.lock"
    command -v flock > /dev/null || { echo "run_all.sh: needs flock (util-linux; on macOS: brew install flock)" >&2; exit 2; }
    if ! flock -n 9; then
        echo "run_all.sh: $RUNS is in use by another run_all.sh (pid $(cat "$RUNS/.run_all.lock")): wait for it to end, or give another --runs" >&2
        exit 1
    fi
    echo $$ > "$RUNS/.run_all.lock"
    rm -f "$RUNS"/logs/*.failed
    # Write the demo corpus and the feature cache once, before parallel jobs could race for them.
    "$PY" "$SATN" prepare "${DATA[@]}" --runs "$RUNS" | tee "$RUNS/logs/prepare.log"
    case ${PIPESTATUS[0]} in
        0) ;;
        3) if [ ${#ASR[@]} -gt 0 ]; then echo "run_all.sh: no transcripts in --data: the teacher learns from --asr-data"
           else TRANSFER=0; echo "run_all.sh: no transcripts: no teachers, and the rows with attention transfer are skipped"; fi ;;
        *) exit 1 ;;
    esac
    FOLDS=$(sed -n 's/^folds: //p' "$RUNS/logs/prepare.log")
elif [ ${#DATA[@]} -gt 0 ]; then
    OUT=$("$PY" "$SATN" prepare "${DATA[@]}" --folds-only); [ $? = 3 ] && TRANSFER=0
    FOLDS=$(echo "$OUT" | sed -n 's/^folds: //p')
fi
[ -n "$FOLDS" ] || { echo "run_all.sh: could not count the sessions of the corpus" >&2; exit 1; }
stop() {  # INT or TERM to run_all.sh (Ctrl-C, kill, a scheduler's time limit): stop the trainings too
    trap '' INT TERM
    echo "run_all.sh: interrupted; stopping the running trainings (each keeps its last completed epoch); call it again to resume" >&2
    local p
    # A job is a subshell; its children train. TERM, not INT: a shell started in the background
    # (nohup, cron, a CI runner) may have handed them an ignored INT, which no one can undo.
    for p in $(jobs -p); do pkill -TERM -P "$p" 2>/dev/null; done
    wait
    exit 130
}
trap stop INT TERM
START=$(date +%s) FAILED=0
declare -A GPU_OF=()   # running job (pid) -> index into GPUS

TEACHERS=() STUDENTS=() STUDENTS_AT=()
run() {  # run <log name> <command...>: once per seed of --seeds (else once, as given)
    local name=$1; shift
    if [ -z "$SEEDS" ]; then run_one "$name" "$@"; return; fi
    local s
    for s in $(seq 0 $((SEEDS - 1))); do
        run_one "$name$([ "$s" = 0 ] || echo "-seed$s")" "$@" --seed "$s"
    done
}
run_one() {  # run_one <log name> <command...>: at most $JOBS at once
    local name=$1; shift
    if [ "$SLURM" = 1 ]; then   # collected for the job arrays
        case "$name" in
            teacher-*) TEACHERS+=("$(printf '%q ' "$@")") ;;
            student-*-at-fold*) STUDENTS_AT+=("$(printf '%q ' "$@")") ;;   # these wait for the teachers
            *) STUDENTS+=("$(printf '%q ' "$@")") ;;
        esac
        return
    fi
    if [ "$DRY" = 1 ]; then printf '%q ' "$@"; echo; return; fi
    while [ "$(jobs -rp | wc -l)" -ge "$JOBS" ]; do wait -n; done
    case "$name" in student-*-at-fold*)   # a student with transfer whose teacher failed: skipped, saying why
        local teacher="teacher-fold${name##*-at-fold}"
        [ ${#ASR[@]} -gt 0 ] && teacher="teacher-asr"
        if [ -e "$RUNS/logs/$teacher.failed" ]; then
            echo "run_all.sh: skipped $name: its teacher failed (log: $RUNS/logs/$teacher.log)"
            touch "$RUNS/logs/$name.failed"; FAILED=$((FAILED + 1)); return
        fi ;;
    esac
    local env=() g=""
    if [ "$NGPU" -gt 1 ]; then g=$(pick_gpu); env=(env CUDA_VISIBLE_DEVICES="${GPUS[$g]}"); fi
    local log="$RUNS/logs/$name.log"
    # appended to, under a header per call: calling run_all.sh again keeps the logs of what ran before
    echo "== run_all.sh $(date '+%F %T'): $(printf '%q ' "$@")" >> "$log"
    if [ "$JOBS" = 1 ]; then
        # in the background and waited for, so that a signal to run_all.sh is handled at once;
        # tee -i outlives an INT, to log the training's last words
        ( "${env[@]}" "$@" 9>&- 2>&1 | tee -i -a "$log"; exit "${PIPESTATUS[0]}" ) &
        wait $! || { FAILED=$((FAILED + 1)); echo "run_all.sh: $name failed (log: $log)"; touch "$RUNS/logs/$name.failed"; }
    else
        echo "run_all.sh: started $name (log: $log)"
        rm -f "$RUNS/logs/$name.failed"
        ( t0=$(date +%s)
          if "${env[@]}" "$@" 9>&- >> "$log" 2>&1; then   # the first test line since this call's header:
              echo "run_all.sh: finished $name in $(( $(date +%s) - t0 )) s: $(awk '/^== run_all.sh /{s=""} s=="" && /test( \([a-z]+ decoding\))?: (WA|PER)/{s=$0} END{print s}' "$log")"
          else
              case $? in 130|143) echo "run_all.sh: $name interrupted (log: $log)"; exit 1 ;; esac   # INT, TERM
              echo "run_all.sh: $name failed (log: $log)"; touch "$RUNS/logs/$name.failed"; exit 1
          fi ) &
        [ -n "$g" ] && GPU_OF[$!]=$g
    fi
}
pick_gpu() {  # the index of the GPU running the fewest of the trainings still running
    local p g best=0
    local -a n=()
    for g in "${!GPUS[@]}"; do n[g]=0; done
    for p in "${!GPU_OF[@]}"; do
        if kill -0 "$p" 2>/dev/null; then g=${GPU_OF[$p]}; n[g]=$((n[g] + 1)); fi
    done
    for g in "${!GPUS[@]}"; do [ "${n[g]}" -lt "${n[best]}" ] && best=$g; done
    echo "$best"
}
drain() {  # wait for every background training; each failure left a .failed marker
    wait
    [ "$JOBS" = 1 ] || [ "$DRY" = 1 ] || FAILED=$(find "$RUNS/logs" -name '*.failed' | wc -l)
}

write_slurm() {  # RUNS/slurm/: task lists, one array script, submit.sh; then submit it with --submit
    local dir="$RUNS/slurm" sb
    mkdir -p "$dir/logs" || return 1
    printf '%s\n' "${TEACHERS[@]}" | sed '/^$/d' > "$dir/teachers.txt"
    printf '%s\n' "${STUDENTS[@]}" | sed '/^$/d' > "$dir/students.txt"
    printf '%s\n' "${STUDENTS_AT[@]}" | sed '/^$/d' > "$dir/students-at.txt"
    cat > "$dir/task.sh" <<'TASK'
#!/usr/bin/env bash
# One task of a job array: line $SLURM_ARRAY_TASK_ID of the command list given as $1.
set -euo pipefail
line=$(sed -n "${SLURM_ARRAY_TASK_ID:?not inside a SLURM job array}p" "$1")
[ -n "$line" ] || { echo "task.sh: $1 has no line $SLURM_ARRAY_TASK_ID" >&2; exit 2; }
echo "task $SLURM_ARRAY_TASK_ID of $1 on $(hostname): $line"
eval "$line"
TASK
    quote() { printf '%q ' "$@"; }
    sb="sbatch --parsable --open-mode=append "   # a resubmission appends to a task's log
    [ ${#SBATCH[@]} -gt 0 ] && sb+=$(quote "${SBATCH[@]}")
    {
        echo '#!/usr/bin/env bash'
        echo "# Written by run_all.sh --slurm: prepare; then the teachers and the students without transfer"
        echo "# (one array task each); the students with transfer when every teacher succeeded (afterok);"
        echo "# the report after all students, whatever their outcome (afterany). A job whose dependency"
        echo "# failed is cancelled (--kill-on-invalid-dep), so the report still runs. Logs: $dir/logs/"
        echo 'set -euo pipefail'
        echo "cd $(quote "$PWD")"
        echo "jobid() { echo \"\${1%%;*}\"; }   # sbatch --parsable prints jobid[;cluster]"
        # prepare exits 3 for a corpus without transcripts: not a failure (the rows without transfer run)
        echo "P=\$(jobid \"\$($sb--job-name=satn-prepare --output=$(quote "$dir/logs/prepare-%j.out")--wrap=$(quote "$(quote "$PY" "$SATN" prepare "${DATA[@]}" --runs "$RUNS")|| [ \$? = 3 ]"))\")"
        local dep="--kill-on-invalid-dep=yes --dependency=afterok:" done="\$S"
        [ ${#TEACHERS[@]} -gt 0 ] &&
            echo "T=\$(jobid \"\$($sb${dep}\$P --array=1-${#TEACHERS[@]} --job-name=satn-teacher --output=$(quote "$dir/logs/teacher-%a.out")$(quote "$dir/task.sh" "$dir/teachers.txt"))\")"
        echo "S=\$(jobid \"\$($sb${dep}\$P --array=1-${#STUDENTS[@]} --job-name=satn-student --output=$(quote "$dir/logs/student-%a.out")$(quote "$dir/task.sh" "$dir/students.txt"))\")"
        if [ ${#STUDENTS_AT[@]} -gt 0 ]; then
            echo "A=\$(jobid \"\$($sb${dep}\$T --array=1-${#STUDENTS_AT[@]} --job-name=satn-student-at --output=$(quote "$dir/logs/student-at-%a.out")$(quote "$dir/task.sh" "$dir/students-at.txt"))\")"
            done+=":\$A"
        fi
        echo "R=\$(jobid \"\$($sb--dependency=afterany:$done --job-name=satn-report --output=$(quote "$dir/logs/report-%j.out")--wrap=$(quote "$(quote "$PY" "$SATN" report --runs "$RUNS")"))\")"
        echo 'echo "submitted: prepare $P, teachers ${T:-none}, students $S, students with transfer ${A:-none}, report $R"'
    } > "$dir/submit.sh"
    chmod +x "$dir/submit.sh" "$dir/task.sh"
    echo "run_all.sh: wrote $dir/submit.sh: ${#TEACHERS[@]} teacher task(s), ${#STUDENTS[@]} student task(s) without and ${#STUDENTS_AT[@]} with transfer, then the report"
    if [ "$SUBMIT" = 1 ]; then bash "$dir/submit.sh"; else echo "submit with: bash $dir/submit.sh (or run_all.sh ... --slurm ... --submit)"; fi
}

TEACHER=()
if [ ${#ASR[@]} -gt 0 ]; then
    # One teacher of the ASR corpus serves every fold (it refuses a corpus sharing speakers with --data).
    TRANSFER=1 TEACHER=(--teacher "$RUNS/teacher/asr$([ "$SEED" = 0 ] || echo "-seed$SEED")")
    run_one "teacher-asr" "$PY" "$SATN" teacher "${ASR[@]}" "${COMMON[@]}"   # once, also with --seeds
elif [ "$TRANSFER" = 1 ]; then
    for k in $(seq "$FOLDS"); do run "teacher-fold$k" "$PY" "$SATN" teacher --fold "$k" "${COMMON[@]}"; done
fi
# The student configurations (run names without "-at", and their options): Table 2's four, then
# the causal student (satn.py's REPORT_ROWS gives each its label in the report).
CONFIG_NAMES=(blstm-soft blstm-self tcn-soft tcn-self tcn-self-causal)
CONFIG_OPTIONS=("--encoder blstm --attention soft" "--encoder blstm --attention self" "--encoder tcn --attention soft"
                "--encoder tcn --attention self" "--encoder tcn --attention self --causal")
# The rows without transfer do not need the teachers: they fill free slots meanwhile.
# The baseline row comes first: every table says how far the deep models are above it.
for k in $(seq "$FOLDS"); do
    run "student-stats-fold$k" "$PY" "$SATN" student --encoder stats --at-weight 0 --fold "$k" "${RECIPE[@]}" "${COMMON[@]}"
done
for at in 0 1; do
    if [ "$at" = 1 ]; then
        [ "$TRANSFER" = 0 ] && break
        drain   # every teacher has finished before a student imitates one
    fi
    for i in "${!CONFIG_NAMES[@]}"; do
        w=0 tw=(); [ "$at" = 1 ] && w=$AT_WEIGHT tw=("${TEACHER[@]}")
        for k in $(seq "$FOLDS"); do
            # shellcheck disable=SC2086  # the options are words
            run "student-${CONFIG_NAMES[$i]}$([ "$at" = 1 ] && echo -at)-fold$k" \
                "$PY" "$SATN" student ${CONFIG_OPTIONS[$i]} --at-weight "$w" --fold "$k" "${RECIPE[@]}" \
                "${tw[@]}" "${COMMON[@]}"
        done
    done
done
drain
if [ "$SLURM" = 1 ]; then write_slurm; exit $?; fi
if [ "$DRY" = 1 ]; then printf '%q ' "$PY" "$SATN" report --runs "$RUNS"; echo; exit 0; fi
"$PY" "$SATN" report --runs "$RUNS" || FAILED=$((FAILED + 1))
echo "run_all.sh: finished in $(( ($(date +%s) - START) / 60 )) min $(( ($(date +%s) - START) % 60 )) s, $FAILED failed run(s)"
[ "$FAILED" = 0 ]
