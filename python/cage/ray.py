"""``cage sweep`` sharded over a Ray cluster (``pip install .[ray]``; ``import cage`` does not load Ray).

The sweep's work (methods x weight vectors x prompts) is cut into shards of one method and a run of rows (rows as
``cage sweep`` orders them: weight vector g, prompt p at row g * prompts + p), cut at multiples of the config's
``batch_size`` so that every batch holds the rows ``cage sweep`` decodes together. One engine per worker: an
actor per GPU when the cluster has GPUs, else one per node, each loading the models once and decoding the shards
it is handed. Each shard's rows are appended to ``results.jsonl`` as it returns; a shard that fails is retried
(``max_retries`` times, on any worker) and, if it still fails, named in ``failed.jsonl`` and in the
``SweepFailed`` raised after the other shards are written. The merged sweep.csv, summary.csv and plot come from
the same Rust code as ``cage sweep`` (``cage._cage.write_sweep``), and rows are numbered (and sampled) as ``cage
sweep`` numbers them, so on the same backend the results are the same.

    python -m cage.ray -c run.json --prompts prompts.jsonl --address HEAD:6379 --out sweep-out
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

from . import _cage

try:
    import ray
except ImportError as _e:  # pragma: no cover - depends on the environment
    raise ImportError("cage.ray needs Ray: pip install 'cage[ray]' (or pip install ray)") from _e

__all__ = ["sweep", "Shard", "SweepResult", "SweepFailed", "main"]

Config = Union[str, "os.PathLike[str]", Mapping[str, Any]]


@dataclass(frozen=True)
class Shard:
    """One unit of work: ``method`` on the sweep's rows ``first`` to ``end`` (excluded)."""

    method: str
    first: int
    end: int

    @property
    def name(self) -> str:
        return f"{self.method}[{self.first}:{self.end}]"

    def describe(self, grid: Sequence[Sequence[float]], prompts: Sequence[str]) -> Dict[str, Any]:
        """Its name, method and the weight vectors and prompts of its rows."""
        g = range(self.first // len(prompts), (self.end - 1) // len(prompts) + 1)
        p = sorted({r % len(prompts) for r in range(self.first, self.end)})
        return {"shard": self.name, "method": self.method, "weights": [list(grid[i]) for i in g],
                "prompts": [prompts[i] for i in p]}


@dataclass
class SweepResult:
    """HV and MIP per method (as ``cage sweep`` prints them), the reference point and the output folder."""

    summary: List[Dict[str, Any]]
    reference: List[float]
    out: str
    workers: int
    retried: List[str] = field(default_factory=list)


class SweepFailed(RuntimeError):
    """Shards that still failed after their retries; the other shards' rows are in results.jsonl."""

    def __init__(self, failed: List[Dict[str, Any]], out: str):
        self.failed = failed
        lines = "\n".join(f"  {f['shard']}: method {f['method']}, weights {f['weights']}, {len(f['prompts'])} "
                          f"prompt(s): {f['error']}" for f in failed)
        super().__init__(f"{len(failed)} shard(s) failed after their retries (listed in {out}/failed.jsonl; the "
                         f"other shards' rows are in {out}/results.jsonl, no merged files written):\n{lines}")


@ray.remote
class _Worker:
    """One engine on one worker: models loaded once, then shard after shard."""

    def __init__(self, config_json: str, cwd: str):
        import cage

        # Relative paths in the config mean the driver's directory where that exists on this node.
        if os.path.isdir(cwd):
            os.chdir(cwd)
        self.engine = cage.Engine(json.loads(config_json))

    def run(self, shard: Shard, prompts: List[str], weights: List[List[float]], max_new_tokens: Optional[int],
            fail: bool) -> List[Dict[str, Any]]:
        """The shard's rows (``prompts[i]`` at ``weights[i]``), numbered and sampled as in the whole sweep."""
        if fail:
            raise RuntimeError(f"injected failure of shard {shard.name}")
        it = self.engine._engine.generate(prompts, weights, shard.method, max_new_tokens, None, None, None,
                                          shard.first)
        rows = [json.loads(line) for line in it]
        for r in rows:
            del r["token_ids"]
        return rows


def _config_json(config: Config) -> str:
    if isinstance(config, Mapping):
        return json.dumps(config)
    if isinstance(config, (str, os.PathLike)):
        try:
            with open(config, encoding="utf-8") as f:
                return f.read()
        except OSError as e:
            raise ValueError(f"reading config {os.fspath(config)}: {e.strerror}") from None
    raise ValueError(f"config must be a path or a dict, got {type(config).__name__}")


def _start_workers(config_json: str, workers: Optional[int]) -> List[Any]:
    """An actor per GPU when the cluster has GPUs, else one per alive node (``workers`` overrides the count)."""
    gpus = int(ray.cluster_resources().get("GPU", 0))
    cwd = os.getcwd()
    if gpus > 0:
        n = workers or gpus
        return [_Worker.options(num_gpus=1, num_cpus=1).remote(config_json, cwd) for _ in range(n)]
    if workers:
        return [_Worker.options(num_cpus=1, scheduling_strategy="SPREAD").remote(config_json, cwd)
                for _ in range(workers)]
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    nodes = [n["NodeID"] for n in ray.nodes() if n["Alive"] and n["Resources"].get("CPU", 0) >= 1]
    return [_Worker.options(num_cpus=1, scheduling_strategy=NodeAffinitySchedulingStrategy(node, soft=False))
            .remote(config_json, cwd) for node in nodes]


def sweep(
    config: Config,
    prompts: Union[str, Sequence[str]],
    methods: Sequence[str] = ("cage", "genarm", "linear"),
    weights: Optional[Sequence[Sequence[float]]] = None,
    address: Optional[str] = None,
    out: Union[str, "os.PathLike[str]"] = "sweep-out",
    steps: Optional[int] = None,
    max_new_tokens: Optional[int] = None,
    shard_size: Optional[int] = None,
    max_retries: int = 2,
    workers: Optional[int] = None,
    _fail: Optional[Mapping[str, int]] = None,
) -> SweepResult:
    """Runs ``cage sweep`` on a Ray cluster and writes its files into ``out``.

    ``weights``: the weight vectors (default: the simplex grid of ``cage sweep``, multiples of 1 / ``steps``).
    ``address``: the cluster (``"host:port"``, ``"auto"``; None: ``ray.init()``'s default, a local cluster when
    none is running). ``shard_size``: rows per shard, rounded up to a multiple of the config's ``batch_size``
    (default: each method's rows split evenly over the workers).
    ``_fail`` (tests): shard name -> how many of its first attempts raise inside the worker.
    """
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    methods = list(methods)
    if not prompts:
        raise ValueError("no prompt given")
    if not methods:
        raise ValueError("a sweep needs at least one method")
    if max_retries < 0:
        raise ValueError(f"max_retries must be >= 0, got {max_retries}")
    config_json = _config_json(config)
    j = len(_cage.sweep_check(config_json, methods, [])[0])
    if weights is None:
        grid = _cage._Engine.grid(j, steps if steps is not None else (10 if j == 2 else 4))
    else:
        grid = [[float(x) for x in w] for w in weights]
        if not grid:
            raise ValueError("weights: give at least one weight vector (or None for the simplex grid)")
    names, batch = _cage.sweep_check(config_json, methods, grid)
    out = os.fspath(out)
    os.makedirs(out, exist_ok=True)
    if not ray.is_initialized():
        ray.init(address=address, log_to_driver=False)
    actors = _start_workers(config_json, workers)
    if not actors:
        raise ValueError("the Ray cluster has no worker with a CPU to run an engine on")
    n = len(grid) * len(prompts)
    size = batch * max(1, math.ceil((shard_size or math.ceil(n / len(actors))) / batch))
    shards = deque(Shard(m, r, min(r + size, n)) for m in methods for r in range(0, n, size))
    row_prompts = [p for _ in grid for p in prompts]
    row_weights = [w for w in grid for _ in prompts]
    tries: Dict[Shard, int] = {}
    scores: Dict[Tuple[str, int], List[float]] = {}
    failed: List[Dict[str, Any]] = []
    retried: List[str] = []
    idle = list(actors)
    running: Dict[Any, Tuple[Shard, Any]] = {}
    with open(os.path.join(out, "results.jsonl"), "w", encoding="utf-8") as results:
        while shards or running:
            while shards and idle:
                shard, actor = shards.popleft(), idle.pop()
                fail = tries.get(shard, 0) < (_fail or {}).get(shard.name, 0)
                call = actor.run.remote(shard, row_prompts[shard.first:shard.end], row_weights[shard.first:shard.end],
                                        max_new_tokens, fail)
                running[call] = (shard, actor)
            [done], _ = ray.wait(list(running), num_returns=1)
            shard, actor = running.pop(done)
            idle.append(actor)
            try:
                rows = ray.get(done)
            except (ray.exceptions.RayError, ValueError) as e:
                tries[shard] = tries.get(shard, 0) + 1
                if tries[shard] <= max_retries:
                    retried.append(shard.name)
                    shards.append(shard)
                else:
                    failed.append({**shard.describe(grid, prompts), "error": _short(e)})
                continue
            for r in rows:
                results.write(json.dumps(r) + "\n")
                scores[(shard.method, r["row"])] = [r["scores"][n] for n in names]
            results.flush()
    for a in actors:
        ray.kill(a)
    if failed:
        with open(os.path.join(out, "failed.jsonl"), "w", encoding="utf-8") as f:
            f.writelines(json.dumps(x) + "\n" for x in failed)
        raise SweepFailed(failed, out)
    table = [[scores[(m, i)] for i in range(n)] for m in methods]
    path = os.fspath(config) if isinstance(config, (str, os.PathLike)) else None
    sums, reference = _cage.write_sweep(out, config_json, grid, len(prompts), methods, table, path)
    return SweepResult([{"method": m, "hv": hv, "mip": mip} for m, hv, mip in sums], reference, out, len(actors),
                       retried)


def _short(e: BaseException) -> str:
    """The last line of a (remote) error: what went wrong, without Ray's traceback."""
    cause = getattr(e, "cause", None) or e
    text = str(cause).strip().splitlines()
    return text[-1] if text else type(cause).__name__


def main(argv: Optional[Sequence[str]] = None) -> int:
    """``python -m cage.ray``: ``cage sweep``'s options plus the cluster's."""
    ap = argparse.ArgumentParser(prog="python -m cage.ray", description=__doc__.splitlines()[0])
    ap.add_argument("-c", "--config", required=True, help="run configuration (JSON)")
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", help="one prompt")
    src.add_argument("--prompts", help="a JSONL file of prompts (a string or {\"prompt\": ...} per line)")
    ap.add_argument("--methods", default="cage,genarm,linear", help="methods, comma-separated")
    ap.add_argument("--steps", type=int, help="grid resolution (default 10 for 2 principals, 4 for 3)")
    ap.add_argument("--max-new-tokens", type=int, help="token limit per prompt (overrides the config)")
    ap.add_argument("--out", default="sweep-out", help="output folder")
    ap.add_argument("--address", help="Ray cluster address (host:port or auto; default: a local cluster)")
    ap.add_argument("--shard-size", type=int, help="rows per shard (rounded up to a multiple of batch_size)")
    ap.add_argument("--max-retries", type=int, default=2, help="retries of a failed shard")
    ap.add_argument("--workers", type=int, help="engines to start (default: one per GPU, else one per node)")
    a = ap.parse_args(argv)
    try:
        prompts = [a.prompt] if a.prompt is not None else _cage.read_prompts(a.prompts)
        res = sweep(a.config, prompts, [m for m in a.methods.split(",") if m], address=a.address, out=a.out,
                    steps=a.steps, max_new_tokens=a.max_new_tokens, shard_size=a.shard_size,
                    max_retries=a.max_retries, workers=a.workers)
    except (ValueError, SweepFailed) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"reference point {res.reference}")
    print(f"{'method':>12} {'HV':>12} {'MIP':>8}")
    for s in res.summary:
        print(f"{s['method']:>12} {s['hv']:>12.4f} {s['mip']:>8.4f}")
    print(f"wrote {res.out}/{{sweep.csv, summary.csv, results.jsonl, pareto.svg, pareto.png}} ({res.workers} "
          f"workers{', retried ' + ', '.join(res.retried) if res.retried else ''})", file=sys.stderr)
    return 0


if __name__ == "__main__":
    from cage.ray import main as _main  # the importable module, so that Ray pickles its classes by name

    sys.exit(_main())
