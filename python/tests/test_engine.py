"""cage.Engine on the repository's tiny model: the same rows as `cage generate` and `cage sweep` for the same config,
streamed while Rust decodes with the GIL released."""

import json
import subprocess
import sys
import threading
import time

import pytest

import cage
from conftest import ROOT

FIX = ROOT / "tests" / "fixtures"


def config(method="cage"):
    return {
        "base": str(FIX / "tiny-llama"),
        "tokenizer": str(FIX / "tiny-word-tokenizer"),
        "principals": [
            {"name": "adapter", "kind": "arm", "adapter": str(FIX / "tiny-lora-a")},
            {"name": "words", "kind": "lexicon", "words": {"t5": 2.0, "t17": 1.0}},
        ],
        "weights": [0.5, 0.5],
        "method": method,
        "tau": 0.1,
        "k": 20,
        "max_new_tokens": 8,
        "backend": "cpu",
    }


PROMPTS = ["t7 t8 t9", "t1 t2", "t3 t4 t5 t6"]


def cli_rows(cli, tmp_path, weights, method="cage"):
    cfg, prompts, out = tmp_path / "run.json", tmp_path / "prompts.jsonl", tmp_path / "out.jsonl"
    cfg.write_text(json.dumps(config()))
    prompts.write_text("\n".join(json.dumps(p) for p in PROMPTS) + "\n")
    args = [cli, "generate", "-c", str(cfg), "--prompts", str(prompts), "--out", str(out), "--method", method,
            "--weights", ",".join(str(w) for w in weights)]
    run = subprocess.run(args, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    return [json.loads(line) for line in out.read_text().splitlines()]


@pytest.fixture(scope="module")
def engine():
    return cage.Engine(config())


@pytest.mark.parametrize("weights, method", [([1.0, 0.0], "cage"), ([0.0, 1.0], "cage"), ([0.3, 0.7], "cage"),
                                             ([0.5, 0.5], "genarm")])
def test_generate_gives_the_rows_of_the_command_line(cli, tmp_path, engine, weights, method):
    ours = sorted(engine.generate(PROMPTS, weights=weights, method=method), key=lambda r: r["row"])
    theirs = cli_rows(cli, tmp_path, weights, method)
    assert [r["row"] for r in ours] == list(range(len(PROMPTS)))
    for o, t in zip(ours, theirs):
        assert len(o["token_ids"]) == o["tokens"]
        for key in ("prompt", "method", "weights", "text", "tokens", "stop_reason"):
            assert o[key] == t[key], key
        assert o["scores"] == pytest.approx(t["scores"], abs=1e-9)


def test_cpu_weights_f32_decodes_the_rows_of_the_stored_model(engine):
    # The tiny model is f32 in its file: both settings hold the same values and decode the same rows.
    f32 = cage.Engine(config(), cpu_weights="f32")
    rows = [sorted(e.generate(PROMPTS), key=lambda r: r["row"]) for e in (f32, engine)]
    assert [r["token_ids"] for r in rows[0]] == [r["token_ids"] for r in rows[1]]


def test_rows_may_weigh_the_principals_differently(engine):
    rows = list(engine.generate(["t7 t8 t9"] * 2, weights=[[1.0, 0.0], [0.0, 1.0]]))
    alone = [next(iter(engine.generate("t7 t8 t9", weights=w))) for w in ([1.0, 0.0], [0.0, 1.0])]
    by_row = sorted(rows, key=lambda r: r["row"])
    assert [r["text"] for r in by_row] == [a["text"] for a in alone]


def test_the_engine_streams_with_the_gil_released(engine):
    """A Python thread runs while the iterator waits on Rust. The switch interval is made huge so that the main
    thread gives the GIL away only where it releases it: with a held GIL the counter could not move."""
    ticks, done = [0], threading.Event()

    def count():
        while not done.is_set():
            ticks[0] += 1
            time.sleep(0.0002)

    interval = sys.getswitchinterval()
    t = threading.Thread(target=count)
    t.start()
    sys.setswitchinterval(1000.0)
    try:
        before = ticks[0]
        rows = list(engine.generate(PROMPTS * 8, weights=[0.5, 0.5], max_new_tokens=32))
        during = ticks[0] - before
    finally:
        sys.setswitchinterval(interval)
        done.set()
        t.join()
    # A held GIL lets at most a tick or two through (a switch already requested); released, hundreds.
    assert len(rows) == 24 and during >= 10, during


def test_sweep_covers_the_grid_for_every_method(engine):
    rows = list(engine.sweep(PROMPTS[:2], methods=["cage", "linear"], steps=2))
    assert len(rows) == 2 * 3 * 2
    assert sorted({tuple(r["weights"]) for r in rows}) == [(0.0, 1.0), (0.5, 0.5), (1.0, 0.0)]
    assert {r["method"] for r in rows} == {"cage", "linear"}
    one = next(iter(engine.generate(PROMPTS[0], weights=[0.5, 0.5], method="linear")))
    same = [r for r in rows if r["method"] == "linear" and r["weights"] == [0.5, 0.5] and r["prompt"] == PROMPTS[0]]
    assert same[0]["text"] == one["text"]


def test_bad_configs_and_requests_are_clear_errors(tmp_path, engine):
    with pytest.raises(ValueError, match="tau must be a finite number > 0"):
        cage.Engine({**config(), "tau": 0})
    with pytest.raises(ValueError, match="unknown field `modle`"):
        cage.Engine({**config(), "modle": "x"})
    with pytest.raises(OSError, match="reading config"):
        cage.Engine(tmp_path / "missing.json")
    with pytest.raises(ValueError, match=r"1 weights given for 2 principals \(adapter, words\)"):
        list(engine.generate("t1", weights=[1.0]))
    with pytest.raises(ValueError, match='unknown decoding method "best"'):
        engine.generate("t1", method="best")
    with pytest.raises(ValueError, match="weight of principal words must be a finite number >= 0"):
        list(engine.generate("t1", weights=[0.5, -1.0]))
    with pytest.raises(ValueError, match=r'^[^"]*cpu_weights: .*unknown cpu_weights "f16" \(expected one of stored, f32\)'):
        cage.Engine({**config(), "cpu_weights": "f16"})
    with pytest.raises(ValueError, match=r'unknown cpu_weights "bf16" \(expected one of stored, f32\)'):
        cage.Engine(config(), cpu_weights="bf16")
    # Reward-model scorers run in the CLI only: a config naming them is refused, not silently unscored.
    scorer = {"name": "reward", "model": str(FIX / "tiny-reward-seqcls")}
    with pytest.raises(ValueError, match="scorers: the Python engine"):
        cage.Engine({**config(), "scorers": [scorer]})


def test_dropping_the_iterator_early_stops_the_decoding(engine):
    """The decoding thread ends at its next row once nobody reads (no hang, the engine stays usable)."""
    it = engine.generate(PROMPTS * 20, weights=[0.5, 0.5], max_new_tokens=16)
    first = next(it)
    del it
    again = next(iter(engine.generate(first["prompt"], weights=[0.5, 0.5], max_new_tokens=16)))
    assert again["text"] == first["text"]


def test_parm_decodes_the_reference_tokens_and_sweeps_cage_plus():
    """The `parm` method through the binding: each preference's PBLoRA adapter is materialised before the decoding
    thread starts, and the tokens are the PyTorch reference's (tests/fixtures/golden-parm.json)."""
    golden = json.loads((FIX / "golden-parm.json").read_text())
    pb = str(FIX / "tiny-pblora")
    parm = cage.Engine({**config("parm"), "k": 0, "principals": [
        {"name": "first", "kind": "parm", "adapter": pb, "preference": [1.0, 0.0]},
        {"name": "second", "kind": "parm", "adapter": pb, "preference": [0.0, 1.0]}]})
    case = next(c for c in golden["greedy"] if c["beta"] == 1.0)
    rows = list(parm.generate([case["prompt"]], weights=[case["preference"]]))
    assert rows[0]["token_ids"] == case["tokens"]
    rows = list(parm.sweep(PROMPTS[:1], methods=["parm", "cage"], steps=2))
    assert {r["method"] for r in rows} == {"parm", "cage"} and len(rows) == 2 * 3
