"""cage.hf.CageLogitsProcessor in transformers' generate on SmolLM2-135M-Instruct: the same tokens as the Rust
engine (`cage generate`) with the same config. Both run f32 forwards (Rust's CPU runtime, torch), so the
log-probabilities differ in their last bits: a row may part ways only at a near tie of the policy, which the test
reports; anywhere else a different token fails."""

import json

import pytest

import cage
from conftest import ROOT

torch = pytest.importorskip("torch", reason="torch is not installed (scripts/test-python.sh installs it unless "
                                            "CAGE_TEST_HF=0)")
transformers = pytest.importorskip("transformers", reason="transformers is not installed (scripts/test-python.sh)")

from cage.hf import CageLogitsProcessor  # noqa: E402

MODEL = ROOT / "models" / "SmolLM2-135M-Instruct"
DEMO = ROOT / "examples" / "configs" / "smollm2-concise-enthusiastic.json"
PROMPTS = ["What is the capital of France?", "Give me a tip for learning to cook.", "Why is the sky blue?"]
NEW = 24
# Two best tokens closer than this in pi: a last-bit difference of the forwards may swap them.
TIE = 1e-3

pytestmark = pytest.mark.skipif(not (MODEL / "model.safetensors").exists(),
                                reason=f"{MODEL} is missing (`cage fetch-model` or scripts/test.sh fetch it)")


def demo():
    cfg = json.loads(DEMO.read_text())
    cfg["base"] = str(MODEL)
    return cfg


@pytest.fixture(scope="module")
def hf():
    torch.manual_seed(0)
    tok = transformers.AutoTokenizer.from_pretrained(MODEL)
    model = transformers.AutoModelForCausalLM.from_pretrained(MODEL, dtype=torch.float32)
    model.eval()
    return model, tok


@pytest.fixture(scope="module")
def engine():
    return cage.Engine({**demo(), "max_new_tokens": NEW, "backend": "cpu"})


def hf_generate(model, tok, proc, prompts, fused=False):
    inputs = proc.encode(prompts, fused=fused)
    out = model.generate(**inputs, logits_processor=[proc], do_sample=False, max_new_tokens=NEW,
                         pad_token_id=proc.pad_token_id, top_k=None, top_p=None, temperature=None)
    width = inputs["input_ids"].shape[1]
    eos = set(model.generation_config.eos_token_id if isinstance(model.generation_config.eos_token_id, list)
              else [model.generation_config.eos_token_id])
    rows = []
    for r in out[: len(prompts), width:].tolist():
        cut = next((i + 1 for i, t in enumerate(r) if t in eos), len(r))
        rows.append(r[:cut])
    return rows


def compare(ours, theirs, proc):
    """Rows equal, or parting at a near tie (reported); returns the report's lines."""
    report, exact = [], 0
    for r, (o, t) in enumerate(zip(ours, theirs)):
        if o == t:
            exact += 1
            continue
        at = next((i for i, (a, b) in enumerate(zip(o, t)) if a != b), min(len(o), len(t)))
        assert at < min(len(o), len(t)), f"row {r}: one stops early at {at}: {o} vs {t}"
        margin = float(proc.margins[at][r])
        assert margin < TIE, f"row {r} parts at step {at} with a clear choice (pi margin {margin:.3g}): {o} vs {t}"
        report.append(f"row {r}: near tie at step {at} (pi margin {margin:.2e}), {exact} rows equal so far")
    return report, exact


@pytest.mark.parametrize("weights, fused", [([0.5, 0.5], False), ([1.0, 0.0], False), ([0.2, 0.8], False),
                                            ([0.2, 0.8], True)])
def test_greedy_gives_the_tokens_of_the_engine(hf, engine, weights, fused):
    model, tok = hf
    cfg = demo()
    proc = CageLogitsProcessor(model, tok, principals=cfg["principals"], weights=weights, tau=cfg["tau"],
                               k=cfg["k"], method="cage")
    ours = hf_generate(model, tok, proc, PROMPTS, fused)
    theirs = [r["token_ids"] for r in sorted(engine.generate(PROMPTS, weights=weights), key=lambda r: r["row"])]
    report, exact = compare(ours, theirs, proc)
    for line in report:
        print(f"weights {weights}: {line}")
    # A near tie may explain one row, not most of them.
    assert exact >= len(PROMPTS) - 1, report
    assert all(len(t) > 0 for t in theirs)


