#!/usr/bin/env bash
# Builds the GPU test and bench binaries here (the GPU machine has no Rust toolchain) and bundles them into the
# git-ignored gpu-bundle/ with a runner. Pass gpu-bundle in the device tool's `carry`, then run there
#   bash gpu-bundle/run.sh            # GPU tests (kernels, forward pass, C ABI backends, decoding backends),
#                                     # compute-sanitizer (memcheck, racecheck), cage bench solver / forward,
#                                     # criterion benches, PyTorch peer
#   bash gpu-bundle/run.sh --quick    # the GPU tests and cage bench only
# from the repository root. Results go to $OUT (or gpu-bundle/results) and name the card they ran on.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
bundle="$root/gpu-bundle"
if [[ -z "${NVCC:-}" && -x "$root/.cuda/nvidia/cu13/bin/nvcc" ]]; then
  export NVCC="$root/.cuda/nvidia/cu13/bin/nvcc"
fi
[[ -n "${NVCC:-}" ]] || echo "gpu-bundle: no nvcc (run scripts/install-cuda.sh): kernels will be compiled by NVRTC on the GPU machine" >&2
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
cargo test --release --no-run --test gpu_kernels --test model_gpu --test ffi_device --test ffi_options \
  --test decode_backend --message-format=json 2>/dev/null | executables |
  while read -r name exe; do cp "$exe" "$bundle/tests/$name"; done
cargo bench --no-run --bench kernels --message-format=json 2>/dev/null | executables |
  while read -r name exe; do cp "$exe" "$bundle/benches/$name"; done
cargo build --release --bin cage
cp target/release/cage "$bundle/cage"
cp benches/torch_peer.py "$bundle/"
# The device tool carries at most 64 MiB: strip the debug line tables and compress (about 15 MB in all).
for exe in "$bundle"/cage "$bundle"/tests/* "$bundle"/benches/*; do
  strip "$exe"
  gzip -9 "$exe"
done
cat >"$bundle/run.sh" <<'RUN'
#!/usr/bin/env bash
# Runs the bundle on a GPU machine, from the repository root. Every result names the card it ran on.
set -uo pipefail
bundle="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
out="${OUT:-$bundle/results}"
mkdir -p "$out"
# Unpack the compressed executables next to a writable copy (the carried folder may be read-only).
here="$(mktemp -d)"
(cd "$bundle" && find . -name '*.gz' | while read -r f; do mkdir -p "$here/$(dirname "$f")"; gunzip -c "$f" >"$here/${f%.gz}"; chmod +x "$here/${f%.gz}"; done)
cp "$bundle/torch_peer.py" "$here/"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$out/card.txt"
# A GPU test that finds no GPU fails here instead of printing SKIP and passing (tests/common/skip.rs).
export CAGE_REQUIRE_GPU=1
# cuBLAS is not carried: the image's PyTorch ships CUDA 13's. Fail loudly without it.
if ! ldconfig -p 2>/dev/null | grep -q 'libcublas.so.13'; then
  cublas="$(python3 - <<'PY' 2>/dev/null
import glob, os, site
roots = site.getsitepackages() + [site.getusersitepackages()]
hits = [h for r in roots for h in glob.glob(os.path.join(r, "nvidia", "**", "libcublas.so.13*"), recursive=True)]
print(os.path.dirname(sorted(hits)[0]) if hits else "")
PY
)"
  if [[ -z "$cublas" ]]; then
    echo "gpu-bundle: libcublas.so.13 not found (neither ldconfig nor the Python nvidia packages): the GPU decoder cannot run" | tee "$out/cublas_missing.txt"
    exit 3
  fi
  export LD_LIBRARY_PATH="$cublas${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
  echo "cuBLAS from $cublas" | tee "$out/cublas.txt"
fi
status=0
# Every test binary under a time limit: a mismatched cluster barrier hangs the GPU instead of failing.
limit() { timeout --kill-after=10 "$1" "${@:2}"; }
limit 240 "$here/tests/gpu_kernels" --test-threads=1 2>&1 | tee "$out/gpu_tests.txt" || status=1
limit 240 "$here/tests/model_gpu" --test-threads=1 2>&1 | tee "$out/model_gpu_tests.txt" || status=1
limit 120 "$here/tests/ffi_device" --test-threads=1 2>&1 | tee "$out/ffi_device_tests.txt" || status=1
# The C ABI's host entry points on AUTO and CUDA, and decoding with the equilibrium on backend auto and cuda.
limit 120 "$here/tests/ffi_options" 2>&1 | tee "$out/ffi_options_tests.txt" || status=1
limit 120 "$here/tests/decode_backend" 2>&1 | tee "$out/decode_backend_tests.txt" || status=1
"$here/cage" bench solver --backend cuda --reps 50 2>&1 | tee "$out/bench_solver.txt" || status=1
# The GPU forward pass on the tiny fixture (a smoke test of the bench wiring; real models are not carried).
"$here/cage" bench forward --model tests/fixtures/tiny-llama 2>&1 | tee "$out/bench_forward_tiny.txt" || status=1
if [[ "${1:-}" != "--quick" ]]; then
  # compute-sanitizer on the GPU tests: memcheck over all of them, racecheck (slow) over the kernels with
  # shared-memory exchanges (equilibrium incl. the cluster split, top-k, the decoding step, attention).
  if command -v compute-sanitizer >/dev/null; then
    compute-sanitizer --tool memcheck --error-exitcode 9 "$here/tests/gpu_kernels" --test-threads=1 2>&1 |
      tee "$out/sanitizer_memcheck_kernels.txt" || status=1
    compute-sanitizer --tool memcheck --error-exitcode 9 "$here/tests/model_gpu" --test-threads=1 2>&1 |
      tee "$out/sanitizer_memcheck_model.txt" || status=1
    # Substring filters over the test names of tests/gpu_kernels.rs (gpu::..., full_vocabulary::...).
    for t in equilibrium_cluster_split equilibrium_matches_reference candidates device_step choose; do
      compute-sanitizer --tool racecheck --error-exitcode 9 "$here/tests/gpu_kernels" --test-threads=1 "$t" 2>&1 |
        tee -a "$out/sanitizer_racecheck.txt" || status=1
    done
    compute-sanitizer --tool racecheck --error-exitcode 9 "$here/tests/model_gpu" --test-threads=1 \
      gpu_decoder_matches_cpu_tiny_llama 2>&1 | tee -a "$out/sanitizer_racecheck.txt" || status=1
  else
    echo "compute-sanitizer not found: sanitizer runs skipped" | tee "$out/sanitizer_skipped.txt"
  fi
  "$here/benches/kernels" --bench --noplot 2>&1 | tee "$out/bench_kernels.txt" || status=1
  python3 "$here/torch_peer.py" 2>&1 | tee "$out/torch_peer.txt" || status=1
fi
exit $status
RUN
chmod +x "$bundle/run.sh"
ls -la "$bundle" "$bundle/tests" "$bundle/benches"
