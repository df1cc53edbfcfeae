#!/usr/bin/env bash
# The GPU validation in one command, for a bare GPU machine without network (see benchmarks/README.md):
#   bash benchmarks/gpu_check.sh            # everything, about 8 minutes on an H100
#   bash benchmarks/gpu_check.sh --part 1   # tests and the step-time table; --part 2: epochs, training, CIFAR-10-C
#   bash benchmarks/gpu_check.sh --quick    # the same stages at toy sizes, on the CPU when there is no GPU
# Needs .gpu_carry/ from benchmarks/gpu_carry.sh (wheels this machine's Python lacks, the CIFAR-10 JPEGs).
# Every stage has a time budget and all end within 570 s; results go to benchmarks/results/*-<device>.md and, with
# the log, to $OUT.
# A short table comes last; the exit status is 0 when every stage is ok.
set -uo pipefail
cd "$(dirname "$0")/.."
REPO=$(pwd)
ARGS="$*"
QUICK=0
PART=all
while [ $# -gt 0 ]; do
  case $1 in
    --quick) QUICK=1 ;;
    --part) PART=$2; shift ;;
    *) echo "usage: $0 [--quick] [--part all|1|2]" >&2; exit 2 ;;
  esac
  shift
done
CARRY=${FORDE_CARRY:-$REPO/.gpu_carry}
WORK=${FORDE_WORK:-/tmp/forde-gpu-check}
OUT=${OUT:-$WORK/out}
DATA=$WORK/data
mkdir -p "$WORK" "$OUT/results" "$DATA"
LOG=$OUT/gpu_check.log
: > "$LOG"
START=$(date +%s)
LIMIT=${FORDE_TIME_LIMIT:-570}  # seconds: every stage ends by then (a run limited to 600 s still gets the summary)
export PYTHONUNBUFFERED=1 OMP_WAIT_POLICY=PASSIVE FORDE_DATA=$DATA WANDB_MODE=disabled
STATUS=()

say() { echo "$*" | tee -a "$LOG"; }
elapsed() { echo $(( $(date +%s) - START )); }

