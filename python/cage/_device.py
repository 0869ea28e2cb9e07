"""Solving games whose arrays are on a CUDA device, without a host copy.

The values are preprocessed on the device with the tensor library's own operations (shift_min, weights, 0 at
excluded candidates: exactly ``Batch::new``'s), then the exact equilibrium is queued on the caller's current
stream through ``cage_solve_device_f32``'s body; the results stay on the device. The same code runs on numpy
arrays with ``emulated=True`` (host pointers, the kernels' host emulation), which is how it is tested without a
GPU. Invalid entries (NaN, infinities, negative values under ``normalize="none"``) are not checked on the
device: such a row comes back with ``converged`` False and a NaN residual (see include/cage.h).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import numpy as np

from . import _cage


@dataclass(frozen=True)
class DeviceSolution:
    """``Solution``'s fields as arrays of the inputs' library, on the inputs' device."""

    policy: Any
    incentives: Any
    payoffs: Any
    aggregate_incentive: Any
    iterations: Any
    residual: Any
    converged: Any


class _Torch:
    """The few array operations the preprocessing needs, on torch tensors."""

    def __init__(self, torch: Any, device: Any):
        self.t, self.device = torch, device

    def check(self, x: Any, what: str) -> Any:
        t = self.t
        if not isinstance(x, t.Tensor):
            raise ValueError(f"{what} must be a torch tensor on {self.device} like base_logprobs, got {type(x).__name__}")
        if x.device != self.device:
            raise ValueError(f"{what} is on {x.device} but base_logprobs is on {self.device}: pass all arrays on one device")
        if x.dtype != t.float32:
            raise ValueError(f"{what} has dtype {x.dtype}; CUDA tensors are solved in float32 (use .float())")
        if not x.is_contiguous():
            raise ValueError(f"{what} is not contiguous; pass {what}.contiguous()")
        return x

    def full(self, shape: tuple, value: float) -> Any:
        return self.t.full(shape, value, dtype=self.t.float32, device=self.device)

    def empty(self, shape: tuple) -> Any:
        return self.t.empty(shape, dtype=self.t.float32, device=self.device)

    def where(self, c: Any, x: Any, y: Any) -> Any:
        return self.t.where(c, x, self.t.as_tensor(y, dtype=self.t.float32, device=self.device))

    def amin(self, x: Any, axis: int) -> Any:
        return self.t.amin(x, dim=axis, keepdim=True)

    def relu(self, x: Any) -> Any:
        return self.t.clamp(x, min=0.0)

    def ptr(self, x: Any) -> int:
        return x.data_ptr()

    def stream(self) -> int:
        return self.t.cuda.current_stream(self.device).cuda_stream

    def sync(self) -> None:
        pass  # the results stay on the caller's stream: torch orders later work after the kernel


class _Numpy:
    """The same operations on host arrays (for the emulated device)."""

    device = "cpu"

    def check(self, x: Any, what: str) -> Any:
        if not isinstance(x, np.ndarray) or x.dtype != np.float32:
            raise ValueError(f"{what} must be a float32 numpy array for the emulated device")
        if not x.flags.c_contiguous:
            raise ValueError(f"{what} is not C-contiguous; pass numpy.ascontiguousarray({what})")
        return x

    def full(self, shape: tuple, value: float) -> Any:
        return np.full(shape, value, dtype=np.float32)

    def empty(self, shape: tuple) -> Any:
        return np.empty(shape, dtype=np.float32)

    def where(self, c: Any, x: Any, y: Any) -> Any:
        return np.where(c, x, np.float32(y)).astype(np.float32)

    def amin(self, x: Any, axis: int) -> Any:
        return np.min(x, axis=axis, keepdims=True)

    def relu(self, x: Any) -> Any:
        return np.maximum(x, np.float32(0))

    def ptr(self, x: Any) -> int:
        return x.ctypes.data

    def stream(self) -> int:
        return 0

    def sync(self) -> None:
        pass  # the emulation runs synchronously


def _shape(x: Any) -> tuple:
    return tuple(int(s) for s in x.shape)


