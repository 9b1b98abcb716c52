"""trpo.py: conjugate gradient against torch.linalg.solve on random symmetric positive-definite
systems; the Fisher-vector product by double back-propagation against the explicit Hessian of the
mean KL (a tiny policy) and against finite differences of the KL gradient (the script's own
policy); the Gaussian KL against torch.distributions; the line search, which never keeps a step
whose KL exceeds δ and writes θ_old back when it fails; GAE against the slow loop of test_math;
smoke, save/evaluate, bad input (in-process and from the command line); learning on
InvertedPendulum-v4."""

import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn as nn
from torch.func import functional_call

from conftest import ALGOS_DIR, TINY, load, run
from test_math import GAMMA, LAM, check, random_rollout, slow_gae

TINY = TINY["trpo"]
SCRIPT = os.path.join(ALGOS_DIR, "trpo.py")


def finite(x):
    return isinstance(x, (int, float)) and math.isfinite(x)


# ---------------------------------------------------------------- math: conjugate gradient (9)


def random_spd(n, condition, gen):
    """QΛQᵀ with eigenvalues spread between 1 and `condition`, float64."""
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=gen, dtype=torch.float64))
    eigenvalues = torch.logspace(0, math.log10(condition), n, dtype=torch.float64)
    return q @ torch.diag(eigenvalues) @ q.T


@pytest.mark.parametrize("n,condition", [(2, 3.0), (5, 10.0), (20, 100.0), (50, 1000.0)])
def test_conjugate_gradient_solves_spd_systems(n, condition):
    cg = load("trpo").conjugate_gradient
    gen = torch.Generator().manual_seed(n)
    for tolerance in (1e-6, 1e-10):
        for _ in range(5):
            a = random_spd(n, condition, gen)
            b = torch.randn(n, generator=gen, dtype=torch.float64)
            products = []

            def matvec(p):
                products.append(p)
                return a @ p

            x, residual = cg(matvec, b, 10 * n, tolerance)
            true_residual = torch.linalg.norm(b - a @ x).item()
            assert true_residual <= tolerance * (1 + 1e-3) + 1e-12, (true_residual, tolerance)
            assert residual.item() == pytest.approx(true_residual, rel=1e-3, abs=1e-12)
            want = torch.linalg.solve(a, b)
            # ‖x - x*‖ ≤ ‖A⁻¹‖ ‖r‖ and ‖A⁻¹‖ = 1 here
            assert torch.linalg.norm(x - want).item() <= tolerance * (1 + 1e-3) + 1e-12
            assert len(products) <= 10 * n


def test_conjugate_gradient_iteration_budget_and_early_stop():
    """One iteration is the exact line minimisation along b: x = (bᵀb / bᵀAb) b. n distinct
    eigenvalues: exact after n iterations (up to rounding). b = 0: no product is computed."""
    cg = load("trpo").conjugate_gradient
    gen = torch.Generator().manual_seed(0)
    a = random_spd(6, 20.0, gen)
    b = torch.randn(6, generator=gen, dtype=torch.float64)
    x, _ = cg(lambda p: a @ p, b, 1, 0.0)
    torch.testing.assert_close(x, (b @ b) / (b @ a @ b) * b)
    x, residual = cg(lambda p: a @ p, b, 6, 0.0)
    torch.testing.assert_close(x, torch.linalg.solve(a, b), rtol=1e-9, atol=1e-9)
    calls = []
    x, residual = cg(lambda p: calls.append(p) or a @ p, torch.zeros(6, dtype=torch.float64), 10, 1e-10)
    assert calls == [] and (x == 0).all() and residual.item() == 0.0


# ---------------------------------------------------------------- math: the KL (7) and F v (8)


def test_gaussian_kl_matches_torch_distributions():
    trpo = load("trpo")
    gen = torch.Generator().manual_seed(1)
    old_mean, mean = torch.randn(2, 9, 3, generator=gen, dtype=torch.float64)
    old_log_std, log_std = 0.5 * torch.randn(2, 1, 3, generator=gen, dtype=torch.float64)
    want = torch.distributions.kl_divergence(torch.distributions.Normal(old_mean, old_log_std.exp()),
                                             torch.distributions.Normal(mean, log_std.exp())).sum(-1)
    torch.testing.assert_close(trpo.gaussian_kl(old_mean, old_log_std, mean, log_std), want)
    assert (trpo.gaussian_kl(old_mean, old_log_std, old_mean, old_log_std).abs() < 1e-12).all()


