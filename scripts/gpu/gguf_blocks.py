#!/usr/bin/env python3
"""Rewrites the linear projections of a safetensors model folder (scripts/gpu/make_models.py's output) in place as
GGUF blocks, in the layout `cage import-gguf --keep-quantized` writes: each projection a U8 tensor of rows of raw
blocks, its ggml type id in the file's metadata (`cage.ggml_type.NAME`). What the GPU bundle's `quant` stage
measures `gpu_weights stored` on without llama.cpp or a GGUF download on the GPU machine.

    python3 scripts/gpu/gguf_blocks.py --model DIR --format q4_k [--device cuda]

Formats: `q8_0` (llama.cpp's reference quantizer: d = max|x| / 127 in f16, q = round(x / d)) and `q4_k` (a plain
round-to-nearest Q4_K: per 32 weights an affine range, its scale and minimum quantized to 6 bits of the block's
f16 d / dmin, 4-bit codes; llama.cpp's search for better scales is left out: this is a throughput fixture, and
its values are what the runtime dequantizes, whatever quantized them). Rows must be whole blocks (32 or 256).
Embedding, LM head and norms stay as they are (cage keeps them bf16 on the GPU in every setting).
"""
import argparse
import json
import os
import time

import torch
from safetensors.torch import load_file, save_file

PROJ = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
GGML_ID = {"q8_0": 8, "q4_k": 12}


def f16_bytes(x):
    """[n] f32 -> [n, 2] uint8 (little-endian f16)."""
    return x.to(torch.float16).contiguous().view(torch.uint8).reshape(-1, 2)


def q8_0(w):
    x = w.float().reshape(-1, 32)
    d = (x.abs().amax(dim=1) / 127.0).to(torch.float16).float()
    inv = torch.where(d > 0, 1.0 / d, torch.zeros_like(d))
    # llama.cpp divides by the unrounded d; rounding to f16 first keeps every code within +-127 here.
    q = torch.round(x * inv[:, None]).clamp(-127, 127).to(torch.int8).view(torch.uint8)
    return torch.cat([f16_bytes(d), q], dim=1).reshape(w.shape[0], -1)


def q4_k(w):
    x = w.float().reshape(-1, 8, 32)
    lo = x.amin(dim=2).clamp(max=0.0)
    hi = x.amax(dim=2).clamp(min=0.0)
    scale, mins = (hi - lo) / 15.0, -lo
    d = (scale.amax(dim=1) / 63.0).to(torch.float16).float()
    dmin = (mins.amax(dim=1) / 63.0).to(torch.float16).float()
    safe = lambda v: torch.where(v > 0, v, torch.ones_like(v))
    sc = torch.where(d[:, None] > 0, torch.round(scale / safe(d)[:, None]), torch.zeros_like(scale)).clamp(0, 63)
    mn = torch.where(dmin[:, None] > 0, torch.round(mins / safe(dmin)[:, None]), torch.zeros_like(mins)).clamp(0, 63)
    a, b = d[:, None] * sc, dmin[:, None] * mn
    q = torch.where(a[:, :, None] > 0, torch.round((x + b[:, :, None]) / safe(a)[:, :, None]), torch.zeros_like(x))
    q = q.clamp(0, 15).to(torch.uint8)
    sc, mn = sc.to(torch.uint8), mn.to(torch.uint8)
    packed = torch.cat([sc[:, :4] | ((sc[:, 4:] >> 4) << 6), mn[:, :4] | ((mn[:, 4:] >> 4) << 6),
                        (sc[:, 4:] & 15) | ((mn[:, 4:] & 15) << 4)], dim=1)
    # Nibble byte 32 (j / 2) + l: sub-block j = 2k in the low nibble, 2k + 1 in the high one.
    qs = (q[:, 0::2, :] | (q[:, 1::2, :] << 4)).reshape(-1, 128)
    return torch.cat([f16_bytes(d), f16_bytes(dmin), packed, qs], dim=1).reshape(w.shape[0], -1)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--format", choices=sorted(GGML_ID), required=True)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    a = ap.parse_args()
    t0, n, raw = time.time(), 0, 0
    quant = {"q8_0": q8_0, "q4_k": q4_k}[a.format]
    per = 256 if a.format == "q4_k" else 32
    for f in sorted(os.listdir(a.model)):
        if not f.endswith(".safetensors"):
            continue
        path = os.path.join(a.model, f)
        tensors = load_file(path)
        meta = {"format": "pt"}
        for name, w in tensors.items():
            if name.endswith(".weight") and any(p in name for p in PROJ):
                if w.shape[1] % per:
                    raise SystemExit(f"{name}: {w.shape[1]} inputs are not whole {a.format} blocks of {per}")
                tensors[name] = quant(w.to(a.device)).cpu()
                meta[f"cage.ggml_type.{name}"] = str(GGML_ID[a.format])
                n += 1
                raw += tensors[name].numel()
        save_file(tensors, path, metadata=meta)
    print(json.dumps({"model": a.model, "format": a.format, "projections": n, "block_bytes": raw,
                      "seconds": round(time.time() - t0, 1)}), flush=True)


if __name__ == "__main__":
    main()
