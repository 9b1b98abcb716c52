"""algos/sac.py: the math against slow references, a tiny run, save and evaluate, bad input,
determinism, Ctrl-C, and (marker `learning`) Pendulum-v1 to a mean return of -200."""

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

TINY = dict(total_timesteps=600, learning_starts=200)
PPO_TINY = dict(env_id="Pendulum-v1", total_timesteps=512, num_steps=256, num_minibatches=4, update_epochs=1)


def finite(x):
    return isinstance(x, (int, float)) and math.isfinite(x)


# ---------------------------------------------------------------- math


def test_soft_q_target_matches_a_loop():
    sac = load("sac")
    g = torch.Generator().manual_seed(0)
    n = 64
    rewards, q1, q2, logp = (torch.randn(n, generator=g, dtype=torch.float64) for _ in range(4))
    terms = (torch.rand(n, generator=g) < 0.3).double()
    alpha, gamma = 0.37, 0.95
    y = sac.soft_q_target(rewards, terms, q1, q2, logp, alpha, gamma)
    for i in range(n):
        bootstrap = 0.0 if terms[i] else gamma * (min(q1[i].item(), q2[i].item()) - alpha * logp[i].item())
        assert y[i].item() == pytest.approx(rewards[i].item() + bootstrap, abs=1e-12)
    # a termination cuts the bootstrap whatever the critics say
    assert sac.soft_q_target(torch.tensor([1.0]), torch.tensor([1.0]), torch.tensor([1e6]), torch.tensor([1e6]),
                             torch.tensor([5.0]), alpha, gamma).item() == 1.0


def normal_log_pdf(x, mean, std):
    return -0.5 * ((x - mean) / std) ** 2 - math.log(std) - 0.5 * math.log(2 * math.pi)


def test_tanh_gaussian_log_prob_is_the_change_of_variables():
    """log π(a) = log N(u) - log|da/du| with a = scale·tanh(u) + bias, the derivative by
    central finite differences, one action dimension at a time (they are independent)."""
    sac = load("sac")
    rng = np.random.default_rng(0)
    n, d = 32, 3
    mean = rng.normal(size=(n, d))
    log_std = rng.uniform(-2, 1, size=(n, d))
    # tails included; |u| <= 6 keeps the finite difference of tanh (near ±1) precise in float64
    u = np.clip(mean + np.exp(log_std) * rng.normal(size=(n, d)) * 3, -6, 6)
    scale, bias = np.array([2.0, 0.5, 1.0]), np.array([0.0, 1.0, -3.0])
    got = sac.tanh_gaussian_log_prob(*(torch.as_tensor(x) for x in (u, mean, log_std, scale))).numpy()
    h = 1e-4
    for i in range(n):
        expected = 0.0
        for j in range(d):
            da_du = (scale[j] * np.tanh(u[i, j] + h) + bias[j] - scale[j] * np.tanh(u[i, j] - h) - bias[j]) / (2 * h)
            expected += normal_log_pdf(u[i, j], mean[i, j], math.exp(log_std[i, j])) - math.log(abs(da_du))
        assert got[i] == pytest.approx(expected, rel=1e-5, abs=1e-4)


def test_tanh_gaussian_log_prob_is_finite_where_tanh_saturates():
    """In float32 tanh(20) == 1 and log(1 - tanh²) would be -inf; the stable form is exact."""
    sac = load("sac")
    u = torch.tensor([[20.0, -30.0]])
    zero = torch.zeros(1, 2)
    got = sac.tanh_gaussian_log_prob(u, zero, zero, torch.ones(2)).item()
    # log(1 - tanh²u) = log 4 - 2|u| - 2 log(1 + e^{-2|u|})
    expected = sum(normal_log_pdf(x, 0.0, 1.0) - (math.log(4) - 2 * abs(x)) for x in (20.0, -30.0))
    assert math.isfinite(got) and got == pytest.approx(expected, rel=1e-5)


def test_polyak_update():
    sac = load("sac")
    torch.manual_seed(1)
    source, target = sac.QNetwork(3, 2), sac.QNetwork(3, 2)
    before = [t.detach().clone() for t in target.parameters()]
    sac.polyak_update(target, source, 0.1)
    for t, s, b in zip(target.parameters(), source.parameters(), before):
        torch.testing.assert_close(t, 0.1 * s + 0.9 * b)
    sac.polyak_update(target, source, 1.0)  # τ = 1 copies
    for t, s in zip(target.parameters(), source.parameters()):
        torch.testing.assert_close(t, s)


