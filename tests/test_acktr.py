"""acktr.py: the Kronecker factors against per-sample loops; the Fisher of one sample equal to the
Kronecker product of its factors; the preconditioned gradient against an explicit Kronecker solve
(with the same damped factors); the trust-region step size against the explicit block-diagonal
K-FAC matrix; the sampled Fisher against the model's exact Fisher; smoke, save/evaluate, bad input
(in-process and from the command line); learning on CartPole-v1."""

import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn as nn

from conftest import ALGOS_DIR, TINY, load, run

TINY = TINY["acktr"]
SCRIPT = os.path.join(ALGOS_DIR, "acktr.py")
F64 = torch.float64


def finite(x):
    return isinstance(x, (int, float)) and math.isfinite(x)


def random_spd(n, gen, scale=1.0):
    m = torch.randn(n, 2 * n, generator=gen, dtype=F64)
    return scale * (m @ m.T / (2 * n) + 0.1 * torch.eye(n, dtype=F64))


def damped(A, G, damping):
    """Equation (9) written out: π from the factors' mean eigenvalues (traces / dims)."""
    pi = math.sqrt((torch.trace(A).item() / len(A)) / (torch.trace(G).item() / len(G)))
    return A + pi * math.sqrt(damping) * torch.eye(len(A), dtype=F64), G + math.sqrt(damping) / pi * torch.eye(
        len(G), dtype=F64)


# ---------------------------------------------------------------- math: the factors (6)


def test_kfac_factors_match_a_loop():
    gen = torch.Generator().manual_seed(0)
    for batch, n_in, n_out in [(1, 3, 2), (7, 4, 3), (50, 6, 5)]:
        a = torch.randn(batch, n_in, generator=gen, dtype=F64)
        g = torch.randn(batch, n_out, generator=gen, dtype=F64)
        A, G = load("acktr").kfac_factors(a, g)
        A_loop, G_loop = torch.zeros(n_in + 1, n_in + 1, dtype=F64), torch.zeros(n_out, n_out, dtype=F64)
        for i in range(batch):
            a_bar = torch.cat([a[i], torch.ones(1, dtype=F64)])
            A_loop += torch.outer(a_bar, a_bar) / batch
            G_loop += torch.outer(g[i], g[i]) / batch
        torch.testing.assert_close(A, A_loop, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(G, G_loop, rtol=1e-12, atol=1e-12)


def test_fisher_of_one_sample_is_the_kronecker_product_of_its_factors():
    """One sample: the gradient of [W | b] is g āᵀ, and vec(g āᵀ) vec(g āᵀ)ᵀ = G ⊗ A exactly, with vec
    stacking rows (torch's flatten): the convention of (9)."""
    acktr = load("acktr")
    gen = torch.Generator().manual_seed(1)
    layer = nn.Linear(4, 3).double()
    x = torch.randn(1, 4, generator=gen, dtype=F64)
    out_grad = torch.randn(1, 3, generator=gen, dtype=F64)
    (layer(x) * out_grad).sum().backward()
    grad = torch.cat([layer.weight.grad, layer.bias.grad[:, None]], 1).flatten()
    A, G = acktr.kfac_factors(x, out_grad)
    torch.testing.assert_close(torch.outer(grad, grad), torch.kron(G, A), rtol=1e-12, atol=1e-12)


def test_layer_inputs_and_outputs_and_per_sample_gradients():
    """forward_with_layers returns each Linear's input and output; the gradient of a sum of per-sample
    terms at an output is, row by row, each sample's own gradient; and E[g āᵀ] is the layer's gradient."""
    acktr = load("acktr")
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 2)).double()
    x = torch.randn(6, 3, dtype=F64)
    y, inputs, outputs = acktr.forward_with_layers(net, x)
    torch.testing.assert_close(y, net(x))
    torch.testing.assert_close(inputs[0], x)
    torch.testing.assert_close(outputs[0], net[0](x))
    torch.testing.assert_close(inputs[1], torch.tanh(net[0](x)))
    per_sample = (y ** 2).sum(-1) * torch.arange(1.0, 7.0, dtype=F64)
    grads = torch.autograd.grad(per_sample.sum(), outputs, retain_graph=True)
    for i in range(6):
        one = torch.autograd.grad(per_sample[i], outputs[0], retain_graph=True)[0]
        torch.testing.assert_close(grads[0][i], one[i])
        assert (one[torch.arange(6) != i] == 0).all()
    per_sample.mean().backward()
    a_bar = torch.cat([inputs[1], torch.ones(6, 1, dtype=F64)], 1)
    torch.testing.assert_close(torch.cat([net[2].weight.grad, net[2].bias.grad[:, None]], 1), grads[1].T @ a_bar / 6)


