"""Type stubs of python/cage/_device.py."""

from typing import Any, Optional

class DeviceSolution:
    policy: Any
    incentives: Any
    payoffs: Any
    aggregate_incentive: Any
    iterations: Any
    residual: Any
    converged: Any

def solve_cuda(
    base: Any, values: Any, weights: Any, tau: Any, method: str, normalize: str, backend: str,
    tol: Optional[float], max_iter: Optional[int],
) -> DeviceSolution: ...
def solve_emulated(
    base: Any, values: Any, weights: Any, tau: Any, normalize: str = "shift_min", tol: Optional[float] = None,
    max_iter: Optional[int] = None,
) -> DeviceSolution: ...
