"""cage.ray on a real Ray cluster on the loopback interface (a head and two workers, started and stopped here): the
sharded sweep writes the same files as `cage sweep` in one process, a shard that fails is retried, and one that
keeps failing is reported by name after the others are written."""

import json
import os
import socket
import subprocess
import sys

import pytest

from conftest import ROOT

try:
    import ray
except ImportError:
    if os.environ.get("CAGE_TEST_RAY", "1") == "0":
        pytest.skip("ray is not installed (CAGE_TEST_RAY=0: scripts/test-python.sh did not install it)",
                    allow_module_level=True)
    pytest.fail("ray is not installed: scripts/test-python.sh installs it (CAGE_TEST_RAY=0 skips these tests)",
                pytrace=False)

import cage.ray

FIX = ROOT / "tests" / "fixtures"
PROMPTS = ["t7 t8 t9", "t1 t2"]
METHODS = ["cage", "linear"]


def config():
    # Sampled, so that a shard's rows match the single-process sweep only when they are keyed by their row there.
    return {
        "base": str(FIX / "tiny-llama"),
        "tokenizer": str(FIX / "tiny-word-tokenizer"),
        "principals": [
            {"name": "adapter", "kind": "arm", "adapter": str(FIX / "tiny-lora-a")},
            {"name": "words", "kind": "lexicon", "words": {"t5": 2.0, "t17": 1.0}},
        ],
        "method": "cage",
        "tau": 0.1,
        "k": 20,
        "max_new_tokens": 8,
        "sampling": "sample",
        "seed": 11,
        "backend": "cpu",
        "batch_size": 2,
    }


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def cluster():
    """A head and two worker nodes on 127.0.0.1, one CPU each; stopped (with the driver) whatever happens."""
    exe = os.path.join(os.path.dirname(sys.executable), "ray")
    port = free_port()
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}
    small = ["--num-cpus=1", "--num-gpus=0", "--object-store-memory=100000000", "--disable-usage-stats"]

    def start(*args):
        run = subprocess.run([exe, "start", *args, *small], env=env, capture_output=True, text=True, timeout=180)
        assert run.returncode == 0, run.stdout + run.stderr

    try:
        start("--head", f"--port={port}", "--node-ip-address=127.0.0.1", "--include-dashboard=false")
        for _ in range(2):
            start(f"--address=127.0.0.1:{port}", "--node-ip-address=127.0.0.1")
        yield f"127.0.0.1:{port}"
    finally:
        ray.shutdown()
        subprocess.run([exe, "stop", "--force"], env=env, capture_output=True, timeout=120)


@pytest.fixture(scope="module")
def single(cli, tmp_path_factory):
    """`cage sweep` in one process: the reference."""
    d = tmp_path_factory.mktemp("single")
    (d / "run.json").write_text(json.dumps(config()))
    (d / "prompts.jsonl").write_text("".join(json.dumps(p) + "\n" for p in PROMPTS))
    run = subprocess.run([cli, "sweep", "-c", str(d / "run.json"), "--prompts", str(d / "prompts.jsonl"),
                          "--methods", ",".join(METHODS), "--steps", "2", "--out", str(d / "out")],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    return d


def rows(path):
    """results.jsonl as a sorted list of rows, without the shard's row index (cage sweep writes none)."""
    out = [json.loads(line) for line in path.read_text().splitlines()]
    for r in out:
        r.pop("row", None)
    return sorted(out, key=lambda r: json.dumps(r, sort_keys=True))


def assert_same_files(got, want):
    for name in ("sweep.csv", "summary.csv", "pareto.svg", "pareto.png"):
        assert (got / name).read_bytes() == (want / name).read_bytes(), name
    assert rows(got / "results.jsonl") == rows(want / "results.jsonl")
    # run.json, what `cage report` reads, names the same axes, methods and sizes (the config differs: given
    # here as a dict, there as a file).
    manifest = [json.loads((d / "run.json").read_text()) for d in (got, want)]
    for m in manifest:
        m.pop("config")
    assert manifest[0] == manifest[1]


def test_a_sharded_sweep_writes_the_single_process_files(cluster, single, tmp_path):
    # One batch (2 rows) per shard: 6 shards over the 3 engines; the first attempt of one shard fails (retried).
    res = cage.ray.sweep(config(), PROMPTS, METHODS, address=cluster, out=tmp_path, steps=2, shard_size=1,
                         max_retries=1, _fail={"cage[2:4]": 1})
    assert res.workers == 3
    assert res.retried == ["cage[2:4]"]
    assert_same_files(tmp_path, single / "out")
    want = {line.split(",")[0]: line for line in (single / "out" / "summary.csv").read_text().splitlines()[1:]}
    assert {s["method"] for s in res.summary} == set(want)
    for s in res.summary:
        assert want[s["method"]] == f"{s['method']},{s['hv']},{s['mip']}"


def test_a_shard_that_keeps_failing_is_reported_after_the_rest_is_written(cluster, single, tmp_path):
    with pytest.raises(cage.ray.SweepFailed) as e:
        cage.ray.sweep(config(), PROMPTS, METHODS, address=cluster, out=tmp_path, steps=2, max_retries=1,
                       _fail={"linear[4:6]": 2})
    [failed] = e.value.failed
    assert failed["shard"] == "linear[4:6]" and failed["method"] == "linear"
    assert failed["weights"] == [[0.0, 1.0]] and failed["prompts"] == PROMPTS
    assert "injected failure of shard linear[4:6]" in failed["error"]
    assert "linear[4:6]" in str(e.value)
    assert [json.loads(line)["shard"] for line in (tmp_path / "failed.jsonl").read_text().splitlines()] == [
        "linear[4:6]"]
    # Every other row is there, as the single process decoded it; no merged file from an incomplete sweep.
    others = [r for r in rows(single / "out" / "results.jsonl")
              if not (r["method"] == "linear" and r["weights"] == [0.0, 1.0])]
    assert rows(tmp_path / "results.jsonl") == others
    assert not (tmp_path / "sweep.csv").exists()


def test_the_command_line(cluster, single, tmp_path):
    cmd = [sys.executable, "-m", "cage.ray", "-c", str(single / "run.json"), "--prompts",
           str(single / "prompts.jsonl"), "--methods", ",".join(METHODS), "--steps", "2", "--address", cluster]
    run = subprocess.run([*cmd, "--out", str(tmp_path / "out")], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    assert_same_files(tmp_path / "out", single / "out")
    bad = subprocess.run([*cmd, "--out", str(tmp_path / "bad"), "--methods", "cage,nope"], capture_output=True,
                         text=True, timeout=300)
    assert bad.returncode == 1 and "nope" in bad.stderr, bad.stderr
