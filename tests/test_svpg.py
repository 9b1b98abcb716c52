"""svpg.py: the RBF kernel (symmetric, diagonal 1, its gradient against autograd), the median-heuristic
bandwidth against a direct computation, the SVGD direction against a double loop over particles written
from equation (8) (and with one particle: the plain gradient over α), the batched particle layers against
n separate Linear layers; smoke, save/evaluate, bad input (in-process and from the command line); learning
on CartPole-v1 (best particle and particle mean)."""

import itertools
import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from conftest import ALGOS_DIR, TINY, load, run

TINY = TINY["svpg"]
SCRIPT = os.path.join(ALGOS_DIR, "svpg.py")
F64 = torch.float64


def finite(x):
    return isinstance(x, (int, float)) and math.isfinite(x)


def particles(n, d, seed, scale=1.0):
    gen = torch.Generator().manual_seed(seed)
    return scale * torch.randn(n, d, generator=gen, dtype=F64), torch.randn(n, d, generator=gen, dtype=F64)


# ---------------------------------------------------------------- math: the kernel (5)-(7)


@pytest.mark.parametrize("n,d", [(2, 1), (3, 7), (6, 40)])
def test_rbf_kernel_is_symmetric_with_unit_diagonal_and_its_gradient_is_autograds(n, d):
    svpg = load("svpg")
    theta, _ = particles(n, d, seed=n)
    h = torch.tensor(0.7 * d, dtype=F64)
    k, grad_k = svpg.rbf_kernel(theta, h)
    torch.testing.assert_close(k, k.T, rtol=0, atol=0)
    assert (k.diagonal() == 1).all() and (k > 0).all() and (k <= 1).all()
    for j, i in itertools.product(range(n), range(n)):
        assert k[j, i].item() == pytest.approx(math.exp(-sum((theta[j] - theta[i]) ** 2).item() / h.item()), rel=1e-12)
        first = theta[j].clone().requires_grad_(True)
        torch.exp(-((first - theta[i]) ** 2).sum() / h).backward()  # k(θ_j, θ_i), differentiated in θ_j
        torch.testing.assert_close(grad_k[j, i], first.grad, rtol=1e-10, atol=1e-14)


@pytest.mark.parametrize("n", [2, 3, 4, 5, 8])
def test_median_bandwidth_against_a_direct_computation(n):
    """h = med² / log n, med the median of the distances between distinct particles (odd and even counts)."""
    theta, _ = particles(n, 9, seed=10 + n, scale=3.0)
    distances = [math.sqrt(sum((theta[i, k].item() - theta[j, k].item()) ** 2 for k in range(9)))
                 for i in range(n) for j in range(i + 1, n)]
    want = float(np.median(distances)) ** 2 / math.log(n)
    assert load("svpg").median_bandwidth(theta).item() == pytest.approx(want, rel=1e-10)


def test_bandwidth_of_coinciding_particles_stays_finite():
    svpg = load("svpg")
    theta = torch.ones(3, 5, dtype=F64)
    grads = torch.randn(3, 5, dtype=F64)
    delta, h = svpg.svgd_direction(theta, grads, 2.0)
    assert torch.isfinite(h) and torch.isfinite(delta).all()
    torch.testing.assert_close(delta, grads.mean(0).expand(3, 5) / 2.0)  # k = 1 everywhere, no repulsion


# ---------------------------------------------------------------- math: the SVGD direction (8)


def slow_svgd(theta, grads, alpha, h):
    """Equation (8) for each particle i, summing over j, the kernel's gradient by autograd."""
    n = len(theta)
    out = torch.zeros_like(theta)
    for i in range(n):
        for j in range(n):
            first = theta[j].clone().requires_grad_(True)
            k = torch.exp(-((first - theta[i]) ** 2).sum() / h)
            (grad_k,) = torch.autograd.grad(k, first)
            out[i] += grads[j] * k.detach() / alpha + grad_k
        out[i] /= n
    return out


@pytest.mark.parametrize("n,d,alpha,scale", [(2, 3, 1.0, 1.0), (4, 10, 10.0, 0.3), (5, 30, 0.1, 2.0),
                                             (8, 20, 100.0, 1.0)])
