#!/usr/bin/env bash
# The GPU proof run: copied into gpu-bundle/ by scripts/gpu-bundle.sh (which compiles the binaries it runs) and
# started there, from the repository root, on the GPU machine:
#   bash gpu-bundle/run.sh [--budget SECONDS] [--stages LIST]   # on the GPU (default budget 420 s)
#   bash gpu-bundle/run.sh --dry-run                            # here: the same logic on the host emulation
# Stages, in this order (the most decisive first; a stage that would not fit the remaining budget is skipped
# and named in the summary, never silently dropped):
#   tests      the GPU test binaries, every skip turned into a failure (CAGE_REQUIRE_GPU=1)
#   real1b     a Llama-3.2-1B-shape model and two LoRA adapters built by transformers (random weights):
#              logits and greedy continuations against transformers, plain decode and GenARM throughput
#   solver     cage bench solver (kernels at full-vocabulary sizes, roofline fractions; decode attention at B = 1 on
#              the 8B shape, split-K against one pass, f32 and bf16 caches) and the PyTorch peer
#   real8b     the Llama-3.1-8B shape: logits against transformers, decode throughput, cage's per-step overhead
#   quant      the Llama-3.1-8B shape's forward throughput with bf16, int8 and int4 weights (gpu_weights), side
#              by side: decode tok/s at batch 1 and 8, prefill tok/s (int8 / int4 dequantize, then cuBLAS); then
#              `stored` rows: the same model's projections as GGUF Q4_K and Q8_0 blocks (scripts/gpu/gguf_blocks.py;
#              the dry run's tiny shape takes Q8_0 only), or the folder of GGUF blocks $CAGE_STORED_MODEL names
#   big        the largest synthetic shape the budget left allows (llama-65b, else llama-13b, else llama-7b;
#              tiny in the dry run), generated in memory in Q4_K (no file: 65B is 37 GB even so) and held on the
#              GPU as $big_weights: decode tok/s at batch 1 and 8, prefill tok/s, generation and upload time,
#              device memory taken. The base alone: bench forward decodes ARMs only on their own backbone
#              (--synthetic-arms), not 7B-shape ARMs beside a 65B base.
#   sanitizer  compute-sanitizer memcheck (all GPU tests) and racecheck (kernels with shared-memory exchanges)
#   criterion  the criterion kernel benches
# What comes back ($OUT, or gpu-bundle/results): log.txt (everything, as it runs), summary.txt (one line per
# stage: passed / failed / skipped and why) and results.tgz (every JSON result, refreshed after each stage), so
# that a run cut short by its time limit still returns what it finished.
set -uo pipefail
bundle="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
out="${OUT:-$bundle/results}"
mkdir -p "$out"
dry=0 budget=420 stages="tests,real1b,solver,real8b,big,sanitizer,criterion"
# How the big stage holds the 65B model's projections on the GPU: stored (the Q4_K blocks as they are: no
# conversion, the GGUF kernels; 37 GB at 65B) or int4 (quantized at upload from the Q4_K values: about 30 to 60 s
# of host conversion at 65B). Both pass the dry run.
big_weights=stored
while [[ $# -gt 0 ]]; do
  case "$1" in
    --dry-run) dry=1; budget=900; stages="tests,real1b,real8b,quant,big" ;;
    --quick) stages="tests,solver" ;;
    --budget) budget="$2"; shift ;;
    --stages) stages="$2"; shift ;;
    *) echo "run.sh: unknown argument $1" >&2; exit 2 ;;
  esac
  shift
