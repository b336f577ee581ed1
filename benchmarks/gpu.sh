#!/usr/bin/env bash
# The GPU measurements of issue 15 §3 in one prepared run, recorded in benchmarks/RESULTS-gpu.md.
#
#   bash benchmarks/gpu.sh                         # CUDA: full sizes, < 5 min on one H200 -> benchmarks/RESULTS-gpu.md
#   bash benchmarks/gpu.sh --cpu-smoke [--out F]   # CPU, tiny sizes, < 2 min on 2 cores (CI; tests/test_gpu.py)
#   bash benchmarks/gpu.sh --tiny [--out F]        # tiny sizes on CUDA (the gpu-marked test of this script)
#
# Without CUDA the plain call runs the CPU smoke run. Tiny runs write to --out, by default
# ${TMPDIR:-/tmp}/pven-gpu-smoke/RESULTS-gpu.md, and refuse benchmarks/RESULTS-gpu.md: the
# recorded GPU results are only ever replaced by a full CUDA run.
#
# Sections (full CUDA sizes; tiny sizes in brackets):
#   1. ReID train step, benchmarks/train_step.py: paper preset, ResNet-50 at 256 x 256, batch 64
#      (16 x 4) [default preset, ResNet-18 at 64 px, batch 32], modes fp32, channels_last + bf16,
#      torch.compile (channels_last + bf16; the compiling first step is reported apart from the
#      steady-state rate) [compile backend aot_eager on CPU: see SMOKE_COMPILE_BACKEND below];
#      then the real training loader (TrainStream + PKBatcher, CPU decode) at the same input
#      size for several worker counts, and how many workers keep up with the step.
#   2. Loader, benchmarks/shards.py: CPU decode and GPU decode (nvJPEG) [CPU decode only].
#   3. Evaluation, benchmarks/evaluation.py: VERI-Wild large (10,000 x 128,517), GEMMs on the
#      GPU [size smoke on CPU].
#   4. DDP on one device through torchrun, benchmarks/ddp_step.py: nccl [gloo], the train step
#      without a process group and inside DistributedDataParallel.
# Each section names the machine (GPU, CPU cores, torch/CUDA/cuDNN versions); each part its
# load (load average, GPU utilisation and memory in use before it starts) and wall time.
#
# Every part runs under a time limit, and every part runs even when an earlier one failed (one
# GPU session should tell as much as it can). Any failure is loud: its log tail is printed, the
# report goes to <out>.failed.md instead of <out>, and the script exits 1.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PY=${PYTHON:-$ROOT/.venv/bin/python}
RECORDED=$ROOT/benchmarks/RESULTS-gpu.md
# torch.compile's CPU code generation (C++, g++) of the ResNet-18 train step takes ~80 s cold on
# 2 cores, which the smoke run cannot afford; aot_eager traces the same graphs (dynamo and
# AOTAutograd: graph breaks, guards, the backward) and runs them eagerly. CUDA runs use inductor.
SMOKE_COMPILE_BACKEND=${SMOKE_COMPILE_BACKEND:-aot_eager}

usage() { sed -n '2,6p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; }
die() { echo "gpu.sh: error: $*" >&2; exit 2; }

DEVICE=auto SIZES=full OUT="" ARGS=${*:+ $*}
while (($#)); do
  case $1 in
    --cpu-smoke) DEVICE=cpu SIZES=tiny ;;
    --tiny) SIZES=tiny ;;
    --out) (($# >= 2)) || die "--out needs a file name"; OUT=$2; shift ;;
    -h|--help) usage; exit 0 ;;
    *) die "unknown argument '$1' (expected --cpu-smoke, --tiny, --out FILE)" ;;
  esac
  shift
done
[[ -x $PY ]] || die "no Python at $PY (make the venv, or set PYTHON=...)"
for need in "benchmarks/shards.py:--decode" "benchmarks/shards.py:--out" "benchmarks/evaluation.py:--device"; do
  grep -q -e "\"${need#*:}\"" "$ROOT/${need%%:*}" || die "${need%%:*} has no ${need#*:} flag, which this script needs"
done

# One Python start for the device and the machine's description (torch takes seconds to import).
probe=$("$PY" - <<'EOF'
import os, platform, torch
cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
           platform.machine())
soft = (f"torch {torch.__version__}, CUDA {torch.version.cuda or 'none'}, cuDNN {torch.backends.cudnn.version()}, "
        f"Python {platform.python_version()}")
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    gpu = f"{p.name} (sm_{p.major}{p.minor}, {p.total_memory / 2**30:.0f} GiB, {torch.cuda.device_count()} visible)"
else:
    gpu = "none (no CUDA device visible to torch)"
