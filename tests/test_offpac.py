"""offpac.py: β of (1), the importance weights (3), the advantage (4) and the expected-SARSA target
(6) against slow loops written from the equations; the actor's gradient against the on-policy
estimator when π = β, and in exact expectation over a ~ β; a replay that holds only real
transitions (a truncation's final observation kept, NEXT_STEP reset rows left out); smoke,
save/evaluate, bad input; learning on CartPole-v1."""

import json
import math
import os
import subprocess
import sys

import gymnasium as gym
import numpy as np
import pytest
import torch

from conftest import ALGOS_DIR, load, run

SCRIPT = os.path.join(ALGOS_DIR, "offpac.py")
TINY = dict(total_timesteps=2000, learning_starts=500)

# CartPole cut at 12 steps: most episodes end by truncation, some by termination.
gym.register("OffpacShortCartPole-v0", entry_point="gymnasium.envs.classic_control:CartPoleEnv",
             max_episode_steps=12)


def finite(x):
    return isinstance(x, (int, float)) and math.isfinite(x)


# ---------------------------------------------------------------- math: (1), (3), (4), (6), (8)


@pytest.mark.parametrize("epsilon", [0.0, 0.1, 0.5, 1.0])
def test_behaviour_probs_match_slow_loop(epsilon):
    rng = np.random.default_rng(0)
    logits = rng.normal(scale=3.0, size=(9, 4))
    got = load("offpac").behaviour_probs(logits, epsilon)
    for i in range(9):
        z = [math.exp(x) for x in logits[i]]
        for a in range(4):
            assert got[i, a] == pytest.approx((1 - epsilon) * z[a] / sum(z) + epsilon / 4, rel=1e-12)
    np.testing.assert_allclose(got.sum(-1), 1.0, rtol=1e-12)
    assert (got >= epsilon / 4 - 1e-15).all()  # β covers every action: π/β <= |A|/ε


def test_importance_weights_match_slow_loop():
    offpac = load("offpac")
    rng = np.random.default_rng(1)
    pi, beta = rng.uniform(0.01, 1.0, 50), rng.uniform(0.01, 1.0, 50)
    for rho_clip in (0.5, 1.0, 3.0, 1e9):
        got = offpac.importance_weights(torch.log(torch.tensor(pi)), torch.tensor(beta), rho_clip)
        want = [min(p / b, rho_clip) for p, b in zip(pi, beta)]
        np.testing.assert_allclose(got.numpy(), want, rtol=1e-12)
    ones = offpac.importance_weights(torch.log(torch.tensor(pi)), torch.tensor(pi), 10.0)
    np.testing.assert_allclose(ones.numpy(), 1.0, rtol=1e-12)  # π = β: every weight is 1


def test_advantages_match_slow_loop_and_average_zero_under_pi():
    offpac = load("offpac")
    g = torch.Generator().manual_seed(2)
    q = torch.randn(20, 3, generator=g, dtype=torch.float64)
    probs = torch.randn(20, 3, generator=g, dtype=torch.float64).softmax(-1)
    actions = torch.randint(0, 3, (20,), generator=g)
    got = offpac.advantages(q, probs, actions)
    for i in range(20):
        v = sum(probs[i, b].item() * q[i, b].item() for b in range(3))
        assert got[i].item() == pytest.approx(q[i, actions[i]].item() - v, abs=1e-12)
    every = torch.stack([offpac.advantages(q, probs, torch.full((20,), a)) for a in range(3)], -1)
    np.testing.assert_allclose((probs * every).sum(-1).numpy(), 0.0, atol=1e-12)  # E_π[A] = 0


def random_transitions(seed, n=40, n_actions=3):
    """Transitions as the replay holds them: some terminated (term = 1), some truncated (term = 0
    and s' the final observation, whose values are given), the rest in mid-episode."""
    rng = np.random.default_rng(seed)
    end = rng.random(n)
    terminations = (end < 0.25).astype(np.float64)
    truncated = (0.25 <= end) & (end < 0.5)
    rewards = rng.normal(size=n)
    next_probs = rng.dirichlet(np.ones(n_actions), size=n)
    next_q = rng.normal(scale=5.0, size=(n, n_actions))
    return rewards, terminations, truncated, next_probs, next_q


