#!/usr/bin/env bash
# Installs the pinned CUDA 13.0 compiler toolchain from PyPI into .cuda/ (git-ignored) so that build.rs can
# compile every kernel: nvcc, NVVM, the CUDA runtime headers, CCCL (cuda_fp16.h / cuda_bf16.h need `nv/target`)
# and NVRTC (for run-time compilation when a built binary is moved to a machine without nvcc).
# Pinned to 13.0: 13.5 emits PTX 9.5, which a CUDA 13.0 driver (the GPU machines') rejects.
# Idempotent: a second run with the same pins does nothing. Prints the NVCC path to use on its last line.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
dest="${CAGE_CUDA_DIR:-$root/.cuda}"
pins=(
  "nvidia-cuda-nvcc==13.0.88"
  "nvidia-nvvm==13.0.88"
  "nvidia-cuda-crt==13.0.88"
  "nvidia-cuda-runtime==13.0.96"
  "nvidia-cuda-cccl==13.0.85"
  "nvidia-cuda-nvrtc==13.0.88"
)
stamp="$dest/.cage-pins"
want="$(printf '%s\n' "${pins[@]}")"
nvcc="$dest/nvidia/cu13/bin/nvcc"
if [[ -x "$nvcc" && -f "$stamp" && "$(cat "$stamp")" == "$want" ]]; then
  echo "install-cuda: pinned CUDA 13.0 already in $dest" >&2
else
  command -v gcc >/dev/null || { echo "install-cuda: nvcc needs gcc on PATH" >&2; exit 1; }
  rm -rf "$dest"
  PIP_ROOT_USER_ACTION=ignore python3 -m pip install --quiet --no-deps --target "$dest" "${pins[@]}"
  printf '%s\n' "${pins[@]}" >"$stamp"
fi
# Smoke test: a compiler that cannot build a trivial kernel is worse than none (build.rs would fall back silently).
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
printf 'extern "C" __global__ void k(float* x) { x[threadIdx.x] += 1.0f; }\n' >"$tmp/k.cu"
"$nvcc" -ptx -arch=compute_80 -o "$tmp/k.ptx" "$tmp/k.cu"
echo "$nvcc"
