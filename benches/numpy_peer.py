#!/usr/bin/env python3
"""NumPy float64 peer of cage's exact equilibrium: the specification's damped Picard iteration written the
straightforward way (vectorised over the batch), on inputs drawn like benches/equilibrium.rs draws them:
base logits ~ N(0, 2.5^2), q ~ N(0, 1), weights in [0.2, 1], tau = 0.1, shift_min.

    python3 benches/numpy_peer.py            # the issue's four shapes
    python3 benches/numpy_peer.py --quick    # the small shapes only

Prints one line per shape: seconds per solve (best of a few runs), iterations, rows per second.
"""
import argparse
import time

import numpy as np


def make(rows, n, j, seed=7):
    rng = np.random.default_rng(seed)
    base = 2.5 * rng.standard_normal((rows, n))
    q = rng.standard_normal((rows, j, n))
    w = rng.uniform(0.2, 1.0, (rows, j))
    v = (q - q.min(axis=2, keepdims=True)) * w[:, :, None]
    return base, v, 0.1


def solve(base, v, tau, eta=0.3, tol=1e-11, max_iter=100_000):
    """Damped Picard on the payoffs u from u = max v until max |T(u) - u| <= tol * max(max v, tau)."""
    u = v.max(axis=2)
    scale = np.maximum(u.max(axis=1), tau)
    for it in range(max_iter):
        c = (u + tau)[:, :, None]
        y = np.maximum(v - c, 0.0)
        z = base + y.sum(axis=1) / tau
        z -= z.max(axis=1, keepdims=True)
        pi = np.exp(z)
        pi /= pi.sum(axis=1, keepdims=True)
        t = (pi[:, None, :] * np.minimum(v, c)).sum(axis=2)
        if (np.abs(t - u).max(axis=1) <= tol * scale).all():
            return pi, u, it
        u = (1 - eta) * u + eta * t
    return pi, u, max_iter


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    shapes = [(1, 50, 2), (64, 32000, 2)] if args.quick else [(1, 50, 2), (1, 49152, 3), (1, 128256, 4), (64, 32000, 2)]
    for rows, n, j in shapes:
        base, v, tau = make(rows, n, j)
        times = []
        for _ in range(3 if n * rows > 100_000 else 20):
            t0 = time.perf_counter()
            _, _, it = solve(base, v, tau)
            times.append(time.perf_counter() - t0)
        best = min(times)
        print(f"numpy f64 B{rows} N{n} J{j}: {best * 1e3:.3f} ms per solve, {it} iterations, {rows / best:.1f} rows/s")


if __name__ == "__main__":
    main()
