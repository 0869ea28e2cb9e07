#!/usr/bin/env python3
"""The transformers side of docs/benchmarks.md "Forward passes": SmolLM2-135M-Instruct in f32 on the CPU,
greedy decode with the KV cache, the same shapes as `cage bench forward` (prompt of 64 tokens per row,
decode steps, batch 1 / 4 / 8 / 32), on as many threads as cage uses.

    /root/venv-golden/bin/python scripts/bench_transformers.py models/SmolLM2-135M-Instruct [--threads 2]

(The model folder is the one `cage fetch-model` imports; transformers loads it like any Llama checkpoint.)
"""
import argparse
import json
import time

import torch
from transformers import AutoModelForCausalLM

ap = argparse.ArgumentParser()
ap.add_argument("model")
ap.add_argument("--threads", type=int, default=2)
ap.add_argument("--batches", default="1,4,8,32")
ap.add_argument("--prompt", type=int, default=64)
ap.add_argument("--steps", type=int, default=32)
ap.add_argument("--repeats", type=int, default=2)
a = ap.parse_args()
torch.set_num_threads(a.threads)
model = AutoModelForCausalLM.from_pretrained(a.model, dtype=torch.float32).eval()
v = model.config.vocab_size
res = []
with torch.inference_mode():
    for b in [int(x) for x in a.batches.split(",")]:
        ids = torch.tensor([[(r * 7919 + i * 104729 + 17) % v for i in range(a.prompt)] for r in range(b)])
        best_pre = best_dec = float("inf")
        for _ in range(a.repeats):
            t0 = time.perf_counter()
            out = model(ids, use_cache=True)
            best_pre = min(best_pre, time.perf_counter() - t0)
            past = out.past_key_values
            nxt = out.logits[:, -1].argmax(-1, keepdim=True)
            t1 = time.perf_counter()
            for _ in range(a.steps):
                out = model(nxt, past_key_values=past, use_cache=True)
                past = out.past_key_values
                nxt = out.logits[:, -1].argmax(-1, keepdim=True)
            best_dec = min(best_dec, time.perf_counter() - t1)
        r = {"batch": b, "prefill_tok_s": b * a.prompt / best_pre, "decode_tok_s": b * a.steps / best_dec, "decode_step_ms": best_dec * 1e3 / a.steps}
        res.append(r)
        print(f"{b:>6} {r['prefill_tok_s']:>14.1f} {r['decode_tok_s']:>14.1f} {r['decode_step_ms']:>16.2f}", flush=True)
print(json.dumps({"torch": torch.__version__, "threads": a.threads, "results": res}))
