"""Type stubs of cage.ray (needs ray)."""

import os
from dataclasses import dataclass
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

__all__ = ["sweep", "Shard", "SweepResult", "SweepFailed", "main"]

Config = Union[str, "os.PathLike[str]", Mapping[str, Any]]

@dataclass(frozen=True)
class Shard:
    method: str
    first: int
    end: int
    @property
    def name(self) -> str: ...
    def describe(self, grid: Sequence[Sequence[float]], prompts: Sequence[str]) -> Dict[str, Any]: ...

@dataclass
class SweepResult:
    summary: List[Dict[str, Any]]
    reference: List[float]
    out: str
    workers: int
    retried: List[str] = ...

class SweepFailed(RuntimeError):
    failed: List[Dict[str, Any]]
    def __init__(self, failed: List[Dict[str, Any]], out: str) -> None: ...

def sweep(
    config: Config,
    prompts: Union[str, Sequence[str]],
    methods: Sequence[str] = ...,
    weights: Optional[Sequence[Sequence[float]]] = None,
    address: Optional[str] = None,
    out: Union[str, "os.PathLike[str]"] = "sweep-out",
    steps: Optional[int] = None,
    max_new_tokens: Optional[int] = None,
    shard_size: Optional[int] = None,
    max_retries: int = 2,
    workers: Optional[int] = None,
    _fail: Optional[Mapping[str, int]] = None,
) -> SweepResult: ...
def main(argv: Optional[Sequence[str]] = None) -> int: ...
