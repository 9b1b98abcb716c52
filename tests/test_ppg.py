"""ppg.py: the KL(π_old ‖ π) of the distillation, the value losses and the joint loss against slow loops
over categorical probabilities; its GAE is ppo.py's; the auxiliary head sits on the policy network and
nothing of the value network; the auxiliary phase runs every N_π iterations with the steps it should;
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

TINY = TINY["ppg"]
SCRIPT = os.path.join(ALGOS_DIR, "ppg.py")
F64 = torch.float64


def finite(x):
    return isinstance(x, (int, float)) and math.isfinite(x)


def random_logits(batch, n_actions, seed, scale=3.0):
    gen = torch.Generator().manual_seed(seed)
    return scale * torch.randn(batch, n_actions, generator=gen, dtype=F64)


def slow_kl(old_logits, new_logits):
    """Equation (8) state by state: softmax probabilities by hand, Σ_a p_old(a) (log p_old(a) − log p_new(a))."""
    out = []
    for old_row, new_row in zip(old_logits.tolist(), new_logits.tolist()):
        old_z = sum(math.exp(x) for x in old_row)
        new_z = sum(math.exp(x) for x in new_row)
        kl = 0.0
        for a in range(len(old_row)):
            p_old, p_new = math.exp(old_row[a]) / old_z, math.exp(new_row[a]) / new_z
            kl += p_old * (math.log(p_old) - math.log(p_new))
        out.append(kl)
    return out


def slow_value_loss(values, targets):
    return 0.5 * sum((v - t) ** 2 for v, t in zip(values.tolist(), targets.tolist())) / len(values)


# ---------------------------------------------------------------- math: the KL of the distillation (8)


@pytest.mark.parametrize("n_actions", [2, 3, 6])
def test_categorical_kl_matches_a_loop(n_actions):
    ppg = load("ppg")
    for seed, scale in [(0, 0.1), (1, 1.0), (2, 5.0)]:
        old, new = random_logits(40, n_actions, seed, scale), random_logits(40, n_actions, seed + 100, scale)
        got = ppg.categorical_kl(old, new)
        assert got.shape == (40,)
        np.testing.assert_allclose(got.numpy(), slow_kl(old, new), rtol=1e-10, atol=1e-12)
        assert (got >= 0).all()


def test_categorical_kl_is_zero_for_the_same_policy_and_ignores_a_shift_of_the_logits():
    ppg = load("ppg")
    old = random_logits(25, 4, 3)
    new = random_logits(25, 4, 4)
    torch.testing.assert_close(ppg.categorical_kl(old, old), torch.zeros(25, dtype=F64), rtol=0, atol=1e-14)
    shifted = ppg.categorical_kl(old + 7.0, new - torch.arange(25, dtype=F64)[:, None])  # softmax(x + c) = softmax(x)
    torch.testing.assert_close(shifted, ppg.categorical_kl(old, new), rtol=1e-10, atol=1e-12)


def test_categorical_kl_direction_and_gradient():
    """KL(π_old ‖ π), not KL(π ‖ π_old): the two differ on asymmetric pairs, and the gradient in the new
    logits is p_new − p_old (the cross-entropy's), so it vanishes where the policies agree."""
    ppg = load("ppg")
    old = torch.tensor([[2.0, 0.0, -1.0]], dtype=F64)
    new = torch.tensor([[-1.0, 0.5, 1.5]], dtype=F64, requires_grad=True)
    kl = ppg.categorical_kl(old, new)
    assert kl.item() == pytest.approx(slow_kl(old, new.detach())[0], rel=1e-12)
    assert kl.item() != pytest.approx(slow_kl(new.detach(), old)[0], rel=1e-3)
    (grad,) = torch.autograd.grad(kl.sum(), new)
    torch.testing.assert_close(grad, new.softmax(-1).detach() - old.softmax(-1), rtol=1e-10, atol=1e-12)
    same = old.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(ppg.categorical_kl(old, same).sum(), same)
    torch.testing.assert_close(grad, torch.zeros_like(grad), rtol=0, atol=1e-14)


def test_categorical_kl_matches_torch_distributions():
    ppg = load("ppg")
    old, new = random_logits(30, 5, 7), random_logits(30, 5, 8)
    want = torch.distributions.kl_divergence(torch.distributions.Categorical(logits=old),
                                             torch.distributions.Categorical(logits=new))
    torch.testing.assert_close(ppg.categorical_kl(old, new), want, rtol=1e-10, atol=1e-12)


# ---------------------------------------------------------------- math: the losses (6), (7), (9)


def test_value_loss_matches_a_loop():
    ppg = load("ppg")
    gen = torch.Generator().manual_seed(9)
    for n in (1, 7, 64):
        values, targets = torch.randn(n, generator=gen, dtype=F64), 50 * torch.randn(n, generator=gen, dtype=F64)
        assert ppg.value_loss(values, targets).item() == pytest.approx(slow_value_loss(values, targets), rel=1e-12)


@pytest.mark.parametrize("beta_clone", [0.0, 1.0, 3.5])
def test_joint_loss_matches_a_loop(beta_clone):
    ppg = load("ppg")
    gen = torch.Generator().manual_seed(10)
    n = 33
    aux_values, targets = torch.randn(n, generator=gen, dtype=F64), 20 * torch.randn(n, generator=gen, dtype=F64)
    old, new = random_logits(n, 3, 11), random_logits(n, 3, 12)
    joint, aux, kl = ppg.joint_loss(aux_values, targets, old, new, beta_clone)
    slow_aux = slow_value_loss(aux_values, targets)
    slow_kl_mean = sum(slow_kl(old, new)) / n
    assert aux.item() == pytest.approx(slow_aux, rel=1e-12)
    assert kl.item() == pytest.approx(slow_kl_mean, rel=1e-10)
    assert joint.item() == pytest.approx(slow_aux + beta_clone * slow_kl_mean, rel=1e-10)


def test_gae_is_ppos():
    """ppg.py copies ppo.py's GAE (tested against slow loops in test_math.py)."""
    rng = np.random.default_rng(0)
    T, N = 11, 5
    rewards = rng.normal(size=(T, N)).astype(np.float32)
    values = rng.normal(size=(T + 1, N)).astype(np.float32)
    term = (rng.random((T, N)) < 0.15).astype(np.float32)
    trunc = (rng.random((T, N)) < 0.15).astype(np.float32)
    np.testing.assert_array_equal(load("ppg").gae(rewards, values, term, trunc, 0.97, 0.9),
                                  load("ppo").gae(rewards, values, term, trunc, 0.97, 0.9))


# ---------------------------------------------------------------- the networks


def test_numpy_copy_of_the_policy_matches_torch():
    ppg = load("ppg")
    torch.manual_seed(0)
    agent = ppg.Agent(5, 3)
    for p in agent.parameters():
        torch.nn.init.normal_(p)
    x = np.random.default_rng(0).normal(size=(7, 5)).astype(np.float32)
    with torch.no_grad():
        expected = agent.actor(torch.as_tensor(x)).numpy()
    np.testing.assert_allclose(ppg.numpy_mlp(agent.actor)(x), expected, rtol=1e-5, atol=1e-5)


def test_auxiliary_head_trains_the_policy_trunk_and_not_the_value_network():
    """The auxiliary value head sits on the policy network's last hidden layer: L^aux moves the policy's
    hidden layers (the features that distillation is for), not its logits layer and nothing of V_φ."""
    ppg = load("ppg")
    torch.manual_seed(0)
    agent = ppg.Agent(4, 2)
    obs = torch.randn(16, 4)
    logits, aux_value = agent.logits_and_aux_value(obs)
    torch.testing.assert_close(logits, agent.actor(obs))
    assert aux_value.shape == (16,)
    ppg.value_loss(aux_value, torch.randn(16)).backward()
    assert agent.aux_value.weight.grad.abs().sum() > 0
    assert agent.actor[0].weight.grad.abs().sum() > 0 and agent.actor[2].weight.grad.abs().sum() > 0
    assert agent.actor[4].weight.grad is None
    assert all(p.grad is None for p in agent.critic.parameters())


# ---------------------------------------------------------------- smoke


def test_runs_and_writes_summary():
    summary = run("ppg", **TINY)
    with open(os.path.join(summary["run_dir"], "summary.json")) as f:
        assert json.load(f) == summary
    assert summary["algorithm"] == "ppg" and summary["stopped"] is None
    assert summary["global_step"] == TINY["total_timesteps"]
    for key in ["wall_seconds", "SPS", "mean_return"]:
        assert finite(summary[key]), (key, summary[key])
    assert summary["episodes"] > 0


def test_same_seed_same_returns():
    a, b, c = run("ppg", seed=3, **TINY), run("ppg", seed=3, **TINY), run("ppg", seed=4, **TINY)
    assert (a["mean_return"], a["episodes"]) == (b["mean_return"], b["episodes"])
    assert (a["mean_return"], a["episodes"]) != (c["mean_return"], c["episodes"])


def test_auxiliary_phase_every_n_pi_iterations_with_its_own_keys_and_steps():
    """Optimiser steps: E_π minibatch steps per iteration, plus E_aux × N_π × aux_num_minibatches at each
    auxiliary phase (after iterations N_π, 2N_π, ...; none for a last, incomplete group); the auxiliary
    keys are logged once per phase."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from torch.optim.optimizer import register_optimizer_step_post_hook

    budget = dict(TINY, total_timesteps=TINY["total_timesteps"] + 3 * 256, n_pi=4, aux_epochs=2)
    args = load("ppg").Args(**budget)
    iterations = args.total_timesteps // (args.num_envs * args.num_steps)
    phases = iterations // args.n_pi
    assert iterations % args.n_pi != 0 and phases == 2
    steps = [0]
    handle = register_optimizer_step_post_hook(lambda optimizer, a, k: steps.__setitem__(0, steps[0] + 1))
    try:
        summary = run("ppg", **budget)
    finally:
        handle.remove()
    assert summary["stopped"] is None
    assert steps[0] == (iterations * args.update_epochs * args.num_minibatches
                        + phases * args.aux_epochs * args.n_pi * args.aux_num_minibatches)
    accumulator = EventAccumulator(summary["run_dir"]).Reload()
    tags = set(accumulator.Tags()["scalars"])
    for key in ["losses/policy_loss", "losses/value_loss", "losses/entropy", "losses/approx_kl", "losses/clipfrac",
                "losses/explained_variance", "charts/learning_rate", "charts/episodic_return", "charts/SPS"]:
        assert len(accumulator.Scalars(key)) >= 1, key
    batch = args.num_envs * args.num_steps
    for key in ["losses/aux_value", "losses/kl_clone", "losses/aux_phase_value_loss", "charts/aux_learning_rate"]:
        assert key in tags, key
        events = accumulator.Scalars(key)
        assert [e.step for e in events] == [k * args.n_pi * batch for k in range(1, phases + 1)], key
        assert all(math.isfinite(e.value) and e.value >= -1e-6 for e in events), key


def test_save_and_evaluate(capsys):
    summary = run("ppg", save_model=True, **TINY)
    path = os.path.join(summary["run_dir"], "ppg.pt")
    ckpt = torch.load(path, weights_only=True)
    assert ckpt["algorithm"] == "ppg" and "model" in ckpt
    assert any(k.startswith("aux_value.") for k in ckpt["model"]) and any(k.startswith("critic.") for k in ckpt["model"])
    result = run("ppg", eval_checkpoint=path, eval_episodes=2)
    assert result["mode"] == "eval" and result["episodes"] == 2 and finite(result["mean_return"])
    assert "mean return" in capsys.readouterr().out
    with pytest.raises(SystemExit) as e:
        run("ppo", eval_checkpoint=path)
    assert e.value.code == 2


def expect_refusal(capsys, must_mention, **overrides):
    with pytest.raises(SystemExit) as e:
        run("ppg", **overrides)
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:"), err
    assert must_mention in err[0], err[0]
    assert not os.path.exists("runs"), "a refused run must not create runs/"


def test_bad_input(capsys):
    expect_refusal(capsys, "--n-pi", n_pi=0)
    expect_refusal(capsys, "--aux-epochs", aux_epochs=0)
    expect_refusal(capsys, "--beta-clone", beta_clone=-1.0)
    expect_refusal(capsys, "--aux-learning-rate", aux_learning_rate=0.0)
    expect_refusal(capsys, "--aux-num-minibatches", aux_num_minibatches=0)
    expect_refusal(capsys, "--aux-num-minibatches", aux_num_minibatches=10_000)
    expect_refusal(capsys, "--num-minibatches", num_minibatches=100_000)
    expect_refusal(capsys, "--n-pi", total_timesteps=2048, n_pi=8, num_envs=4, num_steps=128)  # 4 iterations < 8
    expect_refusal(capsys, "ppo_continuous.py", env_id="Pendulum-v1")
    expect_refusal(capsys, "NoSuchEnv-v0", env_id="NoSuchEnv-v0")
    expect_refusal(capsys, "--total-timesteps", total_timesteps=0)
    expect_refusal(capsys, "one batch", total_timesteps=511)
    torch.save({"algorithm": "ppo", "args": {"env_id": "CartPole-v1"}}, "ppo.pt")
    expect_refusal(capsys, "ppo", eval_checkpoint="ppo.pt")


def test_bad_input_from_the_command_line(in_tmp_dir):
    for flags, must_mention in [(["--n-pi", "0"], "--n-pi"), (["--beta-clone", "nan"], "--beta-clone"),
                                (["--total-timesteps", "1024"], "--n-pi"),
                                (["--env-id", "Pendulum-v1"], "Box"), (["--env-id", "NoSuchEnv-v0"], "NoSuchEnv-v0")]:
        proc = subprocess.run([sys.executable, SCRIPT, *flags], capture_output=True, text=True, timeout=120)
        lines = proc.stderr.strip().splitlines()
        assert proc.returncode == 2 and len(lines) == 1 and must_mention in lines[0], proc.stderr
        assert "Traceback" not in proc.stderr
        assert not os.path.exists("runs")


# ---------------------------------------------------------------- learning


@pytest.mark.learning
def test_learns_cartpole():
    """250k steps (half the default budget, the learning rates annealed over it): seeds 1-3 end at 500,
    having passed 475 after 90k-130k steps."""
    summary = run("ppg", seed=1, total_timesteps=250_000)
    print(f"ppg: mean return {summary['mean_return']:.1f} over the last {summary['episodes_in_mean']} episodes, "
          f"{summary['global_step']:,} steps, {summary['wall_seconds']:.0f} s")
    assert summary["episodes_in_mean"] == 20
    assert summary["mean_return"] >= 475.0
