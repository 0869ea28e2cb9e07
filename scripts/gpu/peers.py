#!/usr/bin/env python3
"""Throughput side by side in one run, on one model built by make_models.py: cage against transformers on the
same card (or, with `--device emulation`, the bundle's dry run on the host: the numbers then only prove the
wiring). Part of scripts/gpu-bundle.sh; every figure goes to docs/benchmarks.md with the card's name and date.

    python3 scripts/gpu/peers.py --cage ./cage --model DIR --device cuda --out peers.json [--genarm] [--overhead]

1. Plain decode, batch 1 / 8 / 32 (prompt 64 tokens, 32 new): `cage bench forward --device cuda` against
   transformers `generate` in bf16 with sdpa, both with its dynamic cache and with the static cache under
   torch.compile (when compiling works there); the best transformers figure is the peer.
2. `--genarm`: a GenARM-style 3-stream loop in PyTorch (base + two LoRA ARMs, log pi_base + sum_j w_j log pi_j,
   greedy, one KV cache per stream, the ARMs merged into their own models as the authors' scripts load them)
   against `cage bench decode` methods genarm and cage with the same streams (`lora-0`, `lora-1` beside the model).
3. `--overhead`: `cage bench decode` with two lexicon principals (no extra streams): the share of a decode step
   spent outside the forward pass (values + equilibrium + choice) for base and cage.
"""
import argparse
import json
import os
import subprocess
import sys
import time

import torch

PROMPT, NEW = 64, 32


