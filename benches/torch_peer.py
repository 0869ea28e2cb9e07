#!/usr/bin/env python3
"""PyTorch peer of the CUDA equilibrium kernel: the same iteration (Newton on ln(g / tau) over the J payoffs,
with the same one-pass sums), batched over rows with torch ops on the same GPU, timed with CUDA events.

The issue's target: cage's fused kernel at least 20x faster than this on the same card in the same run.
`cage bench solver` (in the same bundle run) prints cage's side. Prints the card, the copy bandwidth and, per
shape, the time per solve. Inputs are drawn like benches: base log-probs uniform in [-12, 0], values in [0, 2),
tau = 0.1. Runs on the CPU too (slowly) when no GPU is present, labelled so.
"""
import sys
import time

import torch


def equilibrium(base, values, tau, tol=1e-5, max_iter=50):
    """base: B x N f32, values: B x J x N (f32 or bf16), tau: float. Returns pi (B x N), u (B x J), passes."""
    B, J, N = values.shape
    v = values.float()
    hi = v.amax(dim=2).clamp_min(0)
    u = hi.clone()
    scale = torch.maximum(hi.amax(dim=1), torch.tensor(tau, device=v.device))
    passes = 0
    for passes in range(1, max_iter + 1):
        c = (u + tau).unsqueeze(2)  # B x J x 1
        z = base + ((v - c).clamp_min(0).sum(dim=1)) / tau
        pi = torch.softmax(z, dim=1)  # B x N
        gap = (c - v).clamp_min(0)  # B x J x N
        ind = (v > c).float()  # B x J x N
        g = torch.einsum("bn,bjn->bj", pi, gap)
        p = torch.einsum("bn,bjn->bj", pi, ind)
        cross = torch.einsum("bn,bkn,bjn->bjk", pi, ind, gap)  # E[1{v_k > c_k} (c_j - v_j)^+]
        cov = cross - g.unsqueeze(2) * p.unsqueeze(1)
        jac = -cov / tau + torch.diag_embed(1 - p)
        f = tau - g
        if bool((f.abs().amax(dim=1) <= tol * scale).all()):
            break
        rhs = -g * torch.log(g.clamp_min(1e-30) / tau)
        d = torch.linalg.solve(jac + 1e-12 * torch.eye(J, device=v.device), rhs.unsqueeze(2)).squeeze(2)
        step = torch.where(torch.isfinite(d), d, 0.3 * f)
        u = torch.minimum(torch.maximum(u + step, torch.zeros_like(u)), hi)
    return pi, u, passes


def timed(fn, reps, device):
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
        times = []
        for _ in range(reps):
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            fn()
            b.record()
            b.synchronize()
            times.append(a.elapsed_time(b) * 1e3)
    else:
        times = []
        for _ in range(reps):
            t = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t) * 1e6)
    times.sort()
    return times[len(times) // 2]


def main():
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    card = torch.cuda.get_device_name(0) if device.type == "cuda" else "CPU (no GPU: not a GPU figure)"
    print(f"torch {torch.__version__} on {card}")
    reps = 20 if device.type == "cuda" else 2
    if device.type == "cuda":
        n = 1 << 28
        a = torch.empty(n, dtype=torch.uint8, device=device)
        b = torch.empty_like(a)
        us = timed(lambda: b.copy_(a), reps, device)
        print(f"device-to-device copy: {2 * n / (us * 1e-6) / 1e9:.1f} GB/s")
    shapes = [(1, 50, 4, torch.float32), (64, 50, 4, torch.float32), (64, 128256, 4, torch.bfloat16)]
    if device.type != "cuda":
        shapes = [(1, 50, 4, torch.float32), (4, 8192, 4, torch.bfloat16)]
    g = torch.Generator(device="cpu").manual_seed(1)
    for B, N, J, dt in shapes:
        base = (-12.0 * torch.rand(B, N, generator=g)).to(device)
        values = (2.0 * torch.rand(B, J, N, generator=g)).to(dt).to(device)
        _, _, passes = equilibrium(base, values, 0.1)
        us = timed(lambda: equilibrium(base, values, 0.1), reps, device)
        print(f"torch equilibrium B={B} N={N} J={J} values={str(dt).split('.')[-1]}: {us:.1f} us ({passes} passes)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
