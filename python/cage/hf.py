"""CAGE decoding inside transformers' ``model.generate``: a logits processor that runs the principals' streams.

``model.generate`` runs the base stream (the prompt alone). The processor runs every other stream the principals
need on its own KV cache, batched over the rows with left padding, one forward per model and step:

- a prompted principal: its instruction before the prompt on its model (default: the base model), against the
  same model on the prompt alone (the base stream itself when that model is the base model);
- an ARM principal: a separate model (``model=``: a fine-tuned model, or a ``peft`` model with its adapter
  active) against a reference (``reference=``, default: the base stream).

At each step it takes the base model's top-k candidates, each principal's values (the log-ratio of its two
streams at the candidates), and solves the game with ``cage.solve`` (the Rust solver); it returns logits that are
``-inf`` outside the candidates and ``log pi`` on them. Greedy search thus takes the CAGE argmax and sampling
draws from ``pi`` — with torch's random generator, not the keyed draw of ``cage generate``. Pass ``top_k=0,
top_p=1.0, temperature=1.0`` when sampling so that no warper changes the base logits first.

Cost: by default the streams run in a forward of their own beside generate's at every step. Where a forward costs
about the same for any small batch (a CPU streaming the weights) that about doubles a plain generate over the same
streams. ``encode(prompts, fused=True)`` puts the base model's streams in generate's own batch instead (one forward
per step) and the processor makes the choice itself; scripts/bench-hf.py measures both.

Needs torch and transformers (``import cage`` does not import them).
"""

from __future__ import annotations

import numbers
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
import torch

from . import solve

__all__ = ["CageLogitsProcessor"]

# The decoding methods that play the game through `cage.solve`, by their `cage generate` names.
_SOLVER = {"cage": "exact", "cage_paper": "paper", "linear": "linear"}
_FORMATS = ("auto", "chat", "plain", "alpaca")


class _Stream:
    """One forward stream: a model and the instruction put before the prompt (None: the prompt alone)."""

    def __init__(self, model: Any, instruction: Optional[str]):
        self.model = model
        self.instruction = instruction

    def key(self) -> Tuple[int, Optional[str]]:
        return (id(self.model), self.instruction)


class _Group:
    """The streams that run on one model: rows x streams in one batch with one KV cache."""

    def __init__(self, model: Any):
        self.model = model
        self.streams: List[_Stream] = []
        self.cache: Any = None
        self.mask: Optional[torch.Tensor] = None
        self.positions: Optional[torch.Tensor] = None
        # The last forward's logits ([streams, rows, V], as the model gives them) and their log-normalisers
        # ([streams, rows, 1], f64): log-probs are formed only at the candidates.
        self.logits: Optional[torch.Tensor] = None
        self.lse: Optional[torch.Tensor] = None


def _log_normalizer(z: torch.Tensor) -> torch.Tensor:
    """``log sum exp`` of each row of ``z`` ([R, V]) as [R, 1] f64: the exponentials in ``z``'s precision, their
    sum in f64: within 1e-7 of an all-f64 sum (far below what two forwards of one model differ by), without an
    f64 copy of the rows."""
    if z.dtype not in (torch.float32, torch.float64):
        z = z.float()  # half-precision logits: exponentials in f32
    m = z.amax(-1, keepdim=True)
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    return m.double() + torch.exp(z - m).sum(-1, keepdim=True, dtype=torch.float64).log()


def _top(scores: torch.Tensor, n: int) -> torch.Tensor:
    """The ids of each row's ``n`` largest scores, most likely first, ties to the lower id (as the engine selects:
    a stable descending sort) -- by ``topk`` (a full sort of the vocabulary costs more than the rest of a step)."""
    if n >= scores.shape[-1]:
        return torch.sort(scores, dim=-1, descending=True, stable=True)[1]
    vals, ids = torch.topk(scores, n + 1, dim=-1, sorted=True)
    # topk's pick among values equal to the n-th is unspecified: where the (n + 1)-th equals it (a tie crosses
    # the cut), sort.
    if bool((vals[:, n] == vals[:, n - 1]).any()):
        return torch.sort(scores, dim=-1, descending=True, stable=True)[1][:, :n]
    vals, ids = vals[:, :n], ids[:, :n]
    by_id = ids.argsort(dim=-1)
    ids, vals = ids.gather(-1, by_id), vals.gather(-1, by_id)
    return ids.gather(-1, torch.sort(vals, dim=-1, descending=True, stable=True)[1])


