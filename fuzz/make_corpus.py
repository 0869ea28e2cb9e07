#!/usr/bin/env python3
"""Writes the seed corpus of the fuzz targets into fuzz/corpus/<target>/ (small, valid inputs that reach deep
into each parser; the fuzzer mutates from there). Standard library only; deterministic. Re-run after a format
change: python3 fuzz/make_corpus.py. Files named regression-* are inputs that once crashed a target, kept by
hand so that every run replays them."""
import json
import math
import os
import struct

ROOT = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(ROOT)
SEP = b"\n==cage-fuzz==\n"  # fuzz_targets/model_files.rs


def out(target, name, data):
    d = os.path.join(ROOT, "corpus", target)
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, name), "wb") as f:
        f.write(data if isinstance(data, bytes) else data.encode())


def values(n, seed):
    """n deterministic floats in [-1, 1)."""
    x = seed
    res = []
    for _ in range(n):
        x = (x * 6364136223846793005 + 1442695040888963407) % (1 << 64)
        res.append(((x >> 11) / float(1 << 53)) * 2 - 1)
    return res


def f16(x):
    return struct.pack("<e", x)


# ---- GGUF -------------------------------------------------------------------------------------------------
def gguf_str(s):
    b = s.encode()
    return struct.pack("<Q", len(b)) + b


def gguf_value(v):
    if isinstance(v, bool):
        return struct.pack("<I", 7) + struct.pack("<B", v)
    if isinstance(v, int):
        return struct.pack("<I", 4) + struct.pack("<I", v)
    if isinstance(v, float):
        return struct.pack("<I", 6) + struct.pack("<f", v)
    if isinstance(v, str):
        return struct.pack("<I", 8) + gguf_str(v)
    if isinstance(v, list):
        if all(isinstance(x, str) for x in v):
            return struct.pack("<IIQ", 9, 8, len(v)) + b"".join(gguf_str(x) for x in v)
        if all(isinstance(x, float) for x in v):
            return struct.pack("<IIQ", 9, 6, len(v)) + b"".join(struct.pack("<f", x) for x in v)
        return struct.pack("<IIQ", 9, 5, len(v)) + b"".join(struct.pack("<i", x) for x in v)
    raise TypeError(v)


def quantize(xs, ty):
    """Bytes of xs in ggml type ty (0 F32, 1 F16, 2 Q4_0, 3 Q4_1, 8 Q8_0), like llama.cpp's reference code."""
    if ty == 0:
        return b"".join(struct.pack("<f", x) for x in xs)
    if ty == 1:
        return b"".join(f16(x) for x in xs)
    b = b""
    for i in range(0, len(xs), 32):
        blk = xs[i:i + 32]
        if ty == 8:
            amax = max(abs(x) for x in blk)
            d = amax / 127
            inv = 1 / d if d else 0
            b += f16(d) + bytes((round(x * inv) & 0xFF) for x in blk)
        elif ty == 2:
            mx = max(blk, key=abs)
            d = mx / -8
            inv = 1 / d if d else 0
            q = [min(15, max(0, int(x * inv + 8.5))) for x in blk]
            b += f16(d) + bytes(q[j] | (q[j + 16] << 4) for j in range(16))
        elif ty == 3:
            lo, hi = min(blk), max(blk)
            d = (hi - lo) / 15
            inv = 1 / d if d else 0
            q = [min(15, max(0, int((x - lo) * inv + 0.5))) for x in blk]
            b += f16(d) + f16(lo) + bytes(q[j] | (q[j + 16] << 4) for j in range(16))
    return b


def gguf(meta, tensors):
    """tensors: (name, dims innermost first, ggml type, floats)."""
    head = b"GGUF" + struct.pack("<IQQ", 3, len(tensors), len(meta))
    for k, v in meta:
        head += gguf_str(k) + gguf_value(v)
    data = b""
    infos = b""
    for name, dims, ty, xs in tensors:
        while len(data) % 32:
            data += b"\0"
        infos += gguf_str(name) + struct.pack("<I", len(dims)) + b"".join(struct.pack("<Q", d) for d in dims)
        infos += struct.pack("<IQ", ty, len(data))
        data += quantize(xs, ty)
    b = head + infos
    while len(b) % 32:
        b += b"\0"
    return b + data


