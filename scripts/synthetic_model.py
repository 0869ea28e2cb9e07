"""Synthetic Llama models for the memory and speed benchmarks (`make_fixtures.py synthetic`): random weights with
a fixed seed in a real model's shapes, no download.

    make_fixtures.py synthetic --shape llama-7b --format q4_k --out DIR/llama-7b-q4_k.gguf
    make_fixtures.py synthetic --shape llama-7b --format bf16 --out DIR/llama-7b-bf16

Every format holds the same model: each matrix is first drawn as Q4_K blocks (centred 4-bit weights, standard
deviation ~0.02, a 6-bit scale per 32 with the minimum at 7.5 steps below zero), in llama.cpp's layout and row
order; `q4_k` writes these blocks, `q8_0` requantizes their values with gguf-py, and `bf16` writes their values
rounded to bfloat16 as a Hugging Face folder (config.json, model.safetensors, SmolLM2's tokenizer), with the
q/k rows un-permuted from llama.cpp's rope order. Norms are f32 ones (GGUF) or bf16 ones.

GGUF files use llama.cpp's tensor names and copy the tokenizer metadata (gpt2 BPE, 49152 tokens) of SmolLM2's
GGUF (models/downloads, `cage fetch-model`), so llama.cpp loads them; the vocabulary is therefore 49152 in
every shape. Tensors are generated and written one at a time, never the model: at llama-7b the peak RSS was
0.45 GB for q4_k (30 s) and 3.4 GB for bf16 (dequantizing the 49152 x 4096 embedding; 55 s of CPU). Needs numpy and gguf==0.19.0; no torch.
`cage bench forward --synthetic SHAPE` draws models by the same recipe in memory, in seconds and up to 65B
(src/model/synthetic.rs); its random stream differs, so its weights are not these files'.
"""
import argparse
import json
import os
import shutil
import struct

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
MODELS = os.path.join(HERE, "..", "models")
SMOL_GGUF = os.path.join(MODELS, "downloads", "SmolLM2-135M-Instruct.Q4_1.gguf")
SMOL_DIR = os.path.join(MODELS, "SmolLM2-135M-Instruct")
VOCAB = 49152

# hidden, layers, heads, kv heads, ffn (multiples of 256: whole Q4_K blocks along every row).
SHAPES = {
    "tiny": dict(hidden=256, layers=2, heads=4, kv_heads=2, ffn=512),
    # TinyLlama-1.1B's shape.
    "llama-1b": dict(hidden=2048, layers=22, heads=32, kv_heads=4, ffn=5632),
    # Llama-2-7B's shape.
    "llama-7b": dict(hidden=4096, layers=32, heads=32, kv_heads=32, ffn=11008),
}
QK_K, Q4_K_BYTES = 256, 144
SEED = 7
STD = 0.02


def tensors(s):
    """(GGUF name, Hugging Face name, [rows, cols] or [cols] for a norm) in llama.cpp's file order."""
    h, kv = s["hidden"], s["hidden"] // s["heads"] * s["kv_heads"]
    out = [("token_embd.weight", "model.embed_tokens.weight", [VOCAB, h])]
    for i in range(s["layers"]):
        b, m = f"blk.{i}.", f"model.layers.{i}."
        out += [(b + "attn_norm.weight", m + "input_layernorm.weight", [h]),
                (b + "attn_q.weight", m + "self_attn.q_proj.weight", [h, h]),
                (b + "attn_k.weight", m + "self_attn.k_proj.weight", [kv, h]),
                (b + "attn_v.weight", m + "self_attn.v_proj.weight", [kv, h]),
                (b + "attn_output.weight", m + "self_attn.o_proj.weight", [h, h]),
                (b + "ffn_norm.weight", m + "post_attention_layernorm.weight", [h]),
                (b + "ffn_gate.weight", m + "mlp.gate_proj.weight", [s["ffn"], h]),
                (b + "ffn_up.weight", m + "mlp.up_proj.weight", [s["ffn"], h]),
                (b + "ffn_down.weight", m + "mlp.down_proj.weight", [h, s["ffn"]])]
    out += [("output_norm.weight", "model.norm.weight", [h]), ("output.weight", "lm_head.weight", [VOCAB, h])]
    return out


