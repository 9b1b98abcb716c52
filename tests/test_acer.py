"""acer.py: Retrace against a slow loop written from its unrolled definition, across episode ends,
truncation and reset rows; the truncated importance weight plus the bias correction equal to the
on-policy gradient in expectation (exact enumeration of the actions); the trust-region projection
against a numerical optimiser; importance weights of 1 on-policy; the replay's segments and μ;
smoke, save/evaluate, bad input (in-process and from the command line); learning on CartPole-v1."""

import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from conftest import ALGOS_DIR, TINY, load, run

TINY = TINY["acer"]
SCRIPT = os.path.join(ALGOS_DIR, "acer.py")


def finite(x):
    return isinstance(x, (int, float)) and math.isfinite(x)


# ---------------------------------------------------------------- math: Retrace (3), (4)


def random_segments(seed, T=12, N=5):
    """[T, N] columns in the NEXT_STEP layout: episodes end by termination or truncation inside
    the segment (also on its last row), the row after each end is a reset row (reward 0, no end);
    Q(s_t, a_t), V(s_0 .. s_T) and importance weights ρ_t on both sides of 1."""
    rng = np.random.default_rng(seed)
    rewards = rng.normal(size=(T, N))
    terminations, truncations, resets = np.zeros((T, N)), np.zeros((T, N)), np.zeros((T, N), dtype=bool)
    resets[0] = rng.random(N) < 0.2  # the previous segment ended an episode on its last row
    for n in range(N):
        for t in range(T):
            if resets[t, n]:
                rewards[t, n] = 0.0
                continue
            end = rng.random()
            terminations[t, n], truncations[t, n] = end < 0.12, 0.12 <= end < 0.24
            if end < 0.24 and t + 1 < T:
                resets[t + 1, n] = True
    terminations[-1, 0], truncations[-1, 1] = 1.0, 1.0  # ends on the segment's last row
    for col in (0, 1):
        if resets[-1, col]:
            resets[-1, col], rewards[-1, col] = False, rng.normal()
    q_taken = rng.normal(size=(T, N))
    values = rng.normal(size=(T + 1, N))
    rho = rng.uniform(0.1, 3.0, size=(T, N))
    return rewards, q_taken, values, rho, terminations, truncations, resets


def slow_retrace(rewards, q_taken, values, rho, terminations, truncations, gamma, lam):
    """Retrace unrolled (Munos et al. 2016), term by term: for each row t,
    Q^ret_t = Q(s_t, a_t) + Σ_i γ^(i-t) (c_{t+1} ⋯ c_i) δ_i, δ_i = r_i + γ (1 - term_i) V(s_{i+1}) - Q(s_i, a_i),
    summed from i = t to the first episode end at or after t (or the segment's last row), with
    c_j = λ min(1, ρ_j). At a truncation V(s_{i+1}) is the final observation's value (row i + 1)."""
    T, N = rewards.shape
    q_ret = np.zeros((T, N))
    for n in range(N):
        c = [lam * min(1.0, rho[j, n]) for j in range(T)]
        delta = [rewards[i, n] + gamma * (1 - terminations[i, n]) * values[i + 1, n] - q_taken[i, n] for i in range(T)]
        for t in range(T):
            total, i = q_taken[t, n], t
            while True:
                total += gamma ** (i - t) * math.prod(c[t + 1:i + 1]) * delta[i]
                if terminations[i, n] or truncations[i, n] or i == T - 1:
                    break
                i += 1
            q_ret[t, n] = total
    return q_ret


@pytest.mark.parametrize("lam", [1.0, 0.9, 0.5, 0.0])
def test_retrace_matches_slow_loop(lam):
    for seed, gamma in [(0, 0.99), (1, 0.9), (2, 0.5), (3, 1.0)]:
        case = random_segments(seed)
        resets = case[-1]
        assert resets.any() and case[4].any() and case[5].any() and (case[3] > 1).any() and (case[3] < 1).any()
        got = load("acer").retrace(*case[:6], gamma, lam)
        want = slow_retrace(*case[:6], gamma, lam)
        valid = ~resets  # reset rows are no transitions: their entries mean nothing
        np.testing.assert_allclose(got[valid], want[valid], rtol=1e-10, atol=1e-10)


