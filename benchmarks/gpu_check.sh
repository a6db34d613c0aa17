#!/usr/bin/env bash
# On a machine with an NVIDIA GPU and CUDA (docs/gpu.md), from the repository root, one after the other there:
#   bash benchmarks/gpu_check.sh stage    # needs .gpu/a: keeps the CUDA wheel's first half in /tmp
#   bash benchmarks/gpu_check.sh run      # needs .gpu/b: joins it, installs MLX, runs the benchmarks, then the tests
# Sized to finish within 600 s: about 60 s of set-up, 12 benchmarks of seconds each on a GPU (each cut off at 60 s),
# the suite cut off at 120 s (its log says how far it got).
# .gpu/ is made beforehand by benchmarks/gpu_prepare.sh. Results land in $OUT: pytest.log, bench-*.json, summary.txt.
set -uo pipefail
cd "$(dirname "$0")/.."
STAGE=/tmp/mlx-gpu
OUT=${OUT:-/tmp/mlx-gpu-out}
mkdir -p "$STAGE" "$OUT"

case "${1:-}" in
stage)
    cp .gpu/a/part-00 "$STAGE/" && ls -la "$STAGE"
    exit $?
    ;;
run) ;;
*) echo "usage: $0 stage|run" >&2; exit 2 ;;
esac

[ -f "$STAGE/part-00" ] || { echo "no $STAGE/part-00: run '$0 stage' first, on the same warm machine" >&2; exit 1; }
wheel="$STAGE/$(cat .gpu/b/mlx-cuda-wheel-name)"
cat "$STAGE/part-00" .gpu/b/part-01 > "$wheel"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
    "$wheel" .gpu/b/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
{
    nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
    python3 -c "import mlx.core as mx, torch; print('mlx', mx.__version__, mx.default_device(), '| torch', \
torch.__version__, torch.cuda.get_device_name())"
} 2>&1 | tee "$OUT/summary.txt"

# The native CPU kernels, built against this MLX (cmake is there): their tests run on this machine's CPU too.
python3 setup.py -q build_ext --inplace > "$OUT/build.log" 2>&1
python3 -c "from mlx_aim.backend import native; print('native kernels:', native.available() or native.unavailable_reason())" \
    | tee -a "$OUT/summary.txt"

# MLX's CUDA backend against PyTorch CUDA on the same weights (scripts/benchmark.py; medians of 10 calls).
bench() {
    local name=$1; shift
    timeout 60 python3 scripts/benchmark.py --compare-torch --torch-device cuda --warmup 3 --repeats 10 --json "$@" \
        > "$OUT/bench-$name.json" 2> "$OUT/bench-$name.err"
    python3 - "$OUT/bench-$name.json" "$name" <<'PY' | tee -a "$OUT/summary.txt"
import json, sys
try:
    result = json.loads(open(sys.argv[1]).read().strip().splitlines()[-1])
except Exception as error:  # a failed run: its stderr is beside the JSON
    print(f"{sys.argv[2]}: failed ({error})")
    sys.exit()
for run in result["runs"]:
    t = run["timings"]
    print(f"{sys.argv[2]}: {run['task']} {run['dtype']} q={run['quantization']} batch {run['batch_size']}: "
          f"MLX {t['mlx']['images_per_s']:.1f} img/s, torch {t['torch']['images_per_s']:.1f} img/s, "
          f"ratio {run['ratio_mlx_over_torch']:.2f}x")
PY
}
bench aim-600M-float32 --preset aim-600M --batch-size 2
bench aim-600M-bfloat16 --preset aim-600M --batch-size 2 --dtype bfloat16
bench aim-600M-4bit --preset aim-600M --batch-size 2 --quantize 4
bench aim-600M-float32-b32 --preset aim-600M --batch-size 32
bench aim-small-step --preset aim-small --train-only --batch-size 4
bench aim-small-step-b64 --preset aim-small --train-only --batch-size 64
bench aim-small-lora-step --preset aim-small --finetune lora --batch-size 4
# The token curve: aimv2-large at native resolution against transformers' Aimv2VisionModel, batch 1.
for size in 224 336 448 672 896; do
    bench aimv2-native-$size --preset aimv2-large-patch14-native --image-size $size --batch-size 1
done

# The suite on the GPU (MLX's default device there): what passes, what fails.
timeout 120 python3 -m pytest -q -p no:cacheprovider -o addopts="-ra" --timeout 60 tests > "$OUT/pytest.log" 2>&1
echo "pytest exit $?: $(tail -1 "$OUT/pytest.log")" | tee -a "$OUT/summary.txt"
