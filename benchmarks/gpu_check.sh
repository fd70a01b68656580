#!/usr/bin/env bash
# One short GPU check of faceforge (issue 14, item 8), in at most 8 minutes on a fresh single-GPU machine
# (H100/H200) that has a CUDA torch but not every dependency. Run from the repository root:
#
#   benchmarks/gpu_check.sh OUT_DIR [--wheels DIR] [--cpu-dry-run]
#
#   setup  record the machine, install missing dependencies (simplejpeg, ...) from the wheels in DIR, then
#          `pip install --no-deps -e .` (offline; PYTHONPATH=src covers a failed install)
#   a      pytest -m cuda (tests/test_cuda.py): precision per head, prefetch, compile, fused AdamW resume, torchrun
#   b      faceforge bench train rows: r50/r100 bf16 + channels_last with and without compile, r50 at N = 1M and
#          4M with sample_rate 0.1, ArcFace + TopoFR and ArcFace + UNPG, the real loader on a generated SynthFace
#          .rec, GIF at N = 4M (random codes: timing only), the head step alone at N = 4M (bench head-step --memory)
#   c      benchmarks/ijb_scoring.py --device cuda
#
# Every part runs under `timeout` (its own cap, and never past its section's end: setup by 75 s, a by 190 s, b by
# 430 s, c by 470 s after the start, so the whole stays under 8 minutes); a failing or timed-out part is recorded
# and the script goes on. OUT_DIR receives gpu_check.log (everything), parts.jsonl (one line per part: status, rc,
# seconds), results.jsonl (every JSON line the parts print, tagged with the part) and pytest_cuda.xml. Scratch
# data (SynthFace, GIF codes: about 8 GB) goes to a temporary folder, removed at the end.
# --cpu-dry-run runs the same sequence at tiny sizes on the CPU (tiny backbone, small N, 2 steps; the CUDA tests
# skip; no pip install: the checkout runs from PYTHONPATH=src). Python: $PYTHON, else python, else python3.
# Exit status: 0 when every part passed, 1 when one failed or timed out, 2 for bad arguments.

set -u -o pipefail

usage() {
    echo "usage: benchmarks/gpu_check.sh OUT_DIR [--wheels DIR] [--cpu-dry-run]" >&2
    exit 2
}

OUT="" WHEELS="" DRY=0
while [ $# -gt 0 ]; do
    case "$1" in
        --wheels) [ $# -ge 2 ] || usage; WHEELS=$2; shift 2 ;;
        --cpu-dry-run) DRY=1; shift ;;
        -h | --help) usage ;;
        -*) echo "gpu_check.sh: unknown option $1" >&2; usage ;;
        *) [ -z "$OUT" ] || usage; OUT=$1; shift ;;
    esac
done
[ -n "$OUT" ] || usage
if [ ! -f pyproject.toml ] || [ ! -d src/faceforge ]; then
    echo "gpu_check.sh: run it from the faceforge repository root" >&2
    exit 2
fi
if [ -n "$WHEELS" ] && [ ! -d "$WHEELS" ]; then
    echo "gpu_check.sh: --wheels $WHEELS is not a folder" >&2
    exit 2
fi

mkdir -p "$OUT" && OUT=$(cd "$OUT" && pwd) || exit 2
PY=${PYTHON:-$(command -v python || command -v python3)}
LOG=$OUT/gpu_check.log PARTS=$OUT/parts.jsonl RESULTS=$OUT/results.jsonl
: >"$LOG" && : >"$PARTS" && : >"$RESULTS" || exit 2
WORK=$(mktemp -d "${TMPDIR:-/tmp}/faceforge-gpu-check.XXXXXX") || exit 2
trap 'rm -rf "$WORK"' EXIT
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
START=$(date +%s.%N)
FAILED=0

elapsed() { # seconds since START (fractional)
    awk -v a="$START" -v b="$(date +%s.%N)" 'BEGIN { printf "%.1f", b - a }'
}

record() { # record NAME STATUS RC SECONDS TIMEOUT: one parts.jsonl line and one line on the terminal
    printf '{"part": "%s", "status": "%s", "rc": %s, "seconds": %s, "timeout_s": %s}\n' "$@" >>"$PARTS"
    printf '%-28s %-8s %6s s  (timeout %s s, at %s s)\n' "$1" "$2" "$4" "$5" "$(elapsed)"
    case "$2" in ok | skipped) ;; *) FAILED=1 ;; esac
}

