#!/usr/bin/env python3
"""A ready external scorer for `cage generate --scorer` and `cage sweep --scorer`: any transformers reward model
(AutoModelForSequenceClassification) scores each result, for models the native `scorers` of a run config do not
load (other architectures, remote code).

It reads the hook's JSON lines (`{"prompt": ..., "text": ...}`, one per result) on standard input and writes one
line per result: a JSON array of the model's scores (every label, or those given with --label). The scored text
is --template with `{prompt}` and `{response}` replaced, as in the config's scorers (default "{prompt} {response}"),
tokenized with the model's tokenizer and its special tokens. Each text runs alone, so no padding is involved.

    cage sweep -c run.json --prompts p.jsonl --scorer "python3 scripts/hf_scorer.py --model DIR --label 0"

Needs torch and transformers (scripts/test-python.sh installs both into target/pyenv).
"""
import argparse
import json
import re
import sys


def render(template, prompt, response):
    """Both placeholders in one pass: a prompt that contains "{response}" stays as it is."""
    return re.sub(r"\{prompt\}|\{response\}", lambda m: prompt if m.group(0) == "{prompt}" else response, template)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", required=True, help="reward model folder or hub name")
    ap.add_argument("--tokenizer", help="tokenizer folder (default: the model's)")
    ap.add_argument("--template", default="{prompt} {response}")
    ap.add_argument("--label", type=int, action="append", help="score index to write (repeatable; default: all)")
    a = ap.parse_args()
    for p in ("{prompt}", "{response}"):
        if p not in a.template:
            sys.exit(f"hf_scorer: --template {a.template!r} has no {p} placeholder")

    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(a.tokenizer or a.model)
    model = AutoModelForSequenceClassification.from_pretrained(a.model, dtype=torch.float32).eval()
    labels = model.config.num_labels
    for i in a.label or []:
        if not 0 <= i < labels:
            sys.exit(f"hf_scorer: --label {i} is out of range: the model has {labels} labels")
    for n, line in enumerate(sys.stdin, 1):
        if not line.strip():
            continue
        try:
            r = json.loads(line)
            text = render(a.template, r["prompt"], r["text"])
        except (ValueError, KeyError, TypeError) as e:
            sys.exit(f"hf_scorer: input line {n}: expected {{\"prompt\": ..., \"text\": ...}} ({e})")
        ids = tok(text, return_tensors="pt")["input_ids"]
        if ids.shape[1] == 0:
            sys.exit(f"hf_scorer: input line {n}: the text encodes to no tokens")
        with torch.no_grad():
            s = model(input_ids=ids).logits[0].float().tolist()
        print(json.dumps([s[i] for i in a.label] if a.label else s), flush=True)


if __name__ == "__main__":
    main()
