"""maddpg.py: the math against slow references (the critic's input, centralised and independent,
the target, the actor's gradient, Polyak averaging, the action mapping), the replay's transitions
at episode ends, smoke runs on the three mpe2 tasks, save/evaluate, bad input, determinism, and
learning on simple_spread_v3 against a uniformly random policy measured in the same test."""

import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn as nn

from conftest import ALGOS_DIR, load, run

TASKS = ["simple_spread_v3", "simple_adversary_v3", "simple_tag_v3"]
TINY = dict(total_timesteps=500, learning_starts=200)


def finite(x):
    return isinstance(x, (int, float)) and math.isfinite(x)


def random_parts(dims, batch, g):
    return [torch.randn(batch, d, generator=g) for d in dims]


# ---------------------------------------------------------------- math


@pytest.mark.parametrize("independent", [False, True], ids=["centralised", "independent"])
def test_critic_inputs_match_loop(independent):
    """(3), built element by element: [o_1..o_N, a_1..a_N] for every agent, or [o_i, a_i] alone,
    zero-padded to the largest; observation and action sizes differ between agents, as in
    simple_adversary. One joint action for all critics, or one per critic (the actor loss's)."""
    maddpg = load("maddpg")
    g = torch.Generator().manual_seed(0)
    obs_dims, act_dims, B, N = [8, 10, 10], [5, 5, 3], 7, 3
    o = random_parts(obs_dims, B, g)
    obs = torch.cat(o, -1)
    index = maddpg.critic_index(obs_dims, act_dims, independent)
    a_shared = random_parts(act_dims, B, g)
    a_each = [random_parts(act_dims, B, g) for _ in range(N)]
    for actions, parts in [(torch.cat(a_shared, -1), [a_shared] * N),
                           (torch.stack([torch.cat(a, -1) for a in a_each]), a_each)]:
        x = maddpg.critic_inputs(obs, actions, N, index)
        width = max(d + k for d, k in zip(obs_dims, act_dims)) if independent else sum(obs_dims) + sum(act_dims)
        assert x.shape == (N, B, width)
        for i in range(N):
            a = parts[i]
            for b in range(B):
                if independent:
                    expected = [v.item() for v in o[i][b]] + [v.item() for v in a[i][b]]
                else:
                    expected = [v.item() for j in range(N) for v in o[j][b]] + \
                               [v.item() for j in range(N) for v in a[j][b]]
                expected += [0.0] * (width - len(expected))
                assert x[i, b].tolist() == pytest.approx(expected, abs=0)


def test_centralised_critic_sees_the_others_and_independent_does_not():
    """Changing agent j's observation or action moves Q_i(x_i) with centralised critics and leaves
    it alone with --independent: the critic's input is the whole difference."""
    maddpg = load("maddpg")
    torch.manual_seed(0)
    obs_dims, act_dims = [8, 10, 10], [5, 5, 5]
    obs, actions = torch.randn(4, sum(obs_dims)), torch.rand(4, sum(act_dims))
    other_obs, other_actions = obs.clone(), actions.clone()
    other_obs[:, 8:18] += 1.0  # agent 1's observation
    other_actions[:, 5:10] += 0.5  # and action
    for independent, moves in [(False, True), (True, False)]:
        index = maddpg.critic_index(obs_dims, act_dims, independent)
        dims = [d + a for d, a in zip(obs_dims, act_dims)] if independent else [sum(obs_dims) + sum(act_dims)] * 3
        q = maddpg.Critics(dims)
        before = q(maddpg.critic_inputs(obs, actions, 3, index))[:, 0]
        after = q(maddpg.critic_inputs(other_obs, other_actions, 3, index))[:, 0]
        assert (not torch.allclose(before, after)) == moves