part() { # part NAME CAP SECTION_END COMMAND...: COMMAND under timeout (CAP, and not past SECTION_END)
    local name=$1 cap=$2 end=$3 left rc status t0 t1
    shift 3
    left=$(awk -v e="$end" -v n="$(elapsed)" -v c="$cap" 'BEGIN { l = int(e - n); print (l < c ? l : c) }')
    if [ "$left" -lt 5 ]; then
        echo "=== $name: no time left in its section, not run" >>"$LOG"
        record "$name" out-of-time null 0 "$left"
        return
    fi
    echo "=== $name (timeout ${left} s): $*" >>"$LOG"
    t0=$(date +%s.%N)
    timeout -k 3 "$left" "$@" 2>>"$LOG" | tee -a "$LOG" >"$WORK/stdout"
    rc=${PIPESTATUS[0]}
    t1=$(date +%s.%N)
    grep '^{' "$WORK/stdout" | while IFS= read -r line; do
        printf '{"part": "%s", "row": %s}\n' "$name" "$line"
    done >>"$RESULTS"
    case $rc in 0) status=ok ;; 124 | 137) status=timeout ;; *) status=failed ;; esac
    record "$name" "$status" "$rc" "$(awk -v a="$t0" -v b="$t1" 'BEGIN { printf "%.1f", b - a }')" "$left"
}

skip() { # skip NAME WHY: a part this mode does not run
    echo "=== $1: skipped ($2)" >>"$LOG"
    record "$1" skipped null 0 0
}

# --- sizes: the GPU check, or the same sequence tiny on the CPU -----------------------------------------------
if [ "$DRY" = 1 ]; then
    DEV=(--device cpu --dtype bf16 --batch 16) R50=(--backbone tiny --embedding-size 32) R100=("${R50[@]}")
    N=1000 N1M=2000 N4M=4000 CODE_DIM=32 STEPS=(--warmup 1 --steps 2) LOADER_STEPS=("${STEPS[@]}")
    SYNTH=(--identities 16 --images-per-id 4) WORKERS=2 IJB=(--device cpu --scale 0.01)
else
    DEV=(--device cuda --dtype bf16 --batch 128) R50=(--backbone r50) R100=(--backbone r100)
    N=93431 N1M=1000000 N4M=4000000 CODE_DIM=512 STEPS=(--warmup 5 --steps 20) LOADER_STEPS=(--warmup 5 --steps 30)
    SYNTH=(--identities 1000 --images-per-id 8) WORKERS=12 IJB=(--device cuda)
fi
CODES_DEVICE=${DEV[1]}
NPROC=$("$PY" -c 'import os; print(len(os.sched_getaffinity(0)))')  # not nproc: it follows OMP_NUM_THREADS

echo "gpu_check: $([ "$DRY" = 1 ] && echo "CPU dry run" || echo "GPU run"), output in $OUT, log $LOG"

# --- setup ---------------------------------------------------------------------------------------------------
part setup.machine 30 60 "$PY" -c '
import json, os, platform, torch
cuda = torch.cuda.is_available()
device = torch.cuda.get_device_name(0) if cuda else platform.processor() or platform.machine()
print(json.dumps({"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
                  "cuda_available": cuda, "device": device, "cpus": os.cpu_count()}))'
command -v nvidia-smi >/dev/null && nvidia-smi >>"$LOG" 2>&1
if [ "$DRY" = 0 ] && ! "$PY" -c 'import torch, sys; sys.exit(not torch.cuda.is_available())' 2>>"$LOG"; then
    echo "gpu_check.sh: $PY has no CUDA device (see $LOG); for a CPU rehearsal use --cpu-dry-run" >&2
    exit 1
