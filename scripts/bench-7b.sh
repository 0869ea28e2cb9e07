#!/usr/bin/env bash
# Memory and batch-1 decode speed of a synthetic 7B-shape Llama (issue 15), cage against llama.cpp on the same files:
#
#     scripts/bench-7b.sh DIR [SHAPE]        # SHAPE: llama-7b (default), llama-1b or tiny
#
# Checks the generator first (scripts/synthetic_check.py), then writes DIR/SHAPE-q4_k.gguf and DIR/SHAPE-bf16/ (scripts/make_fixtures.py synthetic: the same random model in both
# formats; kept when present, ~4 GB and ~14.5 GB at 7B), then measures, each under /usr/bin/time -v for the peak RSS:
#   - llama.cpp (llama-cpp-python 0.3.36, CPU, 2 threads) on the Q4_K GGUF: benches/llamacpp_peer.py, batch 1,
#     greedy, a 64-token prompt and 32 decode steps, the best of 2;
#   - `cage bench forward` (same prompt, steps and repeats) and `cage generate` (base method, greedy, 32 new
#     tokens) on the Q4_K GGUF (imported once with `cage import-gguf --keep-quantized`: DIR/SHAPE-q4_k/, the
#     blocks as they are) and on the bf16 folder, RAYON_NUM_THREADS=2.
# and prints one line per run: file, weight bytes (the file's size), peak RSS, RSS / weight bytes, the f32 KV cache
# of the run's 96 positions, and decode tokens/s. A run that fails (out of memory, say) is a
# line saying so; the others still run. The venv (target/bench-venv: numpy, gguf, llama-cpp-python, pinned) is made
# on first use. CAGE_BIN picks the cage binary (default target/release/cage; build it first), CAGE_WEIGHTS its
# `bench forward --weights` (default f32). The machine is shared: run it when the load is low and read the load
# column. Delete DIR afterwards: the files are large.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
DIR="${1:?usage: scripts/bench-7b.sh DIR [llama-7b|llama-1b|tiny]}"
SHAPE="${2:-llama-7b}"
CAGE="${CAGE_BIN:-$PWD/target/release/cage}"
VENV=target/bench-venv
PY="$VENV/bin/python"
PROMPT=64
STEPS=32
mkdir -p "$DIR"
DIR="$(cd "$DIR" && pwd)"

if [ ! -x "$PY" ]; then
    python3 -m venv "$VENV"
fi
"$VENV/bin/pip" install --quiet --disable-pip-version-check "numpy>=2,<3" "gguf==0.19.0" "llama-cpp-python==0.3.36"
if [ ! -x /usr/bin/time ]; then
    echo "bench-7b: /usr/bin/time is missing (Debian: apt-get install time)" >&2
    exit 1
fi
[ -x "$CAGE" ] || { echo "bench-7b: no cage binary at $CAGE (cargo build --release)" >&2; exit 1; }

# The generator writes one model in every format (tiny shape, against llama.cpp and cage).
"$PY" scripts/synthetic_check.py --cage "$CAGE" | tail -1

GGUF="$DIR/$SHAPE-q4_k.gguf"
BF16="$DIR/$SHAPE-bf16"
[ -f "$GGUF" ] || "$PY" scripts/make_fixtures.py synthetic --shape "$SHAPE" --format q4_k --out "$GGUF"
[ -f "$BF16/model.safetensors" ] || "$PY" scripts/make_fixtures.py synthetic --shape "$SHAPE" --format bf16 --out "$BF16"

