#!/usr/bin/env bash
# The GPU check (issue 31): every section of `python -m benchmarks.gpu_check` in its own process
# under its own timeout, then the report. See benchmarks/README.md, "The GPU check".
#
#   bash benchmarks/gpu_check.sh                 # on a GPU machine: results under $OUT, else benchmarks/results/gpu
#   bash benchmarks/gpu_check.sh --dry-run       # on CPU, tiny shapes, results in a temporary folder
#   bash benchmarks/gpu_check.sh --sections "teacher students" --out DIR -- --set student_steps=5
#   bash benchmarks/gpu_check.sh --check-wheels  # only check .whl/ against benchmarks/gpu_wheels.txt
#
# On the GPU machine the Python packages the image lacks come from wheels carried in .whl/ (made
# here by `python benchmarks/gpu_wheels.py`, listed in benchmarks/gpu_wheels.txt): they are
# installed into /tmp/kd-site before anything runs, or the script stops at once saying what is missing.
set -uo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT" || exit 2
DRY=0
CHECK_WHEELS=0
SECTIONS="machine losses gather teacher students"
RESULTS=""
BUDGET_S=${GPU_CHECK_BUDGET_S:-}     # the whole run; each section gets at most what is left of it
WHEELS=${GPU_CHECK_WHEELS:-$ROOT/.whl}
SITE=${GPU_CHECK_SITE:-/tmp/kd-site}
PY=${PYTHON:-python3}
EXTRA=()
while [ $# -gt 0 ]; do
  case "$1" in
    --dry-run) DRY=1 ;;
    --sections) SECTIONS="$2"; shift ;;
    --out) RESULTS="$2"; shift ;;
    --budget-s) BUDGET_S="$2"; shift ;;
    --check-wheels) CHECK_WHEELS=1 ;;
    --) shift; EXTRA=("$@"); break ;;
    -h|--help) sed -n '2,14p' "$0"; exit 0 ;;
    *) echo "gpu_check.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
  shift
done

fail() { echo "gpu_check.sh: $*" >&2; exit 3; }