done
start=$SECONDS
log="$out/log.txt" summary="$out/summary.txt"
: >"$log"; : >"$summary"
res="$(mktemp -d)"
say() { echo "$*" | tee -a "$log"; }
note() { echo "$*" | tee -a "$summary" "$log"; }
pack() { tar -czf "$out/results.tgz" -C "$res" . 2>/dev/null; }
py="${CAGE_PYTHON:-python3}"
# Unpack the compressed executables into a writable place (the carried folder may be read-only).
here="$(mktemp -d)"
(cd "$bundle" && find . -name '*.gz' | while read -r f; do mkdir -p "$here/$(dirname "$f")"; gunzip -c "$f" >"$here/${f%.gz}"; chmod +x "$here/${f%.gz}"; done)
cage="$here/cage"
if [[ $dry == 1 ]]; then
  device=emulation shape1=tiny shape8=tiny
  say "dry run on the host emulation ($(date -u +%F)): tiny models, transformers on the CPU, no sanitizer"
else
  device=cuda shape1=llama-3.2-1b shape8=llama-3.1-8b
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv 2>&1 | tee -a "$log" | tee "$res/card.txt"
  # A GPU test that finds no GPU fails here instead of printing SKIP and passing (tests/common/skip.rs).
  export CAGE_REQUIRE_GPU=1
  # cuBLAS is not carried: the image's PyTorch ships CUDA 13's. Fail loudly without it.
  if ! ldconfig -p 2>/dev/null | grep -q 'libcublas.so.13'; then
    cublas="$("$py" - <<'PY' 2>/dev/null
import glob, os, site
roots = site.getsitepackages() + [site.getusersitepackages()]
hits = [h for r in roots for h in glob.glob(os.path.join(r, "nvidia", "**", "libcublas.so.13*"), recursive=True)]
print(os.path.dirname(sorted(hits)[0]) if hits else "")
PY
)"
    if [[ -z "$cublas" ]]; then
      note "FAILED setup: libcublas.so.13 not found (neither ldconfig nor the Python nvidia packages): the GPU decoder cannot run"
      exit 3
    fi
    export LD_LIBRARY_PATH="$cublas${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
    say "cuBLAS from $cublas"
  fi
  # NVRTC (the NVRTC test, and gputest's rerun without fused multiply-adds) the same way; a missing one only
  # makes those fail, with their own message.
  if ! ldconfig -p 2>/dev/null | grep -q 'libnvrtc.so.13'; then
    nvrtc="$("$py" - <<'PY' 2>/dev/null
import glob, os, site
roots = site.getsitepackages() + [site.getusersitepackages()]
hits = [h for r in roots for h in glob.glob(os.path.join(r, "nvidia", "**", "libnvrtc.so.13*"), recursive=True)]
print(os.path.dirname(sorted(hits)[0]) if hits else "")
PY
)"
    [[ -n "$nvrtc" ]] && export LD_LIBRARY_PATH="$nvrtc:$LD_LIBRARY_PATH" && say "NVRTC from $nvrtc"
  fi
