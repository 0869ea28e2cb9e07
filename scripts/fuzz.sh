#!/usr/bin/env bash
# Runs every cargo-fuzz target of fuzz/ for SECONDS each (default 60), one after another:
#   bash scripts/fuzz.sh [SECONDS] [TARGET...]
# CI runs `bash scripts/fuzz.sh 30` at the end of scripts/test.sh; a longer local run finds more.
#
# Toolchain: the project's stable toolchain; no nightly needed. Installs cargo-fuzz from crates.io when it is
# missing. Targets are built without a sanitizer (--sanitizer none), which needs no unstable flag: the parsers
# are safe Rust, and what fuzzing finds there is panics, arithmetic overflow (the build keeps debug
# assertions), hangs and runaway allocations, which libFuzzer catches without one. CAGE_FUZZ_SANITIZER=address
# hunts memory errors too; that passes -Zsanitizer, which stable accepts under RUSTC_BOOTSTRAP=1. The script
# always sets it, because cargo rebuilds everything when it changes.
#
# The committed seeds stay in fuzz/corpus/<target>/ (small, reviewed); inputs the fuzzer finds go to
# fuzz/target/corpus/<target>/ (git-ignored), so repeated runs build on each other without growing the
# repository. A crash, a timeout (> 10 s on one input) or an out-of-memory (> 2 GB) fails the script with the
# reproducer under fuzz/artifacts/<target>/ (rerun it: RUSTC_BOOTSTRAP=1 cargo fuzz run --sanitizer none
# --debug-assertions <target> <file>).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
SECONDS_EACH="${1:-60}"
shift || true
TARGETS=("$@")
if [ ${#TARGETS[@]} -eq 0 ]; then
  TARGETS=(gguf model_files game_json run_config)
fi
export RUSTC_BOOTSTRAP=1
if ! cargo fuzz --version >/dev/null 2>&1; then
  echo "fuzz.sh: installing cargo-fuzz (cargo install cargo-fuzz --locked)"
  cargo install cargo-fuzz --locked
fi
SANITIZER="${CAGE_FUZZ_SANITIZER:-none}"
FLAGS=(--sanitizer "$SANITIZER" --debug-assertions)
# Every target in one build (release, with debug assertions: overflow checks on).
cargo fuzz build "${FLAGS[@]}"
mkdir -p fuzz/target
status=0
for t in "${TARGETS[@]}"; do
  work="fuzz/target/corpus/$t"
  mkdir -p "$work" "fuzz/artifacts/$t"
  echo "fuzz.sh: $t for ${SECONDS_EACH}s"
  set +e
  cargo fuzz run "${FLAGS[@]}" "$t" "$work" "fuzz/corpus/$t" -- -max_total_time="$SECONDS_EACH" -timeout=10 \
    -rss_limit_mb=2048 -max_len=65536 -print_final_stats=1 >"fuzz/target/$t.log" 2>&1
  rc=$?
  set -e
  # (Panics of the tokenizers crate that cage catches are printed as "caught by cage" and are not failures.)
  grep -E '^#[0-9]+[[:space:]]+DONE|stat::number_of_executed_units|stat::peak_rss_mb|SUMMARY|Test unit written|panicked' \
    "fuzz/target/$t.log" | grep -v 'caught by cage' || true
  if [ $rc != 0 ]; then
    echo "fuzz.sh: $t FAILED (exit $rc): the log is fuzz/target/$t.log, the input under fuzz/artifacts/$t/"
    tail -n 30 "fuzz/target/$t.log"
    status=1
  fi
done
exit $status
