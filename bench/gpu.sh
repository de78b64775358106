#!/usr/bin/env bash
# One prepared GPU run, in under 9 minutes: install offline, record the machine, run the CUDA tests, then the
# benchmark rows; writes bench/results/<gpu>-<date>.json (pytest-benchmark format, plus what ran) and .md.
#
#   bench/gpu.sh                      # on the GPU machine, from anywhere; results under bench/results/
#   bench/gpu.sh --dry-run --out DIR  # CPU, the benchmarks' tiny CPU sizes, short caps (what CI runs)
#
# Offline install: wheels handed in .whl/ (git-ignored) go to a --target folder on PYTHONPATH; the project is
# installed editable without its dependencies (pip install --no-deps --no-build-isolation --no-index -e .),
# which maps kernels/ and dataio/ to smoothsa.kernels and smoothsa.dataio. The one wheel a machine with torch,
# Triton, pytest and pytest-benchmark lacks is lmdb (the data layer and the training loop import it), and
# simplejpeg makes the loader workers' JPEG decoding faster (without it Pillow decodes, the same pixels):
#   python -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#       --platform manylinux_2_17_x86_64 -d .whl lmdb==3.0.0 simplejpeg==1.8.2
# Without lmdb the benchmark phases are skipped, and the JSON says why.
#
# Phases, each capped (timeout) and all within one deadline; a phase that no longer fits is skipped:
#   install 60 s · environment 30 s · pytest -m cuda 150 s · training step at the paper's B (smoothsa_r-coco 32
#   images, smoothsav_c-movi_c 8 clips = 48 frames) 150 s · end to end, torch and torch-gpu loaders, 15 workers,
#   bf16 + compile, 120 s · training step at 4× B (128 images; 32 clips = 192 frames) 100 s.
# Training-step rows: eager-fp32, eager-fp16, fused-bf16-compile, fused-bf16-cudagraphs (bench/test_bench_train_step.py);
# end-to-end rows: test_bench_end_to_end[torch] and [torch-gpu] (the two loaders; the loader stall fraction).
# Rows are chosen by -k expressions: a row the benchmarks do not (yet) have is recorded as "not collected".
set -uo pipefail

DRY_RUN=0
OUT=""
while [ $# -gt 0 ]; do
    case "$1" in
        --dry-run) DRY_RUN=1 ;;
        --out) OUT="${2:?--out needs a folder}"; shift ;;
        -h|--help) sed -n '2,/^[^#]/{/^#/p}' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) echo "bench/gpu.sh: unknown argument '$1' (use --dry-run, --out DIR)" >&2; exit 2 ;;
    esac
    shift
done

cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
START=$SECONDS
if [ "$DRY_RUN" = 1 ]; then
    DEADLINE=$((START + ${SMOOTHSA_GPU_BUDGET:-240}))
    OUT="${OUT:-$(mktemp -d)}"
else
    DEADLINE=$((START + ${SMOOTHSA_GPU_BUDGET:-530}))  # every phase ends by then: 9 minutes less 10 s for the report
    OUT="${OUT:-bench/results}"
fi
RUN="$(mktemp -d)"
mkdir -p "$OUT"
# Autotuning results persist between the phases' processes (compiled kernels do anyway, in Triton's cache).
export PYTHONUNBUFFERED=1 TRITON_DEFAULT_FP_FUSION=1 TRITON_CACHE_AUTOTUNING=1
: >"$RUN/phases.jsonl"
: >"$RUN/rows.jsonl"

# record PHASE STATUS SECONDS [REASON]
record() {
    "$PYTHON" -c 'import json, sys; print(json.dumps(dict(zip(["phase", "status", "seconds", "reason"], sys.argv[1:]))))' \
        "$1" "$2" "$3" "${4:-}" >>"$RUN/phases.jsonl"
}

# phase NAME CAP COMMAND...: runs COMMAND under min(CAP, time left), logs to $RUN/NAME.log, records the outcome.
# A phase stopped at its cap gets SIGINT (pytest then still writes its results), and SIGKILL GRACE s later.
GRACE=20
phase() {
    local name="$1" cap="$2"
    shift 2
    local left=$((DEADLINE - SECONDS - GRACE))
    [ "$cap" -gt "$left" ] && cap=$left
    if [ "$cap" -lt 10 ]; then
        record "$name" skipped 0 "no time left in the 9-minute budget"
        echo "== $name: skipped (no time left)"
        return
    fi
    echo "== $name (at most ${cap} s)"
    local begin=$SECONDS
    timeout --signal=INT --kill-after=$GRACE "$cap" "$@" >"$RUN/$name.log" 2>&1
    local rc=$?
    local took=$((SECONDS - begin))
    tail -n 5 "$RUN/$name.log"
    if [ $rc -eq 124 ] || [ $rc -eq 137 ]; then
        record "$name" "timed out" "$took" "stopped at its ${cap} s cap"
    elif [ $rc -eq 0 ] || [ $rc -eq 5 ]; then  # pytest: 5 = no test selected
        record "$name" ok "$took"
    else
        record "$name" failed "$took" "exit status $rc (see the log tail in the report)"
    fi
}

# rows PHASE TEST_FILE FUNCTION K_EXPRESSION: the rows a benchmark phase asks for (for the report).
rows() {
    "$PYTHON" -c 'import json, sys; print(json.dumps(dict(zip(["phase", "file", "function", "k"], sys.argv[1:]))))' \
        "$@" >>"$RUN/rows.jsonl"
}

