"""Type stubs of the extension module (python/src)."""

from typing import Any, Iterator, Optional, Sequence

__version__: str

class Solution:
    """The result of ``solve``: arrays shaped like the inputs' batch (scalars for one row's statistics)."""

    @property
    def policy(self) -> Any: ...
    @property
    def incentives(self) -> Any: ...
    @property
    def payoffs(self) -> Any: ...
    @property
    def aggregate_incentive(self) -> Any: ...
    @property
    def iterations(self) -> Any: ...
    @property
    def residual(self) -> Any: ...
    @property
    def converged(self) -> Any: ...

def solve(
    base_logprobs: Any,
    values: Any,
    weights: Any,
    tau: Any,
    method: str,
    normalize: str,
    backend: str,
    tol: Optional[float] = None,
    max_iter: Optional[int] = None,
    names: Optional[Sequence[str]] = None,
) -> Solution: ...
def rust_call_seconds(base_logprobs: Any, values: Any, weights: Any, tau: float, method: str, calls: int) -> float: ...
def solve_device_f32(
    rows: int,
    candidates: int,
    principals: int,
    base: int,
    values: int,
    tau: int,
    policy: int,
    payoffs: int,
    stats: int,
    stream: int,
    emulated: bool,
    tol: Optional[float] = None,
    max_iter: Optional[int] = None,
) -> None: ...
def cuda_available() -> bool: ...

class _Results(Iterator[str]):
    def __iter__(self) -> "_Results": ...
    def __next__(self) -> str: ...

class _Engine:
    @staticmethod
    def from_path(path: str, cpu_weights: Optional[str] = None) -> "_Engine": ...
    @staticmethod
    def from_json(text: str, cpu_weights: Optional[str] = None) -> "_Engine": ...
    @staticmethod
    def grid(principals: int, steps: int) -> list[list[float]]: ...
    def principal_names(self) -> list[str]: ...
    def default_weights(self) -> list[float]: ...
    def generate(
        self,
        prompts: Sequence[str],
        weights: Sequence[Sequence[float]],
        method: Optional[str] = None,
        max_new_tokens: Optional[int] = None,
        tau: Optional[float] = None,
        sampling: Optional[str] = None,
        seed: Optional[int] = None,
        first_row: int = 0,
    ) -> _Results: ...
    def sweep(
        self,
        prompts: Sequence[str],
        grid: Sequence[Sequence[float]],
        methods: Sequence[str],
        max_new_tokens: Optional[int] = None,
    ) -> _Results: ...

def sweep_check(
    config_json: str, methods: Sequence[str], grid: Sequence[Sequence[float]]
) -> tuple[list[str], int]: ...
def read_prompts(path: str) -> list[str]: ...
def write_sweep(
    out: str,
    config_json: str,
    grid: Sequence[Sequence[float]],
    prompts: int,
    methods: Sequence[str],
    scores: Sequence[Sequence[Sequence[float]]],
    config_path: Optional[str] = None,
) -> tuple[list[tuple[str, float, float]], list[float]]: ...