@pytest.mark.parametrize("gamma", [0.99, 0.5, 1.0, 0.0])
def test_expected_sarsa_target_matches_slow_loop(gamma):
    offpac = load("offpac")
    rewards, terminations, truncated, next_probs, next_q = random_transitions(3)
    assert terminations.any() and truncated.any()
    got = offpac.expected_sarsa_target(rewards, terminations, next_probs, next_q, gamma)
    for i in range(len(rewards)):
        if terminations[i]:  # nothing follows a termination
            want = rewards[i]
        else:  # mid-episode, or truncated: bootstrap from s' (the final observation when truncated)
            want = rewards[i] + gamma * sum(next_probs[i, a] * next_q[i, a] for a in range(next_q.shape[1]))
        assert got[i] == pytest.approx(want, abs=1e-12)
    as_torch = offpac.expected_sarsa_target(*(torch.tensor(x) for x in (rewards, terminations, next_probs, next_q)),
                                            gamma)
    np.testing.assert_allclose(as_torch.numpy(), got, rtol=1e-12)


def test_polyak_update():
    offpac = load("offpac")
    torch.manual_seed(0)
    source, target = offpac.QNetwork(4, 2), offpac.QNetwork(4, 2)
    before = [p.clone() for p in target.parameters()]
    offpac.polyak_update(target, source, 0.25)
    for t, b, s in zip(target.parameters(), before, source.parameters()):
        torch.testing.assert_close(t, 0.25 * s + 0.75 * b)


# ---------------------------------------------------------------- the actor's gradient (2)-(5)


def actor_grads(loss, actor):
    actor.zero_grad(set_to_none=True)
    loss.backward()
    return [p.grad.clone() for p in actor.parameters()]


def test_pi_equal_to_beta_is_the_on_policy_actor_critic_update():
    """β taken from the actor's current weights with ε = 0 (the lag and the mixture gone): β of (1)
    as the script computes it from the NumPy copy equals π, every ρ is 1, and the gradient of the
    actor's loss is the on-policy actor-critic estimator -mean(A ∇log π) on the same batch, as in
    actor_critic.py's (2) with the advantage in the place of δ."""
    offpac = load("offpac")
    torch.manual_seed(3)
    actor, qf = offpac.Actor(4, 3).double(), offpac.QNetwork(4, 3).double()
    obs = torch.randn(64, 4, dtype=torch.float64)
    logits = offpac.numpy_mlp(actor.logits)(obs.numpy())
    actions = torch.as_tensor((logits + np.random.default_rng(0).gumbel(size=logits.shape)).argmax(-1))
    beta = offpac.behaviour_probs(logits, 0.0)[np.arange(64), actions.numpy()]

    logp = actor(obs)
    log_prob = logp.gather(-1, actions.unsqueeze(-1)).squeeze(-1)
    np.testing.assert_allclose(beta, log_prob.exp().detach().numpy(), rtol=1e-10)
    rho = offpac.importance_weights(log_prob.detach(), torch.as_tensor(beta), 10.0)
    np.testing.assert_allclose(rho.numpy(), 1.0, rtol=1e-10)
    advantage = offpac.advantages(qf(obs).detach(), logp.exp().detach(), actions)
    off_policy = actor_grads(offpac.policy_gradient_loss(log_prob, rho, advantage), actor)

    logp = actor(obs)
    log_prob = logp.gather(-1, actions.unsqueeze(-1)).squeeze(-1)
    on_policy = actor_grads(-(advantage * log_prob).mean(), actor)
    for a, b in zip(off_policy, on_policy):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    assert any(g.abs().max() > 1e-6 for g in on_policy)