def q4_k_blocks(rng, rows, cols):
    """Random Q4_K blocks, `[rows, cols / 256 * 144]` bytes: d = dmin (f16), scales sc in 4..8 and minimums
    mn = round(7.5 sc) (so weights d sc (q - 7.5) centre on zero), random nibbles."""
    nb = rows * cols // QK_K
    d = (rng.uniform(0.8, 1.2, nb) * STD / (6 * 4.6)).astype(np.float16)
    sc = rng.integers(4, 9, size=(nb, 8)).astype(np.uint8)
    mn = np.rint(7.5 * sc).astype(np.uint8)
    packed = np.empty((nb, 12), np.uint8)
    packed[:, 0:4] = sc[:, :4] | ((sc[:, 4:] >> 4) << 6)
    packed[:, 4:8] = mn[:, :4] | ((mn[:, 4:] >> 4) << 6)
    packed[:, 8:12] = (sc[:, 4:] & 0x0F) | ((mn[:, 4:] & 0x0F) << 4)
    out = np.empty((nb, Q4_K_BYTES), np.uint8)
    out[:, 0:2] = d.view(np.uint8).reshape(nb, 2)
    out[:, 2:4] = out[:, 0:2]
    out[:, 4:16] = packed
    out[:, 16:] = rng.integers(0, 256, size=(nb, 128), dtype=np.uint8)
    return out.reshape(rows, -1)


def matrices(shape):
    """Yields (GGUF name, HF name, shape, Q4_K bytes or None for a norm), one tensor at a time."""
    for i, (gg, hf, dims) in enumerate(tensors(SHAPES[shape])):
        if len(dims) == 1:
            yield gg, hf, dims, None
        else:
            yield gg, hf, dims, q4_k_blocks(np.random.default_rng([SEED, i]), *dims)


def to_bf16(x):
    """f32 -> bfloat16 bits, rounding to nearest even (as torch does)."""
    u = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
    return ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16)


