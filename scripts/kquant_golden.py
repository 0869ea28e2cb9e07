"""The K-quant golden (`make_fixtures.py kquant`): random-but-valid Q4_K, Q5_K and Q6_K blocks and their values as
gguf-py dequantizes them (an implementation independent of cage's), written to tests/fixtures/golden-kquant.json.

gguf-py cannot quantize the K types (only dequantize), so the blocks are random bytes with finite f16 scales, plus
one block of all ones and one of all zeros bits per type; every bit pattern of the packed scales, high bits and
nibbles occurs. Needs numpy and gguf (pinned below); no torch.
"""
import json

import numpy as np

GGUF_VERSION = "0.19.0"
BLOCKS = 8
# Byte offsets of the f16 scales in each block: (d, dmin) for Q4_K and Q5_K, d for Q6_K.
TYPES = {"Q4_K": (144, [0, 2]), "Q5_K": (176, [0, 2]), "Q6_K": (210, [208])}


def blocks(rng, size, scale_at):
    raw = rng.integers(0, 256, size=(BLOCKS, size), dtype=np.uint8)
    raw[0, :] = 0xFF
    raw[1, :] = 0
    for a in scale_at:
        # A finite f16 of either sign, |x| in [2^-14, 2): exponent bits 1..15 of 31.
        d = (rng.uniform(-1, 1, BLOCKS) * np.exp2(rng.integers(-14, 1, BLOCKS))).astype(np.float16)
        d[1] = np.float16(0.0)
        raw[:, a:a + 2] = d.view(np.uint8).reshape(BLOCKS, 2)
    return raw


def main(out):
    from importlib.metadata import version

    import gguf

    if version("gguf") != GGUF_VERSION:
        raise SystemExit(f"gguf {version('gguf')} is installed; the golden is pinned to gguf=={GGUF_VERSION}")
    rng = np.random.default_rng(15)
    res = {"generator": f"gguf-py {GGUF_VERSION} gguf.quants.dequantize (numpy {np.__version__})", "types": {}}
    for name, (size, scale_at) in TYPES.items():
        qt = getattr(gguf.GGMLQuantizationType, name)
        raw = blocks(rng, size, scale_at)
        vals = gguf.quants.dequantize(raw.reshape(-1), qt).astype(np.float32)
        assert vals.shape == (BLOCKS * 256,)
        res["types"][name] = {"id": int(qt), "blocks": raw.reshape(-1).tobytes().hex(),
                              "bits": vals.view(np.uint32).tolist()}
    with open(out, "w") as f:
        json.dump(res, f, separators=(",", ":"))
    print(f"wrote {out}")