fi
MISSING=$("$PY" -c '
import importlib.util
wanted = {"simplejpeg": "simplejpeg", "numpy": "numpy", "PIL": "pillow", "yaml": "PyYAML", "safetensors": "safetensors",
          "sklearn": "scikit-learn", "scipy": "scipy", "tqdm": "tqdm", "tensorboard": "tensorboard",
          "matplotlib": "matplotlib", "onnx": "onnx", "onnxruntime": "onnxruntime", "onnxscript": "onnxscript",
          "pytest": "pytest", "setuptools": "setuptools"}
print(" ".join(pkg for module, pkg in wanted.items() if importlib.util.find_spec(module) is None))')
echo "=== missing dependencies: ${MISSING:-none}" >>"$LOG"
if [ -z "$MISSING" ]; then
    skip setup.wheels "nothing missing"
elif [ "$DRY" = 1 ]; then
    skip setup.wheels "dry run: would install $MISSING from ${WHEELS:-<no --wheels>}"
elif [ -z "$WHEELS" ]; then
    echo "=== setup.wheels: missing $MISSING and no --wheels DIR" >>"$LOG"
    record setup.wheels failed null 0 0
else
    # shellcheck disable=SC2086  # one word per package
    part setup.wheels 60 60 "$PY" -m pip install --no-index --find-links "$WHEELS" $MISSING
fi

if [ "$DRY" = 1 ]; then
    skip setup.pip-install "dry run: the checkout runs from PYTHONPATH=src"
else
    part setup.pip-install 60 75 "$PY" -m pip install --no-deps --no-build-isolation --no-index -e .
fi

# --- a: CUDA-only tests --------------------------------------------------------------------------------------
part a.pytest-cuda 130 190 "$PY" -m pytest -m cuda tests/test_cuda.py -v -rA -p no:cacheprovider \
    --durations=0 --junitxml="$OUT/pytest_cuda.xml"

# --- b: training-step benchmarks, cheapest and most telling first ---------------------------------------------
bench() { # bench NAME CAP ARGS...: one `faceforge bench train` row
    local name=$1 cap=$2
    shift 2
    part "b.$name" "$cap" 430 "$PY" -m faceforge bench train "$@"
}
CL=train.channels_last=true
bench r50 60 "$CL" "${R50[@]}" --num-classes "$N" "${DEV[@]}" "${STEPS[@]}"
bench r100 60 "$CL" "${R100[@]}" --num-classes "$N" "${DEV[@]}" "${STEPS[@]}"
bench r50-N1M-sr0.1 60 "$CL" "${R50[@]}" --num-classes "$N1M" --sample-rate 0.1 "${DEV[@]}" "${STEPS[@]}"
bench r50-N4M-sr0.1 90 "$CL" "${R50[@]}" --num-classes "$N4M" --sample-rate 0.1 "${DEV[@]}" "${STEPS[@]}"
# The head path alone at 4M classes (fused margin softmax, row-only update), its tracked peak next to the plan.
part b.head-step-N4M-sr0.1 60 430 "$PY" -m faceforge bench head-step --head arcface --num-classes "$N4M" \
    --sample-rate 0.1 --batch 1024 --device "$CODES_DEVICE" "${STEPS[@]}" --memory
bench r50-arcface+topofr 60 --config configs/ms1mv2_r100_topofr.yaml "$CL" "${R50[@]}" --num-classes "$N" \
    "${DEV[@]}" "${STEPS[@]}"
bench r50-arcface+unpg 60 --config configs/ms1mv2_r100_unpg_arcface.yaml "$CL" "${R50[@]}" --num-classes "$N" \
    "${DEV[@]}" "${STEPS[@]}"
part b.synthface 60 430 "$PY" -m faceforge synth "$WORK/synthface" "${SYNTH[@]}" --eval-identities 20 \
    --eval-images-per-id 3 --pairs 40 --workers "$NPROC"
bench r50-loader 60 "$CL" "${R50[@]}" --num-classes "$N" "${DEV[@]}" "${LOADER_STEPS[@]}" \
    --data "$WORK/synthface/train" --workers "$WORKERS"
bench r50-compile 120 "$CL" "${R50[@]}" --num-classes "$N" "${DEV[@]}" "${STEPS[@]}" --compile
part b.gif-codes 60 430 "$PY" benchmarks/random_gif_codes.py "$WORK/gif-codes.safetensors" --identities "$N4M" \
    --dim "$CODE_DIM" --device "$CODES_DEVICE"
bench r50-gif-N4M 90 --config configs/ms1mv3_r50_gif.yaml head.codes="$WORK/gif-codes.safetensors" "$CL" \
    "${R50[@]}" "${DEV[@]}" "${STEPS[@]}"
bench r100-compile 150 "$CL" "${R100[@]}" --num-classes "$N" "${DEV[@]}" "${STEPS[@]}" --compile

# --- c: IJB-C-size scoring -----------------------------------------------------------------------------------
part c.ijb-scoring 60 470 "$PY" benchmarks/ijb_scoring.py "${IJB[@]}"

echo "gpu_check: done in $(elapsed) s; $([ "$FAILED" = 0 ] && echo "every part passed" || echo "SOME PARTS FAILED"):" \
    "$PARTS, $RESULTS"
exit "$FAILED"