def test_agent_linear_is_each_agents_own_linear():
    """Row i of AgentLinear is agent i's Linear(in_dims[i], out_dims[i]): the same outputs as a
    Linear holding its slice of the weights; the padding weights start at 0 and get zero
    gradients (zero inputs, unused outputs), so Adam keeps them at 0."""
    maddpg = load("maddpg")
    torch.manual_seed(0)
    in_dims, out_dims, B = [8, 10, 6], [5, 3, 5], 9
    layer = maddpg.AgentLinear(in_dims, out_dims)
    assert layer.weight.shape == (3, 10, 5) and layer.bias.shape == (3, 5)
    x = torch.randn(3, B, 10)
    for i, d in enumerate(in_dims):
        x[i, :, d:] = 0.0  # what the padding feeds
    y = layer(x)
    (y[0, :, :5].sum() + y[1, :, :3].sum() + y[2, :, :5].sum()).backward()
    for i, (d_in, d_out) in enumerate(zip(in_dims, out_dims)):
        own = nn.Linear(d_in, d_out)
        with torch.no_grad():
            own.weight.copy_(layer.weight[i, :d_in, :d_out].T)
            own.bias.copy_(layer.bias[i, :d_out])
        assert torch.allclose(y[i, :, :d_out], own(x[i, :, :d_in]), atol=1e-6)
        bound = 1 / math.sqrt(d_in)  # nn.Linear's initialisation for this agent's size
        assert layer.weight[i, :d_in, :d_out].abs().max() <= bound
        assert (layer.weight[i, d_in:] == 0).all() and (layer.weight[i, :, d_out:] == 0).all()
        assert (layer.weight.grad[i, d_in:] == 0).all() and (layer.weight.grad[i, :, d_out:] == 0).all()
        assert (layer.bias.grad[i, d_out:] == 0).all()


def test_clip_grad_norms_is_per_agent():
    """clip_grad_norms_ on batched parameters = nn.utils.clip_grad_norm_ on each agent's own
    network: copies of each agent's gradients clipped alone come out the same."""
    maddpg = load("maddpg")
    torch.manual_seed(0)
    net = maddpg.agent_mlp([8, 10, 10], [5, 5, 5])
    x = torch.randn(3, 16, 10)
    x[0, :, 8:] = 0.0
    scales = torch.tensor([0.001, 1.0, 100.0]).view(3, 1, 1)  # agent 0 under the limit, 1 and 2 above
    (net(x) * scales).pow(2).sum().backward()
    grads = [p.grad.clone() for p in net.parameters()]
    norms = maddpg.clip_grad_norms_(list(net.parameters()), 0.5)
    for i in range(3):
        own = [g[i].clone().requires_grad_(True) for g in grads]
        for t in own:
            t.grad = t.detach().clone()
        expected_norm = nn.utils.clip_grad_norm_(own, 0.5)
        assert norms[i].item() == pytest.approx(expected_norm.item(), rel=1e-5)
        for p, t in zip(net.parameters(), own):
            assert torch.allclose(p.grad[i], t.grad, rtol=1e-5, atol=1e-8)
    assert norms[0] < 0.5 < norms[1] < norms[2]


def test_with_own_actions_matches_loop():
    maddpg = load("maddpg")
    g = torch.Generator().manual_seed(1)
    act_dims = [5, 2, 3]
    actions, mu = torch.randn(6, 10, generator=g), torch.randn(6, 10, generator=g)
    starts = [0, 5, 7, 10]
    own = torch.zeros(3, 10, dtype=torch.bool)
    for i in range(3):
        own[i, starts[i]:starts[i + 1]] = True
    out = maddpg.with_own_actions(actions, mu, own)
    assert out.shape == (3, 6, 10)
    for i in range(3):
        for b in range(6):
            for j in range(3):
                for k in range(starts[j], starts[j + 1]):
                    assert out[i, b, k].item() == (mu if j == i else actions)[b, k].item()