# bench PHASE CAP TEST_FILE FUNCTION K_EXPRESSION [ENV=VALUE...]
bench() {
    local name="$1" cap="$2" file="$3" function="$4" k="$5"
    shift 5
    rows "$name" "$file" "$function" "$k"
    if [ -n "$BENCH_SKIP" ]; then
        record "$name" skipped 0 "$BENCH_SKIP"
        echo "== $name: skipped ($BENCH_SKIP)"
        return
    fi
    phase "$name" "$cap" env "$@" "$PYTHON" -m pytest -q -p no:cacheprovider "$file" -k "$function and ($k)" \
        --benchmark-json "$RUN/$name.bench.json" --junitxml "$RUN/$name.xml" -rs
}

# ------------------------------------------------------------------------------------------------- install
if [ "$DRY_RUN" = 1 ]; then
    record install skipped 0 "dry run: the project is already installed"
else
    SITE="$RUN/site"
    install() {
        if compgen -G ".whl/*.whl" >/dev/null; then
            "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" .whl/*.whl || return 1
        fi
        "$PYTHON" -m pip install -q --no-index --no-deps --no-build-isolation -e .
    }
    export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
    export -f install
    export PYTHON SITE
    phase install 60 bash -c install
fi
ls .whl/*.whl 2>/dev/null | xargs -r -n1 basename >"$RUN/wheels.txt"

# --------------------------------------------------------------------------------------------- environment
environment() {
    if command -v nvidia-smi >/dev/null; then
        nvidia-smi >"$RUN/nvidia-smi.txt" 2>&1
        nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv >>"$RUN/nvidia-smi.txt" 2>&1
    else
        echo "nvidia-smi: not found" >"$RUN/nvidia-smi.txt"
    fi
    "$PYTHON" - "$RUN/env.json" <<'EOF'
import importlib.util, json, os, platform, sys

import torch

def version(name):
    if importlib.util.find_spec(name) is None:
        return None
    module = __import__(name)
    return getattr(module, "__version__", "installed")

env = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
       "triton": version("triton"), "lmdb": version("lmdb"), "simplejpeg": version("simplejpeg"), "dali": importlib.util.find_spec("nvidia") is not None
       and importlib.util.find_spec("nvidia.dali") is not None, "pytest_benchmark": version("pytest_benchmark"),
       "cpu_count": os.cpu_count(), "gpu": None}
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    env.update(gpu=p.name, capability=f"{p.major}.{p.minor}", sms=p.multi_processor_count,
               gpu_memory_gib=round(p.total_memory / 2**30, 1))
try:
    import smoothsa
    env["smoothsa"] = os.path.dirname(smoothsa.__file__)
except ImportError as error:
    env["smoothsa"] = f"not importable: {error}"
json.dump(env, open(sys.argv[1], "w"), indent=1)
print(json.dumps(env))
EOF
}
export -f environment
export PYTHON RUN
phase environment 30 bash -c environment

BENCH_SKIP=""
if ! "$PYTHON" -c "import lmdb" 2>/dev/null; then
    BENCH_SKIP="lmdb is not importable (the benchmarks import the training loop, which imports the LMDB data layer): hand its wheel in .whl/"
fi

# ------------------------------------------------------------------------------------------------ CUDA tests
if [ "$DRY_RUN" = 1 ]; then
    CUDA_TESTS=(tests/kernels/test_slot_attention_kernel.py)  # collected and skipped without a GPU
else
    CUDA_TESTS=(tests)
fi
phase cuda_tests 150 "$PYTHON" -m pytest -q -p no:cacheprovider -m cuda "${CUDA_TESTS[@]}" --junitxml "$RUN/cuda_tests.xml" \
    --continue-on-collection-errors

# ---------------------------------------------------------------------------------------- benchmark rows
TRAIN_ROWS="eager-fp32 or eager-fp16 or fused-bf16-compile or fused-bf16-cudagraphs"
if [ "$DRY_RUN" = 1 ]; then
    BATCH_PAPER="smoothsa_r-coco=2,smoothsav_c-movi_c=2"
    BATCH_LARGE="smoothsa_r-coco=4,smoothsav_c-movi_c=2"
    ROUNDS=1
    WORKERS=1
else
    BATCH_PAPER="smoothsa_r-coco=32,smoothsav_c-movi_c=8"
    BATCH_LARGE="smoothsa_r-coco=128,smoothsav_c-movi_c=32"
    ROUNDS=10
    WORKERS=15
fi
bench train_step_b1 150 bench/test_bench_train_step.py test_bench_train_step "$TRAIN_ROWS" \
    SMOOTHSA_BENCH_BATCH="$BATCH_PAPER" SMOOTHSA_BENCH_ROUNDS=$ROUNDS
# bf16 like the compiled training-step rows at the same batch: inductor's cache then serves their graph.
bench end_to_end 120 bench/test_bench_end_to_end.py test_bench_end_to_end "torch or torch-gpu" SMOOTHSA_BENCH_WORKERS=$WORKERS \
    SMOOTHSA_BENCH_AMP=bf16
bench train_step_b4 100 bench/test_bench_train_step.py test_bench_train_step "$TRAIN_ROWS" \
    SMOOTHSA_BENCH_BATCH="$BATCH_LARGE" SMOOTHSA_BENCH_ROUNDS=$ROUNDS

# ---------------------------------------------------------------------------------------------------- report
"$PYTHON" bench/gpu_report.py "$RUN" "$OUT" --dry-run "$DRY_RUN" --seconds $((SECONDS - START))