# ---------------------------------------------------------------- math: the preconditioned gradient (8), (9)


@pytest.mark.parametrize("damping", [0.0, 1e-3, 0.01, 0.5])
def test_preconditioned_gradient_matches_explicit_kronecker_products(damping):
    acktr = load("acktr")
    gen = torch.Generator().manual_seed(2)
    for n_in, n_out, scale in [(3, 2, 1.0), (4, 3, 50.0), (6, 4, 0.01)]:
        A, G = random_spd(n_in + 1, gen, scale), random_spd(n_out, gen)
        grad = torch.randn(n_out, n_in + 1, generator=gen, dtype=F64)
        got = acktr.kfac_precondition(grad, *acktr.damped_inverses(A, G, damping))
        A_d, G_d = damped(A, G, damping)
        want = torch.kron(torch.linalg.inv(G_d), torch.linalg.inv(A_d)) @ grad.flatten()
        torch.testing.assert_close(got.flatten(), want, rtol=1e-9, atol=1e-10)
        solved = torch.linalg.solve(torch.kron(G_d, A_d), grad.flatten())  # F̂ ĝ = vec(∇W)
        torch.testing.assert_close(got.flatten(), solved, rtol=1e-9, atol=1e-10)


def test_damping_does_not_depend_on_the_factors_scales():
    """A → cA, G → G/c leaves A ⊗ G, and with π the damped product and so ĝ, unchanged."""
    acktr = load("acktr")
    gen = torch.Generator().manual_seed(3)
    A, G = random_spd(5, gen), random_spd(3, gen)
    grad = torch.randn(3, 5, generator=gen, dtype=F64)
    base = acktr.kfac_precondition(grad, *acktr.damped_inverses(A, G, 0.01))
    for c in (1e-3, 10.0, 1e4):
        torch.testing.assert_close(acktr.kfac_precondition(grad, *acktr.damped_inverses(c * A, G / c, 0.01)), base,
                                   rtol=1e-8, atol=1e-12)


# ---------------------------------------------------------------- math: the trust region (10), (11)


def test_step_size_against_the_explicit_kfac_matrix():
    """ε = min(η, √(2δ / ĝᵀF̂ĝ)) with F̂ the block-diagonal matrix of the damped Kronecker products of two
    layers, built explicitly; the predicted KL ½ ε² ĝᵀF̂ĝ is δ when the bound binds and below it otherwise."""
    acktr = load("acktr")
    gen = torch.Generator().manual_seed(4)
    shapes = [(4, 3), (3, 2)]  # (in + 1, out)
    factors = [(random_spd(i, gen), random_spd(o, gen)) for i, o in shapes]
    grads = [torch.randn(o, i, generator=gen, dtype=F64) for i, o in shapes]
    inverses = [acktr.damped_inverses(A, G, 0.01) for A, G in factors]
    natural = [acktr.kfac_precondition(g, a_inv, g_inv) for g, (a_inv, g_inv) in zip(grads, inverses)]
    F_hat = torch.block_diag(*[torch.kron(G_d, A_d) for A_d, G_d in (damped(A, G, 0.01) for A, G in factors)])
    g_hat = torch.cat([n.flatten() for n in natural])
    quadratic = g_hat @ F_hat @ g_hat
    torch.testing.assert_close(g_hat, torch.linalg.solve(F_hat, torch.cat([g.flatten() for g in grads])))
    bound_binds = 0
    for eta in (0.01, 0.25, 10.0):
        for delta in (1e-4, 1e-3, 0.1, 100.0):
            eps, q = acktr.trust_region_step_size(grads, natural, eta, delta)
            torch.testing.assert_close(q, quadratic, rtol=1e-10, atol=0.0)
            want = min(eta, math.sqrt(2 * delta / quadratic.item()))
            assert eps.item() == pytest.approx(want, rel=1e-10)
            kl = 0.5 * eps.item() ** 2 * quadratic.item()
            assert kl <= delta * (1 + 1e-10)
            if eps.item() < eta:
                bound_binds += 1
                assert kl == pytest.approx(delta, rel=1e-10)
    assert 0 < bound_binds < 12


