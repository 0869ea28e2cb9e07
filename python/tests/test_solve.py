"""cage.solve on numpy arrays against the `cage solve` command (same games as JSON, f64) and the equilibrium
conditions of docs/model.md checked in numpy; bad inputs raise ValueError with the command's message."""

import json
import subprocess
import sys

import numpy as np
import pytest

import cage


def random_game(rng: np.random.Generator, n: int, j: int, excluded: int = 1):
    base = rng.normal(-2.0, 1.5, n)
    base[rng.choice(n, excluded, replace=False)] = -np.inf
    values = rng.normal(0.0, 1.0, (j, n))
    weights = rng.uniform(0.0, 1.0, j)
    return base, values, weights


def game_json(base, values, weights, tau, names=None):
    return {
        "tau": tau,
        "base_logprobs": [None if np.isneginf(b) else float(b) for b in base],
        "normalize": "shift_min",
        "principals": [
            {**({"name": names[p]} if names else {}), "weight": float(weights[p]), "values": values[p].tolist()}
            for p in range(len(weights))
        ],
    }


def run_cli(cli, games, method="exact", precision="f64", backend="cpu"):
    out = subprocess.run(
        [cli, "solve", "-i", "-", "--method", method, "--precision", precision, "--backend", backend],
        input=json.dumps(games), capture_output=True, text=True,
    )
    return out


def check_equilibrium(base, values, weights, tau, s, tol):
    """pi ~ pi0 exp(Y / tau), y_j = max(v_j - f_j - tau, 0) and f_j = pi . (v_j - y_j) on the active candidates."""
    active = np.isfinite(base)
    v = (values - values[:, active].min(axis=1, keepdims=True)) * weights[:, None]
    v[:, ~active] = 0.0
    y = np.maximum(v - s.payoffs[:, None] - tau, 0.0)
    y[:, ~active] = 0.0
    np.testing.assert_allclose(s.incentives, y, atol=tol)
    np.testing.assert_allclose(s.aggregate_incentive, y.sum(0), atol=tol)
    z = np.where(active, base + y.sum(0) / tau, -np.inf)
    pi = np.exp(z - z.max())
    pi /= pi.sum()
    np.testing.assert_allclose(s.policy, pi, atol=tol)
    np.testing.assert_allclose(s.payoffs, ((v - y) * s.policy).sum(1), atol=tol)


@pytest.mark.parametrize("method", ["exact", "jacobi", "linear", "base"])
def test_random_games_match_the_command_line(cli, method):
    rng = np.random.default_rng(7)
    games = [random_game(rng, n, j) + (tau,) for n, j, tau in [(5, 1, 0.1), (12, 2, 0.05), (50, 3, 0.2), (8, 4, 1.0)]]
    ref = run_cli(cli, [game_json(*g) for g in games], method)
    assert ref.returncode == 0, ref.stderr
    ref = json.loads(ref.stdout)
    for (base, values, weights, tau), r in zip(games, ref):
        s = cage.solve(base, values, weights, tau=tau, method=method, backend="cpu")
        # The command solves the games of a file as one batch; iterative methods may stop a pass apart there, within
        # their tolerance (1e-11 of the value scale).
        atol = 1e-12 if method != "jacobi" else 1e-9
        np.testing.assert_allclose(s.policy, r["policy"], rtol=0, atol=atol)
        np.testing.assert_allclose(s.incentives, r["incentives"], rtol=0, atol=atol)
        np.testing.assert_allclose(s.payoffs, r["payoffs"], rtol=0, atol=atol)
        np.testing.assert_allclose(s.aggregate_incentive, r["aggregate_incentive"], rtol=0, atol=atol)
        assert s.converged == r["converged"]
        assert s.policy.shape == base.shape and s.incentives.shape == values.shape
        if method in ("exact", "jacobi"):
            check_equilibrium(base, values, weights, tau, s, 1e-8)


def test_a_batch_equals_its_rows_and_keeps_the_batch_shape():
    rng = np.random.default_rng(11)
    n, j, b = 20, 2, 5
    rows = [random_game(rng, n, j, excluded=2) for _ in range(b)]
    base, values, weights = (np.stack([r[k] for r in rows]) for k in range(3))
    taus = np.array([0.05, 0.1, 0.2, 0.5, 1.0])
    s = cage.solve(base, values, weights, tau=taus, backend="cpu")
    assert s.policy.shape == (b, n) and s.incentives.shape == (b, j, n) and s.payoffs.shape == (b, j)
    assert s.iterations.shape == s.residual.shape == s.converged.shape == (b,)
    for i in range(b):
        one = cage.solve(base[i], values[i], weights[i], tau=float(taus[i]), backend="cpu")
        np.testing.assert_array_equal(s.policy[i], one.policy)
        np.testing.assert_array_equal(s.incentives[i], one.incentives)
        check_equilibrium(base[i], values[i], weights[i], taus[i], one, 1e-8)


