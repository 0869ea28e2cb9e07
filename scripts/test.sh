#!/usr/bin/env bash
# The whole test suite, as the README states it and CI runs it: installs what the tests need, then checks formatting and lints and runs
# `cargo test --release`, then fuzzes each parser for 30 s. No GPU is needed: GPU test bodies skip with a message, kernels run through host
# emulation. Needs network access the first time: PyPI (nvcc; the default model for the SmolLM2 tests) and
# crates.io (cargo-fuzz).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
# Formatting and lints first: they fail in seconds, before the long build.
cargo fmt --all --check
# The pinned CUDA 13.0 compiler from PyPI, into .cuda/ (idempotent): build.rs compiles every kernel with it,
# so a kernel that does not compile fails the build.
NVCC="$(bash scripts/install-cuda.sh | tail -n 1)"
export NVCC
# NVRTC (run-time compilation, the path of binaries moved to a machine without nvcc) is tested too.
export LD_LIBRARY_PATH="$(dirname "$(dirname "$NVCC")")/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
# Lints on every target (the kernels must compile for that too, hence after the CUDA install).
cargo clippy --release --all-targets -- -D warnings
# The Python binding (workspace member python/, pyo3): the root's cargo commands do not build it.
cargo clippy --release -p cage-python --all-targets -- -D warnings
# cargo test builds only the rlib of the library: build the cdylib (and the binary) that the C and Python
# examples link against first.
cargo build --release
cargo test --release "$@"
# The Python package: pip install . into a cached venv, then its pytest suite (python/tests).
bash scripts/test-python.sh
# The GPU proof run's logic on the host emulation (tiny models built by transformers, checked against it): the
# bundle a lent GPU runs must not first fail there. Needs the test venv's torch / transformers / peft.
if [[ "${CAGE_TEST_HF:-1}" != 0 ]]; then
  bash scripts/gpu-bundle.sh --dry-run
else
  echo "scripts/test.sh: CAGE_TEST_HF=0: the GPU bundle's dry run is skipped (it needs transformers)"
fi
# The parsers of untrusted input under libFuzzer, 30 seconds per target (fuzz/, scripts/fuzz.sh): a crash,
# hang or runaway allocation on any input fails CI with the reproducer under fuzz/artifacts/.
bash scripts/fuzz.sh 30