class TinyPolicy(nn.Module):
    """The script's policy form (tanh MLP mean, state-independent log-std) small enough for an explicit Hessian."""

    def __init__(self, obs_dim=3, act_dim=2, hidden=4):
        super().__init__()
        self.actor_mean = nn.Sequential(nn.Linear(obs_dim, hidden), nn.Tanh(), nn.Linear(hidden, act_dim))
        self.actor_logstd = nn.Parameter(0.3 * torch.randn(1, act_dim))


def kl_of_flat(policy, obs, old_mean, old_log_std):
    """The mean KL of (6) as a function of one flat parameter vector (for torch.autograd.functional.hessian)."""
    names = [name for name, _ in policy.named_parameters()]
    shapes = [p.shape for p in policy.parameters()]

    def kl(flat):
        tensors, offset = {}, 0
        for name, shape in zip(names, shapes):
            tensors[name] = flat[offset:offset + shape.numel()].reshape(shape)
            offset += shape.numel()
        mean = functional_call(policy.actor_mean, {k[len("actor_mean."):]: v for k, v in tensors.items()
                                                   if k.startswith("actor_mean.")}, (obs,))
        return load("trpo").gaussian_kl(old_mean, old_log_std, mean, tensors["actor_logstd"]).mean()

    return kl


@pytest.mark.parametrize("damping", [0.0, 0.1])
def test_fisher_vector_product_is_the_hessian_of_the_kl(damping):
    trpo = load("trpo")
    torch.manual_seed(0)
    policy = TinyPolicy().double()
    params = list(policy.parameters())
    obs = torch.randn(40, 3, dtype=torch.float64)
    with torch.no_grad():
        old_mean, old_log_std = policy.actor_mean(obs), policy.actor_logstd.clone()
    theta = torch.nn.utils.parameters_to_vector(params).detach()
    hessian = torch.autograd.functional.hessian(kl_of_flat(policy, obs, old_mean, old_log_std), theta)
    assert hessian.shape == (theta.numel(), theta.numel())
    torch.testing.assert_close(hessian, hessian.T)
    assert torch.linalg.eigvalsh(hessian).min() > -1e-10  # a Fisher matrix is positive semi-definite
    kl = trpo.gaussian_kl(old_mean, old_log_std, policy.actor_mean(obs), policy.actor_logstd).mean()
    kl_grad = torch.cat([g.reshape(-1) for g in torch.autograd.grad(kl, params, create_graph=True)])
    assert kl_grad.abs().max() < 1e-12  # θ_old is the KL's minimum
    gen = torch.Generator().manual_seed(1)
    for _ in range(5):  # the graph is kept between products, as in the conjugate gradient
        v = torch.randn(theta.numel(), generator=gen, dtype=torch.float64)
        got = trpo.fisher_vector_product(kl_grad, params, v, damping)
        torch.testing.assert_close(got, hessian @ v + damping * v, rtol=1e-10, atol=1e-10)


def test_fisher_vector_product_of_the_scripts_policy_by_finite_differences():
    """The Agent's full policy (too many parameters for an explicit Hessian): F v equals the central
    difference of the KL gradient along v, (∇KL(θ + εv) - ∇KL(θ - εv)) / 2ε."""
    trpo = load("trpo")
    torch.manual_seed(2)
    agent = trpo.Agent(5, 3).double()
    for p in agent.actor_mean.parameters():  # away from the tiny output init, so a wrong layer shows
        nn.init.normal_(p, std=0.3)
    params = agent.policy_parameters()
    obs = torch.randn(64, 5, dtype=torch.float64)
    with torch.no_grad():
        old_mean, old_log_std = agent.actor_mean(obs), agent.actor_logstd.clone()

    def kl_grad(create_graph=False):
        kl = trpo.gaussian_kl(old_mean, old_log_std, agent.actor_mean(obs), agent.actor_logstd).mean()
        return torch.cat([g.reshape(-1) for g in torch.autograd.grad(kl, params, create_graph=create_graph)])

    theta = torch.nn.utils.parameters_to_vector(params).detach().clone()
    v = torch.randn(theta.numel(), dtype=torch.float64)
    got = trpo.fisher_vector_product(kl_grad(create_graph=True), params, v, 0.0)
    eps = 1e-5
    torch.nn.utils.vector_to_parameters(theta + eps * v, params)
    plus = kl_grad()
    torch.nn.utils.vector_to_parameters(theta - eps * v, params)
    minus = kl_grad()
    torch.nn.utils.vector_to_parameters(theta, params)
    torch.testing.assert_close(got, (plus - minus) / (2 * eps), rtol=1e-5, atol=1e-8)
    assert (got @ v).item() > 0