def test_retrace_episode_ends_by_hand():
    """One column, ρ = 1, λ = 1: rewards 1, 2 | reset | 4, 8; the first episode ends at row 1,
    the segment after row 4 with V(s_5) = 100; Q(s_t, a_t) = V(s_t) - 1."""
    values = np.array([[10.0], [20.0], [30.0], [40.0], [50.0], [100.0]])  # row 2 holds the final observation
    q_taken = values[:-1] - 1.0
    rewards = np.array([[1.0], [2.0], [0.0], [4.0], [8.0]])
    zeros, ones = np.zeros((5, 1)), np.ones((5, 1))
    resets = np.array([[False], [False], [True], [False], [False]])
    g = 0.5
    for terminated in (True, False):
        term, trunc = zeros.copy(), zeros.copy()
        (term if terminated else trunc)[1, 0] = 1.0
        q_ret = load("acer").retrace(rewards, q_taken, values, ones, term, trunc, g, 1.0)
        tail = 0.0 if terminated else 30.0  # truncation: V of the final observation, not of the reset row's s_0
        assert q_ret[1, 0] == pytest.approx(2.0 + g * tail)
        assert q_ret[0, 0] == pytest.approx(1.0 + g * (q_ret[1, 0] - q_taken[1, 0] + values[1, 0]))
        assert q_ret[4, 0] == pytest.approx(8.0 + g * 100.0)
        assert q_ret[3, 0] == pytest.approx(4.0 + g * (q_ret[4, 0] - q_taken[4, 0] + values[4, 0]))


def test_retrace_without_traces_is_the_one_step_target():
    """λ = 0 (or ρ = 0): every target is r_t + γ (1 - term_t) V(s_{t+1})."""
    rewards, q_taken, values, rho, term, trunc, resets = random_segments(7)
    for lam, weights in [(0.0, rho), (1.0, np.zeros_like(rho))]:
        got = load("acer").retrace(rewards, q_taken, values, weights, term, trunc, 0.9, lam)
        want = rewards + 0.9 * (1 - term) * values[1:]
        np.testing.assert_allclose(got[~resets], want[~resets], rtol=1e-12)


def test_retrace_truncates_the_traces():
    """ρ = 4 everywhere: the trace is λ min(1, ρ) = λ, not 4λ."""
    T = 3
    ones, zeros = np.ones((T, 1)), np.zeros((T, 1))
    q_ret = load("acer").retrace(ones, zeros, np.zeros((T + 1, 1)), 4 * ones, zeros, zeros, 1.0, 0.5)
    np.testing.assert_allclose(q_ret[:, 0], [1 + 0.5 * (1 + 0.5), 1 + 0.5, 1.0])


# ---------------------------------------------------------------- math: the policy gradient (1), (6)


@pytest.mark.parametrize("c", [0.1, 0.5, 1.0, 2.0, 10.0, 1e9])
def test_truncation_plus_bias_correction_is_the_on_policy_gradient(c):
    """Exact enumeration: a_t ~ μ with probability μ(a), Q^ret = Q(s, a_t). The expectation over a_t of
    the gradient of (6) with respect to the logits equals E_{a~π}[Q(a) ∇ log π(a)] = ∇ Σ_a π(a) Q(a)."""
    acer = load("acer")
    gen = torch.Generator().manual_seed(int(c * 1000) % 2**31)
    for n_actions in (2, 3, 5):
        for _ in range(5):
            theta = (2 * torch.randn(n_actions, generator=gen, dtype=torch.float64)).requires_grad_(True)
            mu = torch.softmax(2 * torch.randn(n_actions, generator=gen, dtype=torch.float64), -1)
            q = 10 * torch.randn(n_actions, generator=gen, dtype=torch.float64)
            A = n_actions
            truncated, correction = acer.acer_policy_objective(theta.expand(A, A), mu.expand(A, A), torch.arange(A),
                                                               q, q.expand(A, A), c)
            assert torch.allclose(correction, correction[0].expand(A))  # does not depend on the action taken
            (expected,) = torch.autograd.grad((mu * truncated).sum() + correction[0], theta)
            (on_policy,) = torch.autograd.grad((theta.softmax(-1) * q).sum(), theta)
            torch.testing.assert_close(expected, on_policy, rtol=1e-10, atol=1e-10)


