"""Type stubs of cage.hf (needs torch and transformers)."""

from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
import torch

__all__ = ["CageLogitsProcessor"]

class CageLogitsProcessor:
    model: Any
    tokenizer: Any
    tau: float
    k: int
    method: str
    normalize: str
    prompt_format: str
    names: List[str]
    weights: Union[None, Sequence[float], Sequence[Sequence[float]]]
    margins: List[np.ndarray]
    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        principals: Sequence[Mapping[str, Any]],
        weights: Union[None, Sequence[float], Sequence[Sequence[float]]] = None,
        tau: float = 0.1,
        k: int = 50,
        method: str = "cage",
        normalize: str = "shift_min",
        prompt_format: str = "auto",
    ) -> None: ...
    @property
    def pad_token_id(self) -> int: ...
    def near_ties(self, below: float = 1e-3) -> List[Tuple[int, int, float]]: ...
    def prompt_ids(self, prompt: str, instruction: Optional[str] = None) -> List[int]: ...
    def encode(
        self, prompts: Union[str, Sequence[str]], fused: bool = False, sample: bool = False
    ) -> Dict[str, torch.Tensor]: ...
    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor: ...
