#!/usr/bin/env python3
"""Hugging Face transformers peer of `cage bench decode`: the GenARM-style loop with the same principals as the
demo (two prompted principals on SmolLM2-135M-Instruct), written the usual way in PyTorch on the CPU.

Per step: one batched forward over every stream of every row (the base prompt and one instructed prompt per
principal, left-padded, with a KV cache), the base's top-k candidates, GenARM's combination
log pi_base + sum_j w_j log pi_j (each log-normalised over the candidates), greedy choice; EOS is ignored so
every row decodes the same number of tokens, as in `cage bench decode`.

    /root/venv-golden/bin/python benches/hf_genarm_peer.py [--model models/SmolLM2-135M-Instruct] [--rows 4]
        [--tokens 32] [--threads 2]

Prints tokens per second (prefill included, like cage's tok/s column) and decode milliseconds per step.
torch is never needed by cage's build or tests.
"""
import argparse
import time

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

INSTRUCTIONS = [
    "Answer in one short sentence, with no extra detail.",
    "Answer with lots of excitement and enthusiasm, using exclamation marks!",
]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="models/SmolLM2-135M-Instruct")
    ap.add_argument("--rows", type=int, default=4)
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--k", type=int, default=50)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--prompt", default="Tell me about the Moon.")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    tok = AutoTokenizer.from_pretrained(args.model)
    model = AutoModelForCausalLM.from_pretrained(args.model, torch_dtype=torch.float32).eval()
    weights = torch.tensor([0.5, 0.5])

    def ids(text):
        msgs = [{"role": "user", "content": text}]
        text = tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
        return tok(text, add_special_tokens=False).input_ids

    texts = [args.prompt] + [f"{i}\n\n{args.prompt}" for i in INSTRUCTIONS]
    streams = [ids(t) for t in texts] * args.rows  # row-major: [row][stream]
    s = len(texts)
    width = max(len(x) for x in streams)
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    inp = torch.tensor([[pad] * (width - len(x)) + x for x in streams])
    mask = torch.tensor([[0] * (width - len(x)) + [1] * len(x) for x in streams])
    with torch.inference_mode():
        t0 = time.perf_counter()
        pos = (mask.cumsum(-1) - 1).clamp(min=0)
        out = model(input_ids=inp, attention_mask=mask, position_ids=pos, use_cache=True)
        past, logits = out.past_key_values, out.logits[:, -1, :]
        t_prefill = time.perf_counter() - t0
        chosen = []
        for step in range(args.tokens):
            lp = torch.log_softmax(logits.float(), dim=-1).view(args.rows, s, -1)
            cand = torch.topk(lp[:, 0, :], args.k, dim=-1).indices
            at = torch.gather(lp, 2, cand[:, None, :].expand(-1, s, -1))
            at = at - torch.logsumexp(at, dim=-1, keepdim=True)
            z = at[:, 0, :] + (weights[None, :, None] * at[:, 1:, :]).sum(dim=1)
            nxt = torch.gather(cand, 1, z.argmax(dim=-1, keepdim=True))
            chosen.append(int(nxt[0, 0]))
            if step + 1 == args.tokens:
                break
            feed = nxt.repeat_interleave(s, dim=0)
            mask = torch.cat([mask, torch.ones_like(feed)], dim=1)
            pos = pos[:, -1:] + 1
            out = model(input_ids=feed, attention_mask=mask, position_ids=pos, past_key_values=past, use_cache=True)
            past, logits = out.past_key_values, out.logits[:, -1, :]
        total = time.perf_counter() - t0
    n = args.rows * args.tokens
    print(f"transformers {__import__('transformers').__version__}, torch {torch.__version__}, {args.threads} threads: "
          f"{args.rows} rows x {args.tokens} tokens, {s} streams per row")
    print(f"genarm (HF peer): {n / total:.1f} tok/s, decode {1e3 * (total - t_prefill) / max(args.tokens - 1, 1):.2f} ms/step, "
          f"prefill {1e3 * t_prefill:.0f} ms")
    print("row 0:", repr(tok.decode(chosen)))


if __name__ == "__main__":
    main()