print(int(torch.cuda.is_available()))
print(f"GPU: {gpu}; CPU: {os.cpu_count()} cores ({cpu}); {soft}")
EOF
)
HAS_CUDA=${probe%%$'\n'*}
MACHINE=${probe#*$'\n'}
if [[ $DEVICE == auto ]]; then
  if ((HAS_CUDA)); then DEVICE=cuda; else DEVICE=cpu SIZES=tiny; echo "gpu.sh: no CUDA device: CPU smoke run" >&2; fi
fi
[[ $DEVICE == cuda ]] && ! ((HAS_CUDA)) && die "--tiny on CUDA, but torch sees no CUDA device"
if command -v nvidia-smi >/dev/null && [[ $DEVICE == cuda ]]; then
  MACHINE="$MACHINE; driver $(nvidia-smi --query-gpu=driver_version --format=csv,noheader | head -1)"
fi
if [[ $SIZES == tiny ]]; then
  OUT=${OUT:-${TMPDIR:-/tmp}/pven-gpu-smoke/RESULTS-gpu.md}
  mkdir -p "$(dirname "$OUT")"
  [[ $(realpath -m "$OUT") != $(realpath -m "$RECORDED") ]] \
    || die "--out $OUT: tiny runs never overwrite the recorded GPU results; choose another file"
fi
OUT=${OUT:-$RECORDED}
mkdir -p "$(dirname "$OUT")"

WORK=$(mktemp -d "${TMPDIR:-/tmp}/pven-gpu.XXXXXX")
trap 'rm -rf "$WORK"' EXIT
export PYTHONUNBUFFERED=1
cd "$ROOT"

# ---------------------------------------------------------------- sizes: everything tunable is here
if [[ $SIZES == full ]]; then
  CORES=$(nproc)
  TRAIN=(--device cuda --presets paper --modes fp32 channels_last+bf16 compile --steps 30 --warmup 3
         --loader-preset paper --loader-workers 2 4 8 12 --loader-batches 20 --loader-ids 60)
  DECODES=(cpu cuda) SHARDS=(--images 1000 --size 256 --workers 8 --repeats 1)
  EVAL=(--device cuda --sizes wild-large --sections limit)   # every mode; the dense baseline runs on the CPU only
  DDP=(--device cuda --preset paper --steps 20 --warmup 3)
  LIMITS=(180 45 100 60)   # s per part: train, each decode, evaluation, ddp (the whole run < 5 min)
  TITLES=("ReID train step: paper preset (ResNet-50, 256 x 256, batch 64) on $DEVICE, and the training loader (${CORES} cores)"
          "Loader: CPU decode vs GPU decode" "Evaluation at VERI-Wild large size, GEMMs on the GPU"
          "DDP on one GPU through torchrun (nccl)")
else
  COMPILE_BACKEND=inductor
  [[ $DEVICE == cpu ]] && COMPILE_BACKEND=$SMOKE_COMPILE_BACKEND && export OMP_NUM_THREADS=1
  THREADS=(--threads "${OMP_NUM_THREADS:-$(nproc)}")
  TRAIN=(--device "$DEVICE" --presets default --size 64 --modes fp32 channels_last+bf16 compile
         --compile-backend "$COMPILE_BACKEND" --steps 2 --warmup 1 "${THREADS[@]}"
         --loader-preset default --loader-workers 0 1 --loader-batches 5 --loader-ids 12)
  DECODES=(cpu) SHARDS=(--images 200 --size 128 --repeats 1)
  [[ $DEVICE == cuda ]] && DECODES=(cpu cuda)
  EVAL=(--device "$DEVICE" --sizes smoke --no-rerank)
  [[ $DEVICE == cuda ]] && EVAL+=(--sections limit)   # the dense baseline runs on the CPU only
  DDP=(--device "$DEVICE" --preset default --size 64 --steps 2 --warmup 1 "${THREADS[@]}")
  LIMITS=(120 60 60 90)
  TITLES=("ReID train step (tiny: default preset, ResNet-18, 64 px, batch 32) on $DEVICE, and the training loader"
          "Loader: $(IFS=/; echo "${DECODES[*]}" | tr a-z A-Z) decode (tiny)" "Evaluation (tiny: size smoke) on $DEVICE"
          "DDP on one device through torchrun ($([[ $DEVICE == cuda ]] && echo nccl || echo gloo), tiny)")
fi
TORCHRUN=("$PY" -m torch.distributed.run --standalone --nproc_per_node 1)

# ---------------------------------------------------------------- running and recording parts
FAILED=() SUMMARY=() BODY=$WORK/body.md
: >"$BODY"
now() { echo "$EPOCHREALTIME"; }
since() { awk -v a="$1" -v b="$(now)" 'BEGIN { printf "%.1f", b - a }'; }
load_now() {
  local gpu="n/a"
  if [[ $DEVICE == cuda ]] && command -v nvidia-smi >/dev/null; then
    gpu=$(nvidia-smi --query-gpu=utilization.gpu,memory.used --format=csv,noheader | head -1)
  fi
  echo "load average $(cut -d' ' -f1-3 /proc/loadavg) (1/5/15 min); GPU utilisation, memory in use: $gpu"
}

section() {  # section TITLE: a heading and the machine line
  printf '\n## %s\n\n%s\n' "$1" "$MACHINE" >>"$BODY"
}

part() {  # part NAME LIMIT_S CMD...: run CMD (which writes its report to $WORK/NAME.md) and record it
  local name=$1 limit=$2 t0 rc=0 took load
  shift 2
  load=$(load_now)
  echo "== gpu.sh: $name (limit ${limit} s): ${*#"$ROOT/"}" >&2
  t0=$(now)
  timeout --kill-after=15 "$limit" "$@" 2>&1 | tee "$WORK/$name.log" >&2 || rc=$?
  took=$(since "$t0")
  printf '\n### %s\n\nCommand: `%s`  \nBefore it: %s. Took %s s.\n\n' \
    "$name" "${*#"$ROOT/"}" "$load" "$took" >>"$BODY"
  if ((rc == 0)) && [[ -s $WORK/$name.md ]]; then
    sed 's/^#/####/' "$WORK/$name.md" >>"$BODY"   # its headings below this part's
    SUMMARY+=("| $name | $took | ok |")
  else
    ((rc == 124 || rc == 137)) && rc="$rc (timed out after $limit s)"
    ((rc == 0)) && rc="0 but no report at $WORK/$name.md"
    FAILED+=("$name")
    SUMMARY+=("| $name | $took | **FAILED**, exit $rc |")
    printf '**FAILED**: exit %s. Last lines of its output:\n\n```\n%s\n```\n' "$rc" "$(tail -n 40 "$WORK/$name.log")" \
      >>"$BODY"
    echo "!! gpu.sh: $name FAILED (exit $rc); last lines above, full log: $WORK/$name.log" >&2
    tail -n 40 "$WORK/$name.log" >&2
  fi
}

START=$(now)
section "1. ${TITLES[0]}"
part train-step "${LIMITS[0]}" "$PY" benchmarks/train_step.py "${TRAIN[@]}" --out "$WORK/train-step.md"
section "2. ${TITLES[1]}"
for decode in "${DECODES[@]}"; do
  part "decode-$decode" "${LIMITS[1]}" "$PY" benchmarks/shards.py --decode "$decode" "${SHARDS[@]}" \
    --out "$WORK/decode-$decode.md"
done
section "3. ${TITLES[2]}"
part evaluation "${LIMITS[2]}" "$PY" benchmarks/evaluation.py "${EVAL[@]}" --out "$WORK/evaluation.md"
section "4. ${TITLES[3]}"
part ddp "${LIMITS[3]}" "${TORCHRUN[@]}" benchmarks/ddp_step.py "${DDP[@]}" --out "$WORK/ddp.md"
TOTAL=$(since "$START")

# ---------------------------------------------------------------- the report, written atomically
REPORT=$WORK/report.md
{
  echo "# GPU benchmarks (benchmarks/gpu.sh)"
  echo
  echo "Run $(date -u '+%Y-%m-%d %H:%M UTC'): \`bash benchmarks/gpu.sh$ARGS\` ($SIZES sizes on $DEVICE)," \
       "git $(git -C "$ROOT" describe --always --dirty 2>/dev/null || echo unknown); total $TOTAL s."
  echo
  echo "$MACHINE"
  echo
  echo "| part | wall s | result |"
  echo "| --- | --- | --- |"
  printf '%s\n' "${SUMMARY[@]}"
  cat "$BODY"
  if [[ -f $OUT ]] && grep -q '^## Notes' "$OUT"; then echo; sed -n '/^## Notes/,$p' "$OUT"; fi
} >"$REPORT"
DEST=$OUT
((${#FAILED[@]})) && DEST=${OUT%.md}.failed.md
cp "$REPORT" "$DEST.tmp.$$" && mv -f "$DEST.tmp.$$" "$DEST"
echo "gpu.sh: total $TOTAL s; report: $DEST" >&2
if ((${#FAILED[@]})); then
  echo "!! gpu.sh: FAILED parts: ${FAILED[*]} (the report above is $DEST; $OUT was left as it was)" >&2
  exit 1
fi
