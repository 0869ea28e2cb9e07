#!/usr/bin/env python3
"""cage's GPU decoder against transformers on the same model and the same token ids: next-token logits and
greedy continuations. Part of the GPU bundle (scripts/gpu-bundle.sh); with `--device emulation` it is the
bundle's dry run on the host emulation (tiny model, transformers on the CPU).

    python3 scripts/gpu/compare.py --cage ./cage --model DIR --device cuda --out results.json

The reference is transformers in f32 on the model's bf16 weights (exactly the values cage uploads), so a
difference is arithmetic, not weights. The tolerance is transformers' own: the same model run in bf16 by
transformers differs from that reference too, and cage (bf16 weights, f32 activations rounded to bf16 at the
GEMMs, f32 accumulation) must stay within 1.5x of transformers-bf16's difference (plus 1e-3 for tiny models,
whose differences are near f32 rounding). A greedy step is a near tie when the reference's top-2 margin is
below twice the larger of the two measured logit errors: the continuations are compared up to the first near
tie, which is reported with its margin, never hidden.
"""
import argparse
import json
import subprocess
import sys
import time

import torch


def prompts(vocab, n, length, seed=7):
    g = torch.Generator().manual_seed(seed)
    # ids 2..V-2: not BOS / unknown, not the EOS (V - 1) the models are configured with
    return [torch.randint(2, vocab - 1, (length + 3 * i,), generator=g).tolist() for i in range(n)]


def cage_logits(cage, model, device, seqs, top):
    cmd = [cage, "logits", "--model", model, "--device", device, "--top", str(top), "--json"]
    for s in seqs:
        cmd += ["--ids", ",".join(map(str, s))]
    out = subprocess.run(cmd, capture_output=True, text=True)
    if out.returncode != 0:
        raise SystemExit(f"cage logits failed ({out.returncode}): {out.stderr.strip()}")
    return [json.loads(line) for line in out.stdout.splitlines() if line.strip()]


