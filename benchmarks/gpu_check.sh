#!/usr/bin/env bash
# The GPU measurement of issue 15 in one short run (at most 5 minutes), from the repository root:
#
#     OUT=./out bash benchmarks/gpu_check.sh
#
# Needs a CUDA GPU with torch, Triton and timm importable; installs nothing and runs the project from
# src/ (PYTHONPATH=src). Everything goes under $OUT (default ./out): per step NAME.md (its report),
# NAME.log (progress and errors, kept even when the step runs out of time), NAME.json where it has one,
# and steps.txt (step, exit status, seconds). Each step runs under its own `timeout` so a slow one
# cannot eat the next one's time (budgets in seconds, overridable by environment variables).
#
# First phase, every process at once (none of it is timed; the machine has CPU cores to spare, and
# compiling Triton kernels and torch.compile graphs is most of a first run's time: both caches live on
# disk, so the timed steps after it find them compiled):
#
#   correctness_fp32, _bf16, _fp16 (T_CHECK=70)
#                                   CBAM(impl="fused") on the Triton engine vs CBAM(impl="reference") in
#                                   float64 on the GPU, TF32 off: output, every gradient, running
#                                   statistics; NCHW and channels_last, residual, the folded BatchNorm,
#                                   train and eval (cbam.profile.cuda_check), one process per dtype
#   warm_fp32, _bf16, _bf16-autocast, warm_resnet (T_WARM=70)
#                                   the module table and the ResNet-50 runs once, results discarded
#
# Then one step at a time:
#
#   modules_MODE    (T_MODULES=90) cbam bench --device cuda, one run per mode (bf16-autocast, bf16, fp32;
#                                   T_MODULES split evenly), batch 64 at ResNet-50's stage shapes
#   resnet          (T_RESNET=75)   cbam bench --device cuda --resnet-only: ResNet-50 batch 128, 224²,
#                                   bf16 autocast and fp32, plain vs ours vs timm
#   host_profile    (T_HOST=30)     benchmarks/host_profile.py: where an eager call's host time goes
#                                   (cProfile: Triton's launch path, autograd, operators, our Python), ours
#                                   against timm's, training and eval at 256×56², bf16 autocast
#   kernels         (T_KERNELS=0: skipped; 60 runs it, beyond the 5 minutes) benchmarks/kernel_times.py: each
#                                   CUDA kernel's time per fused call (training and eval, batch 64, the stage
#                                   shapes) and in a ResNet-50 inference and training step, with each step's
#                                   wall time against its kernels' (host- or GPU-bound); launches.py counts them
#   graphs          (T_GRAPHS=35)   cbam bench --device cuda --modes bf16-autocast --graphs: the module table
#                                   again, with timm's module and ours also replayed from CUDA graphs (the
#                                   GPU's time without the host's per-call work); last, as a capture that
#                                   fails could leave the process's CUDA context unusable
#   compiled        (T_COMPILE=240) only with GPU_CHECK_COMPILE=1 (beyond the 5 minutes): --resnet-only
#                                   --compile --modes bf16-autocast, torch.compile's mode from COMPILE_MODE
#                                   (default; reduce-overhead replays each step from CUDA graphs)
#
# A budget of 0 skips its step (e.g. T_KERNELS=0 where the profile is already known) and leaves its files from an
# earlier run into the same $OUT alone: GPU_CHECK_COMPILE=1 with every other budget 0 adds the compiled step.
# BENCH_ARGS adds options to the module-table runs (e.g. BENCH_ARGS="--shapes 256x56,2048x7" for a rerun).
# A step that runs out of time leaves what it measured in NAME.log (one line per module or model).
# Exit status: 0 when every step of this run exited 0 (a correctness step exits 1 on any failed case); steps.txt
# keeps each run's lines under a "# run" line.
set -u
mkdir -p "${OUT:-./out}" || exit 2
OUT="$(cd "${OUT:-./out}" && pwd)" || exit 2  # absolute: the script moves to the repository root next
cd "$(dirname "$0")/.." || exit 2
export PYTHONPATH="src${PYTHONPATH:+:$PYTHONPATH}"
export CBAM_NO_EXTENSION=1  # the C++ CPU engine is not measured here: never build it on the GPU machine
PY="${PYTHON:-$(command -v python || command -v python3)}"
T_CHECK="${T_CHECK:-70}" T_WARM="${T_WARM:-70}" T_MODULES="${T_MODULES:-90}" T_RESNET="${T_RESNET:-75}"
T_HOST="${T_HOST:-30}" T_KERNELS="${T_KERNELS:-0}" T_GRAPHS="${T_GRAPHS:-35}"
T_COMPILE="${T_COMPILE:-240}"
echo "# run $(date -u '+%Y-%m-%d %H:%M:%S') UTC" >> "$OUT/steps.txt"

