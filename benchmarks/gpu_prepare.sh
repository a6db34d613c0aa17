#!/usr/bin/env bash
# On a machine that reaches PyPI, from the repository root: fetch what benchmarks/gpu_check.sh needs on the GPU
# machine (Python 3.12, CUDA 13, PyTorch 2.11, no MLX, no registry) into .gpu/, ignored by git:
#   .gpu/a/  the first half of MLX's CUDA wheel (mlx-cuda-13, ~90 MB, kept in two halves of under 64 MiB each)
#   .gpu/b/  its second half and the small wheels (mlx itself, nanobind for building the native kernels there, the
#            pinned transformers and openai-clip the tests use)
# Then copy the clone to the GPU machine and run gpu_check.sh stage, then run, there, as docs/gpu.md says.
set -euo pipefail
cd "$(dirname "$0")/.."
MLX_VERSION=$(python3 -c "import re; print(re.search(r'mlx\[cpu\]==([0-9.]+)', open('pyproject.toml').read())[1])")
exclude=$(git rev-parse --git-path info/exclude)
mkdir -p "$(dirname "$exclude")" && { grep -qx '/.gpu/' "$exclude" 2>/dev/null || echo '/.gpu/' >> "$exclude"; }
rm -rf .gpu && mkdir -p .gpu/a .gpu/b .gpu/download
download() {
    python3 -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_35_x86_64 --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
        --platform manylinux2014_x86_64 --platform any -d "$1" "${@:2}"
}
download .gpu/download "mlx-cuda-13==$MLX_VERSION"
download .gpu/b "mlx==$MLX_VERSION" nanobind==3.1.0 transformers==5.24.0
python3 -m pip wheel --quiet --no-deps -w .gpu/b openai-clip==1.0.1  # published as a source archive only
wheel=$(ls .gpu/download/mlx_cuda_13-*.whl)
split -n 2 -d "$wheel" ".gpu/part-"
mv .gpu/part-00 .gpu/a/ && mv .gpu/part-01 .gpu/b/
basename "$wheel" > .gpu/b/mlx-cuda-wheel-name
rm -rf .gpu/download
du -sh .gpu/a .gpu/b