# ---------------------------------------------------------------- math: the line search (10), (11)


def policy_problem(seed, batch=64):
    """A tiny policy, a batch at θ_old, the surrogate's gradient g and the natural-gradient full step of (10)."""
    trpo = load("trpo")
    torch.manual_seed(seed)
    policy = TinyPolicy().double()
    params = list(policy.parameters())
    obs = torch.randn(batch, 3, dtype=torch.float64)
    with torch.no_grad():
        old_mean, old_log_std = policy.actor_mean(obs), policy.actor_logstd.clone()
        actions = old_mean + old_log_std.exp() * torch.randn(batch, 2, dtype=torch.float64)
        old_logprob = trpo.gaussian_log_prob(actions, old_mean, old_log_std)
    advantages = torch.randn(batch, dtype=torch.float64)

    def mean_kl():
        return trpo.gaussian_kl(old_mean, old_log_std, policy.actor_mean(obs), policy.actor_logstd).mean()

    def evaluate():
        logprob = trpo.gaussian_log_prob(actions, policy.actor_mean(obs), policy.actor_logstd)
        return trpo.surrogate(logprob, old_logprob, advantages).item(), mean_kl().item()

    logprob = trpo.gaussian_log_prob(actions, policy.actor_mean(obs), policy.actor_logstd)
    g = torch.cat([x.reshape(-1) for x in torch.autograd.grad(trpo.surrogate(logprob, old_logprob, advantages),
                                                              params)])
    kl_grad = torch.cat([x.reshape(-1) for x in torch.autograd.grad(mean_kl(), params, create_graph=True)])
    s, _ = trpo.conjugate_gradient(lambda v: trpo.fisher_vector_product(kl_grad, params, v, 0.1), g, 10, 1e-10)
    return policy, params, evaluate, g, s, s @ trpo.fisher_vector_product(kl_grad, params, s, 0.1)


@pytest.mark.parametrize("seed", range(4))
def test_line_search_never_keeps_a_step_beyond_delta(seed):
    trpo = load("trpo")
    accepted_some = rejected_first = 0
    for delta in (1e-4, 1e-2, 0.1, 1.0):
        for oversize in (1.0, 3.0, 30.0, 1000.0):  # a full step larger than (10)'s: backtracking must find one
            policy, params, evaluate, g, s, shs = policy_problem(seed)
            theta_old = torch.nn.utils.parameters_to_vector(params).detach().clone()
            old_surrogate, _ = evaluate()
            full_step = oversize * torch.sqrt(2 * delta / shs) * s
            accepted, candidates, fraction, surrogate, kl = trpo.line_search(params, full_step, evaluate, delta,
                                                                             0.8, 10)
            theta = torch.nn.utils.parameters_to_vector(params).detach()
            measured_surrogate, measured_kl = evaluate()  # measured afresh at the parameters left in place
            assert measured_kl <= delta and (surrogate, kl) == (measured_surrogate, measured_kl)
            if accepted:
                accepted_some += 1
                rejected_first += candidates > 1
                assert surrogate > old_surrogate
                assert fraction == pytest.approx(0.8 ** (candidates - 1))
                torch.testing.assert_close(theta, theta_old + fraction * full_step, rtol=0, atol=1e-15)
            else:
                assert candidates == 10 and torch.equal(theta, theta_old)
    assert accepted_some >= 8 and rejected_first >= 4  # the search both accepted and backtracked


