#!/usr/bin/env bash
# Builds the Python wheel of cage (one abi3 wheel, CPython >= 3.9) into target/wheels, with maturin from the
# cached venv of scripts/test-python.sh (made here if missing). Install it anywhere with `pip install <wheel>`.
# nvcc is optional: without it the kernels are compiled at run time by NVRTC (see build.rs).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
VENV=target/pyenv
if [ ! -x "$VENV/bin/python" ]; then
    "${PYTHON:-python3}" -m venv "$VENV"
fi
"$VENV/bin/pip" install --quiet --disable-pip-version-check "maturin>=1.16,<2"
"$VENV/bin/maturin" build --release --out target/wheels "$@"
ls -1 target/wheels/cage-*.whl