fi
status=0
# stage NAME ESTIMATE_SECONDS COMMAND...: runs when asked for and when the estimate fits the budget left, under
# a time limit of what is left (a mismatched cluster barrier hangs the GPU instead of failing).
stage() {
  local name="$1" est="$2"; shift 2
  [[ ",$stages," == *",$name,"* ]] || return 0
  local left=$((budget - (SECONDS - start)))
  if ((left < est)); then
    note "SKIPPED $name: needs about ${est}s, ${left}s of the budget left"
    return 0
  fi
  say "=== $name (about ${est}s; ${left}s left) ==="
  local t0=$SECONDS
  if STAGE_LEFT=$left timeout --kill-after=10 "$left" bash -c '"$@"' stage "$@" >>"$log" 2>&1; then
    note "passed $name in $((SECONDS - t0))s"
  else
    local rc=$?
    status=1
    note "FAILED $name (exit $rc) after $((SECONDS - t0))s: see log.txt"
  fi
  pack
}
# gputest SECS COMMAND...: one GPU test binary under a timeout (a mismatched cluster barrier hangs the GPU). When it
# fails it runs once more with every kernel compiled by NVRTC without fused multiply-adds (CAGE_CUDA_FMAD=0, as the
# emulation and the CPU references round): passing then means FMA rounding flipped an exact comparison (a tolerance
# to state in docs/benchmarks.md), failing again means a bug. Either way the stage fails and summary.txt says which.
gputest() {
  local secs=$1
  shift
  timeout --kill-after=10 "$secs" "$@" && return 0
  if CAGE_CUDA_FMAD=0 timeout --kill-after=10 "$secs" "$@"; then
    note "ROUNDING $*: fails with fused multiply-adds, passes with --fmad=false"
  else
    note "BUG? $*: fails with and without fused multiply-adds"
  fi
  return 1
}
tests() {
  if [[ $dry == 1 ]]; then
    # cargo test has run these bodies already (under emulation); the dry run checks the carried binaries start.
    for t in "$here"/tests/*; do "$t" --list >/dev/null || return 1; done
    return 0
  fi
  local rc=0
  for t in gpu_kernels model_gpu model_gpu_quant ffi_device; do
    gputest 240 "$here/tests/$t" --test-threads=1 || rc=1
  done
  # The C ABI's host entry points on AUTO and CUDA, and decoding with the equilibrium on backend auto and cuda.
  for t in ffi_options decode_backend; do gputest 120 "$here/tests/$t" || rc=1; done
  # Reward models on the GPU decoder (the library test only: the others run the build machine's cage binary).
  gputest 120 "$here/tests/model_score" gpu_decoder || rc=1
  # The resident decoding step on the GPU against the host stages on the same GPU forwards.
  gputest 180 env CAGE_TEST_MODEL_DEVICE=cuda "$here/tests/decode_resident" || rc=1
  # The steady-state step captured as a CUDA graph against plain launches and the host stages.
  gputest 120 env CAGE_TEST_MODEL_DEVICE=cuda "$here/tests/decode_graph" || rc=1
  return $rc
}
realistic() {
  local label="$1" shape="$2" flags="$3" dir
  dir="$(mktemp -d)/$shape"
  "$py" scripts/gpu/make_models.py --shape "$shape" --out "$dir" $([[ $flags == *genarm* ]] && echo --adapters 2) || return 1
  local rc=0
  "$py" scripts/gpu/compare.py --cage "$cage" --model "$dir" --device "$device" --work "$res" \
    --out "$res/compare-$label.json" || rc=1
  pack
  # shellcheck disable=SC2086
  "$py" scripts/gpu/peers.py --cage "$cage" --model "$dir" --device "$device" --work "$res" $flags \
    $([[ $dry == 1 ]] && echo --batches 1,2) --out "$res/peers-$label.json" || rc=1
  rm -rf "$dir"
  return $rc
}
quant() {
  local dir rc=0 w
  dir="$(mktemp -d)/$shape8"
  "$py" scripts/gpu/make_models.py --shape "$shape8" --out "$dir" || return 1
  for w in bf16 int8 int4; do
    # shellcheck disable=SC2046
    "$cage" bench forward --model "$dir" --device "$device" --gpu-weights "$w" --json \
      $([[ $dry == 1 ]] && echo --batches 1,2 --prompt-len 8 --steps 4 --repeats 1 || echo --batches 1,8 --prompt-len 64 --steps 64) \
      | tee "$res/quant-$w.json" || rc=1
  done
  # gpu_weights stored on GGUF blocks. stored_models: "label=folder" pairs. CAGE_STORED_MODEL (a folder of GGUF
  # blocks: `cage import-gguf --keep-quantized`, or a synthetic model built in-process) replaces the conversions.
  local stored_models="" f
  if [[ -n "${CAGE_STORED_MODEL:-}" ]]; then
    stored_models="given=$CAGE_STORED_MODEL"
  else
    for f in $([[ $dry == 1 ]] && echo q8_0 || echo q4_k q8_0); do
      cp -r "$dir" "$dir-$f" && "$py" scripts/gpu/gguf_blocks.py --model "$dir-$f" --format "$f" || { rc=1; continue; }
      stored_models+=" $f=$dir-$f"
    done
  fi
  rm -rf "$dir"
  for f in $stored_models; do
    # shellcheck disable=SC2046
    "$cage" bench forward --model "${f#*=}" --device "$device" --gpu-weights stored --json \
      $([[ $dry == 1 ]] && echo --batches 1,2 --prompt-len 8 --steps 4 --repeats 1 || echo --batches 1,8 --prompt-len 64 --steps 64) \
      | tee "$res/quant-stored-${f%%=*}.json" || rc=1
    [[ -n "${CAGE_STORED_MODEL:-}" ]] || rm -rf "${f#*=}"
  done
  return $rc
}
big() {
  set -o pipefail
  # Seconds each shape needs here (generation, conversion and upload, two batch sizes), from the largest down.
  local shape="" est
  if [[ $dry == 1 ]]; then
    shape=tiny
  else
    for est in llama-65b:240 llama-13b:120 llama-7b:90; do
      if ((STAGE_LEFT >= ${est#*:})); then shape=${est%:*}; break; fi
    done
  fi
  [[ -n $shape ]] || { echo "big: ${STAGE_LEFT}s left, not enough for llama-7b"; return 1; }
  echo "big: $shape (q4_k, gpu_weights $big_weights) with ${STAGE_LEFT}s left"
  # shellcheck disable=SC2046
  "$cage" bench forward --synthetic "$shape" --synthetic-format q4_k --device "$device" --gpu-weights "$big_weights" \
    --json $([[ $dry == 1 ]] && echo --batches 1,2 --prompt-len 8 --steps 4 --repeats 1 ||
      echo --batches 1,8 --prompt-len 64 --steps 32 --repeats 1) | tee "$res/big-$shape.json"
}
solver() {
  "$cage" bench solver --backend cuda --reps 50 | tee "$res/bench_solver.txt" || return 1
  "$py" "$bundle/torch_peer.py" | tee "$res/torch_peer.txt"
}
sanitizer() {
  command -v compute-sanitizer >/dev/null || { echo "compute-sanitizer not found"; return 1; }
  local rc=0
  compute-sanitizer --tool memcheck --error-exitcode 9 "$here/tests/gpu_kernels" --test-threads=1 || rc=1
  compute-sanitizer --tool memcheck --error-exitcode 9 "$here/tests/model_gpu" --test-threads=1 || rc=1
  # Substring filters over the test names of tests/gpu_kernels.rs (gpu::..., full_vocabulary::...): the staged
  # equilibrium loop (staged_vector_tails, matches_reference), the cluster exchange, the split rows of top-k /
  # log-softmax / log-sum-exp and their merges (candidates, principal_values_split_rows), the stream
  # log-sum-exps of the resident step (resident_step).
  for t in equilibrium_cluster_split equilibrium_matches_reference equilibrium_staged_vector_tails candidates \
    principal_values_split_rows resident_step device_step choose; do
    compute-sanitizer --tool racecheck --error-exitcode 9 "$here/tests/gpu_kernels" --test-threads=1 "$t" || rc=1
  done
  compute-sanitizer --tool racecheck --error-exitcode 9 "$here/tests/model_gpu" --test-threads=1 \
    gpu_decoder_matches_cpu_tiny_llama || rc=1
  return $rc
}
criterion() { "$here/benches/kernels" --bench --noplot | tee "$res/bench_kernels.txt"; }
# The stages run in a child bash under `timeout`: it sees these functions and variables.
export -f tests realistic quant big solver sanitizer criterion pack
export here cage res py device dry bundle out shape8 big_weights
stage tests 60 tests
stage real1b 150 realistic 1b "$shape1" "--genarm"
stage solver 40 solver
stage real8b 200 realistic 8b "$shape8" "--overhead --no-compile"
stage quant 240 quant
stage big 90 big
stage sanitizer 150 sanitizer
stage criterion 60 criterion
note "total $((SECONDS - start))s of a ${budget}s budget; exit $status"
pack
exit $status