def llama_gguf(hidden, ffn, heads, kv, vocab, types, tokenizer):
    hd = hidden // heads
    shapes = [("token_embd.weight", [hidden, vocab]), ("output_norm.weight", [hidden]),
              ("output.weight", [hidden, vocab]), ("blk.0.attn_norm.weight", [hidden]),
              ("blk.0.ffn_norm.weight", [hidden]), ("blk.0.attn_q.weight", [hidden, heads * hd]),
              ("blk.0.attn_k.weight", [hidden, kv * hd]), ("blk.0.attn_v.weight", [hidden, kv * hd]),
              ("blk.0.attn_output.weight", [heads * hd, hidden]), ("blk.0.ffn_gate.weight", [hidden, ffn]),
              ("blk.0.ffn_up.weight", [hidden, ffn]), ("blk.0.ffn_down.weight", [ffn, hidden])]
    tensors = []
    for i, (name, dims) in enumerate(shapes):
        n = math.prod(dims)
        ty = 0 if len(dims) == 1 else types[i % len(types)]
        tensors.append((name, dims, ty, values(n, i + 1)))
    meta = [("general.architecture", "llama"), ("llama.embedding_length", hidden), ("llama.block_count", 1),
            ("llama.feed_forward_length", ffn), ("llama.attention.head_count", heads),
            ("llama.attention.head_count_kv", kv), ("llama.context_length", 64), ("llama.rope.freq_base", 10000.0),
            ("llama.attention.layer_norm_rms_epsilon", 1e-5), ("llama.vocab_size", vocab)] + tokenizer
    return gguf(meta, tensors)


BPE_TOKENS = ["h", "i", "t", "Ġ", "hi", "Ġt", "<|im_start|>", "<|im_end|>"]
TEMPLATE = ("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + "
            "'<|im_end|>' + '\\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")
BPE = [("tokenizer.ggml.model", "gpt2"), ("tokenizer.ggml.pre", "smollm"), ("tokenizer.ggml.tokens", BPE_TOKENS),
       ("tokenizer.ggml.token_type", [1, 1, 1, 1, 1, 1, 3, 3]), ("tokenizer.ggml.merges", ["h i", "Ġ t"]),
       ("tokenizer.ggml.bos_token_id", 6), ("tokenizer.ggml.eos_token_id", 7),
       ("tokenizer.ggml.add_bos_token", False), ("tokenizer.chat_template", TEMPLATE)]
SPM_TOKENS = ["<unk>", "<s>", "</s>", "<0x41>", "\u2581", "h", "e", "he", "\u2581he"]
SPM = [("tokenizer.ggml.model", "llama"), ("tokenizer.ggml.tokens", SPM_TOKENS),
       ("tokenizer.ggml.scores", [0.0, 0.0, 0.0, 0.0, -1.0, -2.0, -3.0, -1.5, -0.5]),
       ("tokenizer.ggml.token_type", [2, 3, 3, 6, 1, 1, 1, 1, 1]), ("tokenizer.ggml.bos_token_id", 1),
       ("tokenizer.ggml.eos_token_id", 2), ("tokenizer.ggml.unknown_token_id", 0)]

out("gguf", "bpe-q8-q4", llama_gguf(32, 32, 2, 1, 8, [8, 2, 3], BPE))
out("gguf", "spm-f16-f32", llama_gguf(8, 8, 2, 1, 9, [1, 0], SPM))
out("gguf", "header-only", gguf([("general.architecture", "llama"), ("general.alignment", 64)], []))

# ---- model folder ----------------------------------------------------------------------------------------
def safetensors(tensors, dtype="F32"):
    header = {}
    data = b""
    for name, shape in tensors:
        n = math.prod(shape)
        xs = values(n, len(data) + 7)
        if dtype == "F32":
            raw = b"".join(struct.pack("<f", x) for x in xs)
        elif dtype == "F16":
            raw = b"".join(f16(x) for x in xs)
        else:  # BF16: the high half of the f32
            raw = b"".join(struct.pack("<f", x)[2:] for x in xs)
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [len(data), len(data) + len(raw)]}
        data += raw
    h = json.dumps(header, separators=(",", ":")).encode()
    while len(h) % 8:
        h += b" "
    return struct.pack("<Q", len(h)) + h + data