def test_svgd_direction_matches_a_double_loop(n, d, alpha, scale):
    svpg = load("svpg")
    theta, grads = particles(n, d, seed=d, scale=scale)
    delta, h = svpg.svgd_direction(theta, grads, alpha)  # median heuristic
    torch.testing.assert_close(h, svpg.median_bandwidth(theta))
    torch.testing.assert_close(delta, slow_svgd(theta, grads, alpha, h), rtol=1e-10, atol=1e-12)
    fixed = torch.tensor(5.0, dtype=F64)  # and a given bandwidth
    delta, h = svpg.svgd_direction(theta, grads, alpha, fixed)
    assert h is fixed
    torch.testing.assert_close(delta, slow_svgd(theta, grads, alpha, fixed), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("alpha", [0.5, 1.0, 10.0])
def test_one_particle_is_the_plain_gradient_over_alpha(alpha):
    """k(θ, θ) = 1 and ∇k(θ, θ) = 0: no repulsion, Δθ = ĝ / α."""
    theta, grads = particles(1, 12, seed=3)
    delta, _ = load("svpg").svgd_direction(theta, grads, alpha)
    torch.testing.assert_close(delta, grads / alpha, rtol=1e-12, atol=0)


def test_repulsion_pushes_particles_apart():
    """Without policy gradients each particle moves away from the others (the distance grows)."""
    svpg = load("svpg")
    theta, _ = particles(5, 6, seed=4)
    delta, _ = svpg.svgd_direction(theta, torch.zeros_like(theta), 1.0)
    assert torch.pdist(theta + 1e-3 * delta).mean() > torch.pdist(theta).mean()
    two = torch.tensor([[0.0, 0.0], [1.0, 0.0]], dtype=F64)
    delta, _ = svpg.svgd_direction(two, torch.zeros_like(two), 1.0)
    assert delta[0, 0] < 0 < delta[1, 0] and (delta[:, 1] == 0).all()


# ---------------------------------------------------------------- the batched particles


def test_particle_layers_are_independent_linear_layers():
    """Row i of every ParticleLinear is particle i's Linear layer: outputs match x_i W_i + b_i, a loss of
    particle i has gradient in row i only, and each particle's weights are initialised like layer_init's."""
    svpg = load("svpg")
    torch.manual_seed(0)
    layer = svpg.ParticleLinear(3, 5, 4)
    x = torch.randn(3, 2, 6, 5)
    y = layer(x)
    assert y.shape == (3, 2, 6, 4)
    for i in range(3):
        torch.testing.assert_close(y[i], x[i] @ layer.weight[i] + layer.bias[i])
        w = layer.weight[i].detach()  # [in, out]: orthogonal columns of norm √2, as orthogonal_ on [out, in]
        torch.testing.assert_close(w.T @ w if w.shape[0] >= w.shape[1] else w @ w.T, 2 * torch.eye(min(w.shape)),
                                   rtol=1e-5, atol=1e-5)
    y[1].sum().backward()
    assert (layer.weight.grad[[0, 2]] == 0).all() and (layer.weight.grad[1] != 0).any()
    assert not torch.equal(layer.weight[0], layer.weight[1])  # distinct particles


def test_numpy_copy_of_the_policy_matches_torch():
    svpg = load("svpg")
    torch.manual_seed(0)
    agent = svpg.Agent(3, 5, 2)
    for p in agent.parameters():
        torch.nn.init.normal_(p)
    x = np.random.default_rng(0).normal(size=(3, 7, 5)).astype(np.float32)
    with torch.no_grad():
        expected = agent.actor(torch.as_tensor(x)).numpy()
    np.testing.assert_allclose(svpg.numpy_mlp(agent.actor)(x), expected, rtol=1e-5, atol=1e-5)
    for i in range(3):
        np.testing.assert_allclose(svpg.numpy_mlp(agent.actor, i)(x[i]), expected[i], rtol=1e-5, atol=1e-5)


def test_nstep_returns_are_a2cs():
    """svpg.py copies a2c.py's n-step returns (tested against slow loops in test_math.py); on [T, n, N]."""
    rng = np.random.default_rng(0)
    T, n, N = 9, 3, 4
    rewards = rng.normal(size=(T, n, N)).astype(np.float32)
    values = rng.normal(size=(T + 1, n, N)).astype(np.float32)
    term = (rng.random((T, n, N)) < 0.15).astype(np.float32)
    trunc = (rng.random((T, n, N)) < 0.15).astype(np.float32)
    got = load("svpg").nstep_returns(rewards, values, term, trunc, 0.97)
    flat = [x.reshape(len(x), -1) for x in (rewards, values, term, trunc)]
    np.testing.assert_array_equal(got.reshape(T, -1), load("a2c").nstep_returns(*flat, 0.97))


# ---------------------------------------------------------------- smoke


def test_runs_and_writes_summary():
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    summary = run("svpg", **TINY)
    with open(os.path.join(summary["run_dir"], "summary.json")) as f:
        assert json.load(f) == summary
    assert summary["algorithm"] == "svpg" and summary["stopped"] is None
    defaults = load("svpg").Args()
    batch = defaults.num_particles * defaults.num_envs * defaults.num_steps
    assert summary["global_step"] == TINY["total_timesteps"] // batch * batch
    for key in ["wall_seconds", "SPS", "mean_return", "best_return"]:
        assert finite(summary[key]), (key, summary[key])
    returns = summary["particle_returns"]
    assert len(returns) == defaults.num_particles and all(finite(r) for r in returns)
    assert summary["mean_return"] == pytest.approx(np.mean(returns)) and summary["best_return"] == max(returns)
    assert 0 < summary["episodes_in_mean"] <= 20
    tags = set(EventAccumulator(summary["run_dir"]).Reload().Tags()["scalars"])
    for key in ["losses/policy_loss", "losses/value_loss", "losses/entropy", "charts/learning_rate", "charts/SPS",
                "charts/episodic_return", "charts/particle_mean_return", "charts/particle_best_return",
                "charts/particle_distance", "charts/kernel_bandwidth",
                *[f"charts/particle_{i}_return" for i in range(defaults.num_particles)]]:
        assert key in tags, key


def test_same_seed_same_returns():
    a, b, c = run("svpg", seed=3, **TINY), run("svpg", seed=3, **TINY), run("svpg", seed=4, **TINY)
    assert (a["particle_returns"], a["episodes"]) == (b["particle_returns"], b["episodes"])
    assert (a["particle_returns"], a["episodes"]) != (c["particle_returns"], c["episodes"])


def test_save_and_evaluate(capsys):
    summary = run("svpg", save_model=True, num_particles=3, **TINY)
    path = os.path.join(summary["run_dir"], "svpg.pt")
    ckpt = torch.load(path, weights_only=True)
    assert ckpt["algorithm"] == "svpg" and "model" in ckpt
    best = int(np.argmax(summary["particle_returns"]))
    assert ckpt["best_particle"] == best
    result = run("svpg", eval_checkpoint=path, eval_episodes=2)  # 3 particles, from the checkpoint
    assert result["mode"] == "eval" and result["episodes"] == 2 and finite(result["mean_return"])
    assert result["particle"] == best
    assert "mean return" in capsys.readouterr().out
    with pytest.raises(SystemExit) as e:
        run("a2c", eval_checkpoint=path)
    assert e.value.code == 2


def expect_refusal(capsys, must_mention, **overrides):
    with pytest.raises(SystemExit) as e:
        run("svpg", **overrides)
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:"), err
    assert must_mention in err[0], err[0]
    assert not os.path.exists("runs"), "a refused run must not create runs/"


def test_bad_input(capsys):
    expect_refusal(capsys, "--num-particles", num_particles=1)
    expect_refusal(capsys, "--num-particles", num_particles=0)
    expect_refusal(capsys, "--temperature", temperature=0.0)
    expect_refusal(capsys, "--temperature", temperature=float("inf"))
    expect_refusal(capsys, "--max-grad-norm", max_grad_norm=0.0)
    expect_refusal(capsys, "ppo_continuous.py", env_id="Pendulum-v1")
    expect_refusal(capsys, "NoSuchEnv-v0", env_id="NoSuchEnv-v0")
    expect_refusal(capsys, "one batch", total_timesteps=159)  # 4 particles x 8 envs x 5 steps = 160
    torch.save({"algorithm": "a2c", "args": {"env_id": "CartPole-v1"}}, "a2c.pt")
    expect_refusal(capsys, "a2c", eval_checkpoint="a2c.pt")


def test_bad_input_from_the_command_line(in_tmp_dir):
    for flags, must_mention in [(["--num-particles", "1"], "--num-particles"), (["--temperature", "-1"], "--temperature"),
                                (["--env-id", "Pendulum-v1"], "Box"), (["--env-id", "NoSuchEnv-v0"], "NoSuchEnv-v0")]:
        proc = subprocess.run([sys.executable, SCRIPT, *flags], capture_output=True, text=True, timeout=120)
        lines = proc.stderr.strip().splitlines()
        assert proc.returncode == 2 and len(lines) == 1 and must_mention in lines[0], proc.stderr
        assert "Traceback" not in proc.stderr
        assert not os.path.exists("runs")


# ---------------------------------------------------------------- learning


@pytest.mark.learning
def test_learns_cartpole():
    summary = run("svpg", seed=1)
    print(f"svpg: particles' last-20 means {summary['particle_returns']}, mean {summary['mean_return']:.1f}, "
          f"best {summary['best_return']:.1f}, {summary['global_step']:,} steps, {summary['wall_seconds']:.0f} s")
    assert summary["episodes_in_mean"] == 20
    assert summary["best_return"] >= 475.0
    assert summary["mean_return"] >= 300.0
