"""``python -m cage.bench``: what ``cage.solve`` costs over the direct Rust call, side by side.

One k = 50, J = 2 row (shaped like a decoding step, the inputs of ``cage bench ffi``), exact method, CPU backend,
f32 and f64: the median per call over batches of 100 calls of ``cage.solve`` from Python and of the Rust calls
a Rust user would make for the same work (``Batch::new`` from the slices, then ``solve``), timed in Rust in the
same process on the same arrays. The difference is what the Python boundary costs.
"""

from __future__ import annotations

import argparse
import platform
import time

import numpy as np

import cage
from cage import _cage


def inputs(dtype: type) -> tuple:
    """The inputs of ``cage bench ffi``: a peaked base over 50 candidates, spread values of two principals."""
    n, j = 50, 2
    a = np.arange(n)
    base = -0.15 * a - 0.5 * ((a * 7919 % 13) / 13.0)
    i = np.arange(j * n, dtype=np.uint64)
    values = ((i * np.uint64(2654435761)) % np.uint64(1000)).astype(np.float64) / 250.0 - 2.0
    return base.astype(dtype), values.reshape(j, n).astype(dtype), np.array([0.6, 0.4], dtype=dtype)


def python_call_seconds(base: np.ndarray, values: np.ndarray, weights: np.ndarray, calls: int) -> float:
    """Median seconds per ``cage.solve`` call (policy read back) over batches of 100 calls."""
    per_call = []
    for _ in range(max(calls // 100, 5)):
        t = time.perf_counter()
        for _ in range(100):
            cage.solve(base, values, weights, 0.1, "exact", "shift_min", "cpu").policy
        per_call.append((time.perf_counter() - t) / 100)
    return float(np.median(per_call))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--calls", type=int, default=20000, help="calls per side and precision")
    args = ap.parse_args()
    print(f"cage.solve vs the direct Rust call, k = 50, J = 2, B = 1, exact, CPU ({args.calls} calls each)")
    print(f"  {platform.processor() or platform.machine()}, Python {platform.python_version()}, numpy {np.__version__}")
    for dtype in (np.float32, np.float64):
        base, values, weights = inputs(dtype)
        # Alternate the two sides twice so that both see the same machine state; keep the lower of each.
        rust = py = float("inf")
        for _ in range(2):
            rust = min(rust, _cage.rust_call_seconds(base, values, weights, 0.1, "exact", args.calls))
            py = min(py, python_call_seconds(base, values, weights, args.calls))
        name = np.dtype(dtype).name
        print(f"  {name}: direct Rust call {rust * 1e6:7.2f} us   cage.solve {py * 1e6:7.2f} us   "
              f"Python boundary {(py - rust) * 1e6:6.2f} us")


if __name__ == "__main__":
    main()
