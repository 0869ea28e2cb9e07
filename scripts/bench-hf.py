"""What cage.hf.CageLogitsProcessor adds to transformers' generate: the same prompts decoded greedily (a) by a
plain generate over every stream CAGE runs (each prompt alone and with each instruction, one batch) and (b) by
generate with the processor (the base stream in generate, the instruction streams in the processor, the game
solved at every step), and (c) the same with encode(fused=True) (every stream in generate's batch). All decode the
same number of tokens per row; the median and the fastest of --repeat interleaved runs are printed.
--compare FILE times another version of cage/hf.py beside it in the same run ((b) and (c) with that file's
processor), e.g. an earlier commit's: git show COMMIT:python/cage/hf.py > /tmp/hf_before.py

    target/pyenv/bin/python scripts/bench-hf.py [--rows 4] [--new 32] [--repeat 3] [--compare FILE]
"""

import argparse
import importlib.util
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
    ap.add_argument("--compare", help="another cage/hf.py whose processor is timed beside this one")
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
    variants = [("plain", plain), ("cage", with_cage), ("fused", fused)]
    if args.compare:
        # Loaded as a module of the installed package, so that its relative imports (cage.solve) resolve.
        spec = importlib.util.spec_from_file_location("cage._hf_compared", args.compare)
        other = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(other)
        old = other.CageLogitsProcessor(model, tok, cfg["principals"], weights=cfg["weights"], tau=cfg["tau"],
                                        k=cfg["k"])

        def old_cage() -> None:
            model.generate(**old.encode(prompts), logits_processor=[old], **fixed)

        def old_fused() -> None:
            model.generate(**old.encode(prompts, fused=True), logits_processor=[old], **fixed)

        variants += [("compared cage", old_cage), ("compared fused", old_fused)]
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
    for name in ("compared cage", "compared fused"):
        if name in times:
            print(f"{name} ({args.compare}): {times[name]:.3f} s ({100 * (times[name] / times['plain'] - 1):+.1f}%)")
    # Under a load that comes and goes the fastest run of each is the steadier figure.
    low = {name: min(r) for name, r in runs.items()}
    print("fastest runs: " + ", ".join(f"{k} {t:.3f} s ({100 * (t / low['plain'] - 1):+.1f}%)" for k, t in low.items()))
    print("all runs (s): " + ", ".join(f"{k} {' '.join(f'{t:.2f}' for t in v)}" for k, v in runs.items()))


if __name__ == "__main__":
    main()