def test_preactivation_penalty_matches_loop():
    """(10) summed over agents whose actions differ in size: Σ_i (1/(B |a_i|)) Σ_b Σ_k u_{b,k}²
    over agent i's columns k."""
    maddpg = load("maddpg")
    g = torch.Generator().manual_seed(4)
    starts, B = [0, 5, 7, 10], 6
    u = torch.randn(B, 10, generator=g)
    own = torch.zeros(3, 10, dtype=torch.bool)
    for i in range(3):
        own[i, starts[i]:starts[i + 1]] = True
    expected = 0.0
    for i in range(3):
        size = starts[i + 1] - starts[i]
        expected += sum(u[b, k].item() ** 2 for b in range(B) for k in range(starts[i], starts[i + 1])) / (B * size)
    assert maddpg.preactivation_penalty(u, own).item() == pytest.approx(expected, rel=1e-6)


def test_maddpg_target_matches_loop():
    maddpg = load("maddpg")
    g = torch.Generator().manual_seed(2)
    B, N, gamma = 64, 3, 0.95
    rewards, next_q = torch.randn(B, N, generator=g), torch.randn(B, N, generator=g)
    terminations = (torch.rand(B, N, generator=g) < 0.3).float()
    assert 0 < terminations.sum() < B * N
    y = maddpg.maddpg_target(rewards, terminations, next_q, gamma)
    for b in range(B):
        for i in range(N):
            expected = rewards[b, i].item() + (0.0 if terminations[b, i] else gamma * next_q[b, i].item())
            assert y[b, i].item() == pytest.approx(expected, abs=1e-6)


def test_polyak_update():
    maddpg = load("maddpg")
    torch.manual_seed(0)
    source, target = nn.Linear(3, 4), nn.Linear(3, 4)
    before = [p.detach().clone() for p in target.parameters()]
    maddpg.polyak_update(target, source, 0.1)
    for t, s, b in zip(target.parameters(), source.parameters(), before):
        assert torch.allclose(t, 0.1 * s + 0.9 * b, atol=1e-7)
    maddpg.polyak_update(target, source, 1.0)
    for t, s in zip(target.parameters(), source.parameters()):
        assert torch.equal(t, s)


def test_action_mapping():
    """(1): tanh into [low, high] per dimension, against low + (high - low)(tanh u + 1)/2; with
    MPE's Box(0, 1) bounds it is sigmoid(2u), strictly inside the box."""
    maddpg = load("maddpg")
    g = torch.Generator().manual_seed(3)
    low, high = torch.tensor([0.0, -2.0, 1.0]), torch.tensor([1.0, 2.0, 1.5])
    u = torch.randn(50, 3, generator=g) * 3
    out = maddpg.scale_to_bounds(u, (high - low) / 2, (high + low) / 2)
    for b in range(50):
        for k in range(3):
            expected = low[k].item() + (high[k].item() - low[k].item()) * (math.tanh(u[b, k].item()) + 1) / 2
            assert out[b, k].item() == pytest.approx(expected, abs=1e-6)
    actors = maddpg.Actors([4, 6], [5, 5], [np.zeros(5, dtype=np.float32)] * 2, [np.ones(5, dtype=np.float32)] * 2)
    obs = torch.randn(20, 10, generator=g) * 10
    mu = actors(obs)
    u = actors.net(torch.stack([nn.functional.pad(obs[:, :4], (0, 2)), obs[:, 4:]]))  # [2, 20, 5]
    assert torch.allclose(mu, torch.sigmoid(2 * torch.cat([u[0], u[1]], -1)), atol=1e-6)
    assert ((mu >= 0) & (mu <= 1)).all()


@pytest.mark.parametrize("env_id", TASKS)
def test_mpe_actions_are_boxes_from_0_to_1(env_id):
    """The bounds the actors are scaled to, read from the envs: Box(0, 1) for every agent; agents
    of simple_adversary and simple_tag have observations of different sizes."""
    maddpg = load("maddpg")
    env = maddpg.make_env(env_id, 0, False, "")()
    task = maddpg.Task(env)
    env.close()
    assert all((low == 0).all() and (high == 1).all() for low, high in zip(task.lows, task.highs))
    assert task.act_dims == [5] * len(task.agents)
    if env_id != "simple_spread_v3":
        assert len(set(task.obs_dims)) > 1