# stage NAME BUDGET_S COMMAND...: runs with a time limit (a shell function runs in a child bash), logs,
# records ok / failed / timed out and its seconds
stage() {
  local name=$1 budget=$2 left=$(( LIMIT - $(elapsed) ))
  shift 2
  if [ "$left" -lt 20 ]; then
    STATUS+=("$name|skipped (time limit)|0"); say "== $name: skipped, $(elapsed) s past the start"; return 1
  fi
  [ "$budget" -gt "$left" ] && budget=$left
  say "== $name (budget ${budget} s, at $(elapsed) s)"
  local t0 rc
  t0=$(date +%s)
  if [ "$(type -t "$1")" = function ]; then
    timeout -k 10 "$budget" bash -c "$(declare -f "$1"); $(printf '%q ' "$@")" >> "$LOG" 2>&1
  else
    timeout -k 10 "$budget" "$@" >> "$LOG" 2>&1
  fi
  rc=$?
  local took=$(( $(date +%s) - t0 )) verdict=ok
  [ $rc -eq 124 ] || [ $rc -eq 137 ] && verdict="timed out"
  [ $rc -ne 0 ] && [ "$verdict" = ok ] && verdict="failed (exit $rc)"
  STATUS+=("$name|$verdict|$took")
  say "   $name: $verdict in $took s"
  tail -n 4 "$LOG" | sed 's/^/   | /'
  cp "$RESULTS"/*-"$SUFFIX".md "$OUT/results/" 2>/dev/null  # what is done survives a stop later on
  return $rc
}

# -- environment: the project's code, and what the image lacks from the carried wheels; the check stops here, with
#    one line naming what is missing, before any stage runs ----------------------------------------------------
PY=python3
export PYTHONPATH=$REPO/src
if ls "$CARRY"/wheels/*.whl >/dev/null 2>&1; then
  rm -rf "$WORK/site"
  $PY -m pip install -q --no-index --no-deps --no-compile --target "$WORK/site" "$CARRY"/wheels/*.whl >> "$LOG" 2>&1 ||
    { say "installing the carried wheels failed: see $LOG"; exit 2; }
  export PYTHONPATH=$WORK/site:$REPO/src
fi
$PY benchmarks/gpu_env.py check 2>&1 | tee -a "$LOG"
[ "${PIPESTATUS[0]}" = 0 ] || exit 2
DEVICE=$($PY -c "import torch; print('cuda' if torch.cuda.is_available() else 'cpu')")
say "device: $($PY -c "import torch; print(torch.cuda.get_device_name() if torch.cuda.is_available() else 'CPU only')"), torch $($PY -c 'import torch; print(torch.__version__)'), $(nproc) cores; quick=$QUICK part=$PART"
[ "$DEVICE" = cpu ] && [ $QUICK = 0 ] && { say "no CUDA device: use --quick to try the stages on the CPU"; exit 2; }
RESULTS=$REPO/benchmarks/results
SUFFIX=$DEVICE
[ $QUICK = 1 ] && { RESULTS=$WORK/results; SUFFIX=$DEVICE-quick; mkdir -p "$RESULTS"; }

if [ $QUICK = 1 ]; then  # toy sizes: every stage still runs its real code path
  STEP_ARGS=(--models small_resnet --sizes 2 --batch 32 --settings loop+fp32 --min-run-time 0.1 --rounds 1)
  EPOCH_ARGS=(--images 512 --members 2 --warmup-steps 2 model.width=4 optim.batch_size=64)
  TRAIN_ARGS=(--epochs 1 ensemble_size=2 model.width=4 optim.batch_size=100)
  EVAL_ARGS=(eval.batch_size=200 eval.grad_samples=50)
  export TRAIN_PER_CLASS=100 TEST_PER_CLASS=20  # images per class taken from the JPEGs
  WORKERS=2
else
  STEP_ARGS=(--models resnet18 --sizes 10 --batch 128 --min-run-time 0.5 --rounds 3
             --settings "${FORDE_STEP_SETTINGS:-loop+fp32,loop+tf32,loop+tf32+nobench,loop+tf32+cl,loop+bf16,loop+bf16+cl,loop+bf16+cl+graphs,loop+tf32+cl+graphs,vmap+tf32+cl,vmap+bf16+cl}")
  EPOCH_ARGS=(--images 50000 --members 10 --warmup-steps 10)
  TRAIN_ARGS=(--epochs "${FORDE_TRAIN_EPOCHS:-2}")
  EVAL_ARGS=(eval.batch_size=1000 eval.grad_samples=1000)
  WORKERS=$(( $(nproc) > 4 ? $(nproc) - 4 : 1 ))  # cores left to the GPU stages while the -C sets are built
fi

# -- data, in the background while the GPU stages that need none run: CIFAR-10 from the carried JPEGs, the PCA
#    of its training images (FoRDE's kernel), every corruption x severity of its test set (CIFAR-10-C) ----------
prepare_data() {
  local src=$WORK/cifar10-jpg
  rm -rf "$src" && mkdir -p "$src" && tar -xzf "$CARRY/cifar10-jpg.tar.gz" -C "$src" || return 1
  if [ -n "${TRAIN_PER_CLASS:-}" ]; then  # quick: a few images per class
    local small=$WORK/cifar10-small split n cls
    rm -rf "$small"
    for split in train test; do
      n=$TRAIN_PER_CLASS; [ $split = test ] && n=$TEST_PER_CLASS
      for cls in "$src/$split"/*/; do
        mkdir -p "$small/$split/$(basename "$cls")"
        ls "$cls" | head -n "$n" | while read -r f; do cp "$cls/$f" "$small/$split/$(basename "$cls")/"; done
      done
    done
    src=$small
  fi
  rm -rf "$DATA/cifar10" "$DATA/cifar10-C" &&
  $PY -m forde.cli data import-folder "$src" cifar10 --root "$DATA" &&
  $PY -m forde.cli data pca --dataset cifar10 --root "$DATA" &&
  $PY -m forde.cli data corrupt --dataset cifar10 --root "$DATA" --workers "$WORKERS"
}
PREP_PID=
if [ "$PART" != 1 ]; then
  say "== data preparation started in the background (at $(elapsed) s)"
  set -m  # its own process group, so that the deadline can stop it with every worker it started
  ( t0=$(date +%s); prepare_data > "$WORK/prep.log" 2>&1; echo "$? $(( $(date +%s) - t0 ))" > "$WORK/prep.rc" ) &
  PREP_PID=$!
  set +m
fi

# -- part 1: the cuda tests and the step-time table -------------------------------------------------------
if [ "$PART" != 2 ]; then
  # one process (the suite's addopts spread it over two with pytest-xdist, which the image lacks and this needs not)
  stage "pytest -m cuda" 150 $PY -m pytest -o addopts="-ra --timeout=600" -m cuda -q -p no:cacheprovider tests
  stage "step times" 180 $PY benchmarks/step_time.py --device "$DEVICE" "${STEP_ARGS[@]}" --out "$RESULTS/step_time-$SUFFIX.md"
  if [ "$($PY -c 'import torch; print(torch.cuda.device_count())')" -ge 2 ]; then  # one ensemble over two GPUs
    stage "two GPUs" 120 $PY benchmarks/distributed.py --device cuda --processes 1,2 --out "$RESULTS/distributed-$SUFFIX.md"
  fi
