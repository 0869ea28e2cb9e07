#!/usr/bin/env python3
"""Writes tests/fixtures/golden-rope-llama3.json: the Llama 3.1 RoPE inverse frequencies ("rope_type":
"llama3") for the tiny-llama fixture's head_dim and rope_theta with a scaling that takes all three branches.

Computed with the standard library only (no torch, no numpy), following transformers'
`_compute_default_rope_parameters` and `_compute_llama3_parameters` (src/transformers/modeling_rope_utils.py)
step for step:

    inv_freq = 1 / base ** (arange(0, dim, 2) / dim)
    wavelen = 2 pi / inv_freq
    inv_freq_llama = where(wavelen > old / low_freq_factor, inv_freq / factor, inv_freq)
    smooth = (old / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
    smoothed = (1 - smooth) * inv_freq_llama / factor + smooth * inv_freq_llama
    medium = !(wavelen < old / high_freq_factor) and !(wavelen > old / low_freq_factor)
    inv_freq_llama = where(medium, smoothed, inv_freq_llama)

transformers evaluates this in float32 tensors; here it runs in float64 and the result is rounded to float32,
so the two agree to a few float32 ulps (the test allows 1e-6 relative). Run: python3 scripts/make_rope_golden.py
"""
import json
import math
import os
import struct

HERE = os.path.dirname(os.path.abspath(__file__))
OUT = os.path.join(HERE, "..", "tests", "fixtures", "golden-rope-llama3.json")

HEAD_DIM = 16  # tests/fixtures/tiny-llama/config.json
ROPE_THETA = 500.0
SCALING = {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 32}


def f32(x):
    return struct.unpack("f", struct.pack("f", x))[0]


def llama3_inv_freq(dim, base, factor, low_freq_factor, high_freq_factor, old_context_len):
    out = []
    low_freq_wavelen = old_context_len / low_freq_factor
    high_freq_wavelen = old_context_len / high_freq_factor
    for i in range(0, dim, 2):
        inv_freq = 1.0 / base ** (i / dim)
        wavelen = 2 * math.pi / inv_freq
        llama = inv_freq / factor if wavelen > low_freq_wavelen else inv_freq
        smooth = (old_context_len / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
        smoothed = (1 - smooth) * llama / factor + smooth * llama
        medium = not (wavelen < high_freq_wavelen) and not (wavelen > low_freq_wavelen)
        out.append(f32(smoothed if medium else llama))
    return out


def main():
    s = SCALING
    freqs = llama3_inv_freq(HEAD_DIM, ROPE_THETA, s["factor"], s["low_freq_factor"], s["high_freq_factor"],
                            s["original_max_position_embeddings"])
    golden = {
        "source": "transformers _compute_llama3_parameters, re-implemented in scripts/make_rope_golden.py",
        "head_dim": HEAD_DIM,
        "rope_theta": ROPE_THETA,
        "rope_scaling": dict(rope_type="llama3", **s),
        "inv_freq": freqs,
    }
    with open(OUT, "w") as f:
        json.dump(golden, f, indent=1)
        f.write("\n")
    print(OUT, freqs)


if __name__ == "__main__":
    main()
