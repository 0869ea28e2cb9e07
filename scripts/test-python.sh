#!/usr/bin/env bash
# The Python package's tests: builds and installs `cage` from the repository root (pyproject.toml, maturin) into a
# cached virtual environment (target/pyenv, made once, reused by later runs), then runs python/tests with pytest
# against the release binary (`cargo build --release` first; scripts/test.sh does). Needs python3 >= 3.9 with
# venv, and PyPI the first time. Extra arguments go to pytest.
# It also installs torch, transformers and peft into that venv (once, ~3.5 GB) and fetches SmolLM2-135M-Instruct,
# so that the tests of cage.hf run against real transformers, as CI requires; CAGE_TEST_HF=0 leaves them out
# (they then skip, saying why). It installs ray too, for the tests of cage.ray on a local cluster (a head and two
# workers on 127.0.0.1); CAGE_TEST_RAY=0 leaves it out (those tests then skip, saying why).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PY="${PYTHON:-python3}"
VENV=target/pyenv
if [ ! -x "$VENV/bin/python" ]; then
    "$PY" -m venv "$VENV"
fi
# Pinned as in pyproject.toml; torch and transformers only for the tests of cage.hf (they skip without them).
"$VENV/bin/pip" install --quiet --disable-pip-version-check "maturin>=1.16,<2" "numpy>=2,<3" "pytest>=8,<10"
if [ "${CAGE_TEST_HF:-1}" != "0" ]; then
    "$VENV/bin/pip" install --quiet --disable-pip-version-check "torch==2.15.0" "transformers==5.23.0" "peft==0.21.2"
    "${CAGE_BIN:-target/release/cage}" fetch-model --models models
fi
if [ "${CAGE_TEST_RAY:-1}" != "0" ]; then
    "$VENV/bin/pip" install --quiet --disable-pip-version-check "ray==2.60.0"
fi
# The same build as `pip install .`, against the cached venv's maturin instead of a fresh isolated one.
export PATH="$PWD/$VENV/bin:$PATH"
PYO3_PYTHON="$VENV/bin/python" "$VENV/bin/pip" install --quiet --disable-pip-version-check --no-build-isolation \
    --force-reinstall --no-deps .
# Run from outside the source tree so that the installed package is the one imported, not python/cage.
cd python/tests
CAGE_BIN="${CAGE_BIN:-$PWD/../../target/release/cage}" "../../$VENV/bin/python" -m pytest -q "$@"
"../../$VENV/bin/python" -m cage.bench --calls 2000