def own_network(net, i, in_dim, out_dim):
    """Agent i's own MLP, cut out of a batched agent_mlp: its weights as leaf tensors, and the
    function they compute on [B, in_dim]."""
    layers = [m for m in net if not isinstance(m, nn.ReLU)]
    ins, outs = [in_dim, 64, 64], [64, 64, out_dim]
    params = []
    for layer, d_in, d_out in zip(layers, ins, outs):
        params += [layer.weight[i, :d_in, :d_out].detach().clone().requires_grad_(True),
                   layer.bias[i, :d_out].detach().clone().requires_grad_(True)]

    def forward(x):
        for k in range(3):
            x = x @ params[2 * k] + params[2 * k + 1]
            x = torch.relu(x) if k < 2 else x
        return x

    return params, forward


def test_actor_gradient_is_the_multi_agent_deterministic_policy_gradient():
    """The summed actor loss (6) with the critics held fixed (requires_grad_(False) around the
    backward, as train() does): actor i's gradient (its rows of the batched parameters) is
    ∇θ_i μ_i(o_i) ∇_{a_i} Q_i with the other actions as replayed (7), computed here with agent
    i's own networks alone; the critics get none."""
    maddpg = load("maddpg")
    torch.manual_seed(0)
    obs_dims, act_dims = [8, 10, 10], [5, 5, 5]
    lows, highs = [np.zeros(5, dtype=np.float32)] * 3, [np.ones(5, dtype=np.float32)] * 3
    actors = maddpg.Actors(obs_dims, act_dims, lows, highs)
    D = sum(obs_dims) + sum(act_dims)
    critics = maddpg.Critics([D] * 3)
    obs, actions = torch.randn(16, sum(obs_dims)), torch.rand(16, sum(act_dims))
    own = torch.zeros(3, 15, dtype=torch.bool)
    for i in range(3):
        own[i, 5 * i:5 * i + 5] = True

    critics.requires_grad_(False)
    mu = actors(obs)
    x = maddpg.critic_inputs(obs, maddpg.with_own_actions(actions, mu, own), 3)
    loss = -critics(x).mean(0).sum()
    loss.backward()
    critics.requires_grad_(True)
    assert all(p.grad is None for p in critics.parameters())
    obs_starts = [0, 8, 18, 28]
    for i in range(3):
        _, q_i = own_network(critics.net, i, D, 1)
        actor_params, mu_i = own_network(actors.net, i, obs_dims[i], 5)
        o_i = obs[:, obs_starts[i]:obs_starts[i + 1]]
        joint = actions.clone()  # a_i = μ_i(o_i), the others as replayed
        joint[:, 5 * i:5 * i + 5] = torch.sigmoid(2 * mu_i(o_i)).detach()
        joint.requires_grad_(True)
        (grad_joint,) = torch.autograd.grad(-q_i(torch.cat([obs, joint], -1)).mean(), joint)
        grad_ai = grad_joint[:, 5 * i:5 * i + 5]
        expected = torch.autograd.grad((torch.sigmoid(2 * mu_i(o_i)) * grad_ai).sum(), actor_params)
        batched = [p.grad for p in actors.parameters()]
        for k, e in enumerate(expected):
            got = batched[k][i][:obs_dims[i]] if k == 0 else batched[k][i]
            assert torch.allclose(got, e, atol=1e-6)
        assert (batched[0][i][obs_dims[i]:] == 0).all()  # the padding of agent 0's 8 inputs