def test_importance_weights_are_one_on_policy():
    """π = μ: ρ = 1, min(c, ρ) = 1 and no bias correction (c ≥ 1), Retrace's traces are λ, and the
    gradient of (6) is the on-policy actor-critic gradient (Q^ret - V) ∇ log π(a_t)."""
    acer = load("acer")
    gen = torch.Generator().manual_seed(3)
    logits = torch.randn(7, 4, generator=gen, dtype=torch.float64)
    pi = logits.softmax(-1)
    actions = torch.randint(0, 4, (7,), generator=gen)
    for c in (1.0, 10.0):
        rho_t, truncated, correction = acer.importance_weights(pi, pi, actions, c)
        torch.testing.assert_close(rho_t, torch.ones(7, dtype=torch.float64))
        torch.testing.assert_close(truncated, torch.ones(7, dtype=torch.float64))
        assert (correction == 0).all()
        phi = logits.clone().requires_grad_(True)
        q, q_ret = torch.randn(7, 4, generator=gen, dtype=torch.float64), torch.randn(7, generator=gen,
                                                                                       dtype=torch.float64)
        t_term, c_term = acer.acer_policy_objective(phi, pi, actions, q_ret, q, c)
        (got,) = torch.autograd.grad((t_term + c_term).sum(), phi)
        phi2 = logits.clone().requires_grad_(True)
        advantage = q_ret - (pi * q).sum(-1)
        (want,) = torch.autograd.grad((advantage * phi2.log_softmax(-1)[torch.arange(7), actions]).sum(), phi2)
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    rewards, q_taken, values, _, term, trunc, resets = random_segments(9)
    ones = np.ones_like(rewards)
    np.testing.assert_allclose(acer.retrace(rewards, q_taken, values, ones, term, trunc, 0.9, 1.0)[~resets],
                               acer.retrace(rewards, q_taken, values, 5 * ones, term, trunc, 0.9, 1.0)[~resets])


def test_importance_weights_truncated_at_c():
    acer = load("acer")
    pi = torch.tensor([[0.7, 0.2, 0.1]], dtype=torch.float64)
    mu = torch.tensor([[0.1, 0.1, 0.8]], dtype=torch.float64)
    rho_t, truncated, correction = acer.importance_weights(pi, mu, torch.tensor([0]), 3.0)
    assert rho_t.item() == pytest.approx(7.0) and truncated.item() == pytest.approx(3.0)
    torch.testing.assert_close(correction, torch.tensor([[1 - 3 / 7, 0.0, 0.0]], dtype=torch.float64))


# ---------------------------------------------------------------- math: the trust region (10)


def constrained_minimum(g, k, delta):
    """min ½‖z − g‖² s.t. kᵀz ≤ δ by the method of multipliers (augmented Lagrangian), each inner
    problem solved by L-BFGS: written without the closed form."""
    z = torch.zeros_like(g, requires_grad=True)
    multiplier, penalty = 0.0, 10.0
    for _ in range(60):
        opt = torch.optim.LBFGS([z], max_iter=200, tolerance_grad=1e-14, tolerance_change=1e-16,
                                line_search_fn="strong_wolfe")

        def closure():
            opt.zero_grad()
            violation = torch.clamp(k @ z - delta + multiplier / penalty, min=0.0)
            objective = 0.5 * ((z - g) ** 2).sum() + 0.5 * penalty * violation ** 2
            objective.backward()
            return objective

        opt.step(closure)
        with torch.no_grad():
            previous, multiplier = multiplier, max(0.0, multiplier + penalty * (k @ z - delta).item())
        if abs(multiplier - previous) < 1e-13:
            break
    return z.detach()


def test_trust_region_matches_a_numerical_optimiser():
    acer = load("acer")
    gen = torch.Generator().manual_seed(0)
    g_rows, k_rows = [], []
    for n in range(12):  # 2 to 6 actions, the unused entries 0
        dim = 2 + n % 5
        g = 3 * torch.randn(6, generator=gen, dtype=torch.float64)
        k = torch.randn(6, generator=gen, dtype=torch.float64)
        g[dim:] = 0.0
        k[dim:] = 0.0
        if n % 4 == 0:
            g = -g * torch.sign(k @ g)  # kᵀg ≤ 0 < δ: the constraint does not bind
        g_rows.append(g)
        k_rows.append(k)
    for delta in (0.1, 1.0, 5.0):
        z = acer.trust_region(torch.stack(g_rows), torch.stack(k_rows), delta)
        for row, (g, k) in enumerate(zip(g_rows, k_rows)):
            want = constrained_minimum(g, k, delta)
            torch.testing.assert_close(z[row], want, rtol=1e-6, atol=1e-6)
            assert k @ z[row] <= delta + 1e-9
            if k @ g <= delta:
                torch.testing.assert_close(z[row], g)  # inside the region: unchanged


