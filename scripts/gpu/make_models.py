#!/usr/bin/env python3
"""Builds a Llama-family model of a realistic shape with random weights (fixed seed) from its config alone, as
bf16 safetensors with a word-level tokenizer of the full vocabulary, plus PEFT LoRA adapters on it: what the GPU
bundle measures cage and transformers on where no hub is reachable (scripts/gpu-bundle.sh, docs/benchmarks.md).

    python3 scripts/gpu/make_models.py --shape llama-3.2-1b --out /tmp/m1b --adapters 2 [--device cuda]

Shapes: `tiny` (the bundle's dry run on the host emulation), `llama-3.2-1b`, `llama-3.1-8b` (the published
configs' sizes: layers, widths, heads, vocabulary 128256, Llama 3.1 RoPE scaling). The weights follow
transformers' own initialisation (normal, std `initializer_range`) except the LM head, drawn 4x wider so that
the next-token distribution has a clear top (random models are otherwise close to uniform over 128k tokens and
every comparison would be a near tie). Tokens are `t0`..`t{V-1}`, split on whitespace: a prompt of ids is the
text "t5 t17 ...", for cage and transformers alike.
"""
import argparse
import json
import os
import time

import torch

LLAMA3_ROPE = {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 8192}
SHAPES = {
    "tiny": dict(hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, head_dim=16, vocab_size=512, tie_word_embeddings=False,
                 rope_theta=500000.0, rope_scaling=LLAMA3_ROPE),
    "llama-3.2-1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                         num_key_value_heads=8, head_dim=64, vocab_size=128256, tie_word_embeddings=True,
                         rope_theta=500000.0, rope_scaling=LLAMA3_ROPE),
    "llama-3.1-8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                         num_key_value_heads=8, head_dim=128, vocab_size=128256, tie_word_embeddings=False,
                         rope_theta=500000.0, rope_scaling=LLAMA3_ROPE),
}


def tokenizer(vocab, out):
    from tokenizers import Tokenizer, models, pre_tokenizers

    tok = Tokenizer(models.WordLevel({f"t{i}": i for i in range(vocab)}, unk_token="t0"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(os.path.join(out, "tokenizer.json"))
    with open(os.path.join(out, "tokenizer_config.json"), "w") as f:
        json.dump({"bos_token": "t1", "eos_token": f"t{vocab - 1}", "unk_token": "t0"}, f)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", choices=sorted(SHAPES), required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--adapters", type=int, default=0, help="PEFT LoRA adapters to write beside the model")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    from transformers import LlamaConfig, LlamaForCausalLM

    t0 = time.time()
    s = SHAPES[a.shape]
    v = s["vocab_size"]
    cfg = LlamaConfig(**s, max_position_embeddings=131072, bos_token_id=1, eos_token_id=v - 1, pad_token_id=None,
                      rms_norm_eps=1e-5, initializer_range=0.02)
    torch.manual_seed(a.seed)
    with torch.device(a.device):
        model = LlamaForCausalLM(cfg).to(torch.bfloat16)
    with torch.no_grad():
        head = model.get_output_embeddings().weight
        if not cfg.tie_word_embeddings:
            head.mul_(4.0)
        for n, p in model.named_parameters():
            if "norm" in n:
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
    model.eval()
    os.makedirs(a.out, exist_ok=True)
    model.save_pretrained(a.out, safe_serialization=True)
    tokenizer(v, a.out)
    for i in range(a.adapters):
        from peft import LoraConfig, get_peft_model

        torch.manual_seed(a.seed + 1 + i)
        lc = LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0,
                        target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
        pm = get_peft_model(model, lc)
        with torch.no_grad():
            for n, p in pm.named_parameters():
                if "lora_B" in n:  # PEFT starts B at zero: an adapter that changes nothing would test nothing
                    p.copy_(0.02 * torch.randn_like(p))
        pm.save_pretrained(os.path.join(a.out, f"lora-{i}"))
        model = pm.unload()
    n = sum(p.numel() for p in model.parameters())
    print(json.dumps({"shape": a.shape, "out": a.out, "parameters": n, "adapters": a.adapters,
                      "seconds": round(time.time() - t0, 1)}), flush=True)


if __name__ == "__main__":
    main()
