"""td3.py and ddpg.py: the math against slow references, smoke, save/evaluate, bad input,
determinism, Ctrl-C, and learning on Pendulum-v1."""

import json
import math
import os

import gymnasium as gym
import numpy as np
import pytest
import torch
import torch.nn as nn

from conftest import load, run

SCRIPTS = ["td3", "ddpg"]
TINY = dict(total_timesteps=600, learning_starts=200)


def finite(x):
    return isinstance(x, (int, float)) and math.isfinite(x)


# ---------------------------------------------------------------- math


def test_td3_target_matches_loop():
    td3 = load("td3")
    g = torch.Generator().manual_seed(0)
    B, gamma = 64, 0.97
    rewards, q1, q2 = torch.randn(B, generator=g), torch.randn(B, generator=g), torch.randn(B, generator=g)
    terminations = (torch.rand(B, generator=g) < 0.3).float()
    assert 0 < terminations.sum() < B
    y = td3.td3_target(rewards, terminations, q1, q2, gamma)
    for i in range(B):
        expected = rewards[i].item()
        if not terminations[i]:
            expected += gamma * min(q1[i].item(), q2[i].item())
        assert y[i].item() == pytest.approx(expected, abs=1e-6)


def test_smoothed_target_action_clips_noise_and_bounds():
    """Bounds not ±1: action_scale (2, 0.5), bias (1, 0) -> low (-1, -0.5), high (3, 0.5)."""
    td3 = load("td3")
    scale, bias = torch.tensor([2.0, 0.5]), torch.tensor([1.0, 0.0])
    low, high = bias - scale, bias + scale
    noise_clip = 0.5
    g = torch.Generator().manual_seed(1)
    mu = bias + scale * torch.tanh(torch.randn(500, 2, generator=g) * 2)
    noise = torch.randn(500, 2, generator=g) * 0.8 * scale  # σ large enough that the clip bites
    out = td3.smoothed_target_action(mu, noise, noise_clip, scale, low, high)
    for i in range(500):
        for j in range(2):
            c = noise_clip * scale[j].item()
            eps = min(max(noise[i, j].item(), -c), c)
            expected = min(max(mu[i, j].item() + eps, low[j].item()), high[j].item())
            assert out[i, j].item() == pytest.approx(expected, abs=1e-6)
    assert ((out >= low) & (out <= high)).all()
    assert ((out - mu).abs() <= noise_clip * scale + 1e-6).all()
    assert (noise.abs() > noise_clip * scale).any()  # the noise clip was exercised
    assert ((mu + noise < low) | (mu + noise > high)).any()  # and the bounds


def test_ddpg_target_matches_loop():
    ddpg = load("ddpg")
    g = torch.Generator().manual_seed(2)
    B, gamma = 64, 0.9
    rewards, next_q = torch.randn(B, generator=g), torch.randn(B, generator=g)
    terminations = (torch.rand(B, generator=g) < 0.3).float()
    y = ddpg.ddpg_target(rewards, terminations, next_q, gamma)
    for i in range(B):
        expected = rewards[i].item() + (0.0 if terminations[i] else gamma * next_q[i].item())
        assert y[i].item() == pytest.approx(expected, abs=1e-6)


def test_ddpg_actor_gradient_is_the_deterministic_policy_gradient():
    """-Q(s, μ(s)) with the critic held fixed (requires_grad_(False) around the backward, as
    train() does): the actor's gradient is ∇_a Q · ∇_θ μ, (6); the critic gets none."""
    ddpg = load("ddpg")
    torch.manual_seed(0)
    actor = ddpg.Actor(3, 2, np.array([-1.0, 0.0], dtype=np.float32), np.array([3.0, 0.5], dtype=np.float32))
    critic = ddpg.QNetwork(3, 2)
    obs = torch.randn(8, 3)
    critic.requires_grad_(False)
    (-critic(obs, actor(obs)).mean()).backward()
    critic.requires_grad_(True)
    assert all(p.grad is None for p in critic.parameters())
    a = actor(obs).detach().requires_grad_(True)
    (grad_a,) = torch.autograd.grad(-critic(obs, a).mean(), a)
    expected = torch.autograd.grad((actor(obs) * grad_a).sum(), list(actor.parameters()))
    for p, e in zip(actor.parameters(), expected):
        assert torch.allclose(p.grad, e, atol=1e-6)
    mu = actor(obs)
    assert ((mu >= torch.tensor([-1.0, 0.0])) & (mu <= torch.tensor([3.0, 0.5]))).all()