# The f32 KV cache of one sequence of PROMPT + STEPS positions: 2 (k, v) x layers x kv width x positions x 4 bytes.
KV=$("$PY" - "$SHAPE" "$((PROMPT + STEPS))" <<'EOF'
import sys
sys.path.insert(0, "scripts")
from synthetic_model import SHAPES
s = SHAPES[sys.argv[1]]
print(2 * s["layers"] * s["hidden"] // s["heads"] * s["kv_heads"] * int(sys.argv[2]) * 4)
EOF
)
CFG="$DIR/generate-config.json"
LOG="$DIR/logs"
mkdir -p "$LOG"

# run NAME MODEL_BYTES COMMAND...: the command under /usr/bin/time -v, its output in $LOG/NAME.out.
run() {
    local name=$1 bytes=$2
    shift 2
    local load
    load=$(cut -d' ' -f1 /proc/loadavg)
    if RAYON_NUM_THREADS=2 /usr/bin/time -v -o "$LOG/$name.time" "$@" >"$LOG/$name.out" 2>"$LOG/$name.err"; then
        local rss tps
        rss=$(awk -F': ' '/Maximum resident set size/ {printf "%.0f\n", $2 * 1024}' "$LOG/$name.time")
        tps=$("$PY" - "$name" "$LOG/$name.out" "$LOG/$name.err" <<'EOF'
import json, re, sys
name, out, err = sys.argv[1], open(sys.argv[2]).read(), open(sys.argv[3]).read()
if name.startswith("llama.cpp"):
    r = json.loads(out.strip().splitlines()[-1])["results"][0]
    print(f"{1e3 / r['decode_step_ms']:.2f}")
elif "forward" in name:
    rows = [r for v in json.loads(out)["weights"].values() for r in v if r["batch"] == 1]
    print(f"{rows[0]['decode_tok_s']:.2f}")
else:
    m = re.search(r"([0-9.]+) tok/s", err + out)
    print(m.group(1) if m else "-")
EOF
)
        printf '%-22s %6s %14d %14d %8.3f %12d %10s\n' "$name" "$load" "$bytes" "$rss" \
            "$(awk "BEGIN {print $rss / $bytes}")" "$KV" "$tps"
    else
        printf '%-22s %6s failed: %s\n' "$name" "$load" "$(grep -v '^\s*$' "$LOG/$name.err" | tail -1)"
    fi
}

gguf_bytes=$(stat -c %s "$GGUF")
bf16_bytes=$(stat -c %s "$BF16/model.safetensors")
echo "shape $SHAPE, prompt $PROMPT, $STEPS decode steps, batch 1, 2 threads; logs in $LOG"
printf '%-22s %6s %14s %14s %8s %12s %10s\n' run load weight_bytes peak_rss_bytes rss/w kv_f32_bytes decode_tok/s
run llama.cpp-q4_k "$gguf_bytes" "$PY" benches/llamacpp_peer.py "$GGUF" --threads 2 --batches 1 \
    --prompt "$PROMPT" --steps "$STEPS" --repeats 2
# cage reads a GGUF's blocks as they are after `cage import-gguf --keep-quantized` (a folder of raw blocks).
Q4K="$DIR/$SHAPE-q4_k"
[ -f "$Q4K/model.safetensors" ] || "$CAGE" import-gguf "$GGUF" --out "$Q4K" --keep-quantized >/dev/null
for m in "$Q4K:q4_k:$gguf_bytes" "$BF16:bf16:$bf16_bytes"; do
    IFS=: read -r path fmt bytes <<<"$m"
    run "cage-forward-$fmt" "$bytes" "$CAGE" bench forward --model "$path" --json --batches 1 --device cpu \
        --weights "${CAGE_WEIGHTS:-f32}" --prompt-len "$PROMPT" --steps "$STEPS" --repeats 2
    printf '{"base": "%s", "method": "base", "k": 1, "max_new_tokens": %d, "prompt_format": "plain", "batch_size": 1, "backend": "cpu"}\n' \
        "$path" "$STEPS" >"$CFG"
    run "cage-generate-$fmt" "$bytes" "$CAGE" generate --config "$CFG" --prompt "The history of the printing press"
done

# Shared backbone: the bf16 base and two LoRA ARMs of it (rank 8 on q and v) decoded as one batch by the `cage`
# method (3 streams on one copy of the weights: the adapters stay unmerged).
for i in 1 2; do
    [ -f "$DIR/$SHAPE-lora-$i/adapter_model.safetensors" ] ||
        "$PY" scripts/make_fixtures.py synthetic --shape "$SHAPE" --format lora --seed "$i" --out "$DIR/$SHAPE-lora-$i" >/dev/null
done
printf '{"base": "%s", "principals": [{"name": "a", "kind": "arm", "adapter": "%s"}, {"name": "b", "kind": "arm", "adapter": "%s"}], "method": "cage", "k": 20, "max_new_tokens": %d, "prompt_format": "plain", "batch_size": 1, "backend": "cpu"}\n' \
    "$BF16" "$DIR/$SHAPE-lora-1" "$DIR/$SHAPE-lora-2" "$STEPS" >"$CFG"
run "cage-generate-bf16-2arm" "$bf16_bytes" "$CAGE" generate --config "$CFG" --prompt "The history of the printing press"
