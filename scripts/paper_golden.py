#!/usr/bin/env python3
"""Goldens for the `paper` method and for src/solver/lbfgsb.rs, computed with SciPy's own L-BFGS-B.

`epec` below reproduces what `epec_one_step` (with `solve_principal` and `best_response`) computes in the
authors' repository toz015/common-agency, file code/evaluation/generate_outputs_epec_genarm.py: y = 0 at every
token, at most 5 Jacobi rounds, each principal's best response by `scipy.optimize.minimize(method="L-BFGS-B",
bounds=[(0, max(v_a, 0))], options={"maxiter": 8, "ftol": 1e-4})` started from the previous y (a ValueError
from SciPy keeps the start), stop when max|dy| + max|dpi| <= 1e-3. The games are passed in float64 (the
authors' pipeline hands SciPy float32 arrays from torch, which makes SciPy evaluate the first round's
objective and finite differences in float32: see docs/model.md, "paper").

Writes two fixtures:
- tests/fixtures/paper-golden.json: 200 games (top-50 steps shaped like ARM log-ratios and Gaussian ones,
  tau 0.1 and 0.3, J = 2 and 3) with the authors' policy for each.
- tests/fixtures/lbfgsb-scipy.json: a few small bounded problems with SciPy's iterates and f per iteration.

Usage: python3 scripts/paper_golden.py [--lbfgsb-only]  (needs numpy and scipy from PyPI; records their versions).
"""
import json
import sys
from pathlib import Path

import numpy as np
import scipy
from scipy.optimize import minimize
from scipy.special import softmax

ROOT = Path(__file__).resolve().parent.parent
K = 50


def best_response(log_pi_base, y_total, tau):
    return softmax(log_pi_base + y_total / tau)


def solve_principal(i, q, y, log_pi_base, tau):
    qi = q[i]
    y_other = sum(y[j] for j in range(len(y)) if j != i)

    def neg_obj(yi):
        pi = best_response(log_pi_base, y_other + yi, tau)
        return -float(pi @ (qi - yi))

    bounds = [(0.0, max(float(qi[a]), 0.0)) for a in range(len(qi))]
    upper = np.array([b[1] for b in bounds])
    x0 = np.clip(y[i], 0.0, upper)
    try:
        res = minimize(neg_obj, x0, method="L-BFGS-B", bounds=bounds, options={"maxiter": 8, "ftol": 1e-4})
        return res.x
    except ValueError:
        return x0


def epec(log_pi_base, q_list, tau, eps=1e-3, max_iter=5):
    """The authors' epec_one_step; also returns the number of rounds run."""
    J = len(q_list)
    y = [np.zeros_like(qj) for qj in q_list]
    pi = best_response(log_pi_base, sum(y), tau)
    rounds = 0
    for _ in range(max_iter):
        rounds += 1
        y_new = [solve_principal(i, q_list, y, log_pi_base, tau) for i in range(J)]
        pi_new = best_response(log_pi_base, sum(y_new), tau)
        dy = max(np.max(np.abs(y_new[i] - y[i])) for i in range(J))
        dp = float(np.max(np.abs(pi_new - pi)))
        y, pi = y_new, pi_new
        if dy + dp <= eps:
            break
    return pi, rounds


def log_softmax(z):
    z = z - z.max()
    return z - np.log(np.exp(z).sum())


def game(rng, shape, j):
    """One decoding step: base log-probs of the top-50 candidates and J raw principal values q_j."""
    vocab = 2000
    z = rng.normal(0.0, 3.0, vocab)
    log_b = log_softmax(z)
    top = np.argpartition(log_b, -K)[-K:]
    if shape == "arm":
        # q_j = log pi_ARM_j - log pi_base on the top-k, an ARM being the base tilted by a reward head.
        qs = [log_softmax(z + rng.normal(0.0, rng.uniform(0.5, 2.0), vocab))[top] - log_b[top] for _ in range(j)]
    else:
        qs = [rng.normal(0.0, rng.uniform(0.5, 2.0), K) for _ in range(j)]
    alpha = rng.uniform(0.5, 2.0, j)
    # Rounded so the fixture stays small; the rounded numbers are the game.
    return np.round(log_b[top], 5), [np.round(q, 5) for q in qs], np.round(alpha, 3)


def preprocess(q, alpha):
    """The authors' preprocessing: clip(q - min q, 0) * alpha."""
    return np.clip(q - q.min(), 0.0, None) * alpha