def test_replay_holds_final_observations_and_no_termination(monkeypatch):
    """MPE episodes end by truncation at max_cycles: every stored term flag is 0 (so (4)
    bootstraps), o' of an episode's last step is its true final observation, and within an
    episode o' of one step is o of the next."""
    maddpg = load("maddpg")
    stored = []
    real_add = maddpg.ReplayBuffer.add

    def add(self, obs, actions, rewards, next_obs, terminations):
        stored.append((obs.copy(), next_obs.copy(), terminations.copy()))
        return real_add(self, obs, actions, rewards, next_obs, terminations)

    monkeypatch.setattr(maddpg.ReplayBuffer, "add", add)
    summary = run("maddpg", num_envs=1, total_timesteps=100, learning_starts=50, max_cycles=10, eval_frequency=0)
    assert summary["episodes"] == 10 and len(stored) == 100
    assert all((term == 0).all() for _, _, term in stored)
    for t in range(99):
        _, next_obs, _ = stored[t]
        obs_after, _, _ = stored[t + 1]
        if (t + 1) % 10:
            assert np.array_equal(next_obs, obs_after)
        else:  # the last step: o' is the final observation, the next row starts a new episode
            assert not np.allclose(next_obs, obs_after)
            velocity = next_obs[0, :2]  # simple_spread's o_1 starts with the agent's velocity: 0 after a reset
            assert np.abs(velocity).sum() > 0 and np.abs(obs_after[0, :2]).sum() == 0


# ---------------------------------------------------------------- smoke


@pytest.mark.parametrize("independent", [False, True], ids=["centralised", "independent"])
@pytest.mark.parametrize("env_id", TASKS)
def test_runs_and_writes_summary(env_id, independent):
    summary = run("maddpg", env_id=env_id, independent=independent, **TINY)
    with open(os.path.join(summary["run_dir"], "summary.json")) as f:
        on_disk = json.load(f)
    assert on_disk == summary
    assert list(summary) == ["env_id", "algorithm", "exp_name", "seed", "global_step", "wall_seconds", "SPS",
                             "mean_return", "episodes_in_mean", "episodes", "eval_step", "eval_return",
                             "agent_returns", "stopped", "stop_reason", "versions", "run_dir"]
    assert summary["algorithm"] == "maddpg" and summary["global_step"] == 500 and summary["stopped"] is None
    for key in ["global_step", "wall_seconds", "SPS", "mean_return"]:
        assert finite(summary[key]), (key, summary[key])
    assert summary["episodes"] == 20 and summary["episodes_in_mean"] == 20  # 25-step episodes
    agents = summary["agent_returns"]
    assert len(agents) == {"simple_spread_v3": 3, "simple_adversary_v3": 3, "simple_tag_v3": 4}[env_id]
    assert sum(agents.values()) == pytest.approx(summary["mean_return"], rel=1e-5, abs=1e-5)  # (9)


def test_one_env_and_evaluation():
    summary = run("maddpg", num_envs=1, total_timesteps=1000, learning_starts=200, eval_frequency=500,
                  eval_episodes=2)
    assert summary["global_step"] == 1000 and summary["episodes"] == 40
    assert summary["eval_step"] == 1000  # evaluated at 500 and 1,000
    assert finite(summary["eval_return"])


def test_capture_video():
    summary = run("maddpg", capture_video=True, total_timesteps=100, learning_starts=50, eval_frequency=0)
    videos = os.path.join(summary["run_dir"], "videos")
    assert any(f.endswith(".mp4") for f in os.listdir(videos))


def test_save_and_evaluate(capsys):
    summary = run("maddpg", env_id="simple_adversary_v3", save_model=True, **TINY)
    path = os.path.join(summary["run_dir"], "maddpg.pt")
    assert os.path.isfile(path)
    result = run("maddpg", eval_checkpoint=path, eval_episodes=2)
    assert result["mode"] == "eval" and result["episodes"] == 2 and finite(result["mean_return"])
    assert result["env_id"] == "simple_adversary_v3"
    assert "mean return" in capsys.readouterr().out


def expect_refusal(capsys, must_mention, **overrides):
    with pytest.raises(SystemExit) as e:
        run("maddpg", **overrides)
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:"), err
    assert must_mention in err[0], err[0]
    assert not os.path.exists("runs"), "a refused run must not create runs/"