def test_line_search_restores_the_old_parameters_when_it_fails():
    trpo = load("trpo")
    for case in ("worse surrogate", "KL too large"):
        policy, params, evaluate, g, s, shs = policy_problem(7)
        theta_old = torch.nn.utils.parameters_to_vector(params).detach().clone()
        old_surrogate, _ = evaluate()
        calls = []

        def recording():
            calls.append(torch.nn.utils.parameters_to_vector(params).detach().clone())
            return evaluate()

        if case == "worse surrogate":  # against the gradient, small enough to be linear: L falls at every candidate
            full_step, delta, backtracks = -1e-3 * g / g.norm(), 1.0, 10
        else:  # along the natural gradient, but 1e6 times the KL budget and only 3 candidates
            full_step, delta, backtracks = 1e3 * torch.sqrt(2 * 0.01 / shs) * s, 1e-8, 3
        accepted, candidates, fraction, surrogate, kl = trpo.line_search(params, full_step, recording, delta,
                                                                         0.5, backtracks)
        assert not accepted and candidates == backtracks and fraction == 0.0, case
        assert (surrogate, kl) == (old_surrogate, 0.0)
        assert len(calls) == backtracks + 1  # θ_old first, then every candidate
        for k, theta in enumerate(calls[1:]):
            torch.testing.assert_close(theta, theta_old + 0.5 ** k * full_step, rtol=0, atol=1e-15)
        for p, q in zip(params, policy.parameters()):
            assert p is q
        assert torch.equal(torch.nn.utils.parameters_to_vector(params), theta_old), case  # bit for bit


def test_line_search_full_step_accepted_on_a_small_step():
    """Well inside the trust region the first candidate (the full step, fraction 1) is kept."""
    trpo = load("trpo")
    policy, params, evaluate, g, s, shs = policy_problem(3)
    full_step = torch.sqrt(2 * 1e-4 / shs) * s
    accepted, candidates, fraction, _, kl = trpo.line_search(params, full_step, evaluate, 0.01, 0.8, 10)
    assert accepted and candidates == 1 and fraction == 1.0 and kl <= 0.01


# ---------------------------------------------------------------- math: GAE (3), (4)


@pytest.mark.parametrize("seed", range(3))
def test_gae(seed):
    rewards, term, trunc, reset, values, episodes = random_rollout(64, 6, seed)
    fast = load("trpo").gae(rewards, values, term, trunc, GAMMA, LAM)
    check(fast, slow_gae(rewards, values, episodes, GAMMA, LAM), reset)