def _keep(g: "_Group", logits: torch.Tensor, streams: int, rows: int) -> None:
    """A forward's last logits ([streams * rows, V]) and their log-normalisers, kept for the step."""
    g.logits = logits.view(streams, rows, -1)
    g.lse = _log_normalizer(logits).view(streams, rows, 1)


class CageLogitsProcessor:
    """A ``LogitsProcessor`` whose output's argmax (or sample) is the CAGE choice of the principals.

    ``principals``: dicts with ``name``, ``kind`` (``"prompted"`` with ``instruction`` and optional ``model``;
    ``"arm"`` with ``model`` and optional ``reference``). ``weights``: one per principal, or one vector per
    prompt. ``tau``, ``k`` (0: the whole vocabulary), ``method`` (``cage``, ``cage_paper``, ``linear``) and
    ``normalize`` as in a run config. Call ``encode(prompts)`` for the base inputs of ``generate`` (it also
    resets the streams), then ``generate(**inputs, logits_processor=[processor], ...)``.
    """

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
    ):
        if not principals:
            raise ValueError("principals must name at least one principal")
        if method not in _SOLVER:
            raise ValueError(f"unknown decoding method {method!r} for the processor (expected one of "
                             f"{', '.join(_SOLVER)})")
        if not (isinstance(tau, numbers.Real) and np.isfinite(tau) and tau > 0):
            raise ValueError(f"tau must be a finite number > 0, got {tau!r}")
        if not (isinstance(k, numbers.Integral) and k >= 0):
            raise ValueError(f"k must be an integer >= 0 (0: the whole vocabulary), got {k!r}")
        if prompt_format not in _FORMATS:
            raise ValueError(f"unknown prompt_format {prompt_format!r} (expected one of {', '.join(_FORMATS)})")
        self.model, self.tokenizer = model, tokenizer
        self.tau, self.k, self.method, self.normalize = float(tau), int(k), method, normalize
        if prompt_format == "auto":
            prompt_format = "chat" if getattr(tokenizer, "chat_template", None) else "plain"
        self.prompt_format = prompt_format
        self.names = [str(p.get("name", "")) for p in principals]
        # Each principal's two streams (values = log pi_first - log pi_second); None is the base stream.
        self._pairs: List[Tuple[Optional[_Stream], Optional[_Stream]]] = []
        streams: Dict[Tuple[int, Optional[str]], _Stream] = {}

        def stream(m: Any, instruction: Optional[str]) -> Optional[_Stream]:
            if m is model and instruction is None:
                return None
            return streams.setdefault((id(m), instruction), _Stream(m, instruction))

        for p in principals:
            name, kind = p.get("name"), p.get("kind")
            if not name:
                raise ValueError("every principal needs a name")
            known = {"prompted": {"name", "kind", "instruction", "model"}, "arm": {"name", "kind", "model",
                                                                                  "reference"}}
            if kind not in known:
                raise ValueError(f"principal {name}: unknown kind {kind!r} (the processor runs prompted and arm)")
            extra = sorted(set(p) - known[kind])
            if extra:
                raise ValueError(f"principal {name}: unknown field {extra[0]!r} for kind {kind}")
            if kind == "prompted":
                if not isinstance(p.get("instruction"), str) or not p["instruction"]:
                    raise ValueError(f"principal {name}: a prompted principal needs an instruction")
                m = p.get("model") or model
                self._pairs.append((stream(m, p["instruction"]), stream(m, None)))
            else:
                if p.get("model") is None:
                    raise ValueError(f"principal {name}: an arm principal needs its model (model=)")
                self._pairs.append((stream(p["model"], None), stream(p.get("reference") or model, None)))
        self._groups: List[_Group] = []
        for s in streams.values():
            g = next((g for g in self._groups if g.model is s.model), None)
            if g is None:
                g = _Group(s.model)
                self._groups.append(g)
            g.streams.append(s)
        self.weights = weights
        self._prompts: Optional[List[str]] = None
        # encode(fused=True): the base model's streams ride in generate's batch; the processor then chooses.
        self._fused: Optional[_Group] = None
        self._sample = False
        self._step = 0
        # Per step of the last generate: each row's margin pi(best) - pi(second best), to report near ties.
        self.margins: List[np.ndarray] = []

    def near_ties(self, below: float = 1e-3) -> List[Tuple[int, int, float]]:
        """(step, row, margin) of the last generate's steps whose two most likely tokens' probabilities differ by
        less than ``below``: there a different forward (Rust vs torch) may rightly pick the other token."""
        return [(s, int(r), float(m[r])) for s, m in enumerate(self.margins) for r in np.nonzero(m < below)[0]]

    # ---- prompts ----------------------------------------------------------------------------------------------

    def prompt_ids(self, prompt: str, instruction: Optional[str] = None) -> List[int]:
        """The token ids of one stream's prompt, as the engine builds them (instruction, blank line, prompt)."""
        text = prompt if instruction is None else f"{instruction}\n\n{prompt}"
        tok = self.tokenizer
        if self.prompt_format == "chat":
            rendered = tok.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                               tokenize=False)
            ids = tok(rendered, add_special_tokens=False)["input_ids"]
        elif self.prompt_format == "alpaca":
            ids = tok(f"### Instruction:\n{text}\n\n### Response:\n", add_special_tokens=True)["input_ids"]
        else:
            ids = tok(text, add_special_tokens=True)["input_ids"]
        if not ids:
            raise ValueError(f"prompt {prompt!r} encodes to no tokens")
        return list(ids)

    @property
    def pad_token_id(self) -> int:
        """The id that pads prompts on the left (the tokenizer's pad token, else its EOS); pass it to generate."""
        tok = self.tokenizer
        pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        return int(pad) if pad is not None else 0

    def _left_pad(self, rows: List[List[int]], device: Any) -> Tuple[torch.Tensor, torch.Tensor]:
        width = max(len(r) for r in rows)
        ids = torch.full((len(rows), width), self.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, r in enumerate(rows):
            ids[i, width - len(r):] = torch.tensor(r, dtype=torch.long)
            mask[i, width - len(r):] = 1
        return ids.to(device), mask.to(device)

    def encode(self, prompts: Union[str, Sequence[str]], fused: bool = False,
               sample: bool = False) -> Dict[str, torch.Tensor]:
        """The base stream's ``input_ids`` and ``attention_mask`` for ``generate`` (left padded); starts a new
        decoding of these prompts (the other streams are prefilled at the first step).

        ``fused``: the base model's other streams join generate's batch (rows ``len(prompts)`` and on are theirs;
        read the first ``len(prompts)``), one forward per step as a plain generate over the same streams. The
        processor then takes the choice itself (argmax of pi, or with ``sample`` a draw from pi with torch's
        generator) and returns it as the only finite logit of every row of the prompt."""
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        if not prompts:
            raise ValueError("no prompt given")
        self._prompts = prompts
        self._step = 0
        self.margins = []
        self._sample = sample
        self._fused = next((g for g in self._groups if g.model is self.model), None) if fused else None
        seqs = [self.prompt_ids(p) for p in prompts]
        if self._fused is not None:
            seqs += [self.prompt_ids(p, st.instruction) for st in self._fused.streams for p in prompts]
        ids, mask = self._left_pad(seqs, self.model.device)
        return {"input_ids": ids, "attention_mask": mask}

    # ---- streams ----------------------------------------------------------------------------------------------

    def _weights(self, rows: int) -> np.ndarray:
        j = len(self._pairs)
        w = self.weights if self.weights is not None else [1.0 / j] * j
        arr = np.asarray(w, dtype=np.float64)
        if arr.ndim == 1:
            arr = np.broadcast_to(arr, (rows, arr.shape[0]))
        if arr.shape != (rows, j):
            raise ValueError(f"weights must be {j} numbers (principals {', '.join(self.names)}) or one such "
                             f"vector per prompt ({rows}), got shape {tuple(np.shape(w))}")
        return np.ascontiguousarray(arr)

    @torch.no_grad()
    def _forward(self, g: _Group, last: Optional[torch.Tensor]) -> None:
        """Prefills the group's streams (``last`` None) or feeds them the rows' last tokens; keeps log-probs."""
        from transformers import DynamicCache

        assert self._prompts is not None
        dev = g.model.device
        rows = len(self._prompts)
        if last is None:
            seqs = [self.prompt_ids(p, s.instruction) for s in g.streams for p in self._prompts]
            ids, g.mask = self._left_pad(seqs, dev)
            g.positions = (g.mask.cumsum(-1) - 1).clamp(min=0)
            g.cache = DynamicCache()
        else:
            ids = last.to(dev).repeat(len(g.streams)).unsqueeze(-1)
            g.mask = torch.cat([g.mask, g.mask.new_ones((g.mask.shape[0], 1))], dim=-1)
            g.positions = g.positions[:, -1:] + 1
        out = g.model(input_ids=ids, attention_mask=g.mask, position_ids=g.positions, past_key_values=g.cache,
                      use_cache=True, logits_to_keep=1)
        g.cache = out.past_key_values
        _keep(g, out.logits[:, -1, :], len(g.streams), rows)

    def _logprobs_at(self, s: Optional[_Stream], base: torch.Tensor, ids: torch.Tensor, top: int) -> torch.Tensor:
        """Stream ``s``'s log-probs (f64) at the candidates ``ids`` ([rows, n]); None is the base stream, whose
        candidates' log-probs are ``base``. ``top``: the largest candidate id."""
        if s is None:
            return base
        g = next(g for g in self._groups if s in g.streams)
        assert g.logits is not None and g.lse is not None
        i = g.streams.index(s)
        if top >= g.logits.shape[-1]:
            raise ValueError(f"candidate token {top} is outside a principal model's vocabulary of "
                             f"{g.logits.shape[-1]}")
        at = ids.to(g.logits.device)
        return (g.logits[i].gather(-1, at).double() - g.lse[i]).to(base.device)

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        if self._prompts is None:
            raise ValueError("call encode(prompts) first: it gives generate its inputs and the processor the "
                             "prompts of the other streams")
        rows = len(self._prompts)
        fused = self._fused
        total = rows * (1 + (len(fused.streams) if fused is not None else 0))
        if scores.shape[0] != total:
            raise ValueError(f"generate runs {scores.shape[0]} sequences where encode gave {total}: the "
                             "processor supports neither beams nor num_return_sequences > 1")
        all_scores = scores
        # Every row's log-normaliser at once (the base rows and, fused, the other streams' rows).
        lse = _log_normalizer(scores)
        if fused is not None:
            fused.logits = scores[rows:].view(len(fused.streams), rows, -1)
            fused.lse = lse[rows:].view(len(fused.streams), rows, 1)
            scores = scores[:rows]
        last = None if self._step == 0 else input_ids[:rows, -1]
        for g in self._groups:
            if g is not fused:
                self._forward(g, last)
        v = scores.shape[-1]
        n = v if self.k == 0 or self.k >= v else self.k
        ids = _top(scores, n)
        # Base log-probs at the candidates (f64 log-normaliser, then f32 as the engine's kernels keep them).
        base = scores.gather(-1, ids).double() - lse[:rows]
        base_c = base.float().double()
        top = int(ids.max())
        values = torch.stack([self._logprobs_at(a, base, ids, top) - self._logprobs_at(b, base, ids, top)
                              for a, b in self._pairs], dim=1)
        sol = solve(np.ascontiguousarray(base_c.cpu().numpy()), np.ascontiguousarray(values.cpu().numpy()),
                    self._weights(rows), self.tau, method=_SOLVER[self.method], normalize=self.normalize)
        pi = np.asarray(sol.policy, dtype=np.float64).reshape(rows, n)
        top2 = np.sort(pi, axis=-1)[:, -2:] if n > 1 else np.ones((rows, 2))
        self.margins.append(top2[:, 1] - top2[:, 0])
        self._step += 1
        if fused is not None:
            p = torch.from_numpy(pi)
            # Greedy: the first best candidate (the most likely under the base on a tie), as the engine picks.
            a = torch.multinomial(p, 1) if self._sample else p.float().argmax(-1, keepdim=True)
            chosen = ids.gather(-1, a.to(ids.device)).repeat(total // rows, 1)
            out = torch.full_like(all_scores, float("-inf"))
            return out.scatter_(-1, chosen, 0.0)
        with np.errstate(divide="ignore"):
            logpi = torch.from_numpy(np.log(pi))
        out = torch.full_like(scores, float("-inf"))
        out.scatter_(-1, ids, logpi.to(device=scores.device, dtype=scores.dtype))
        return out