def run(cmd):
    out = subprocess.run(cmd, capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd[:3])} failed ({out.returncode}): {out.stderr.strip()[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def ids(vocab, rows, n, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(2, vocab - 1, (rows, n), generator=g)


def timed(dev, fn):
    """Seconds `fn()` takes, the device's queued work drained before and after it."""
    if dev == "cuda":
        torch.cuda.synchronize()
    t = time.perf_counter()
    fn()
    if dev == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t


def tf_generate(model, batches, dev, compiled):
    v = model.config.vocab_size
    res = {}
    for b in batches:
        x = ids(v, b, PROMPT).to(dev)
        kw = dict(max_new_tokens=NEW, min_new_tokens=NEW, do_sample=False, attention_mask=torch.ones_like(x))
        if compiled:
            kw["cache_implementation"] = "static"
        best = float("inf")
        for _ in range(3):  # the first run compiles / warms up
            # prefill + NEW steps; the prefill share is measured apart and taken out
            total = timed(dev, lambda: model.generate(x, **kw))
            pre = timed(dev, lambda: model.generate(x, **{**kw, "max_new_tokens": 1, "min_new_tokens": 1}))
            best = min(best, max(total - pre, 1e-9))
        res[b] = {"decode_tok_s": b * (NEW - 1) / best, "decode_step_ms": best * 1e3 / (NEW - 1)}
    return res


def genarm_loop(models, weights, x, steps, dev):
    """Greedy GenARM decode: log softmax of the base plus w_j times the ARMs' log softmax, one cache per stream."""
    from transformers import DynamicCache

    caches = [DynamicCache() for _ in models]
    logp = []
    for m, c in zip(models, caches):
        logp.append(torch.log_softmax(m(x, past_key_values=c, use_cache=True).logits[:, -1].float(), -1))
    toks = []
    for _ in range(steps):
        z = logp[0] + sum(w * lp for w, lp in zip(weights, logp[1:]))
        nxt = z.argmax(-1, keepdim=True)
        toks.append(nxt)
        logp = [torch.log_softmax(m(nxt, past_key_values=c, use_cache=True).logits[:, -1].float(), -1)
                for m, c in zip(models, caches)]
    return torch.cat(toks, 1)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--cage", required=True)
    ap.add_argument("--model", required=True)
    ap.add_argument("--device", default="cuda", choices=["cuda", "emulation"])
    ap.add_argument("--batches", default="1,8,32")
    ap.add_argument("--genarm", action="store_true")
    ap.add_argument("--overhead", action="store_true")
    ap.add_argument("--no-compile", action="store_true")
    ap.add_argument("--work", default="/tmp")
    ap.add_argument("--out", required=True)
    a = ap.parse_args()
    from transformers import AutoModelForCausalLM

    dev = "cuda" if a.device == "cuda" else "cpu"
    batches = [int(b) for b in a.batches.split(",")]
    res = {"model": a.model, "device": a.device, "torch": torch.__version__,
           "transformers": __import__("transformers").__version__, "prompt": PROMPT, "new_tokens": NEW,
           "card": torch.cuda.get_device_name(0) if dev == "cuda" else "host (dry run)"}

    def save():
        with open(a.out, "w") as f:
            json.dump(res, f, indent=1)

    # 1. plain decode
    res["cage_forward"] = run([a.cage, "bench", "forward", "--model", a.model, "--device", a.device, "--batches",
                               a.batches, "--prompt-len", str(PROMPT), "--steps", str(NEW), "--repeats", "2", "--json"])
    save()
    dtype = torch.bfloat16 if dev == "cuda" else torch.float32
    m = AutoModelForCausalLM.from_pretrained(a.model, dtype=dtype, attn_implementation="sdpa").to(dev).eval()
    with torch.inference_mode():
        res["transformers_dynamic"] = tf_generate(m, batches, dev, False)
        save()
        if dev == "cuda" and not a.no_compile:
            try:
                m.forward = torch.compile(m.forward, mode="reduce-overhead", fullgraph=True)
                res["transformers_static_compiled"] = tf_generate(m, batches, dev, True)
            except Exception as e:  # a compile failure is a line in the report, not the end of the run
                res["transformers_static_compiled"] = {"error": f"{type(e).__name__}: {str(e)[:500]}"}
            save()
    del m
    for r in res["cage_forward"]["gpu"].get("results", []):
        peers = [res[k][r["batch"]]["decode_tok_s"] for k in ("transformers_dynamic", "transformers_static_compiled")
                 if isinstance(res.get(k), dict) and r["batch"] in res[k]]
        if peers:
            r["speedup_over_best_transformers"] = r["decode_tok_s"] / max(peers)
    save()
    # 2. GenARM with three streams
    if a.genarm:
        from peft import PeftModel

        w = [0.5, 0.5]
        base = AutoModelForCausalLM.from_pretrained(a.model, dtype=dtype, attn_implementation="sdpa").to(dev).eval()
        arms = []
        for i in range(2):
            m = AutoModelForCausalLM.from_pretrained(a.model, dtype=dtype, attn_implementation="sdpa")
            arms.append(PeftModel.from_pretrained(m, os.path.join(a.model, f"lora-{i}")).merge_and_unload().to(dev).eval())
        x = ids(base.config.vocab_size, 1, PROMPT).to(dev)
        with torch.inference_mode():
            best = min(timed(dev, lambda: genarm_loop([base] + arms, w, x, NEW, dev)) for _ in range(3))
        res["pytorch_genarm_3_streams"] = {"tok_s_incl_prefill": NEW / best}
        del base, arms
        cfg = {"base": a.model, "method": "genarm", "k": 50, "prompt_format": "plain", "model_device": a.device,
               "backend": "cuda" if a.device == "cuda" else "emulation", "weights": w, "sampling": "greedy",
               "principals": [{"name": f"arm{i}", "kind": "arm", "adapter": os.path.join(a.model, f"lora-{i}")}
                              for i in range(2)]}
        with open(f"{a.work}/genarm.json", "w") as f:
            json.dump(cfg, f)
        prompt = " ".join(f"t{t}" for t in x[0].tolist())
        res["cage_decode_3_streams"] = run([a.cage, "bench", "decode", "--config", f"{a.work}/genarm.json", "--methods",
                                            "genarm,cage", "--rows", "1", "--tokens", str(NEW), "--prompt", prompt,
                                            "--repeats", "2", "--json"])
        save()
    # 3. per-step overhead without extra streams
    if a.overhead:
        cfg = {"base": a.model, "k": 50, "prompt_format": "plain", "model_device": a.device,
               "backend": "cuda" if a.device == "cuda" else "emulation", "sampling": "greedy",
               "principals": [{"name": "lex-a", "kind": "lexicon", "words": {"t5": 1.0, "t7": 0.5}},
                              {"name": "lex-b", "kind": "lexicon", "words": {"t9": 2.0}, "default": 0.1}]}
        with open(f"{a.work}/overhead.json", "w") as f:
            json.dump(cfg, f)
        res["cage_decode_overhead"] = run([a.cage, "bench", "decode", "--config", f"{a.work}/overhead.json", "--methods",
                                           "base,cage", "--rows", "1", "--tokens", str(NEW), "--prompt",
                                           " ".join(f"t{i}" for i in range(10, 10 + PROMPT)), "--repeats", "2", "--json"])
        save()
    print(json.dumps(res)[:3000], flush=True)


if __name__ == "__main__":
    sys.exit(main())