def test_numpy_copy_of_the_actor_matches_torch():
    trpo = load("trpo")
    torch.manual_seed(0)
    agent = trpo.Agent(5, 3)
    for p in agent.actor_mean.parameters():
        torch.nn.init.normal_(p)
    x = np.random.default_rng(0).normal(size=(7, 5)).astype(np.float32)
    with torch.no_grad():
        expected = agent.actor_mean(torch.as_tensor(x)).numpy()
    np.testing.assert_allclose(trpo.numpy_mlp(agent.actor_mean)(x), expected, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------- smoke


def batch():
    defaults = load("trpo").Args()
    return TINY.get("num_steps", defaults.num_steps) * TINY.get("num_envs", defaults.num_envs)


def test_runs_and_writes_summary():
    summary = run("trpo", **TINY)
    with open(os.path.join(summary["run_dir"], "summary.json")) as f:
        assert json.load(f) == summary
    assert summary["algorithm"] == "trpo" and summary["stopped"] is None
    assert summary["global_step"] == TINY["total_timesteps"] // batch() * batch()
    for key in ["wall_seconds", "SPS", "mean_return"]:
        assert finite(summary[key]), (key, summary[key])
    assert summary["episodes"] > 0


def test_same_seed_same_returns():
    a, b, c = run("trpo", seed=3, **TINY), run("trpo", seed=3, **TINY), run("trpo", seed=4, **TINY)
    assert (a["mean_return"], a["episodes"], a["global_step"]) == (b["mean_return"], b["episodes"], b["global_step"])
    assert (a["mean_return"], a["episodes"]) != (c["mean_return"], c["episodes"])


def test_logs_its_own_keys_and_keeps_the_kl_within_delta():
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    summary = run("trpo", **dict(TINY, total_timesteps=4096))
    events = EventAccumulator(summary["run_dir"]).Reload()
    tags = set(events.Tags()["scalars"])
    for key in ["losses/policy_loss", "losses/value_loss", "losses/entropy", "losses/approx_kl",
                "losses/explained_variance", "charts/line_search_steps", "charts/line_search_failures",
                "charts/step_size", "charts/cg_residual", "charts/cg_seconds", "charts/line_search_seconds",
                "charts/iteration_seconds", "charts/episodic_return", "charts/SPS", "charts/learning_rate"]:
        assert key in tags, key
    kls = [e.value for e in events.Scalars("losses/approx_kl")]
    assert len(kls) == 4096 // batch() and max(kls) <= load("trpo").Args().max_kl and max(kls) > 0
    for e in events.Scalars("charts/iteration_seconds"):
        assert e.value > 0


def test_save_and_evaluate(capsys):
    summary = run("trpo", save_model=True, **TINY)
    path = os.path.join(summary["run_dir"], "trpo.pt")
    ckpt = torch.load(path, weights_only=True)
    assert ckpt["algorithm"] == "trpo" and {"model", "obs_rms", "return_rms", "args"} <= set(ckpt)
    assert ckpt["obs_rms"]["count"].item() > TINY["total_timesteps"]  # the statistics are saved with the model
    result = run("trpo", eval_checkpoint=path, eval_episodes=2)
    assert result["mode"] == "eval" and result["episodes"] == 2 and finite(result["mean_return"])
    assert result["env_id"] == "InvertedPendulum-v4"  # the saved env, not the default
    assert "mean return" in capsys.readouterr().out


def expect_refusal(capsys, must_mention, **overrides):
    with pytest.raises(SystemExit) as e:
        run("trpo", **overrides)
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:"), err
    assert must_mention in err[0], err[0]
    assert not os.path.exists("runs"), "a refused run must not create runs/"


def test_bad_input(capsys):
    expect_refusal(capsys, "--max-kl", max_kl=0.0)
    expect_refusal(capsys, "--max-kl", max_kl=-0.01)
    expect_refusal(capsys, "--damping", damping=-0.1)
    expect_refusal(capsys, "--cg-iterations", cg_iterations=0)
    expect_refusal(capsys, "--cg-tolerance", cg_tolerance=-1.0)
    expect_refusal(capsys, "--backtrack-coef", backtrack_coef=1.0)
    expect_refusal(capsys, "--max-backtracks", max_backtracks=0)
    expect_refusal(capsys, "--max-kl", max_kl=float("nan"))
    expect_refusal(capsys, "algos/ppo.py", env_id="CartPole-v1")
    expect_refusal(capsys, "NoSuchEnv-v0", env_id="NoSuchEnv-v0")
    expect_refusal(capsys, "algos/ppo_atari.py", env_id="ALE/Breakout-v5")
    expect_refusal(capsys, "less than one batch", total_timesteps=2047)
    expect_refusal(capsys, "--vf-minibatches", num_steps=8, num_envs=1, vf_minibatches=5)
    torch.save({"algorithm": "ppo_continuous", "args": {"env_id": "Hopper-v4"}}, "ppo_continuous.pt")
    expect_refusal(capsys, "ppo_continuous", eval_checkpoint="ppo_continuous.pt")
    expect_refusal(capsys, "no checkpoint", eval_checkpoint="missing.pt")


def test_bad_input_from_the_command_line(in_tmp_dir):
    for flags, must_mention in [(["--max-kl", "0"], "--max-kl"), (["--damping", "-1"], "--damping"),
                                (["--cg-iterations", "0"], "--cg-iterations"), (["--max-kl", "x"], "--max-kl"),
                                (["--env-id", "CartPole-v1"], "Discrete"),
                                (["--env-id", "NoSuchEnv-v0"], "NoSuchEnv-v0")]:
        proc = subprocess.run([sys.executable, SCRIPT, *flags], capture_output=True, text=True, timeout=120)
        lines = proc.stderr.strip().splitlines()
        assert proc.returncode == 2 and len(lines) == 1 and lines[0].startswith("error:"), proc.stderr
        assert must_mention in lines[0], lines[0]
        assert "Traceback" not in proc.stderr
        assert not os.path.exists("runs")


# ---------------------------------------------------------------- learning


@pytest.mark.learning
def test_learns_inverted_pendulum():
    summary = run("trpo", seed=1, env_id="InvertedPendulum-v4", total_timesteps=100_000)
    print(f"trpo: mean return {summary['mean_return']:.1f} over the last {summary['episodes_in_mean']} episodes, "
          f"{summary['global_step']:,} steps, {summary['wall_seconds']:.0f} s")
    assert summary["episodes_in_mean"] == 20
    assert summary["mean_return"] >= 900.0
