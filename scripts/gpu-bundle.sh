#!/usr/bin/env bash
# Builds the GPU test and bench binaries here (the GPU machine has no Rust toolchain) and bundles them into the
# git-ignored gpu-bundle/ with its runner (scripts/gpu/run.sh, which says what each stage measures). Pass
# gpu-bundle in the device tool's `carry`, then run there, from the repository root,
#   bash gpu-bundle/run.sh [--budget SECONDS]
# Results go to $OUT (or gpu-bundle/results) and name the card they ran on.
#   bash scripts/gpu-bundle.sh --dry-run
# builds the bundle and runs it here on the host emulation with tiny models (CI does: scripts/test.sh), with
# the Python of $CAGE_PYTHON (default: the test venv target/pyenv, which has torch, transformers and peft).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
bundle="$root/gpu-bundle"
if [[ -z "${NVCC:-}" && -x "$root/.cuda/nvidia/cu13/bin/nvcc" ]]; then
  export NVCC="$root/.cuda/nvidia/cu13/bin/nvcc"
fi
[[ -n "${NVCC:-}" ]] || echo "gpu-bundle: no nvcc (run scripts/install-cuda.sh): kernels will be compiled by NVRTC on the GPU machine" >&2
shopt -s nullglob
dry=0
[[ "${1:-}" == "--dry-run" ]] && dry=1
rm -rf "$bundle"
mkdir -p "$bundle/tests" "$bundle/benches"
# Executables of the test and bench targets, read from cargo's JSON messages.
executables() {
  python3 -c '
import json, sys
for line in sys.stdin:
    try:
        m = json.loads(line)
    except ValueError:
        continue
    if m.get("reason") == "compiler-artifact" and m.get("executable") and m["target"]["kind"] != ["bin"]:
        print(m["target"]["name"], m["executable"])
'
}
cargo test --release --no-run --test gpu_kernels --test model_gpu --test model_gpu_quant --test ffi_device --test ffi_options \
  --test decode_backend --test model_score --test decode_resident --test decode_graph --message-format=json 2>/dev/null | executables |
  while read -r name exe; do cp "$exe" "$bundle/tests/$name"; done
if [[ $dry == 0 ]]; then
  cargo bench --no-run --bench kernels --message-format=json 2>/dev/null | executables |
    while read -r name exe; do cp "$exe" "$bundle/benches/$name"; done
fi
cargo build --release --bin cage
cp target/release/cage "$bundle/cage"
cp benches/torch_peer.py "$bundle/"
# The device tool carries at most 64 MiB: strip the debug line tables and compress (about 35 MB in all).
for exe in "$bundle"/cage "$bundle"/tests/* "$bundle"/benches/*; do
  strip "$exe"
  gzip -9 "$exe"
done
cp scripts/gpu/run.sh "$bundle/run.sh"
chmod +x "$bundle/run.sh"
du -sh "$bundle"
if [[ $dry == 1 ]]; then
  CAGE_PYTHON="${CAGE_PYTHON:-$root/target/pyenv/bin/python}" bash "$bundle/run.sh" --dry-run
fi