def model_folder(arch, dtype):
    hidden, ffn, heads, kv, hd, vocab = 8, 8, 2, 1, 4, 16
    cfg = {"architectures": [{"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM",
                              "mistral": "MistralForCausalLM"}[arch]], "model_type": arch, "hidden_size": hidden,
           "intermediate_size": ffn, "num_hidden_layers": 1, "num_attention_heads": heads,
           "num_key_value_heads": kv, "head_dim": hd, "vocab_size": vocab, "rms_norm_eps": 1e-5,
           "rope_theta": 10000.0, "max_position_embeddings": 64, "tie_word_embeddings": arch == "qwen2",
           "bos_token_id": 1, "eos_token_id": [2]}
    if arch == "mistral":
        cfg["sliding_window"] = 4
    if arch == "qwen2":
        cfg.update({"use_sliding_window": True, "sliding_window": 4, "max_window_layers": 0,
                    "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                     "high_freq_factor": 4.0, "original_max_position_embeddings": 32}})
    p = "model.layers.0."
    t = [("model.embed_tokens.weight", [vocab, hidden]), ("model.norm.weight", [hidden]),
         (p + "input_layernorm.weight", [hidden]), (p + "post_attention_layernorm.weight", [hidden]),
         (p + "self_attn.q_proj.weight", [heads * hd, hidden]), (p + "self_attn.k_proj.weight", [kv * hd, hidden]),
         (p + "self_attn.v_proj.weight", [kv * hd, hidden]), (p + "self_attn.o_proj.weight", [hidden, heads * hd]),
         (p + "mlp.gate_proj.weight", [ffn, hidden]), (p + "mlp.up_proj.weight", [ffn, hidden]),
         (p + "mlp.down_proj.weight", [hidden, ffn])]
    if arch == "qwen2":
        t += [(p + "self_attn.q_proj.bias", [heads * hd]), (p + "self_attn.k_proj.bias", [kv * hd]),
              (p + "self_attn.v_proj.bias", [kv * hd])]
    else:
        t.append(("lm_head.weight", [vocab, hidden]))
    with open(os.path.join(REPO, "tests/fixtures/tiny-word-tokenizer/tokenizer.json"), "rb") as f:
        tok = json.loads(f.read())
    tok["model"]["vocab"] = {k: v for k, v in tok["model"]["vocab"].items() if v < vocab}
    tok_cfg = {"bos_token": "<s>", "eos_token": "</s>",
               "chat_template": "{% for m in messages %}{{ bos_token + m['role'] + ' ' + m['content'] }}{% endfor %}"
                                "{% if add_generation_prompt %}{{ 't3' }}{% endif %}"}
    return SEP.join([json.dumps(cfg).encode(), safetensors(t, dtype), json.dumps(tok).encode(),
                     json.dumps(tok_cfg).encode()])


out("model_files", "llama-f32", model_folder("llama", "F32"))
out("model_files", "qwen2-bf16", model_folder("qwen2", "BF16"))
out("model_files", "mistral-f16", model_folder("mistral", "F16"))
with open(os.path.join(REPO, "tests/fixtures/tiny-llama/config.json"), "rb") as f:
    out("model_files", "config-only", f.read())

# ---- game JSON and run config ----------------------------------------------------------------------------
with open(os.path.join(REPO, "examples/game.json"), "rb") as f:
    out("game_json", "example", f.read())
out("game_json", "many", json.dumps([
    {"tau": 0.05, "base_logprobs": [-0.1, "-inf", -3.0, None, -0.7], "normalize": "none",
     "principals": [{"values": [0.0, 9.0, 1.0, 2.0, 0.5], "weight": 2.0}, {"name": "b", "values": [1, 1, 1, 1, 1]}]},
    {"tau": 1e3, "base_logprobs": [0.0]},
    {"tau": 0.3, "base_logprobs": [-1.0, -2.0], "principals": [{"values": [1e30, -1e30]}]}]))
out("game_json", "bad-string", '{"tau": 0.1, "base_logprobs": ["nan", 1], "principals": []}')
for name in ("smollm2-concise-enthusiastic.json", "smollm2-three-objectives.json"):
    with open(os.path.join(REPO, "examples/configs", name), "rb") as f:
        out("run_config", name, f.read())
