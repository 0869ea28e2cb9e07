#!/usr/bin/env python3
"""cage as a logits processor, from Python through ctypes (no dependency beyond the standard library).

Each decoding step: take the base model's next-token logits and each principal's log-probabilities over the
vocabulary, keep the base's top-k tokens, let the principals bid (q = log pi_principal - log pi_base at those
tokens, the implicit reward when the principal shares the base's backbone), and return the equilibrium
policy over the candidates and the chosen token.

    python3 examples/python/logits_processor.py --lib target/release/libcage.so

With no model at hand, the demo below uses a made-up 12-token vocabulary and prints JSON.
"""
import argparse
import ctypes
import json
import math

CAGE_OK = 0


class CageOptions(ctypes.Structure):
    _fields_ = [
        ("method", ctypes.c_int32),
        ("tau", ctypes.c_double),
        ("normalize", ctypes.c_int32),
        ("tol", ctypes.c_double),
        ("max_iter", ctypes.c_uint32),
        ("backend", ctypes.c_int32),
        ("device", ctypes.c_int32),
    ]


class Cage:
    """A thin wrapper over include/cage.h."""

    def __init__(self, path, tau=0.1, backend=0):
        self.lib = ctypes.CDLL(path)
        L = self.lib
        L.cage_version.restype = ctypes.c_uint32
        L.cage_last_error.restype = ctypes.c_char_p
        L.cage_options_default.restype = CageOptions
        L.cage_solver_create.argtypes = [ctypes.POINTER(CageOptions), ctypes.POINTER(ctypes.c_void_p)]
        L.cage_solver_destroy.argtypes = [ctypes.c_void_p]
        fp = ctypes.POINTER(ctypes.c_float)
        L.cage_solve_f32.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_size_t, ctypes.c_size_t, fp, fp, fp,
                                     fp, fp, fp, ctypes.POINTER(ctypes.c_uint32), ctypes.POINTER(ctypes.c_uint8)]
        L.cage_choose_tokens.argtypes = [fp, ctypes.c_size_t, ctypes.c_size_t, ctypes.c_int32, ctypes.c_uint64,
                                         ctypes.c_uint32, ctypes.POINTER(ctypes.c_uint32)]
        opts = L.cage_options_default()
        opts.tau = tau
        opts.backend = backend
        self.solver = ctypes.c_void_p()
        self._check(L.cage_solver_create(ctypes.byref(opts), ctypes.byref(self.solver)))

    def _check(self, status):
        if status != CAGE_OK:
            raise RuntimeError(f"cage error {status}: {self.lib.cage_last_error().decode()}")

    def close(self):
        self.lib.cage_solver_destroy(self.solver)

    def solve(self, base_logprobs, values, weights):
        """One row: base_logprobs [N], values [J][N], weights [J] -> (policy [N], payoffs [J])."""
        n, j = len(base_logprobs), len(values)
        arr = lambda xs: (ctypes.c_float * len(xs))(*xs)
        policy, payoffs = (ctypes.c_float * n)(), (ctypes.c_float * max(j, 1))()
        flat = [x for row in values for x in row]
        self._check(self.lib.cage_solve_f32(self.solver, 1, n, j, arr(base_logprobs), arr(flat) if j else None,
                                            arr(weights) if j else None, None, policy, payoffs, None, None))
        return list(policy), list(payoffs)[:j]

    def choose(self, policy, greedy=True, seed=0, step=0):
        out = (ctypes.c_uint32 * 1)()
        pol = (ctypes.c_float * len(policy))(*policy)
        self._check(self.lib.cage_choose_tokens(pol, 1, len(policy), 0 if greedy else 1, seed, step, out))
        return out[0]


def log_softmax(xs):
    m = max(xs)
    s = math.log(sum(math.exp(x - m) for x in xs)) + m
    return [x - s for x in xs]


class CageLogitsProcessor:
    """Turns the base logits and principals' log-probs of one step into the equilibrium's next token."""

    def __init__(self, cage, weights, top_k=50):
        self.cage, self.weights, self.top_k = cage, weights, top_k

    def __call__(self, base_logits, principal_logprobs, step=0, greedy=True, seed=0):
        base = log_softmax(base_logits)
        ids = sorted(range(len(base)), key=lambda i: (-base[i], i))[: self.top_k]
        cand_base = [base[i] for i in ids]
        values = [[lp[i] - base[i] for i in ids] for lp in principal_logprobs]
        policy, payoffs = self.cage.solve(cand_base, values, self.weights)
        token = ids[self.cage.choose(policy, greedy=greedy, seed=seed, step=step)]
        return token, dict(zip(ids, policy)), payoffs


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--lib", required=True, help="path to libcage.so")
    ap.add_argument("--top-k", type=int, default=6)
    args = ap.parse_args()
    cage = Cage(args.lib, tau=0.1)
    # A 12-token vocabulary: the base prefers token 0; "concise" likes 3 and 7, "friendly" likes 5 and 7.
    base_logits = [3.0, 2.6, 2.2, 2.0, 1.5, 1.9, -1.0, 1.7, 0.5, -2.0, 0.0, 1.0]
    concise = log_softmax([0.0, 0.2, 0.1, 2.5, 0.0, 0.0, 0.0, 2.0, 0.0, 0.0, 0.0, 0.0])
    friendly = log_softmax([0.0, 0.0, 0.3, 0.0, 0.0, 2.4, 0.0, 1.8, 0.0, 0.0, 0.0, 0.0])
    out = {}
    for w in ([0.0, 0.0], [1.0, 0.0], [0.0, 1.0], [0.5, 0.5]):
        proc = CageLogitsProcessor(cage, w, top_k=args.top_k)
        token, policy, payoffs = proc(base_logits, [concise, friendly])
        out[f"{w[0]},{w[1]}"] = {"token": token, "policy": policy, "payoffs": payoffs}
    cage.close()
    print(json.dumps({"version": cage.lib.cage_version(), "runs": out}, sort_keys=True))


if __name__ == "__main__":
    main()