def test_actor_step_holds_the_critics_fixed():
    """requires_grad_(False) around the actor loss (6): the gradient reaches the action and the
    actor, the critics get none, and they learn again afterwards."""
    sac = load("sac")
    torch.manual_seed(0)
    actor, qf1, qf2 = sac.Actor(3, 2, -np.ones(2), np.ones(2)), sac.QNetwork(3, 2), sac.QNetwork(3, 2)
    obs = torch.randn(16, 3)
    pi, log_prob = actor.sample(obs)
    qf1.requires_grad_(False)
    qf2.requires_grad_(False)
    (0.2 * log_prob - torch.min(qf1(obs, pi), qf2(obs, pi))).mean().backward()
    qf1.requires_grad_(True)
    qf2.requires_grad_(True)
    assert all(p.grad is None and p.requires_grad for p in [*qf1.parameters(), *qf2.parameters()])
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in actor.parameters())


def test_actions_respect_asymmetric_bounds():
    """scale and bias come from the action space: the squashed action stays in [low, high]."""
    sac = load("sac")
    torch.manual_seed(0)
    low, high = np.array([-1.0, 0.0], dtype=np.float32), np.array([3.0, 0.5], dtype=np.float32)
    actor = sac.Actor(4, 2, low, high)
    with torch.no_grad():
        obs = 10 * torch.randn(2000, 4)
        actions, log_prob = actor.sample(obs)
        det = actor.deterministic(obs)
    for a in (actions, det):
        assert (a >= torch.as_tensor(low)).all() and (a <= torch.as_tensor(high)).all()
    assert actions[:, 0].max() - actions[:, 0].min() > 2.0  # the whole width is used, not ±1
    assert torch.isfinite(log_prob).all()


# ---------------------------------------------------------------- runs


def test_runs_and_writes_summary(in_tmp_dir):
    summary = run("sac", **TINY)
    with open(os.path.join(summary["run_dir"], "summary.json")) as f:
        on_disk = json.load(f)
    assert on_disk == summary
    assert list(summary) == ["env_id", "algorithm", "exp_name", "seed", "global_step", "wall_seconds", "SPS",
                             "mean_return", "episodes_in_mean", "episodes", "eval_step", "eval_return", "stopped",
                             "stop_reason", "versions", "run_dir"]
    assert summary["algorithm"] == "sac" and summary["global_step"] == 600
    for key in ["global_step", "wall_seconds", "SPS", "mean_return"]:
        assert finite(summary[key]), (key, summary[key])
    assert summary["episodes_in_mean"] == summary["episodes"] == 2  # 200-step episodes, a reset step between
    assert summary["stopped"] is None and summary["eval_step"] is None  # 600 steps: no evaluation yet
    assert any(f.startswith("events.out.tfevents") for f in os.listdir(summary["run_dir"]))


def test_save_evaluate_and_refuse_foreign_checkpoints(in_tmp_dir, capsys):
    summary = run("sac", save_model=True, **TINY)
    path = os.path.join(summary["run_dir"], "sac.pt")
    assert os.path.isfile(path)
    result = run("sac", eval_checkpoint=path, eval_episodes=2)
    assert result["mode"] == "eval" and result["episodes"] == 2 and finite(result["mean_return"])
    assert "mean return" in capsys.readouterr().out

    ppo = run("ppo_continuous", save_model=True, **PPO_TINY)
    foreign = os.path.join(ppo["run_dir"], "ppo_continuous.pt")
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        run("sac", eval_checkpoint=foreign)
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:") and "sac.py" in err[0], err
    with pytest.raises(SystemExit) as e:  # and the other way round
        run("ppo_continuous", eval_checkpoint=path)
    assert e.value.code == 2


def expect_refusal(capsys, must_mention, **overrides):
    with pytest.raises(SystemExit) as e:
        run("sac", **overrides)
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:"), err
    assert must_mention in err[0], err[0]
    assert not os.path.exists("runs"), "a refused run must not create runs/"