def test_f32_is_solved_in_f32_and_agrees_with_f64():
    rng = np.random.default_rng(3)
    base, values, weights = random_game(rng, 50, 2)
    s64 = cage.solve(base, values, weights, backend="cpu")
    s32 = cage.solve(base.astype(np.float32), values.astype(np.float32), weights.astype(np.float32), backend="cpu")
    assert s32.policy.dtype == np.float32 and s64.policy.dtype == np.float64
    # f32 stops at 1e-5 of the value scale (the policy moves more than that near the fixed point).
    np.testing.assert_allclose(s32.policy, s64.policy, atol=3e-4)


def test_the_emulated_device_path_matches_the_host_solver():
    """The CUDA-tensor path (device preprocessing, the copy-free entry point) on host arrays and the emulation."""
    from cage import _device

    rng = np.random.default_rng(5)
    rows = [random_game(rng, 16, 2, excluded=3) for _ in range(3)]
    base, values, weights = (np.stack([r[k] for r in rows]).astype(np.float32) for k in range(3))
    d = _device.solve_emulated(base, values, weights, 0.1)
    h = cage.solve(base, values, weights, tau=0.1, backend="cpu")
    np.testing.assert_allclose(d.policy, h.policy, atol=1e-4)
    np.testing.assert_allclose(d.payoffs, h.payoffs, atol=1e-4)
    np.testing.assert_allclose(d.incentives, h.incentives, atol=1e-4)
    np.testing.assert_allclose(d.aggregate_incentive, h.aggregate_incentive, atol=1e-4)
    assert d.converged.all()
    one = _device.solve_emulated(base[1], values[1], weights[1], 0.1)
    np.testing.assert_allclose(one.policy, h.policy[1], atol=1e-4)


class Foreign:
    """A CPU array of another library: only the DLPack protocol."""

    def __init__(self, a):
        self.a = a

    def __dlpack__(self, **kw):
        return self.a.__dlpack__(**kw)

    def __dlpack_device__(self):
        return self.a.__dlpack_device__()


class Unreadable(Foreign):
    def __dlpack__(self, **kw):
        raise BufferError("cannot export this")


def test_dlpack_inputs_are_read_in_place_and_solve_alike():
    rng = np.random.default_rng(9)
    base, values, weights = random_game(rng, 30, 2)
    assert np.shares_memory(cage._host(Foreign(values)), values)
    s = cage.solve(Foreign(base), Foreign(values), Foreign(weights), backend="cpu")
    np.testing.assert_array_equal(s.policy, cage.solve(base, values, weights, backend="cpu").policy)
    with pytest.raises(ValueError, match=r"weights cannot be read through DLPack \(cannot export this\)"):
        cage.solve(Foreign(base), Foreign(values), Unreadable(weights))


def test_torch_tensors_if_installed():
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(4)
    base, values, weights = random_game(rng, 30, 2)
    t = [torch.from_numpy(x) for x in (base, values, weights)]
    s = cage.solve(*t, backend="cpu")
    np.testing.assert_array_equal(s.policy, cage.solve(base, values, weights, backend="cpu").policy)
    with pytest.raises(ValueError, match="values cannot be read through DLPack"):
        cage.solve(t[0], t[1].requires_grad_(), t[2], backend="cpu")


class FakeCudaArray(Foreign):
    def __dlpack_device__(self):
        return (2, 0)


def cli_error(cli, game, backend="cpu"):
    out = run_cli(cli, game, backend=backend)
    assert out.returncode != 0
    return out.stderr