@pytest.mark.parametrize("name", SCRIPTS)
def test_polyak_update(name):
    module = load(name)
    torch.manual_seed(0)
    source, target = nn.Linear(3, 4), nn.Linear(3, 4)
    before = [p.detach().clone() for p in target.parameters()]
    module.polyak_update(target, source, 0.1)
    for t, s, b in zip(target.parameters(), source.parameters(), before):
        assert torch.allclose(t, 0.1 * s + 0.9 * b, atol=1e-7)
    module.polyak_update(target, source, 1.0)
    for t, s in zip(target.parameters(), source.parameters()):
        assert torch.equal(t, s)


def test_td3_actor_loss_moves_only_the_actor():
    """The actor's loss -Q_1(s, μ(s)) with Q_1 held fixed (requires_grad_(False) around the
    backward, as train() does) leaves the critic without gradients, and its gradient is
    ∇_a Q_1 · ∇_θ μ (the deterministic policy gradient)."""
    td3 = load("td3")
    torch.manual_seed(0)
    actor = td3.Actor(3, 1, np.array([-2.0], dtype=np.float32), np.array([2.0], dtype=np.float32))
    qf1, qf2 = td3.QNetwork(3, 1), td3.QNetwork(3, 1)
    obs = torch.randn(8, 3)
    qf1.requires_grad_(False)
    loss = -qf1(obs, actor(obs)).mean()
    loss.backward()
    qf1.requires_grad_(True)
    assert all(p.grad is None for p in qf1.parameters())
    assert all(p.requires_grad for p in qf1.parameters())  # the critic's own step still trains it
    # chain rule by hand: dL/da from the critic, then a·(dL/da) back through the actor
    a = actor(obs).detach().requires_grad_(True)
    (grad_a,) = torch.autograd.grad(-qf1(obs, a).mean(), a)
    expected = torch.autograd.grad((actor(obs) * grad_a).sum(), list(actor.parameters()))
    for p, e in zip(actor.parameters(), expected):
        assert torch.allclose(p.grad, e, atol=1e-6)
    # the twin critics are two different networks
    q1, q2 = qf1(obs, a.detach()), qf2(obs, a.detach())
    assert q1.shape == (8,) and not torch.allclose(q1, q2)


# ---------------------------------------------------------------- smoke


@pytest.mark.parametrize("name", SCRIPTS)
def test_runs_and_writes_summary(name):
    summary = run(name, **TINY)
    with open(os.path.join(summary["run_dir"], "summary.json")) as f:
        on_disk = json.load(f)
    assert on_disk == summary
    assert list(summary) == ["env_id", "algorithm", "exp_name", "seed", "global_step", "wall_seconds", "SPS",
                             "mean_return", "episodes_in_mean", "episodes", "eval_step", "eval_return", "stopped",
                             "stop_reason", "versions", "run_dir"]
    assert summary["algorithm"] == name and summary["global_step"] == 600
    for key in ["global_step", "wall_seconds", "SPS", "mean_return"]:
        assert finite(summary[key]), (key, summary[key])
    # 600 steps: episodes end at steps 200 and 401 (each NEXT_STEP reset takes a step)
    assert summary["episodes_in_mean"] == 2 and summary["stopped"] is None
    assert summary["eval_step"] is None  # the default --eval-frequency 10,000 is beyond 600 steps
    assert any(f.startswith("events.out.tfevents") for f in os.listdir(summary["run_dir"]))