def test_the_processor_output_is_log_pi_on_the_candidates(hf):
    """The returned row is -inf off the top-k and log pi on it, pi the Rust solver's policy of those values."""
    model, tok = hf
    cfg = demo()
    proc = CageLogitsProcessor(model, tok, principals=cfg["principals"], weights=[0.3, 0.7], tau=0.3, k=10)
    inputs = proc.encode(PROMPTS[:2])
    with torch.no_grad():
        logits = model(**inputs).logits[:, -1, :]
    out = proc(inputs["input_ids"], logits.clone())
    finite = torch.isfinite(out)
    assert finite.sum(-1).tolist() == [10, 10]
    assert torch.equal(finite, torch.zeros_like(finite).scatter_(-1, logits.topk(10).indices, True))
    assert out.exp().sum(-1).double().tolist() == pytest.approx([1.0, 1.0], abs=1e-5)
    # The instruction streams, built independently: the chat template on instruction + blank line + prompt.
    ids = logits.topk(10).indices
    base = logits.double().log_softmax(-1).gather(-1, ids)
    values = []
    for p in cfg["principals"]:
        rows = []
        for r, prompt in enumerate(PROMPTS[:2]):
            text = tok.apply_chat_template([{"role": "user", "content": f"{p['instruction']}\n\n{prompt}"}],
                                           add_generation_prompt=True, tokenize=False)
            x = tok(text, add_special_tokens=False, return_tensors="pt")
            with torch.no_grad():
                lp = model(**x).logits[0, -1].double().log_softmax(-1)
            rows.append(lp[ids[r]] - base[r])
        values.append(torch.stack(rows))
    sol = cage.solve(base.float().double().numpy(), torch.stack(values, 1).numpy(),
                     [[0.3, 0.7]] * 2, 0.3, method="exact")
    got = out.gather(-1, ids).exp().double().numpy()
    assert got == pytest.approx(sol.policy, abs=1e-4)


def test_sampling_draws_from_pi(hf):
    """do_sample draws only candidates, and a seeded torch generator makes the draw repeatable."""
    model, tok = hf
    cfg = demo()
    proc = CageLogitsProcessor(model, tok, principals=cfg["principals"], weights=[0.5, 0.5], tau=0.3, k=5)

    def draw():
        torch.manual_seed(7)
        inputs = proc.encode(PROMPTS[0])
        out = model.generate(**inputs, logits_processor=[proc], do_sample=True, top_k=0, top_p=1.0,
                             temperature=1.0, max_new_tokens=6, pad_token_id=proc.pad_token_id)
        return out[0, inputs["input_ids"].shape[1]:].tolist()

    assert draw() == draw()


def test_fused_sampling_gives_every_stream_of_a_prompt_the_drawn_token(hf):
    """encode(fused=True, sample=True): the processor draws (seeded by torch) and every row of a prompt (its base
    and instruction streams in generate's batch) continues with that token."""
    model, tok = hf
    cfg = demo()
    proc = CageLogitsProcessor(model, tok, principals=cfg["principals"], weights=[0.5, 0.5], tau=0.3, k=5)

    def draw():
        torch.manual_seed(7)
        inputs = proc.encode(PROMPTS[:2], fused=True, sample=True)
        out = model.generate(**inputs, logits_processor=[proc], do_sample=False, max_new_tokens=6,
                             pad_token_id=proc.pad_token_id, top_k=None, top_p=None, temperature=None)
        return out[:, inputs["input_ids"].shape[1]:].tolist()

    rows = draw()
    assert len(rows) == 2 * 3 and rows == draw()
    assert rows[0::2] == [rows[0]] * 3 and rows[1::2] == [rows[1]] * 3


def test_bad_arguments_are_clear_errors(hf):
    model, tok = hf
    p = demo()["principals"]
    with pytest.raises(ValueError, match="unknown decoding method 'best'"):
        CageLogitsProcessor(model, tok, principals=p, method="best")
    with pytest.raises(ValueError, match="tau must be a finite number > 0"):
        CageLogitsProcessor(model, tok, principals=p, tau=0.0)
    with pytest.raises(ValueError, match="an arm principal needs its model"):
        CageLogitsProcessor(model, tok, principals=[{"name": "a", "kind": "arm"}])
    with pytest.raises(ValueError, match="unknown field 'instructions'"):
        CageLogitsProcessor(model, tok, principals=[{"name": "a", "kind": "prompted", "instructions": "x"}])
    proc = CageLogitsProcessor(model, tok, principals=p, weights=[1.0])
    inputs = proc.encode("hi")
    with pytest.raises(ValueError, match=r"weights must be 2 numbers \(principals concise, enthusiastic\)"):
        model.generate(**inputs, logits_processor=[proc], max_new_tokens=1, do_sample=False,
                       pad_token_id=proc.pad_token_id)
    fresh = CageLogitsProcessor(model, tok, principals=p)
    with pytest.raises(ValueError, match=r"call encode\(prompts\) first"):
        fresh(inputs["input_ids"], torch.zeros(1, 10))