def test_bad_inputs_raise_value_errors_with_the_command_lines_messages(cli):
    base, values, weights = np.array([-0.1, -2.3, -np.inf]), np.array([[1.0, 0.2, 0.0]]), np.array([0.5])
    cases = [
        (dict(tau=-1.0), {**game_json(base, values, weights, -1.0)}),
        (dict(weights=np.array([-0.5])), game_json(base, values, np.array([-0.5]), 0.1, names=["helpful"])),
    ]
    for override, game in cases:
        args = dict(base_logprobs=base, values=values, weights=weights, tau=0.1, backend="cpu", names=["helpful"])
        args.update(override)
        with pytest.raises(ValueError) as e:
            cage.solve(**args)
        assert str(e.value) in cli_error(cli, game)
    nan_values = np.array([[1.0, np.nan, 0.0]])
    with pytest.raises(ValueError, match="non-finite number in values of principal \"helpful\""):
        cage.solve(base, nan_values, weights, names=["helpful"])
    game = game_json(base, values, weights, 0.1, names=["helpful"])
    game["principals"][0]["values"][1] = "nan"
    with pytest.raises(ValueError) as e:
        cage.solve(base, nan_values, weights, names=["helpful"])
    assert str(e.value) in cli_error(cli, game)
    with pytest.raises(ValueError, match=r'unknown method "fast" \(expected one of exact, jacobi, paper, base, linear\)'):
        cage.solve(base, values, weights, method="fast")
    with pytest.raises(ValueError, match="unknown backend"):
        cage.solve(base, values, weights, backend="tpu")


@pytest.mark.parametrize(
    "args, message",
    [
        ((np.zeros(4), np.zeros((2, 3)), np.ones(2)), r"values must have shape \[J, N\] = \[J, 4\] for one row, got \[2, 3\]"),
        ((np.zeros(4), np.zeros((2, 4)), np.ones(3)), r"weights must have shape \[J\] = \[2\]"),
        ((np.zeros((2, 4)), np.zeros((2, 4)), np.ones(2)), r"values must have shape \[B, J, N\]"),
        ((np.zeros((1, 2, 4)), np.zeros((2, 4)), np.ones(2)), r"base_logprobs must have shape \[N\] \(one row\)"),
        ((np.zeros(4), np.zeros((2, 8))[:, ::2], np.ones(2)), r"values is not C-contiguous"),
        ((np.zeros(4, np.float32), np.zeros((2, 4)), np.ones(2)), r"values has dtype float64 but base_logprobs has dtype float32"),
        ((np.zeros(4, np.int64), np.zeros((2, 4)), np.ones(2)), r"base_logprobs must have dtype float32 or float64, got int64"),
        ((np.zeros(4), "x", np.ones(2)), r"values must be a numpy array"),
        ((np.full(4, -np.inf), np.zeros((1, 4)), np.ones(1)), r"empty candidate set in row 0"),
        ((np.zeros(0), np.zeros((1, 0)), np.ones(1)), r"empty candidate set"),
        ((np.array([0.0, np.inf]), np.zeros((1, 2)), np.ones(1)), r"non-finite number in base_logprobs at index 1: inf"),
        ((FakeCudaArray(np.zeros(4)), np.zeros((1, 4)), np.ones(1)), r"on a GPU"),
        ((np.zeros(4), FakeCudaArray(np.zeros((1, 4))), np.ones(1)), r"values is on a GPU but base_logprobs is not"),
    ],
)
def test_malformed_arrays_are_value_errors(args, message):
    with pytest.raises(ValueError, match=message):
        cage.solve(*args)


def test_a_bad_tau_array_is_a_value_error():
    with pytest.raises(ValueError, match=r"tau must have shape \[\] or \[B\] = \[2\], got \[3\]"):
        cage.solve(np.zeros((2, 3)), np.zeros((2, 1, 3)), np.ones((2, 1)), tau=np.ones(3))
    with pytest.raises(ValueError, match="tau must be a number"):
        cage.solve(np.zeros(3), np.zeros((1, 3)), np.ones(1), tau="warm")


def test_backend_cuda_without_a_gpu_is_the_command_lines_error_and_emulation_runs_the_kernels(cli):
    rng = np.random.default_rng(12)
    base, values, weights = random_game(rng, 20, 2)
    if not cage.cuda_available():
        with pytest.raises(RuntimeError) as e:
            cage.solve(base, values, weights, backend="cuda")
        assert str(e.value) in cli_error(cli, game_json(base, values, weights, 0.1), backend="cuda")
    emu = cage.solve(base, values, weights, backend="emulation")
    cpu = cage.solve(base, values, weights, backend="cpu")
    np.testing.assert_allclose(emu.policy, cpu.policy, atol=3e-4)
    assert emu.converged


def test_importing_cage_loads_neither_torch_nor_transformers():
    code = "import sys, cage; print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
