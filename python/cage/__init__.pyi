"""Type stubs of the package ``cage`` (python/cage/__init__.py)."""

import os
from typing import Any, Iterable, Iterator, Mapping, Optional, Sequence, Union

from ._cage import Solution as Solution

__version__: str

def cuda_available() -> bool: ...
def solve(
    base_logprobs: Any,
    values: Any,
    weights: Any,
    tau: Any = 0.1,
    method: str = "exact",
    normalize: str = "shift_min",
    backend: str = "auto",
    tol: Optional[float] = None,
    max_iter: Optional[int] = None,
    names: Optional[Sequence[str]] = None,
) -> Any: ...

class Engine:
    def __init__(self, config: Union[str, "os.PathLike[str]", Mapping[str, Any]]) -> None: ...
    @property
    def principals(self) -> list[str]: ...
    def generate(
        self,
        prompts: Union[str, Sequence[str]],
        weights: Union[None, Sequence[float], Sequence[Sequence[float]]] = None,
        method: Optional[str] = None,
        max_new_tokens: Optional[int] = None,
        tau: Optional[float] = None,
        sampling: Optional[str] = None,
        seed: Optional[int] = None,
    ) -> Iterator[dict[str, Any]]: ...
    def sweep(
        self,
        prompts: Union[str, Sequence[str]],
        methods: Iterable[str] = ...,
        steps: Optional[int] = None,
        max_new_tokens: Optional[int] = None,
    ) -> Iterator[dict[str, Any]]: ...