def test_trust_region_when_the_average_is_the_policy():
    """k = 0 (θ_a = θ, as at the start): z = g, finite."""
    g = torch.randn(5, 3, dtype=torch.float64)
    torch.testing.assert_close(load("acer").trust_region(g, torch.zeros_like(g), 1.0), g)


# ---------------------------------------------------------------- the replay


def test_replay_keeps_whole_columns_and_the_behaviour_probabilities():
    acer = load("acer")
    T, N, obs_dim, A = 3, 2, 4, 3
    replay = acer.SegmentReplay(4, T, N, obs_dim, A, np.random.default_rng(0))
    assert replay.nbytes(4, T, N, obs_dim, A) == sum(getattr(replay, name).nbytes for name in
                                                     ("obs", "mu", "actions", "rewards", "terminations",
                                                      "truncations", "resets"))
    for s in range(6):  # the first two are overwritten
        mu = np.random.default_rng(s).dirichlet(np.ones(A), size=(T, N)).astype(np.float32)
        replay.add(dict(obs=np.full((T + 1, N, obs_dim), s, np.float32) + np.arange(N)[:, None] / 10,
                        mu=mu, actions=np.full((T, N), s % A), rewards=np.full((T, N), float(s), np.float32),
                        terminations=np.zeros((T, N), np.float32), truncations=np.zeros((T, N), np.float32),
                        resets=np.arange(T)[:, None].repeat(N, 1) == s % T))
    assert replay.size == 4
    batch = replay.sample(50)
    assert batch["obs"].shape == (T + 1, 50, obs_dim) and batch["mu"].shape == (T, 50, A)
    for col in range(50):
        s = int(batch["rewards"][0, col])
        env = round((batch["obs"][0, col, 0] - s) * 10)
        assert s >= 2 and (batch["rewards"][:, col] == s).all() and (batch["obs"][:, col] == s + env / 10).all()
        np.testing.assert_array_equal(batch["mu"][:, col], np.random.default_rng(s).dirichlet(
            np.ones(A), size=(T, N)).astype(np.float32)[:, env])
        np.testing.assert_array_equal(batch["resets"][:, col], np.arange(T) == s % T)


def test_on_policy_steps_have_weights_one_and_replayed_ones_do_not(monkeypatch):
    """Every learner step computes Retrace: on the fresh segment (the first call of an iteration) ρ = 1
    to float precision, since μ is the policy that acted; on replayed columns ρ moves away from 1."""
    acer = load("acer")
    calls, retrace = [], acer.retrace

    def recording(rewards, q_taken, values, rho, terminations, truncations, gamma, lam):
        calls.append(rho.copy())
        return retrace(rewards, q_taken, values, rho, terminations, truncations, gamma, lam)

    monkeypatch.setattr(acer, "retrace", recording)
    summary = run("acer", total_timesteps=8000, replay_start=800)
    iterations = summary["global_step"] // (acer.Args().num_steps * acer.Args().num_envs)
    assert len(calls) > iterations * 2  # replay ratio 4: about 5 steps per iteration once the replay starts
    assert max(np.abs(rho - 1).max() for rho in calls[:9]) < 1e-4  # before replay starts: on-policy only
    assert max(np.abs(rho - 1).max() for rho in calls) > 1e-2


# ---------------------------------------------------------------- smoke


def test_runs_and_writes_summary():
    summary = run("acer", **TINY)
    with open(os.path.join(summary["run_dir"], "summary.json")) as f:
        assert json.load(f) == summary
    assert summary["algorithm"] == "acer" and summary["stopped"] is None
    segment = acer_segment()
    assert summary["global_step"] == TINY["total_timesteps"] // segment * segment
    for key in ["wall_seconds", "SPS", "mean_return"]:
        assert finite(summary[key]), (key, summary[key])
    assert summary["episodes"] > 0


def acer_segment():
    defaults = load("acer").Args()
    return TINY.get("num_steps", defaults.num_steps) * TINY.get("num_envs", defaults.num_envs)


def test_same_seed_same_returns():
    a, b, c = run("acer", seed=3, **TINY), run("acer", seed=3, **TINY), run("acer", seed=4, **TINY)
    assert (a["mean_return"], a["episodes"], a["global_step"]) == (b["mean_return"], b["episodes"], b["global_step"])
    assert (a["mean_return"], a["episodes"]) != (c["mean_return"], c["episodes"])


