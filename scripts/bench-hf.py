"""What cage.hf.CageLogitsProcessor adds to transformers' generate: the same prompts decoded greedily (a) by a
plain generate over every stream CAGE runs (each prompt alone and with each instruction, one batch) and (b) by
generate with the processor (the base stream in generate, the instruction streams in the processor, the game
solved at every step), and (c) the same with encode(fused=True) (every stream in generate's batch). Both decode the same number of tokens per row; the median of --repeat runs is printed.

    target/pyenv/bin/python scripts/bench-hf.py [--rows 4] [--new 32] [--repeat 3]
"""

import argparse
import json
import pathlib
import statistics
import time

import torch
import transformers

from cage.hf import CageLogitsProcessor

ROOT = pathlib.Path(__file__).resolve().parents[1]
PROMPTS = ["What is the capital of France?", "Give me a tip for learning to cook.", "Why is the sky blue?",
           "Name a good book for a long trip.", "How do plants make food?", "What should I pack for a hike?",
           "Explain what a prime number is.", "Suggest a name for a cat."]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=4)
    ap.add_argument("--new", type=int, default=32)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--model", default=str(ROOT / "models" / "SmolLM2-135M-Instruct"))
    args = ap.parse_args()
    cfg = json.loads((ROOT / "examples" / "configs" / "smollm2-concise-enthusiastic.json").read_text())
    tok = transformers.AutoTokenizer.from_pretrained(args.model)
    model = transformers.AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).eval()
    prompts = (PROMPTS * (args.rows // len(PROMPTS) + 1))[: args.rows]
    proc = CageLogitsProcessor(model, tok, cfg["principals"], weights=cfg["weights"], tau=cfg["tau"], k=cfg["k"])
    fixed = dict(do_sample=False, max_new_tokens=args.new, min_new_tokens=args.new, pad_token_id=proc.pad_token_id,
                 top_k=None, top_p=None, temperature=None)
    # (a) Every stream of (b) in one plain batch: each prompt alone and with each instruction.
    instructions = [None] + [p["instruction"] for p in cfg["principals"]]
    seqs = [proc.prompt_ids(p, i) for i in instructions for p in prompts]
    ids, mask = proc._left_pad(seqs, model.device)

    def plain() -> None:
        model.generate(input_ids=ids, attention_mask=mask, **fixed)

    def with_cage() -> None:
        model.generate(**proc.encode(prompts), logits_processor=[proc], **fixed)

    def fused() -> None:
        model.generate(**proc.encode(prompts, fused=True), logits_processor=[proc], **fixed)

    # Interleaved, so that a load that comes and goes (a shared machine) weighs on both alike.
    variants = (("plain", plain), ("cage", with_cage), ("fused", fused))
    for _, fn in variants:
        fn()
    runs: dict = {name: [] for name, _ in variants}
    for _ in range(args.repeat):
        for name, fn in variants:
            t = time.perf_counter()
            fn()
            runs[name].append(time.perf_counter() - t)
    times = {name: statistics.median(r) for name, r in runs.items()}
    streams = len(seqs)
    print(f"{args.rows} prompts x {len(instructions)} streams = {streams} sequences, {args.new} new tokens, "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    print(f"plain generate over the {streams} streams: {times['plain']:.3f} s")
    print(f"generate with CageLogitsProcessor: {times['cage']:.3f} s "
          f"({100 * (times['cage'] / times['plain'] - 1):+.1f}%)")
    print(f"the same, encode(fused=True): {times['fused']:.3f} s ({100 * (times['fused'] / times['plain'] - 1):+.1f}%)")


if __name__ == "__main__":
    main()