def test_bad_input(in_tmp_dir, capsys):
    expect_refusal(capsys, "ppo.py", env_id="CartPole-v1", **TINY)
    expect_refusal(capsys, "NoSuchEnv-v0", env_id="NoSuchEnv-v0", **TINY)
    expect_refusal(capsys, "--batch-size", batch_size=512, buffer_size=256, **TINY)
    expect_refusal(capsys, "--learning-starts", total_timesteps=1000, learning_starts=1000)
    expect_refusal(capsys, "--learning-starts", total_timesteps=1000, learning_starts=5000)
    expect_refusal(capsys, "--total-timesteps", total_timesteps=0)
    expect_refusal(capsys, "--total-timesteps", total_timesteps=-100)
    expect_refusal(capsys, "--torch-threads", torch_threads=0, **TINY)
    expect_refusal(capsys, "--target-entropy-scale", target_entropy_scale=float("nan"), **TINY)
    # 3.3 TiB, refused before allocating (a budget as large: the replay holds at most --total-timesteps)
    expect_refusal(capsys, "--buffer-size", buffer_size=100_000_000_000, total_timesteps=100_000_000_000)


def test_checkpoint_holds_the_alpha_used(in_tmp_dir):
    """--no-autotune trains with the fixed --alpha and the checkpoint says so; --autotune saves the learned α."""
    fixed = run("sac", save_model=True, autotune=False, alpha=0.2, **TINY)
    ckpt = torch.load(os.path.join(fixed["run_dir"], "sac.pt"), weights_only=True)
    assert ckpt["alpha"] == pytest.approx(0.2)
    zero = run("sac", save_model=True, autotune=False, alpha=0.0, **TINY)
    assert torch.load(os.path.join(zero["run_dir"], "sac.pt"), weights_only=True)["alpha"] == 0.0
    tuned = run("sac", save_model=True, **TINY)
    alpha = torch.load(os.path.join(tuned["run_dir"], "sac.pt"), weights_only=True)["alpha"]
    assert 0 < alpha != pytest.approx(0.2)  # 400 steps of (7) moved it


def test_logs_the_shared_loss_keys(in_tmp_dir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    summary = run("sac", **TINY)
    tags = set(EventAccumulator(summary["run_dir"]).Reload().Tags()["scalars"])
    for key in ["qf1_loss", "qf2_loss", "qf1_values", "qf2_values", "actor_loss", "alpha", "alpha_loss", "entropy"]:
        assert f"losses/{key}" in tags, key
    assert "charts/SPS" in tags and "charts/episodic_return" in tags


def test_bad_input_from_the_command_line(in_tmp_dir):
    out = subprocess.run([sys.executable, os.path.join(ALGOS_DIR, "sac.py"), "--env-id", "CartPole-v1"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 2
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and "ppo.py" in lines[0], out.stderr
    assert not os.path.exists("runs")


def test_same_seed_same_returns(in_tmp_dir):
    a = run("sac", seed=3, **TINY)
    b = run("sac", seed=3, **TINY)
    c = run("sac", seed=4, **TINY)
    assert (a["mean_return"], a["episodes"], a["global_step"]) == (b["mean_return"], b["episodes"], b["global_step"])
    assert a["mean_return"] != c["mean_return"]


def test_ctrl_c_saves_and_closes(in_tmp_dir, monkeypatch):
    real_step, calls = gym.vector.SyncVectorEnv.step, [0]

    def step(self, actions):
        calls[0] += 1
        if calls[0] == 300:
            raise KeyboardInterrupt
        return real_step(self, actions)

    monkeypatch.setattr(gym.vector.SyncVectorEnv, "step", step)
    summary = run("sac", save_model=True, total_timesteps=100_000, learning_starts=200)
    assert summary["stopped"] == "interrupted" and summary["global_step"] < 100_000
    assert os.path.isfile(os.path.join(summary["run_dir"], "sac.pt"))
    assert os.path.isfile(os.path.join(summary["run_dir"], "summary.json"))


# ---------------------------------------------------------------- learning

LEARNING_BUDGET = 15_000  # env steps (learning starts after 5,000); seeds 1, 2, 3 reach -136.7, -157.3, -127.2


@pytest.mark.learning
def test_learns_pendulum():
    """The score is the summary's mean_return: the last 20 episodes (stricter than the last 10
    while returns still improve)."""
    summary = run("sac", seed=1, total_timesteps=LEARNING_BUDGET)
    print(f"sac: mean return {summary['mean_return']:.1f} over the last {summary['episodes_in_mean']} episodes, "
          f"{summary['global_step']:,} steps, {summary['wall_seconds']:.0f} s")
    assert summary["episodes_in_mean"] == 20
    assert summary["mean_return"] >= -200.0