@pytest.mark.parametrize("name", SCRIPTS)
def test_save_and_evaluate(name, capsys):
    summary = run(name, save_model=True, **TINY)
    path = os.path.join(summary["run_dir"], f"{name}.pt")
    assert os.path.isfile(path)
    result = run(name, eval_checkpoint=path, eval_episodes=2)
    assert result["mode"] == "eval" and result["episodes"] == 2 and finite(result["mean_return"])
    assert "mean return" in capsys.readouterr().out


def expect_refusal(name, capsys, must_mention, **overrides):
    with pytest.raises(SystemExit) as e:
        run(name, **overrides)
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:"), err
    assert must_mention in err[0], err[0]
    assert not os.path.exists("runs"), "a refused run must not create runs/"


@pytest.mark.parametrize("name", SCRIPTS)
def test_refuses_another_scripts_checkpoint(name, capsys):
    for other in ["ppo", "sac"] + [s for s in SCRIPTS if s != name]:
        torch.save({"algorithm": other, "args": {"env_id": "Pendulum-v1"}}, f"{other}.pt")
        expect_refusal(name, capsys, other, eval_checkpoint=f"{other}.pt")


@pytest.mark.parametrize("name", SCRIPTS)
def test_bad_input(name, capsys):
    expect_refusal(name, capsys, "ppo.py", env_id="CartPole-v1")
    expect_refusal(name, capsys, "NoSuchEnv-v0", env_id="NoSuchEnv-v0")
    expect_refusal(name, capsys, "--batch-size", batch_size=512, buffer_size=100)
    expect_refusal(name, capsys, "--learning-starts", total_timesteps=1000, learning_starts=1000)
    expect_refusal(name, capsys, "--total-timesteps", total_timesteps=0)
    expect_refusal(name, capsys, "--total-timesteps", total_timesteps=-100)
    expect_refusal(name, capsys, "--torch-threads", torch_threads=0)
    expect_refusal(name, capsys, "--learning-rate", learning_rate=-1.0)
    # a replay larger than the machine's memory is refused before anything is allocated
    expect_refusal(name, capsys, "--buffer-size", buffer_size=10**11, total_timesteps=10**11)


@pytest.mark.parametrize("name", SCRIPTS)
def test_same_seed_same_returns(name):
    a = run(name, seed=3, **TINY)
    b = run(name, seed=3, **TINY)
    c = run(name, seed=4, **TINY)
    assert (a["mean_return"], a["episodes"], a["global_step"]) == (b["mean_return"], b["episodes"], b["global_step"])
    assert a["mean_return"] != c["mean_return"]


@pytest.mark.parametrize("name", SCRIPTS)
def test_ctrl_c_saves_and_closes(name, monkeypatch):
    real_step, calls = gym.vector.SyncVectorEnv.step, [0]

    def step(self, actions):
        calls[0] += 1
        if calls[0] == 300:
            raise KeyboardInterrupt
        return real_step(self, actions)

    monkeypatch.setattr(gym.vector.SyncVectorEnv, "step", step)
    summary = run(name, save_model=True, total_timesteps=100_000, learning_starts=250)
    assert summary["stopped"] == "interrupted" and summary["global_step"] == 299
    assert os.path.isfile(os.path.join(summary["run_dir"], f"{name}.pt"))
    assert os.path.isfile(os.path.join(summary["run_dir"], "summary.json"))


# ---------------------------------------------------------------- learning

# Budgets in env steps; the score is the summary's mean_return, the mean of the last 20
# episodes (4,000 steps on Pendulum-v1), which is stricter than the last 10 as long as the
# returns still improve.
LEARNING = {
    # script: (overrides, threshold)
    "td3": (dict(total_timesteps=16_000), -200.0),
    "ddpg": (dict(total_timesteps=16_000), -250.0),
}


@pytest.mark.learning
@pytest.mark.parametrize("name", SCRIPTS)
def test_learns_pendulum(name):
    overrides, threshold = LEARNING[name]
    summary = run(name, seed=1, **overrides)
    print(f"{name}: mean return {summary['mean_return']:.1f} over the last {summary['episodes_in_mean']} episodes, "
          f"{summary['global_step']:,} steps, {summary['wall_seconds']:.0f} s")
    assert summary["episodes_in_mean"] == 20
    assert summary["mean_return"] >= threshold