def test_step_size_bounds_the_exact_kl_of_a_small_policy_step():
    """A softmax over the logits W ā of one sample: there the Kronecker product G ⊗ A of its factors is
    the exact Fisher (G = diag(π) − ππᵀ, A = ā āᵀ), and the measured KL of the step -ε ĝ is δ to second
    order."""
    acktr = load("acktr")
    gen = torch.Generator().manual_seed(5)
    a_bar = torch.cat([torch.randn(1, 3, generator=gen, dtype=F64), torch.ones(1, 1, dtype=F64)], 1)
    W = torch.randn(4, 4, generator=gen, dtype=F64)
    p = (a_bar @ W.T).softmax(-1)[0]
    G, A = torch.diag(p) - torch.outer(p, p), a_bar.T @ a_bar
    u = torch.randn(4, generator=gen, dtype=F64)
    grad = torch.outer(u - u.mean(), a_bar[0])  # a gradient of this sample's loss: it lies in the Fisher's range
    g_hat = (torch.linalg.pinv(torch.kron(G, A)) @ grad.flatten()).reshape(4, 4)
    for delta in (1e-7, 1e-6):
        eps, _ = acktr.trust_region_step_size([grad], [g_hat], 1e6, delta)
        new = (a_bar @ (W - eps * g_hat).T).log_softmax(-1)[0]
        kl = (p * (p.log() - new)).sum().item()
        assert kl == pytest.approx(delta, rel=0.02)


# ---------------------------------------------------------------- math: the Fisher of the model (5)


def test_sampled_targets_give_the_fisher_not_the_empirical_fisher():
    """E[g gᵀ] at the logits is diag(π) − ππᵀ (the exact Fisher of the categorical), and at V it is 1
    (the Fisher of N(V, 1)): the targets come from the model, whatever actions the data holds."""
    acktr = load("acktr")
    gen = torch.Generator().manual_seed(6)
    B = 400_000
    logits = torch.tensor([1.0, -0.5, 0.3], dtype=F64).expand(B, 3).clone().requires_grad_(True)
    values = torch.full((B,), 37.0, dtype=F64, requires_grad=True)
    g_logits, g_values = torch.autograd.grad(acktr.sampled_log_likelihood(logits, values, gen), [logits, values])
    p = logits[0].softmax(-1).detach()
    torch.testing.assert_close(g_logits.T @ g_logits / B, torch.diag(p) - torch.outer(p, p), rtol=0, atol=4e-3)
    torch.testing.assert_close(g_logits.mean(0), torch.zeros(3, dtype=F64), rtol=0, atol=4e-3)  # E[∇ log p] = 0
    assert (g_values ** 2).mean().item() == pytest.approx(1.0, abs=0.01)
    assert abs(g_values.mean().item()) < 0.01


def test_nstep_returns_are_a2cs():
    """acktr.py copies a2c.py's n-step returns (tested against slow loops in test_math.py)."""
    rng = np.random.default_rng(0)
    T, N = 9, 5
    rewards = rng.normal(size=(T, N)).astype(np.float32)
    values = rng.normal(size=(T + 1, N)).astype(np.float32)
    term = (rng.random((T, N)) < 0.15).astype(np.float32)
    trunc = (rng.random((T, N)) < 0.15).astype(np.float32)
    np.testing.assert_array_equal(load("acktr").nstep_returns(rewards, values, term, trunc, 0.97),
                                  load("a2c").nstep_returns(rewards, values, term, trunc, 0.97))