def test_numpy_copy_of_the_policy_matches_torch():
    """Acting uses numpy_mlp of the torso and the policy head: the same logits as the network."""
    acer = load("acer")
    torch.manual_seed(0)
    agent = acer.Agent(5, 3)
    for p in agent.parameters():  # away from the tiny output init, so a wrong layer shows
        torch.nn.init.normal_(p)
    x = np.random.default_rng(0).normal(size=(7, 5)).astype(np.float32)
    with torch.no_grad():
        expected = agent(torch.as_tensor(x))[0].numpy()
    np.testing.assert_allclose(acer.numpy_mlp(agent.policy_net())(x), expected, rtol=1e-5, atol=1e-5)


def test_logs_its_own_keys():
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    summary = run("acer", total_timesteps=4000)
    tags = set(EventAccumulator(summary["run_dir"]).Reload().Tags()["scalars"])
    for key in ["losses/policy_loss", "losses/value_loss", "losses/entropy", "losses/bias_correction",
                "charts/avg_rho", "charts/trust_region_active", "charts/episodic_return", "charts/SPS"]:
        assert key in tags, key


def test_save_and_evaluate(capsys):
    summary = run("acer", save_model=True, **TINY)
    path = os.path.join(summary["run_dir"], "acer.pt")
    ckpt = torch.load(path, weights_only=True)
    assert ckpt["algorithm"] == "acer" and {"agent", "average"} <= set(ckpt)
    result = run("acer", eval_checkpoint=path, eval_episodes=2)
    assert result["mode"] == "eval" and result["episodes"] == 2 and finite(result["mean_return"])
    assert "mean return" in capsys.readouterr().out


def expect_refusal(capsys, must_mention, **overrides):
    with pytest.raises(SystemExit) as e:
        run("acer", **overrides)
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:"), err
    assert must_mention in err[0], err[0]
    assert not os.path.exists("runs"), "a refused run must not create runs/"


def test_bad_input(capsys):
    expect_refusal(capsys, "--replay-ratio", replay_ratio=-1.0)
    expect_refusal(capsys, "--c", c=0.0)
    expect_refusal(capsys, "--c", c=-2.0)
    expect_refusal(capsys, "--delta", delta=0.0)
    expect_refusal(capsys, "--retrace-lambda", retrace_lambda=1.5)
    expect_refusal(capsys, "--avg-alpha", avg_alpha=-0.1)
    expect_refusal(capsys, "ppo_continuous.py", env_id="Pendulum-v1")
    expect_refusal(capsys, "NoSuchEnv-v0", env_id="NoSuchEnv-v0")
    expect_refusal(capsys, "one segment", total_timesteps=79)
    expect_refusal(capsys, "--buffer-size", buffer_size=79)
    expect_refusal(capsys, "--replay-start", buffer_size=800, replay_start=801)
    with pytest.raises(SystemExit) as e:
        load("acer").check_memory(2**62, "--buffer-size")
    assert e.value.code == 2 and capsys.readouterr().err.startswith("error: --buffer-size needs")
    torch.save({"algorithm": "a2c", "args": {"env_id": "CartPole-v1"}}, "a2c.pt")
    expect_refusal(capsys, "a2c", eval_checkpoint="a2c.pt")


def test_bad_input_from_the_command_line(in_tmp_dir):
    for flags, must_mention in [(["--replay-ratio", "-1"], "--replay-ratio"), (["--c", "0"], "--c"),
                                (["--env-id", "Pendulum-v1"], "Box"), (["--env-id", "NoSuchEnv-v0"], "NoSuchEnv-v0")]:
        proc = subprocess.run([sys.executable, SCRIPT, *flags], capture_output=True, text=True, timeout=120)
        lines = proc.stderr.strip().splitlines()
        assert proc.returncode == 2 and len(lines) == 1 and must_mention in lines[0], proc.stderr
        assert "Traceback" not in proc.stderr
        assert not os.path.exists("runs")


# ---------------------------------------------------------------- learning


@pytest.mark.learning
def test_learns_cartpole():
    summary = run("acer", seed=1)
    print(f"acer: mean return {summary['mean_return']:.1f} over the last {summary['episodes_in_mean']} episodes, "
          f"{summary['global_step']:,} steps, {summary['wall_seconds']:.0f} s")
    assert summary["episodes_in_mean"] == 20
    assert summary["mean_return"] >= 450.0