def _solve(xp: Any, base: Any, values: Any, weights: Any, tau: Any, normalize: str, tol: Optional[float],
           max_iter: Optional[int], emulated: bool) -> DeviceSolution:
    base, values, weights = xp.check(base, "base_logprobs"), xp.check(values, "values"), xp.check(weights, "weights")
    batched = len(_shape(base)) == 2
    if len(_shape(base)) not in (1, 2):
        raise ValueError(f"base_logprobs must have shape [N] (one row) or [B, N] (a batch), got {list(_shape(base))}")
    if not batched:
        base, values, weights = base[None], values[None], weights[None]
    b, n = _shape(base)
    if len(_shape(values)) != 3 or _shape(values)[0] != b or _shape(values)[2] != n:
        raise ValueError(f"values must have shape [B, J, N] = [{b}, J, {n}], got {list(_shape(values))}")
    j = _shape(values)[1]
    if _shape(weights) != (b, j):
        raise ValueError(f"weights must have shape [B, J] = [{b}, {j}], got {list(_shape(weights))}")
    if j == 0:
        raise ValueError("CUDA tensors need at least one principal (J >= 1)")
    if normalize not in ("shift_min", "none"):
        raise ValueError(f'unknown normalize "{normalize}" (expected one of shift_min, none)')
    if isinstance(tau, (int, float)):
        if not (tau > 0 and tau < float("inf")):
            raise ValueError(f"tau must be a finite number > 0, got {tau}")
        tau = xp.full((b,), float(tau))
    else:
        tau = xp.check(tau, "tau").reshape(-1)
        if _shape(tau) != (b,):
            raise ValueError(f"tau must have shape [] or [B] = [{b}], got {list(_shape(tau))}")
    active = (base != float("-inf"))[:, None, :]
    if normalize == "shift_min":
        q = values - xp.amin(xp.where(active, values, float("inf")), 2)
    else:
        q = values
    v = xp.where(active, q * weights[:, :, None], 0.0)
    policy, payoffs, stats = xp.empty((b, n)), xp.empty((b, j)), xp.empty((b, 3))
    _cage.solve_device_f32(b, n, j, xp.ptr(base), xp.ptr(v), xp.ptr(tau), xp.ptr(policy), xp.ptr(payoffs),
                           xp.ptr(stats), xp.stream(), emulated, tol, max_iter)
    # Each principal pays where its value beats its payoff by more than tau (docs/model.md).
    incentives = xp.where(active, xp.relu(v - payoffs[:, :, None] - tau[:, None, None]), 0.0)
    out = DeviceSolution(policy, incentives, payoffs, incentives.sum(1), stats[:, 0].round().astype(np.uint32)
                         if isinstance(stats, np.ndarray) else stats[:, 0].round().int(), stats[:, 1], stats[:, 2] > 0.5)
    if batched:
        return out
    return DeviceSolution(*(getattr(out, f)[0] for f in DeviceSolution.__dataclass_fields__))


def solve_cuda(base: Any, values: Any, weights: Any, tau: Any, method: str, normalize: str, backend: str,
               tol: Optional[float], max_iter: Optional[int]) -> DeviceSolution:
    """``cage.solve`` for CUDA tensors (torch): the exact method, float32, on the current stream."""
    try:
        import torch
    except ImportError:
        raise ValueError(
            f"base_logprobs is a {type(base).__name__} on a GPU; cage solves GPU arrays as torch tensors "
            "(pip install torch) or copies them to the host first (numpy.from_dlpack(x.cpu()))"
        ) from None
    if not isinstance(base, torch.Tensor):
        raise ValueError(f"base_logprobs is a {type(base).__name__} on a GPU; cage solves GPU arrays as torch tensors")
    if method != "exact":
        raise ValueError(f'CUDA tensors are solved by the exact method only, got method "{method}"')
    if backend not in ("auto", "cuda"):
        raise ValueError(f'base_logprobs is a CUDA tensor but backend is "{backend}": use "auto" or "cuda", '
                         "or move the tensors to the host")
    if base.device.index not in (None, 0):
        raise ValueError(f"base_logprobs is on {base.device}; cage solves on CUDA device 0 only")
    if not _cage.cuda_available():
        raise RuntimeError("no usable CUDA GPU for cage in this process (its driver or device is missing), "
                           f"but base_logprobs is on {base.device}")
    return _solve(_Torch(torch, base.device), base, values, weights, tau, normalize, tol, max_iter, emulated=False)


def solve_emulated(base: np.ndarray, values: np.ndarray, weights: np.ndarray, tau: Any, normalize: str = "shift_min",
                   tol: Optional[float] = None, max_iter: Optional[int] = None) -> DeviceSolution:
    """The device path on host float32 arrays and the kernels' host emulation (tests without a GPU)."""
    return _solve(_Numpy(), base, values, weights, tau, normalize, tol, max_iter, emulated=True)