fi

# -- part 2: real epochs, a short CIFAR-10 training, the whole CIFAR-10-C evaluation ----------------------
if [ "$PART" != 1 ]; then
  FASTEST=()
  [ -f "$RESULTS/step_time-$SUFFIX.md" ] && read -r -a FASTEST <<< "$($PY benchmarks/step_time.py --fastest "$RESULTS/step_time-$SUFFIX.md")"
  say "fastest FoRDE setting of the step table: ${FASTEST[*]:-(no table: the device defaults)}"
  stage "epoch, defaults" 75 $PY benchmarks/epoch_time.py --device "$DEVICE" "${EPOCH_ARGS[@]}" --out "$RESULTS/epoch_time-$SUFFIX.md"
  if [ ${#FASTEST[@]} -gt 0 ]; then
    stage "epoch, fastest setting" 75 $PY benchmarks/epoch_time.py --device "$DEVICE" "${EPOCH_ARGS[@]}" "${FASTEST[@]}" \
      --out "$RESULTS/epoch_time-fastest-$SUFFIX.md"
  fi
  say "== waiting for the data preparation (at $(elapsed) s)"
  while kill -0 "$PREP_PID" 2>/dev/null && [ "$(elapsed)" -lt $(( LIMIT - 60 )) ]; do sleep 2; done
  kill -0 "$PREP_PID" 2>/dev/null && { kill -TERM -- -"$PREP_PID"; echo "124 $(elapsed)" > "$WORK/prep.rc"; }
  wait "$PREP_PID" 2>/dev/null
  cat "$WORK/prep.log" >> "$LOG"
  read -r PREP_RC PREP_S < "$WORK/prep.rc"
  STATUS+=("data: import, PCA, CIFAR-10-C (background)|$([ "$PREP_RC" = 0 ] && echo ok || echo "failed (exit $PREP_RC)")|$PREP_S")
  say "   data preparation: exit $PREP_RC after $PREP_S s; now at $(elapsed) s"
  RUNS=$WORK/runs
  rm -rf "$RUNS"
  stage "short CIFAR-10 training" 120 $PY benchmarks/short_training.py --device "$DEVICE" --root "$DATA" --runs "$RUNS" \
    "${TRAIN_ARGS[@]}" "${FASTEST[@]}" --out "$RESULTS/cifar10_training-$SUFFIX.md"
  RUN=$(ls -d "$RUNS"/*forde* 2>/dev/null | head -n 1)
  if [ -n "$RUN" ]; then
    stage "CIFAR-10-C evaluation" 100 $PY benchmarks/eval_speed.py --device "$DEVICE" --root "$DATA" --run "$RUN" \
      "${EVAL_ARGS[@]}" "${FASTEST[@]}" --out "$RESULTS/eval_speed-$SUFFIX.md"
  else
    STATUS+=("CIFAR-10-C evaluation|skipped (no trained run)|0")
  fi
fi

# -- the summary: written beside the results, printed last --------------------------------------------------
SUMMARY=$RESULTS/gpu_check-$SUFFIX.md
{
  echo "# GPU check, $DEVICE"
  echo
  echo "- $(grep -m1 '^device:' "$LOG")"
  echo "- date: $(date -Iseconds); command: \`bash benchmarks/gpu_check.sh $ARGS\`; total $(elapsed) s"
  echo
  echo "| stage | result | seconds |"
  echo "|---|---|---:|"
  for s in "${STATUS[@]}"; do echo "| ${s//|/ | } |"; done
  echo
  PYTEST_LINE=$(grep -E '^[0-9]+ (passed|failed|skipped)|^=+ .*(passed|failed|skipped)' "$LOG" | tail -n 1)
  [ -n "$PYTEST_LINE" ] && echo "pytest: $PYTEST_LINE"
  for f in "$RESULTS"/step_time-"$SUFFIX".md "$RESULTS"/epoch_time*-"$SUFFIX".md "$RESULTS"/cifar10_training-"$SUFFIX".md \
           "$RESULTS"/eval_speed-"$SUFFIX".md; do
    [ -f "$f" ] || continue
    echo
    echo "$(basename "$f"):"
    grep -E '^\| |^Measured|^Over the sets| width [0-9]+, M = ' "$f" | grep -vE '^\|---' | head -n 30
  done
} > "$SUMMARY"
cp "$RESULTS"/*-"$SUFFIX".md "$OUT/results/" 2>/dev/null
cat "$SUMMARY"
for s in "${STATUS[@]}"; do  # the exit status: 0 only when every stage is ok
  IFS='|' read -r _ verdict _ <<< "$s"
  [ "$verdict" = ok ] || exit 1
done