def test_the_readme_example_runs(capsys):
    """The README's transformers example (its second Python block) runs as written from the repository root."""
    import ast
    import os
    import re

    text = (ROOT / "README.md").read_text()
    code = re.findall(r"```python\n(.*?)```", text[text.index("## Python"):], re.S)[1]
    cwd = os.getcwd()
    os.chdir(ROOT)
    try:
        exec(compile(code, "README.md", "exec"), {})
    finally:
        os.chdir(cwd)
    texts = ast.literal_eval(capsys.readouterr().out.strip())
    assert len(texts) == 2 and all(isinstance(t, str) and t.strip() for t in texts), texts


FIX = ROOT / "tests" / "fixtures"


def test_arm_principals_as_peft_models_give_the_tokens_of_the_engine():
    """ARM principals as separate models (the tiny backbone with each LoRA adapter, through peft) against the
    base stream: the Rust engine's tokens for the same config (its unmerged adapters on the shared backbone)."""
    peft = pytest.importorskip("peft", reason="peft is not installed (scripts/test-python.sh installs it)")
    prompts, new = ["t7 t8 t9", "t1 t2", "t3 t4 t5 t6"], 8
    tok = transformers.AutoTokenizer.from_pretrained(FIX / "tiny-word-tokenizer")

    def backbone():
        return transformers.AutoModelForCausalLM.from_pretrained(FIX / "tiny-llama", dtype=torch.float32).eval()

    arms = {n: peft.PeftModel.from_pretrained(backbone(), FIX / f"tiny-lora-{n}").eval() for n in ("a", "b")}
    base = backbone()
    cfg = {"base": str(FIX / "tiny-llama"), "tokenizer": str(FIX / "tiny-word-tokenizer"),
           "principals": [{"name": n, "kind": "arm", "adapter": str(FIX / f"tiny-lora-{n}")} for n in arms],
           "tau": 0.1, "k": 20, "max_new_tokens": new, "backend": "cpu"}
    engine = cage.Engine(cfg)
    for weights in ([0.5, 0.5], [0.9, 0.1]):
        proc = CageLogitsProcessor(base, tok, principals=[{"name": n, "kind": "arm", "model": m}
                                                          for n, m in arms.items()],
                                   weights=weights, tau=0.1, k=20)
        inputs = proc.encode(prompts)
        out = base.generate(**inputs, logits_processor=[proc], do_sample=False, max_new_tokens=new,
                            pad_token_id=proc.pad_token_id, top_k=None, top_p=None, temperature=None)
        ours = [r[: next((i + 1 for i, t in enumerate(r) if t == 2), len(r))]
                for r in out[:, inputs["input_ids"].shape[1]:].tolist()]
        theirs = [r["token_ids"] for r in sorted(engine.generate(prompts, weights=weights), key=lambda r: r["row"])]
        report, exact = compare(ours, theirs, proc)
        for line in report:
            print(f"arm weights {weights}: {line}")
        assert exact >= len(prompts) - 1, report
        assert all(len(t) > 0 for t in theirs)


def test_candidates_by_topk_are_those_of_a_stable_sort():
    from cage.hf import _log_normalizer, _top

    g = torch.Generator().manual_seed(3)
    z = torch.randn(6, 500, generator=g) * 3
    z[1, :] = torch.round(z[1, :])  # many ties, some across the cut at n
    z[2, 100:140] = z[2].max()  # 40 equal maxima, more than fit in some n below
    z[3, 50:] = float("-inf")  # fewer finite scores than n
    z[4, :] = 0.0  # all tied
    for n in (1, 7, 30, 50, 499, 500, 600):
        want = torch.sort(z, dim=-1, descending=True, stable=True)[1][:, :n]
        assert torch.equal(_top(z, n), want), n
    lse = _log_normalizer(z)
    want = torch.logsumexp(z.double(), -1, keepdim=True)
    assert lse.dtype == torch.float64 and float((lse - want).abs().max()) < 1e-7
    assert float(_log_normalizer(torch.full((1, 5), float("-inf")))) == float("-inf")