def unpermute(w, heads):
    """llama.cpp's q/k row order back to Hugging Face's (the inverse of its converter's permute)."""
    rows, cols = w.shape
    return w.reshape(heads, rows // heads // 2, 2, cols).swapaxes(1, 2).reshape(rows, cols)


def write_gguf(shape, fmt, path):
    import gguf

    s = SHAPES[shape]
    qt = {"q4_k": gguf.GGMLQuantizationType.Q4_K, "q8_0": gguf.GGMLQuantizationType.Q8_0}[fmt]
    w = gguf.GGUFWriter(path, "llama")
    w.add_name(f"cage synthetic {shape} {fmt}")
    w.add_block_count(s["layers"])
    w.add_context_length(4096)
    w.add_embedding_length(s["hidden"])
    w.add_feed_forward_length(s["ffn"])
    w.add_head_count(s["heads"])
    w.add_head_count_kv(s["kv_heads"])
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_freq_base(10000.0)
    w.add_rope_dimension_count(s["hidden"] // s["heads"])
    w.add_vocab_size(VOCAB)
    w.add_file_type({"q4_k": gguf.LlamaFileType.MOSTLY_Q4_K_M, "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[fmt])
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    src = gguf.GGUFReader(SMOL_GGUF)
    for key, f in src.fields.items():
        if key.startswith("tokenizer."):
            sub = f.types[1] if len(f.types) > 1 else None
            w.add_key_value(key, f.contents(), f.types[0], sub_type=sub)
    for gg, _, dims in tensors(s):
        if len(dims) == 1:
            w.add_tensor_info(gg, dims, np.dtype(np.float32), dims[0] * 4)
        else:
            row = dims[1] // QK_K * Q4_K_BYTES if fmt == "q4_k" else dims[1] // 32 * 34
            w.add_tensor_info(gg, [dims[0], row], np.dtype(np.uint8), dims[0] * row, raw_dtype=qt)
    w.write_header_to_file(path)
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    for gg, _, dims, blocks in matrices(shape):
        if blocks is None:
            w.write_tensor_data(np.ones(dims, np.float32))
        elif fmt == "q4_k":
            w.write_tensor_data(blocks)
        else:
            vals = gguf.quants.dequantize(blocks, gguf.GGMLQuantizationType.Q4_K)
            w.write_tensor_data(gguf.quants.quantize(vals, qt))
    w.close()


def safetensors_header(tensors_, dtype, itemsize):
    """The length-prefixed safetensors header of `tensors_` ((name, dims) in file order, all of `dtype`), padded
    to 8 bytes: written first, then the tensors' data streamed in the same order."""
    header, at = {"__metadata__": {"format": "pt"}}, 0
    for name, dims in tensors_:
        n = int(np.prod(dims)) * itemsize
        header[name] = {"dtype": dtype, "shape": dims, "data_offsets": [at, at + n]}
        at += n
    hb = json.dumps(header, separators=(",", ":")).encode()
    hb += b" " * (-len(hb) % 8)
    return struct.pack("<Q", len(hb)) + hb


def write_bf16(shape, out):
    import gguf

    s = SHAPES[shape]
    os.makedirs(out, exist_ok=True)
    items = list(tensors(s))
    with open(os.path.join(out, "model.safetensors"), "wb") as f:
        f.write(safetensors_header([(hf, dims) for _, hf, dims in items], "BF16", 2))
        for gg, _, dims, blocks in matrices(shape):
            if blocks is None:
                vals = np.ones(dims, np.float32)
            else:
                vals = gguf.quants.dequantize(blocks, gguf.GGMLQuantizationType.Q4_K)
                if "attn_q" in gg:
                    vals = unpermute(vals, s["heads"])
                elif "attn_k" in gg:
                    vals = unpermute(vals, s["kv_heads"])
            to_bf16(vals).tofile(f)
    cfg = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": s["hidden"],
           "intermediate_size": s["ffn"], "num_hidden_layers": s["layers"], "num_attention_heads": s["heads"],
           "num_key_value_heads": s["kv_heads"], "vocab_size": VOCAB, "max_position_embeddings": 4096,
           "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "hidden_act": "silu", "tie_word_embeddings": False,
           "bos_token_id": 1, "eos_token_id": 2, "torch_dtype": "bfloat16"}
    with open(os.path.join(out, "config.json"), "w") as f:
        json.dump(cfg, f, indent=1)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(os.path.join(SMOL_DIR, name), os.path.join(out, name))


def write_lora(shape, out, seed, rank=8):
    """A PEFT LoRA adapter of the shape (rank 8 on q_proj and v_proj, alpha 16, f32): the ARM of the shared-backbone
    row of bench-7b.sh. B is random too (a trained adapter's is not zero), small enough to keep the model sane."""
    s = SHAPES[shape]
    kv = s["hidden"] // s["heads"] * s["kv_heads"]
    os.makedirs(out, exist_ok=True)
    rng = np.random.default_rng([SEED, seed])
    tensors_ = []
    for i in range(s["layers"]):
        for mod, width in (("q_proj", s["hidden"]), ("v_proj", kv)):
            pre = f"base_model.model.model.layers.{i}.self_attn.{mod}."
            tensors_.append((pre + "lora_A.weight", [rank, s["hidden"]]))
            tensors_.append((pre + "lora_B.weight", [width, rank]))
    with open(os.path.join(out, "adapter_model.safetensors"), "wb") as f:
        f.write(safetensors_header(tensors_, "F32", 4))
        for _, dims in tensors_:
            (rng.standard_normal(dims, dtype=np.float32) * 0.01).tofile(f)
    cfg = {"peft_type": "LORA", "r": rank, "lora_alpha": 2 * rank, "target_modules": ["q_proj", "v_proj"],
           "lora_dropout": 0.0, "bias": "none", "fan_in_fan_out": False, "task_type": "CAUSAL_LM"}
    with open(os.path.join(out, "adapter_config.json"), "w") as f:
        json.dump(cfg, f, indent=1)


def main(argv):
    ap = argparse.ArgumentParser(prog="make_fixtures.py synthetic")
    ap.add_argument("--shape", choices=sorted(SHAPES), required=True)
    ap.add_argument("--format", choices=["bf16", "q4_k", "q8_0", "lora"], required=True)
    ap.add_argument("--out", required=True, help="a folder (bf16, lora) or a .gguf file")
    ap.add_argument("--seed", type=int, default=1, help="lora: which adapter")
    a = ap.parse_args(argv)
    if a.format == "bf16":
        write_bf16(a.shape, a.out)
    elif a.format == "lora":
        write_lora(a.shape, a.out, a.seed)
    else:
        if not os.path.exists(SMOL_GGUF):
            raise SystemExit(f"{SMOL_GGUF} is missing (its tokenizer goes into the GGUF): run `cage fetch-model`")
        write_gguf(a.shape, a.format, a.out)
    print(f"wrote {a.out}")