def test_refuses_another_scripts_checkpoint(capsys):
    for other in ["ddpg", "ppo"]:
        torch.save({"algorithm": other, "args": {"env_id": "Pendulum-v1"}}, f"{other}.pt")
        expect_refusal(capsys, other, eval_checkpoint=f"{other}.pt")


def test_bad_input(capsys):
    expect_refusal(capsys, "simple_spread_v3", env_id="simple_nope_v3")
    expect_refusal(capsys, "ddpg.py", env_id="Pendulum-v1")
    expect_refusal(capsys, "--batch-size", batch_size=512, buffer_size=100)
    expect_refusal(capsys, "--learning-starts", total_timesteps=1000, learning_starts=1000)
    expect_refusal(capsys, "--total-timesteps", total_timesteps=0)
    expect_refusal(capsys, "--max-cycles", max_cycles=0)
    expect_refusal(capsys, "--train-frequency", train_frequency=0)
    expect_refusal(capsys, "--buffer-size", buffer_size=10**11, total_timesteps=10**11)


def test_bad_task_from_the_command_line():
    out = subprocess.run([sys.executable, os.path.join(ALGOS_DIR, "maddpg.py"), "--env-id", "simple_world_v9"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 2
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and "simple_world_v9" in lines[0] and "simple_spread_v3" in lines[0], out.stderr
    assert not os.path.exists("runs")


def test_same_seed_same_returns():
    a = run("maddpg", seed=3, **TINY)
    b = run("maddpg", seed=3, **TINY)
    c = run("maddpg", seed=4, **TINY)
    assert (a["mean_return"], a["agent_returns"]) == (b["mean_return"], b["agent_returns"])
    assert a["mean_return"] != c["mean_return"]


# ---------------------------------------------------------------- learning


def random_team_returns(env_id: str, episodes: int, seed: int) -> list:
    """Team returns (9) of uniformly random actions in [low, high] over the episodes that
    evaluate_policy plays with `seed` (the same starts as the trained actors' evaluation)."""
    maddpg = load("maddpg")
    env = maddpg.make_env(env_id, 0, False, "")()
    task = maddpg.Task(env)
    rng = np.random.default_rng(seed)
    returns = maddpg.evaluate_policy(lambda obs: rng.uniform(task.low, task.high).astype(np.float32), env, task,
                                     episodes, seed)
    env.close()
    return returns


# Budget in env steps. The score: the deterministic actors μ(o) (no exploration noise) over
# EVAL_EPISODES evaluation episodes at the end of training against the uniformly random policy
# over the same episodes (the same env seed, so the same starting positions). At the defaults,
# 100k steps: seed 1 -50.4 (random -75.8, threshold -53.0), seed 2 -52.6 (-80.5, -56.4),
# seed 3 -47.3 (-78.2, -54.8). The test took 133 s on the 2-core machine shared with other
# jobs (2026-11-24); alone it has not been timed.
LEARNING_STEPS = 100_000
EVAL_EPISODES = 100


@pytest.mark.learning
def test_learns_simple_spread():
    """The team return at the end at least 30% better than a uniformly random policy's, both
    measured on the same evaluation episodes: trained >= random + 0.3 |random| (returns are
    negative)."""
    maddpg = load("maddpg")
    summary = run("maddpg", seed=1, total_timesteps=LEARNING_STEPS, eval_frequency=LEARNING_STEPS,
                  eval_episodes=EVAL_EPISODES)
    random_return = float(np.mean(random_team_returns("simple_spread_v3", EVAL_EPISODES,
                                                      seed=1 + maddpg.EVAL_SEED_OFFSET)))
    threshold = random_return + 0.3 * abs(random_return)
    print(f"maddpg: evaluation team return {summary['eval_return']:.1f} over {EVAL_EPISODES} episodes "
          f"(random {random_return:.1f}, threshold {threshold:.1f}), {summary['global_step']:,} steps, "
          f"{summary['wall_seconds']:.0f} s")
    assert summary["eval_step"] == LEARNING_STEPS
    assert summary["eval_return"] >= threshold