def cage_greedy(cage, model, device, seqs, new, work):
    cfg = {"base": model, "principals": [], "method": "base", "k": 1, "max_new_tokens": new, "stop": [],
           "prompt_format": "plain", "model_device": device, "sampling": "greedy", "batch_size": len(seqs)}
    with open(f"{work}/greedy.json", "w") as f:
        json.dump(cfg, f)
    with open(f"{work}/greedy-prompts.jsonl", "w") as f:
        for s in seqs:
            f.write(json.dumps(" ".join(f"t{t}" for t in s)) + "\n")
    out = subprocess.run([cage, "generate", "-c", f"{work}/greedy.json", "--prompts", f"{work}/greedy-prompts.jsonl"],
                         capture_output=True, text=True)
    if out.returncode != 0:
        raise SystemExit(f"cage generate failed ({out.returncode}): {out.stderr.strip()}")
    rows = [json.loads(line) for line in out.stdout.splitlines() if line.strip()]
    return [[int(w[1:]) for w in r["text"].split()] for r in rows]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--cage", required=True)
    ap.add_argument("--model", required=True)
    ap.add_argument("--device", default="cuda", choices=["cuda", "emulation"])
    ap.add_argument("--prompts", type=int, default=4)
    ap.add_argument("--length", type=int, default=24)
    ap.add_argument("--new", type=int, default=16)
    ap.add_argument("--top", type=int, default=256)
    ap.add_argument("--work", default="/tmp")
    ap.add_argument("--out", required=True)
    a = ap.parse_args()
    from transformers import AutoModelForCausalLM

    t0 = time.time()
    tdev = "cuda" if a.device == "cuda" else "cpu"
    m = AutoModelForCausalLM.from_pretrained(a.model, dtype=torch.float32, attn_implementation="sdpa").to(tdev).eval()
    vocab = m.config.vocab_size
    seqs = prompts(vocab, a.prompts, a.length)
    with torch.inference_mode():
        ref = [m(torch.tensor([s], device=tdev)).logits[0, -1].double().cpu() for s in seqs]
        greedy_ref = [m.generate(torch.tensor([s], device=tdev), max_new_tokens=a.new, do_sample=False,
                                 min_new_tokens=a.new)[0, len(s):].tolist() for s in seqs]
        # The same model in bf16 by transformers: the arithmetic difference its users accept.
        m = m.to(torch.bfloat16)
        tfb = [m(torch.tensor([s], device=tdev)).logits[0, -1].double().cpu() for s in seqs]
        # Reference margins along the reference's greedy path (for near ties in the continuations).
        m = m.to(torch.float32)
        margins = []
        for s, g in zip(seqs, greedy_ref):
            lg = m(torch.tensor([s + g], device=tdev)).logits[0, len(s) - 1:len(s) - 1 + len(g)].double().cpu()
            top2 = lg.topk(2, dim=-1).values
            margins.append((top2[:, 0] - top2[:, 1]).tolist())
    del m
    t_tf = time.time() - t0
    t1 = time.time()
    cg = cage_logits(a.cage, a.model, a.device, seqs, a.top)
    t_cage = time.time() - t1
    rows, ok = [], True
    for i, (s, r, b, c) in enumerate(zip(seqs, ref, tfb, cg)):
        ids = torch.tensor([t["id"] for t in c["top"]])
        cl = torch.tensor([t["logit"] for t in c["top"]], dtype=torch.float64)
        err_cage = float((cl - r[ids]).abs().max())
        err_tfb = float((b[ids] - r[ids]).abs().max())
        lse_err = abs(c["logsumexp"] - float(torch.logsumexp(r, 0)))
        top2 = r.topk(2).values
        margin = float(top2[0] - top2[1])
        tol = 1.5 * err_tfb + 1e-3
        near_tie = margin < 2 * max(err_cage, err_tfb)
        same_top = int(ids[0]) == int(r.argmax())
        good = err_cage <= tol and (same_top or near_tie)
        ok &= good
        rows.append({"prompt": i, "tokens": len(s), "max_abs_err_cage": err_cage, "max_abs_err_transformers_bf16": err_tfb,
                     "tolerance": tol, "logsumexp_err_cage": lse_err, "top1_margin": margin, "same_top1": same_top,
                     "near_tie": near_tie, "pass": good})
    t2 = time.time()
    cgr = cage_greedy(a.cage, a.model, a.device, seqs, a.new, a.work)
    t_gen = time.time() - t2
    err = max(max(r["max_abs_err_cage"], r["max_abs_err_transformers_bf16"]) for r in rows)
    cont = []
    for i, (c, g, mg) in enumerate(zip(cgr, greedy_ref, margins)):
        first_diff = next((j for j, (x, y) in enumerate(zip(c, g)) if x != y), None)
        if first_diff is None and len(c) != len(g):
            first_diff = min(len(c), len(g))
        tie_at = next((j for j, x in enumerate(mg) if x < 2 * err), None)
        # Equal up to the first near tie of the reference's path: a difference before it is a failure.
        good = first_diff is None or (tie_at is not None and first_diff >= tie_at)
        ok &= good
        cont.append({"prompt": i, "cage": c, "transformers": g, "first_difference": first_diff,
                     "first_near_tie": tie_at, "margin_there": None if tie_at is None else mg[tie_at], "pass": good})
    res = {"model": a.model, "device": a.device, "vocab": vocab, "reference": "transformers f32 on the bf16 weights",
           "transformers": __import__("transformers").__version__, "torch": torch.__version__,
           "logits": rows, "greedy": cont, "seconds": {"transformers": round(t_tf, 1), "cage_logits": round(t_cage, 1),
                                                      "cage_generate": round(t_gen, 1)}, "pass": ok}
    with open(a.out, "w") as f:
        json.dump(res, f, indent=1)
    for r in rows:
        print(f"logits prompt {r['prompt']}: cage err {r['max_abs_err_cage']:.4g} (tol {r['tolerance']:.4g}; "
              f"transformers bf16 {r['max_abs_err_transformers_bf16']:.4g}), top1 {'same' if r['same_top1'] else 'DIFFERENT'}"
              f" margin {r['top1_margin']:.4g}{' near tie' if r['near_tie'] else ''}: {'ok' if r['pass'] else 'FAIL'}")
    for c in cont:
        print(f"greedy prompt {c['prompt']}: first difference {c['first_difference']}, first near tie {c['first_near_tie']}: "
              f"{'ok' if c['pass'] else 'FAIL'}")
    print(f"compare {a.model} on {a.device}: {'PASS' if ok else 'FAIL'}", flush=True)
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