check_wheels() {
  # The carried wheels: exactly one per line of benchmarks/gpu_wheels.txt, at its version.
  [ -d "$WHEELS" ] || fail "no $WHEELS folder: run 'python benchmarks/gpu_wheels.py' on the development machine and name .whl in the device call's carry (benchmarks/README.md)"
  local missing=() pin name version n
  while read -r pin; do
    name=${pin%%==*}; version=${pin#*==}
    n=$(ls "$WHEELS" | grep -ic "^$(sed 's/[-_.]/[-_.]/g' <<< "$name")-${version//./\\.}-.*\.whl$")
    [ "$n" = 1 ] || missing+=("$pin ($n wheels)")
  done < <(sed -e 's/#.*//' -e 's/[[:space:]]//g' -e '/^$/d' benchmarks/gpu_wheels.txt)
  [ ${#missing[@]} = 0 ] || fail "$WHEELS lacks (or has several of): ${missing[*]}; rerun 'python benchmarks/gpu_wheels.py'"
  local listed found
  listed=$(sed -e 's/#.*//' -e 's/[[:space:]]//g' -e '/^$/d' benchmarks/gpu_wheels.txt | wc -l)
  found=$(ls "$WHEELS" | grep -c '\.whl$')
  [ "$found" = "$listed" ] || fail "$WHEELS holds $found wheels for $listed pins: remove those benchmarks/gpu_wheels.txt does not name"
  echo "gpu_check.sh: $WHEELS holds every wheel of benchmarks/gpu_wheels.txt"
}

install_wheels() {
  # The packages the GPU image lacks, from the carried wheels, into $SITE (first on PYTHONPATH);
  # a rerun on the same warm machine finds them there (same list) and skips pip.
  check_wheels
  local listed
  listed=$(sha256sum benchmarks/gpu_wheels.txt | cut -d' ' -f1)
  if [ "$(cat "$SITE/.kd-wheels" 2>/dev/null)" = "$listed" ]; then
    echo "gpu_check.sh: the carried wheels are installed in $SITE already"
  else
    echo "gpu_check.sh: installing $(ls "$WHEELS"/*.whl | wc -l) carried wheels into $SITE"
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" \
      "$WHEELS"/*.whl || fail "pip could not install the carried wheels into $SITE"
    echo "$listed" > "$SITE/.kd-wheels"
  fi
  export PYTHONPATH="$SITE:$ROOT${PYTHONPATH:+:$PYTHONPATH}"
  export PATH="$SITE/bin:$PATH"
}

if [ "$CHECK_WHEELS" = 1 ]; then check_wheels; exit 0; fi
if [ "$DRY" = 0 ]; then  # before anything is written: this must be a GPU machine
  command -v nvidia-smi >/dev/null || fail "no nvidia-smi here: this is not a GPU machine (use --dry-run on CPU)"
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || fail "nvidia-smi sees no GPU"
  "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" \
    || fail "$PY's torch sees no CUDA device"
fi

# Seconds each section may take on the GPU machine (the dry run on a busy 2-core box gets 3x).
declare -A LIMIT=([machine]=60 [losses]=120 [gather]=120 [teacher]=200 [students]=260)
if [ "$DRY" = 1 ]; then
  for s in "${!LIMIT[@]}"; do LIMIT[$s]=$((3 * LIMIT[$s])); done
  BUDGET_S=${BUDGET_S:-1500}
  RESULTS=${RESULTS:-$(mktemp -d /tmp/kd-gpu-check-dry.XXXXXX)}
  DRYFLAG=(--dry-run)
else
  BUDGET_S=${BUDGET_S:-450}  # 7.5 min: the device allows 10 min a command, 15 min a session
  RESULTS=${RESULTS:-${OUT:-$ROOT/benchmarks/results/gpu}}
  DRYFLAG=()
fi
mkdir -p "$RESULTS/sections" || fail "cannot create $RESULTS/sections"
rm -f "$RESULTS"/sections/*.json "$RESULTS"/sections/*.rc
exec > >(tee -a "$RESULTS/gpu_check.log") 2>&1
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false RAY_DEDUP_LOGS=0 RAY_TRAIN_HEALTH_CHECK_INTERVAL_S=0.5
START=$SECONDS
echo "gpu_check.sh: $(date -u +%FT%TZ) results in $RESULTS; sections: $SECTIONS; budget ${BUDGET_S}s"

if [ "$DRY" = 0 ]; then
  if [ -d "$WHEELS" ]; then
    install_wheels
  elif "$PY" -c "import ray, open_clip, webdataset, sys; sys.exit(ray.__version__ != '2.60.0')" 2>/dev/null; then
    echo "gpu_check.sh: no $WHEELS; Ray 2.60.0, open_clip and webdataset are installed already"
  else
    check_wheels  # fails, saying what to prepare
  fi
else
  export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
fi
"$PY" -c "import ray, open_clip, webdataset, teacher_service.app, student_trainer.train, benchmarks.gpu_check.run" \
  || fail "the project does not import with $PY (PYTHONPATH=$PYTHONPATH)"
echo "gpu_check.sh: $("$PY" -c 'import sys, torch, ray, open_clip; print("Python", sys.version.split()[0], "torch", torch.__version__, "ray", ray.__version__, "open_clip", open_clip.__version__)')"

status=0
for section in $SECTIONS; do
  [ -n "${LIMIT[$section]:-}" ] || fail "unknown section $section"
  left=$((BUDGET_S - (SECONDS - START) - 20))  # 20 s kept for the report
  limit=$(( LIMIT[$section] < left ? LIMIT[$section] : left ))
  if [ "$limit" -lt 15 ]; then
    echo "gpu_check.sh: section $section not started: ${left}s of the budget left"
    echo 124 > "$RESULTS/sections/$section.rc"; status=1; continue
  fi
  echo "gpu_check.sh: section $section (timeout ${limit}s, $((SECONDS - START))s elapsed)"
  timeout -k 15 "$limit" "$PY" -m benchmarks.gpu_check --out "$RESULTS" "${DRYFLAG[@]}" "${EXTRA[@]}" "$section"
  rc=$?
  if [ ! -f "$RESULTS/sections/$section.json" ]; then
    echo "$rc" > "$RESULTS/sections/$section.rc"
    echo "gpu_check.sh: section $section wrote no result (exit $rc$( [ $rc = 124 ] || [ $rc = 137 ] && echo ': timed out'))"
    if [ "$DRY" = 0 ]; then ray stop --force >/dev/null 2>&1; fi  # free the GPU of a killed section's workers
  fi
  [ "$rc" = 0 ] || status=1
done
"$PY" -m benchmarks.gpu_check --report "$RESULTS" || status=1
echo "gpu_check.sh: done in $((SECONDS - START))s; results in $RESULTS (exit $status)"
exit $status