def test_numpy_copy_of_the_policy_matches_torch():
    acktr = load("acktr")
    torch.manual_seed(0)
    agent = acktr.Agent(5, 3)
    for p in agent.parameters():
        torch.nn.init.normal_(p)
    x = np.random.default_rng(0).normal(size=(7, 5)).astype(np.float32)
    with torch.no_grad():
        expected = agent.actor(torch.as_tensor(x)).numpy()
    np.testing.assert_allclose(acktr.numpy_mlp(agent.actor)(x), expected, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------- smoke


def test_runs_and_writes_summary():
    summary = run("acktr", **TINY)
    with open(os.path.join(summary["run_dir"], "summary.json")) as f:
        assert json.load(f) == summary
    assert summary["algorithm"] == "acktr" and summary["stopped"] is None
    defaults = load("acktr").Args()
    batch = defaults.num_envs * defaults.num_steps
    assert summary["global_step"] == TINY["total_timesteps"] // batch * batch
    for key in ["wall_seconds", "SPS", "mean_return"]:
        assert finite(summary[key]), (key, summary[key])
    assert summary["episodes"] > 0


def test_same_seed_same_returns():
    a, b, c = run("acktr", seed=3, **TINY), run("acktr", seed=3, **TINY), run("acktr", seed=4, **TINY)
    assert (a["mean_return"], a["episodes"]) == (b["mean_return"], b["episodes"])
    assert (a["mean_return"], a["episodes"]) != (c["mean_return"], c["episodes"])


def test_logs_its_own_keys_and_keeps_the_predicted_kl_within_the_bound():
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    summary = run("acktr", total_timesteps=8000)
    accumulator = EventAccumulator(summary["run_dir"]).Reload()
    tags = set(accumulator.Tags()["scalars"])
    for key in ["losses/policy_loss", "losses/value_loss", "losses/entropy", "losses/approx_kl", "charts/step_size",
                "charts/vf_step_size", "charts/kl_estimate", "charts/learning_rate", "charts/episodic_return",
                "charts/SPS"]:
        assert key in tags, key
    delta = load("acktr").Args().delta
    assert all(e.value <= delta * (1 + 1e-4) for e in accumulator.Scalars("charts/kl_estimate"))
    lr = {e.step: e.value for e in accumulator.Scalars("charts/learning_rate")}
    assert all(e.value <= lr[e.step] * (1 + 1e-6) for e in accumulator.Scalars("charts/step_size"))


def test_save_and_evaluate(capsys):
    summary = run("acktr", save_model=True, **TINY)
    path = os.path.join(summary["run_dir"], "acktr.pt")
    ckpt = torch.load(path, weights_only=True)
    assert ckpt["algorithm"] == "acktr" and "model" in ckpt
    result = run("acktr", eval_checkpoint=path, eval_episodes=2)
    assert result["mode"] == "eval" and result["episodes"] == 2 and finite(result["mean_return"])
    assert "mean return" in capsys.readouterr().out


def expect_refusal(capsys, must_mention, **overrides):
    with pytest.raises(SystemExit) as e:
        run("acktr", **overrides)
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:"), err
    assert must_mention in err[0], err[0]
    assert not os.path.exists("runs"), "a refused run must not create runs/"


def test_bad_input(capsys):
    expect_refusal(capsys, "--delta", delta=0.0)
    expect_refusal(capsys, "--delta", delta=-0.01)
    expect_refusal(capsys, "--vf-delta", vf_delta=0.0)
    expect_refusal(capsys, "--damping", damping=-0.01)
    expect_refusal(capsys, "--stats-decay", stats_decay=1.0)
    expect_refusal(capsys, "--inverse-every", inverse_every=0)
    expect_refusal(capsys, "--learning-rate", learning_rate=0.0)
    expect_refusal(capsys, "ppo_continuous.py", env_id="Pendulum-v1")
    expect_refusal(capsys, "NoSuchEnv-v0", env_id="NoSuchEnv-v0")
    expect_refusal(capsys, "one batch", total_timesteps=159)
    torch.save({"algorithm": "a2c", "args": {"env_id": "CartPole-v1"}}, "a2c.pt")
    expect_refusal(capsys, "a2c", eval_checkpoint="a2c.pt")


def test_bad_input_from_the_command_line(in_tmp_dir):
    for flags, must_mention in [(["--delta", "0"], "--delta"), (["--damping", "-0.1"], "--damping"),
                                (["--env-id", "Pendulum-v1"], "Box"), (["--env-id", "NoSuchEnv-v0"], "NoSuchEnv-v0")]:
        proc = subprocess.run([sys.executable, SCRIPT, *flags], capture_output=True, text=True, timeout=120)
        lines = proc.stderr.strip().splitlines()
        assert proc.returncode == 2 and len(lines) == 1 and must_mention in lines[0], proc.stderr
        assert "Traceback" not in proc.stderr
        assert not os.path.exists("runs")


# ---------------------------------------------------------------- learning


@pytest.mark.learning
def test_learns_cartpole():
    summary = run("acktr", seed=1)
    print(f"acktr: mean return {summary['mean_return']:.1f} over the last {summary['episodes_in_mean']} episodes, "
          f"{summary['global_step']:,} steps, {summary['wall_seconds']:.0f} s")
    assert summary["episodes_in_mean"] == 20
    assert summary["mean_return"] >= 400.0
