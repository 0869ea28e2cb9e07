"""scripts/hf_scorer.py, the ready external scorer, against `cage score` on the tiny sequence-classification
reward model: the same scores for the same texts, alone and as the `--scorer` hook of `cage generate` beside the
config's native scorer of the same model."""

import json
import subprocess
import sys

import pytest

from conftest import ROOT

pytest.importorskip("torch", reason="torch is not installed (scripts/test-python.sh installs it unless CAGE_TEST_HF=0)")
pytest.importorskip("transformers", reason="transformers is not installed (scripts/test-python.sh)")

FIX = ROOT / "tests" / "fixtures"
MODEL = FIX / "tiny-reward-seqcls"
SCRIPT = ROOT / "scripts" / "hf_scorer.py"
# torch and cage's f32 forwards associate differently: a few ulps of scores of size ~1.
TOL = 2e-5


def hf_scorer(lines, *args):
    inp = "".join(json.dumps(x) + "\n" for x in lines)
    out = subprocess.run([sys.executable, str(SCRIPT), "--model", str(MODEL), *args], input=inp, text=True,
                         capture_output=True, check=True)
    return [json.loads(x) for x in out.stdout.splitlines()]


def cage_score(cli, text):
    out = subprocess.run([cli, "score", "--model", str(MODEL), "--text", text, "--json"], text=True,
                         capture_output=True, check=True)
    return json.loads(out.stdout)["scores"]


def test_hf_scorer_gives_the_scores_of_cage_score(cli):
    texts = [c["text"] for c in json.loads((FIX / "golden-score.json").read_text())["models"]["tiny-reward-seqcls"]["cases"]]
    # The default template "{prompt} {response}" puts the two halves back together.
    lines = [{"prompt": t.split(" ", 1)[0], "text": t.split(" ", 1)[1] if " " in t else ""} for t in texts]
    lines[-1] = {"prompt": "t64 t65", "text": "t66"}
    texts[-1] = "t64 t65 t66"
    theirs = hf_scorer(lines)
    assert len(theirs) == len(texts)
    for t, s in zip(texts, theirs):
        ours = cage_score(cli, t)
        assert len(ours) == len(s) == 2
        assert all(abs(a - b) <= TOL for a, b in zip(ours, s)), (t, ours, s)
    assert hf_scorer(lines[:1], "--label", "1") == [[theirs[0][1]]]


def test_hf_scorer_as_the_hook_agrees_with_the_native_scorer(cli, tmp_path):
    cfg = {"base": str(FIX / "tiny-llama"), "tokenizer": str(FIX / "tiny-word-tokenizer"),
           "principals": [{"name": "adapter", "kind": "arm", "adapter": str(FIX / "tiny-lora-a")},
                          {"name": "words", "kind": "lexicon", "words": {"t5": 2.0}}],
           "tau": 0.1, "k": 20, "max_new_tokens": 5,
           "scorers": [{"name": "helpful", "model": str(MODEL), "label": 1, "template": "t9 {prompt} {response}"}]}
    (tmp_path / "cfg.json").write_text(json.dumps(cfg))
    (tmp_path / "p.jsonl").write_text('"t3 t4 t5"\n"t20 t21"\n')
    hook = f"{sys.executable} {SCRIPT} --model {MODEL} --label 1 --template 't9 {{prompt}} {{response}}'"
    out = subprocess.run([cli, "generate", "-c", str(tmp_path / "cfg.json"), "--prompts", str(tmp_path / "p.jsonl"),
                          "--scorer", hook], text=True, capture_output=True, check=True)
    rows = [json.loads(x) for x in out.stdout.splitlines()]
    assert len(rows) == 2
    for r in rows:
        assert abs(r["scores"]["external_1"] - r["scores"]["helpful"]) <= TOL, r
