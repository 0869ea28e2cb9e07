"""cage: multi-objective test-time alignment of language models as the equilibrium of a common-agency game.

``solve`` computes the equilibrium of one game or a batch from numpy arrays, CPU tensors (through DLPack, without
copying) or CUDA tensors (on the device, on the caller's stream); ``Engine`` decodes prompts with the Rust engine
of a run config. Bad input raises ``ValueError`` with the message the ``cage`` command line prints.
"""

from __future__ import annotations

import json
import numbers
import os
from typing import Any, Iterable, Iterator, Mapping, Optional, Sequence, Union

import numpy as np

from . import _cage
from ._cage import Solution

__version__: str = _cage.__version__
__all__ = ["solve", "Solution", "Engine", "cuda_available", "__version__"]

# DLPack device types (dlpack.h): where a foreign array lives.
_DL_CPU = 1
_DL_CUDA = 2


def cuda_available() -> bool:
    """Whether a CUDA GPU is usable by cage in this process."""
    return _cage.cuda_available()


def _host(x: Any, what: str = "array") -> Any:
    """A numpy view of ``x`` where it is a CPU array from another library (DLPack, no copy), or a list."""
    if isinstance(x, np.ndarray) or isinstance(x, (float, int)):
        return x
    if hasattr(x, "__dlpack__"):
        try:
            return np.from_dlpack(x)
        except (BufferError, RuntimeError, TypeError, ValueError) as e:
            # A tensor that requires grad, an unsupported dtype (bfloat16), ...
            raise ValueError(f"{what} cannot be read through DLPack ({e}); pass a float32 or float64 array "
                             "(for torch: x.detach().float())") from None
    if isinstance(x, (list, tuple)):
        return np.asarray(x, dtype=np.float64)
    return x


def _on_cuda(x: Any) -> bool:
    dev = getattr(x, "__dlpack_device__", None)
    return dev is not None and not isinstance(x, np.ndarray) and dev()[0] != _DL_CPU


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
) -> Any:
    """The equilibrium policy of one game ([N], [J, N], [J]) or a batch ([B, N], [B, J, N], [B, J]).

    Arrays are f32 or f64 (all three alike), C-contiguous; ``base_logprobs`` may hold ``-inf`` (excluded
    candidates). ``tau`` is a number or one per row. ``method``, ``normalize`` and ``backend`` are spelled as on
    the command line. CUDA tensors are solved on their device by the exact method (see ``cage._device``).
    """
    if type(base_logprobs) is np.ndarray and type(values) is np.ndarray and type(weights) is np.ndarray:
        return _cage.solve(base_logprobs, values, weights, tau, method, normalize, backend, tol, max_iter, names)
    if _on_cuda(base_logprobs):
        from . import _device

        return _device.solve_cuda(base_logprobs, values, weights, tau, method, normalize, backend, tol, max_iter)
    for x, what in ((values, "values"), (weights, "weights")):
        if _on_cuda(x):
            raise ValueError(f"{what} is on a GPU but base_logprobs is not: pass all arrays on one device")
    return _cage.solve(
        _host(base_logprobs, "base_logprobs"), _host(values, "values"), _host(weights, "weights"), _host(tau, "tau"),
        method, normalize, backend, tol, max_iter, names,
    )


Config = Union[str, "os.PathLike[str]", Mapping[str, Any]]
Weights = Union[None, Sequence[float], Sequence[Sequence[float]]]


class Engine:
    """The decoding engine of a run config (a JSON file's path, or the same content as a dict).

    Models load once; ``generate`` and ``sweep`` stream one dict per finished row (the fields of ``cage
    generate``'s JSON lines, plus ``row`` and ``token_ids``) while Rust decodes with the GIL released.
    """

    def __init__(self, config: Config, cpu_weights: Optional[str] = None):
        # cpu_weights: "stored" (the default: matrices as the model files hold them) or "f32"; overrides the
        # config's "cpu_weights".
        if isinstance(config, Mapping):
            self._engine = _cage._Engine.from_json(json.dumps(config), cpu_weights)
        elif isinstance(config, (str, os.PathLike)):
            self._engine = _cage._Engine.from_path(os.fspath(config), cpu_weights)
        else:
            raise ValueError(f"config must be a path or a dict, got {type(config).__name__}")

    @property
    def principals(self) -> list:
        """The principals' names, in the config's order."""
        return self._engine.principal_names()

    def generate(
        self,
        prompts: Union[str, Sequence[str]],
        weights: Weights = None,
        method: Optional[str] = None,
        max_new_tokens: Optional[int] = None,
        tau: Optional[float] = None,
        sampling: Optional[str] = None,
        seed: Optional[int] = None,
    ) -> Iterator[dict]:
        """Decodes each prompt; ``weights`` is one vector for all prompts or one per prompt (default: the
        config's). Rows are yielded as they finish (``row`` says which)."""
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        if weights is None:
            rows = [self._engine.default_weights()] * len(prompts)
        elif len(weights) == 0 or all(isinstance(w, numbers.Real) for w in weights):
            rows = [[float(w) for w in weights]] * len(prompts)
        else:
            rows = [[float(x) for x in w] for w in weights]
        it = self._engine.generate(prompts, rows, method, max_new_tokens, tau, sampling, seed)
        return (json.loads(line) for line in it)

    def sweep(
        self,
        prompts: Union[str, Sequence[str]],
        methods: Iterable[str] = ("cage", "genarm", "linear"),
        steps: Optional[int] = None,
        max_new_tokens: Optional[int] = None,
    ) -> Iterator[dict]:
        """Decodes every prompt at every weight vector of the simplex grid of ``cage sweep`` (multiples of
        1 / steps; default 10 for two principals, 4 for three), once per method."""
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        j = len(self.principals)
        grid = _cage._Engine.grid(j, steps if steps is not None else (10 if j == 2 else 4))
        it = self._engine.sweep(prompts, grid, list(methods), max_new_tokens)
        return (json.loads(line) for line in it)