def paper_fixture():
    rng = np.random.default_rng(20261130)
    games = []
    for g in range(200):
        shape = ("arm", "gauss")[g % 2]
        tau = (0.1, 0.3)[(g // 2) % 2]
        j = (2, 3)[(g // 4) % 2]
        lb, qs, alpha = game(rng, shape, j)
        values = [preprocess(q, a) for q, a in zip(qs, alpha)]
        pi, rounds = epec(lb, values, tau)
        games.append({
            "shape": shape, "tau": tau, "base": lb.tolist(), "q": [q.tolist() for q in qs],
            "alpha": alpha.tolist(), "rounds": rounds, "policy": [float(f"{p:.6g}") for p in pi],
        })
    return games


def lbfgsb_fixture(paper_games):
    """SciPy's iterates (x and f after every iteration) on small bounded problems, for lbfgsb.rs's unit tests."""
    problems = []

    def record(name, fun, x0, lo, hi, maxiter, ftol, gtol=1e-5):
        xs, fs = [], []

        def callback(intermediate_result):  # this parameter name makes SciPy pass x and f
            xs.append(intermediate_result.x.tolist())
            fs.append(float(intermediate_result.fun))

        bounds = list(zip(lo, hi))
        res = minimize(fun, np.array(x0, dtype=float), method="L-BFGS-B", bounds=bounds,
                       options={"maxiter": maxiter, "ftol": ftol, "gtol": gtol},
                       callback=callback)
        problems.append({"name": name, "x0": list(x0), "lower": list(lo), "upper": list(hi), "maxiter": maxiter,
                         "ftol": ftol, "gtol": gtol, "iterates": xs, "f": fs, "x": res.x.tolist(),
                         "fun": float(res.fun), "nit": int(res.nit), "nfev": int(res.nfev)})

    def rosen(x):
        return float(np.sum(100.0 * (x[1:] - x[:-1] ** 2) ** 2 + (1.0 - x[:-1]) ** 2))

    record("rosenbrock", rosen, [-1.2, 1.0, -1.2, 1.0, 0.3], [-2.0, -2.0, 0.5, -2.0, -2.0],
           [2.0, 0.8, 2.0, 2.0, 2.0], 60, 1e-10, 1e-5)

    def quartic(x):
        c = np.arange(1.0, len(x) + 1)
        return float(np.sum(c * (x - 0.3 * c) ** 2) + 0.1 * np.sum(x ** 4) + 0.5 * x[0] * x[-1])

    record("quartic", quartic, [0.0] * 8, [0.0] * 8, [0.5, 1.0, 0.2, 3.0, 0.9, 4.0, 1.0, 10.0], 40, 1e-10, 1e-5)

    # The first principal's best response in the first round of two fixture games, run longer than 8 steps.
    for gi in (0, 5):
        g = paper_games[gi]
        lb = np.array(g["base"])
        v = [preprocess(np.array(q), a) for q, a in zip(g["q"], g["alpha"])]
        tau = g["tau"]
        keep = v[0] > 0.0  # SciPy drops the variables fixed by their bounds (v = 0) before L-BFGS-B

        def neg_obj(yi, v=v, lb=lb, tau=tau, keep=keep):
            y = np.zeros(K)
            y[keep] = yi
            pi = softmax(lb + y / tau)
            return -float(pi @ (v[0] - y))

        record(f"principal-{gi}", neg_obj, [0.0] * int(keep.sum()), [0.0] * int(keep.sum()),
               v[0][keep].tolist(), 30, 1e-12, 1e-8)
    return problems


def main():
    versions = {"python": sys.version.split()[0], "numpy": np.__version__, "scipy": scipy.__version__}
    out = ROOT / "tests/fixtures/paper-golden.json"
    if "--lbfgsb-only" in sys.argv:  # reuse the games (the 200 EPEC solves take minutes)
        games = json.loads(out.read_text())["games"]
    else:
        games = paper_fixture()
        out.write_text(json.dumps({"generator": "scripts/paper_golden.py", "versions": versions, "games": games},
                                  separators=(",", ":")) + "\n")
        print(f"{out}: {len(games)} games, {out.stat().st_size} bytes, {versions}")
    probs = lbfgsb_fixture(games)
    out = ROOT / "tests/fixtures/lbfgsb-scipy.json"
    out.write_text(json.dumps({"generator": "scripts/paper_golden.py", "versions": versions, "problems": probs},
                              separators=(",", ":")) + "\n")
    print(f"{out}: {[(p['name'], p['nit'], p['nfev']) for p in probs]}")


if __name__ == "__main__":
    main()