def test_off_policy_gradient_in_expectation_over_beta():
    """Exact enumeration on one state with 4 actions: Σ_a β(a) ∇[−ρ(a) A(a) log π(a)] (what (5)
    estimates, a ~ β) equals the on-policy Σ_a π(a) ∇[−Q(a) log π(a)] (the seed's E_π[Q ∇log π]) when
    ρ̄ is above every π/β: (2) is unbiased and the baseline of (4) adds nothing in expectation.
    A clip below the largest π/β biases it."""
    offpac = load("offpac")
    torch.manual_seed(4)
    theta = torch.randn(4, dtype=torch.float64, requires_grad=True)
    q = torch.randn(1, 4, dtype=torch.float64) * 3
    beta = torch.as_tensor(offpac.behaviour_probs(np.random.default_rng(1).normal(size=4), 0.2))
    actions = torch.arange(4)

    def off_policy_expectation(rho_clip):
        logp = theta.log_softmax(-1).expand(4, 4)  # one row per action a
        log_prob = logp.gather(-1, actions.unsqueeze(-1)).squeeze(-1)
        rho = offpac.importance_weights(log_prob.detach(), beta, rho_clip)
        advantage = offpac.advantages(q.expand(4, 4), logp.exp().detach(), actions)
        per_action = -(rho * advantage * log_prob)  # policy_gradient_loss of each row, before the mean
        torch.testing.assert_close(offpac.policy_gradient_loss(log_prob, rho, advantage), per_action.mean())
        return torch.autograd.grad((beta * per_action).sum(), theta)[0]

    logp = theta.log_softmax(-1)
    on_policy = torch.autograd.grad(-(logp.exp().detach() * q[0] * logp).sum(), theta)[0]
    ratios = theta.softmax(-1).detach() / beta
    torch.testing.assert_close(off_policy_expectation(1e9), on_policy, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(off_policy_expectation(ratios.max().item()), on_policy, rtol=1e-10, atol=1e-12)
    clipped = off_policy_expectation(0.5 * ratios.max().item())
    assert (clipped - on_policy).abs().max() > 1e-3


# ---------------------------------------------------------------- the replay


def test_replay_holds_only_real_transitions(monkeypatch):
    """A run on CartPole cut at 12 steps, with every transition stored recorded: each one replayed
    from its s with its a gives its s', r and term (CartPole is deterministic), so no reset row
    (final observation -> first observation of the next episode) slipped in and a truncated
    step keeps its final observation as s' with term = 0; β(a|s) is a probability of (1)."""
    offpac = load("offpac")
    stored = []
    add = offpac.ReplayBuffer.add

    def recording_add(self, *rows):
        stored.append([np.array(x, copy=True) for x in rows])
        return add(self, *rows)

    monkeypatch.setattr(offpac.ReplayBuffer, "add", recording_add)
    epsilon, N = 0.3, 3
    summary = run("offpac", env_id="OffpacShortCartPole-v0", total_timesteps=600, learning_starts=200, num_envs=N,
                  num_steps=5, eval_frequency=0, epsilon=epsilon)
    obs, actions, probs, rewards, next_obs, terms = (np.concatenate(x) for x in zip(*stored))
    steps, episodes = summary["global_step"], summary["episodes"]
    # one reset row after each episode end, except after ends on the run's last step
    assert steps - episodes <= len(obs) <= steps - episodes + N, (len(obs), steps, episodes)
    env = gym.make("CartPole-v1").unwrapped
    env.reset(seed=0)
    for i in range(len(obs)):
        env.state = obs[i].astype(np.float64)
        env.steps_beyond_terminated = None
        s, r, term, _, _ = env.step(int(actions[i]))
        np.testing.assert_allclose(next_obs[i], s, rtol=1e-5, atol=1e-5, err_msg=f"transition {i}")
        assert r == rewards[i] and float(term) == terms[i], i
    assert terms.sum() > 0 and len(obs) - terms.sum() > 0
    assert ((probs >= epsilon / 2 - 1e-6) & (probs <= 1 - epsilon / 2 + 1e-6)).all()
    truncations = episodes - terms.sum()  # every episode ended by one or the other
    assert truncations > terms.sum()  # mostly 12-step truncations: each kept its last transition (the count above)


# ---------------------------------------------------------------- smoke


def test_runs_and_writes_summary():
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    summary = run("offpac", eval_frequency=1000, eval_episodes=2, **TINY)
    with open(os.path.join(summary["run_dir"], "summary.json")) as f:
        assert json.load(f) == summary
    assert summary["algorithm"] == "offpac" and summary["stopped"] is None
    assert summary["global_step"] == 1984  # 62 rollouts of 4 envs x 8 steps
    for key in ["wall_seconds", "SPS", "mean_return", "eval_return"]:
        assert finite(summary[key]), (key, summary[key])
    assert summary["episodes_in_mean"] == 20 and summary["eval_step"] == 1024
    tags = set(EventAccumulator(summary["run_dir"]).Reload().Tags()["scalars"])
    for key in ["losses/policy_loss", "losses/entropy", "losses/qf1_loss", "losses/qf1_values", "charts/avg_rho",
                "charts/rho_clipfrac", "charts/SPS", "charts/episodic_return", "charts/episodic_length",
                "eval/episodic_return"]:
        assert key in tags, key


def test_save_and_evaluate(capsys):
    summary = run("offpac", save_model=True, **TINY)
    path = os.path.join(summary["run_dir"], "offpac.pt")
    ckpt = torch.load(path, weights_only=True)
    assert ckpt["algorithm"] == "offpac" and {"actor", "qf", "qf_target"} <= set(ckpt)
    result = run("offpac", eval_checkpoint=path, eval_episodes=2)
    assert result["mode"] == "eval" and result["episodes"] == 2 and finite(result["mean_return"])
    assert "mean return" in capsys.readouterr().out


def test_from_the_command_line(in_tmp_dir):
    proc = subprocess.run([sys.executable, SCRIPT, "--total-timesteps", "1500", "--learning-starts", "500",
                           "--no-cuda"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip().splitlines()[-1].startswith("run directory: runs/")


# ---------------------------------------------------------------- bad input


def expect_refusal(capsys, must_mention, **overrides):
    with pytest.raises(SystemExit) as e:
        run("offpac", **overrides)
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:"), err
    assert must_mention in err[0], err[0]
    assert not os.path.exists("runs"), "a refused run must not create runs/"


def test_bad_input(capsys):
    expect_refusal(capsys, "--rho-clip", rho_clip=0.0)
    expect_refusal(capsys, "--rho-clip", rho_clip=-1.0)
    expect_refusal(capsys, "--epsilon", epsilon=1.5)
    expect_refusal(capsys, "--gradient-steps", gradient_steps=0)
    expect_refusal(capsys, "Box", env_id="Pendulum-v1")
    expect_refusal(capsys, "NoSuchEnv-v0", env_id="NoSuchEnv-v0")
    expect_refusal(capsys, "--learning-starts", total_timesteps=1000, learning_starts=1000)
    expect_refusal(capsys, "--batch-size", batch_size=512, buffer_size=256)
    expect_refusal(capsys, "one rollout", total_timesteps=31, learning_starts=0)
    torch.save({"algorithm": "a2c", "args": {"env_id": "CartPole-v1"}}, "a2c.pt")
    expect_refusal(capsys, "a2c", eval_checkpoint="a2c.pt")


@pytest.mark.parametrize("flags,mention", [(["--rho-clip", "0"], "--rho-clip"),
                                           (["--env-id", "Pendulum-v1"], "Box"),
                                           (["--env-id", "NoSuchEnv-v0"], "NoSuchEnv-v0")])
def test_bad_input_from_the_command_line(flags, mention, in_tmp_dir):
    out = subprocess.run([sys.executable, SCRIPT, *flags], capture_output=True, text=True, timeout=120)
    lines = out.stderr.strip().splitlines()
    assert out.returncode == 2 and len(lines) == 1 and lines[0].startswith("error:") and mention in lines[0], out.stderr
    assert not os.path.exists("runs")


# ---------------------------------------------------------------- learning


@pytest.mark.learning
def test_learns_cartpole():
    """Seed 1, the defaults (100,000 steps): mean of the last 20 episodes >= 300."""
    summary = run("offpac", seed=1)
    print(f"offpac: mean return {summary['mean_return']:.1f} over the last {summary['episodes_in_mean']} episodes, "
          f"{summary['global_step']:,} steps, {summary['wall_seconds']:.0f} s")
    assert summary["episodes_in_mean"] == 20
    assert summary["mean_return"] >= 300.0
