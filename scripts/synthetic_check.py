#!/usr/bin/env python3
"""Checks the synthetic-model generator (`make_fixtures.py synthetic`) at `--shape tiny`: llama.cpp must load the
Q4_K and Q8_0 GGUFs, and they, the bf16 folder and cage's import of the Q4_K file (`cage import-gguf`, which
dequantizes the K-quant blocks; both run by `cage logits`) must be one model: the same next token and
next-token logits over the whole vocabulary within 0.01 RMS of the Q4_K file's (the formats differ by bf16
rounding of the weights, Q8_0 requantization, and llama.cpp's 8-bit activations: measured 0.005 for bf16 and
0.007 for Q8_0, against 0.33 for the logits' own spread). Random weights make the logits flat, so a wrong q/k
un-permutation shows only as 0.017-0.019 RMS: the bound is set between the two.

    target/bench-venv/bin/python scripts/synthetic_check.py [--cage target/release/cage]

Needs the venv of scripts/bench-7b.sh (numpy, gguf==0.19.0, llama-cpp-python==0.3.36); bench-7b.sh runs it first.
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(HERE, "..", "benches"))
import synthetic_model  # noqa: E402

IDS = [[1, 500, 1000, 2000, 3000, 40000], [7, 7, 120, 45, 2, 9000, 31337, 12]]


def llama_cpp_logits(path, ids):
    import llamacpp_peer as P

    p = P.Peer(path, 2, 1, len(ids), 1)
    p.clear()
    b = p.batch
    b.n_tokens = len(ids)
    for i, t in enumerate(ids):
        b.token[i], b.pos[i], b.n_seq_id[i], b.logits[i] = t, i, 1, i == len(ids) - 1
        b.seq_id[i][0] = 0
    if P.L.llama_decode(p.ctx, b) != 0:
        raise SystemExit(f"llama.cpp could not decode with {path}")
    return np.ctypeslib.as_array(P.L.llama_get_logits_ith(p.ctx, len(ids) - 1), shape=(p.v,)).astype(np.float64)


def cage_logits(cage, folder, ids):
    out = subprocess.run([cage, "logits", "--model", folder, "--ids", ",".join(map(str, ids)), "--top",
                          str(synthetic_model.VOCAB), "--json"], capture_output=True, text=True, check=True).stdout
    lg = np.full(synthetic_model.VOCAB, np.nan)
    for t in json.loads(out)["top"]:
        lg[t["id"]] = t["logit"]
    return lg


def rms(a, b):
    return float(np.sqrt(np.mean((a - b) ** 2)))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--cage", default=os.path.join(HERE, "..", "target", "release", "cage"))
    a = ap.parse_args()
    with tempfile.TemporaryDirectory() as d:
        for fmt, name in [("q4_k", "t-q4_k.gguf"), ("q8_0", "t-q8_0.gguf"), ("bf16", "t-bf16")]:
            synthetic_model.main(["--shape", "tiny", "--format", fmt, "--out", os.path.join(d, name)])
        subprocess.run([a.cage, "import-gguf", "--out", os.path.join(d, "t-imported"), os.path.join(d, "t-q4_k.gguf")],
                       check=True, capture_output=True)
        for ids in IDS:
            q4 = llama_cpp_logits(os.path.join(d, "t-q4_k.gguf"), ids)
            q8 = llama_cpp_logits(os.path.join(d, "t-q8_0.gguf"), ids)
            cg = cage_logits(a.cage, os.path.join(d, "t-bf16"), ids)
            ci = cage_logits(a.cage, os.path.join(d, "t-imported"), ids)
            top = [int(np.argmax(x)) for x in (q4, q8, cg, ci)]
            print(f"{ids}: next token {top} (Q4_K, Q8_0, bf16, imported Q4_K); RMS logit difference to llama.cpp's "
                  f"Q4_K: Q8_0 {rms(q8, q4):.4f}, bf16 (cage) {rms(cg, q4):.4f}, imported (cage) {rms(ci, q4):.4f}")
            assert len(set(top)) == 1, f"{ids}: the formats pick different next tokens {top}"
            assert max(rms(q8, q4), rms(cg, q4), rms(ci, q4)) < 0.01, f"{ids}: the formats are not one model"
    print("synthetic models agree")


if __name__ == "__main__":
    main()