step() {  # step NAME BUDGET COMMAND...: stdout to NAME.md, stderr to NAME.log and the console; may run in the background
    local name=$1 budget=$2 start rc
    shift 2
    if [ "$budget" -eq 0 ]; then echo "== $name: skipped (budget 0)" >&2; return; fi
    echo "== $name (budget ${budget} s): $(printf '%s ' "$@" | head -n 1)" >&2
    start=$(date +%s)
    timeout -k 10 "$budget" "$@" > "$OUT/$name.md" 2> >(tee "$OUT/$name.log" >&2)
    rc=$?
    case $rc in
        124 | 137) echo "== $name: out of time after ${budget} s (partial progress in $OUT/$name.log)" >&2 ;;
    esac
    echo "$name $rc $(( $(date +%s) - start ))" >> "$OUT/steps.txt"
    echo "== $name: exit $rc in $(( $(date +%s) - start )) s" >&2
}

show() {  # show NAME...: the reports of the steps this run made (a skipped one may hold an earlier run's)
    local name
    for name; do
        awk -v name="$name" '/^# run/ { ran = 0 } $1 == name { ran = 1 } END { exit !ran }' "$OUT/steps.txt" &&
            cat "$OUT/$name.md"
    done
}

step environment 60 "$PY" -c '
import platform, torch
import triton
try:
    import timm; timm_version = timm.__version__
except ImportError:
    timm_version = None
cuda = torch.cuda.is_available()
print(f"device: {torch.cuda.get_device_name() if cuda else None} (CUDA available: {cuda}, CUDA {torch.version.cuda})")
print(f"torch {torch.__version__}, triton {triton.__version__}, timm {timm_version}, python {platform.python_version()}")
if not cuda:
    raise SystemExit("no CUDA device: nothing to measure")
'
show environment
if grep -q "^device: None" "$OUT/environment.md" || [ ! -s "$OUT/environment.md" ]; then
    echo "gpu_check: no CUDA device or no torch/triton; stopping" >&2
    exit 2
fi

check_budget=$(( T_CHECK > 40 ? T_CHECK - 20 : T_CHECK / 2 ))  # cases start within it; the rest is for exiting
for dtype in fp32 bf16 fp16; do
    step "correctness_$dtype" "$T_CHECK" "$PY" -m cbam.profile.cuda_check --device cuda --engine triton \
        --dtypes "$dtype" --budget "$check_budget" --json "$OUT/correctness_$dtype.json" &
done
for mode in fp32 bf16 bf16-autocast; do
    # shellcheck disable=SC2086  # BENCH_ARGS: extra options, word-split on purpose
    step "warm_$mode" "$T_WARM" "$PY" -m cbam bench --device cuda --modes "$mode" ${BENCH_ARGS:-} &
done
step warm_resnet "$T_WARM" "$PY" -m cbam bench --device cuda --resnet-only --steps 2 &
wait
show correctness_fp32 correctness_bf16 correctness_fp16

per_mode=$(( T_MODULES / 3 ))
for mode in bf16-autocast bf16 fp32; do
    # shellcheck disable=SC2086  # BENCH_ARGS: extra options, word-split on purpose (e.g. "--shapes 256x56")
    step "modules_$mode" "$per_mode" "$PY" -m cbam bench --device cuda --modes "$mode" \
        --save "$OUT/modules_$mode.json" ${BENCH_ARGS:-}
    show "modules_$mode"
done

step resnet "$T_RESNET" "$PY" -m cbam bench --device cuda --resnet-only --save "$OUT/resnet.json"
show resnet

step host_profile "$T_HOST" "$PY" benchmarks/host_profile.py
show host_profile

step kernels "$T_KERNELS" "$PY" benchmarks/kernel_times.py
show kernels

# shellcheck disable=SC2086  # BENCH_ARGS: as above
step graphs "$T_GRAPHS" "$PY" -m cbam bench --device cuda --modes bf16-autocast --graphs --save "$OUT/graphs.json" \
    ${BENCH_ARGS:-}
show graphs

if [ "${GPU_CHECK_COMPILE:-0}" = 1 ]; then
    step compiled "$T_COMPILE" "$PY" -m cbam bench --device cuda --resnet-only --compile --modes bf16-autocast \
        --compile-mode "${COMPILE_MODE:-default}" --save "$OUT/compiled.json"
    show compiled
fi

echo "== steps (name, exit status, seconds):" >&2
cat "$OUT/steps.txt" >&2
awk '/^# run/ { failed = 0; next } $1 !~ /^warm_/ && $2 != 0 { failed = 1 } END { exit failed }' \
    "$OUT/steps.txt"  # this run's steps; warm-ups only compile
