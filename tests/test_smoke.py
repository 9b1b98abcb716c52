"""Every script with a tiny budget on CPU: runs, writes summary.json, saves and evaluates a
model, refuses bad input with one line and exit code 2, is deterministic, survives Ctrl-C."""

import json
import math
import os
import subprocess
import sys

import gymnasium as gym
import pytest

from conftest import ALGOS_DIR, load, run

TINY = {
    "reinforce": dict(total_timesteps=1500),
    "reinforce_baseline": dict(total_timesteps=1500, baseline=True),
    "actor_critic": dict(total_timesteps=1600),
    "a2c": dict(total_timesteps=2000),
    "ppo": dict(total_timesteps=2048, num_envs=4, num_steps=64),
    "ppo_continuous": dict(env_id="InvertedPendulum-v4", total_timesteps=1024, num_steps=256, num_minibatches=4, update_epochs=2),
}
SCRIPT = {case: case.replace("_baseline", "") for case in TINY}
DISCRETE = ["reinforce", "actor_critic", "a2c", "ppo"]
WRONG_SPACE = {name: ("Pendulum-v1", "ppo_continuous.py") for name in DISCRETE}
WRONG_SPACE["ppo_continuous"] = ("CartPole-v1", "ppo.py")


def finite(x):
    return isinstance(x, (int, float)) and math.isfinite(x)


@pytest.mark.parametrize("case", TINY)
def test_runs_and_writes_summary(case, in_tmp_dir):
    summary = run(SCRIPT[case], **TINY[case])
    with open(os.path.join(summary["run_dir"], "summary.json")) as f:
        on_disk = json.load(f)
    assert on_disk == summary
    assert summary["algorithm"] == SCRIPT[case]
    for key in ["global_step", "wall_seconds", "SPS", "mean_return"]:
        assert finite(summary[key]), (key, summary[key])
    assert summary["global_step"] >= TINY[case]["total_timesteps"] * 0.5
    assert 0 < summary["episodes_in_mean"] <= 20
    assert summary["stopped"] is None
    assert any(f.startswith("events.out.tfevents") for f in os.listdir(summary["run_dir"]))


@pytest.mark.parametrize("name", list(WRONG_SPACE))
def test_save_and_evaluate(name, in_tmp_dir, capsys):
    summary = run(name, save_model=True, **TINY[name])
    path = os.path.join(summary["run_dir"], f"{name}.pt")
    assert os.path.isfile(path)
    result = run(name, eval_checkpoint=path, eval_episodes=2)
    assert result["mode"] == "eval" and result["episodes"] == 2 and finite(result["mean_return"])
    assert "mean return" in capsys.readouterr().out
    other = "a2c" if name != "a2c" else "ppo"
    with pytest.raises(SystemExit) as e:
        run(other, eval_checkpoint=path)
    assert e.value.code == 2


def expect_refusal(name, capsys, must_mention, **overrides):
    with pytest.raises(SystemExit) as e:
        run(name, **overrides)
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:"), err
    assert must_mention in err[0], err[0]
    assert not os.path.exists("runs"), "a refused run must not create runs/"


@pytest.mark.parametrize("name", list(WRONG_SPACE))
def test_bad_input(name, in_tmp_dir, capsys):
    env_id, suggestion = WRONG_SPACE[name]
    expect_refusal(name, capsys, suggestion, env_id=env_id)
    expect_refusal(name, capsys, "NoSuchEnv-v0", env_id="NoSuchEnv-v0")
    expect_refusal(name, capsys, "--total-timesteps", total_timesteps=0)
    expect_refusal(name, capsys, "--total-timesteps", total_timesteps=-100)
    if name.startswith("ppo"):
        expect_refusal(name, capsys, "--num-minibatches", num_minibatches=100_000)


def test_bad_input_from_the_command_line(in_tmp_dir):
    out = subprocess.run([sys.executable, os.path.join(ALGOS_DIR, "ppo.py"), "--env-id", "Hopper-v4"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 2
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and "ppo_continuous.py" in lines[0], out.stderr
    assert not os.path.exists("runs")


@pytest.mark.parametrize("case", TINY)
def test_same_seed_same_returns(case, in_tmp_dir):
    a = run(SCRIPT[case], seed=3, **TINY[case])
    b = run(SCRIPT[case], seed=3, **TINY[case])
    c = run(SCRIPT[case], seed=4, **TINY[case])
    assert (a["mean_return"], a["episodes"], a["global_step"]) == (b["mean_return"], b["episodes"], b["global_step"])
    assert (a["mean_return"], a["episodes"]) != (c["mean_return"], c["episodes"])


@pytest.mark.parametrize("case", ["reinforce", "reinforce_baseline", "actor_critic"])
def test_global_step_counts_every_env_step(case, in_tmp_dir, monkeypatch):
    """Every env.step of every env is counted, also reinforce's steps of the episodes that a batch
    discards (an env whose episode ended first steps on until the longest one ends)."""
    real_step, env_steps = gym.vector.SyncVectorEnv.step, [0]

    def step(self, actions):
        env_steps[0] += self.num_envs
        return real_step(self, actions)

    monkeypatch.setattr(gym.vector.SyncVectorEnv, "step", step)
    summary = run(SCRIPT[case], **TINY[case])
    assert summary["global_step"] == env_steps[0]


@pytest.mark.parametrize("name", list(WRONG_SPACE))
def test_ctrl_c_saves_and_closes(name, in_tmp_dir, monkeypatch):
    real_step, calls = gym.vector.SyncVectorEnv.step, [0]

    def step(self, actions):
        calls[0] += 1
        if calls[0] == 300:
            raise KeyboardInterrupt
        return real_step(self, actions)

    monkeypatch.setattr(gym.vector.SyncVectorEnv, "step", step)
    budget = dict(TINY[name], total_timesteps=100_000)
    summary = run(name, save_model=True, **budget)
    assert summary["stopped"] == "interrupted" and summary["global_step"] < 100_000
    assert os.path.isfile(os.path.join(summary["run_dir"], f"{name}.pt"))
    assert os.path.isfile(os.path.join(summary["run_dir"], "summary.json"))


def test_capture_video(in_tmp_dir):
    summary = run("ppo", capture_video=True, **TINY["ppo"])
    videos = os.path.join(summary["run_dir"], "videos")
    assert any(f.endswith(".mp4") for f in os.listdir(videos))


def test_capture_video_mujoco_refusal_suggests_what_works(in_tmp_dir):
    """Headless MuJoCo rendering needs MUJOCO_GL: without it, a one-line refusal that names
    MUJOCO_GL=egl; with the suggestion followed, the video is written."""
    script = os.path.join(ALGOS_DIR, "ppo_continuous.py")
    flags = ["--env-id", "InvertedPendulum-v4", "--total-timesteps", "512", "--num-steps", "256",
             "--update-epochs", "1", "--capture-video", "--no-cuda"]
    env = {k: v for k, v in os.environ.items() if k not in ("MUJOCO_GL", "PYOPENGL_PLATFORM", "DISPLAY")}
    out = subprocess.run([sys.executable, script, *flags], capture_output=True, text=True, timeout=300, env=env)
    if out.returncode == 2:
        lines = out.stderr.strip().splitlines()
        assert len(lines) == 1 and "MUJOCO_GL=egl" in lines[0], out.stderr
        assert not os.path.exists("runs")
    else:  # a machine with a display renders without help
        assert out.returncode == 0, out.stderr[-2000:]
    out = subprocess.run([sys.executable, script, *flags], capture_output=True, text=True, timeout=300,
                         env=dict(env, MUJOCO_GL="egl"))
    assert out.returncode == 0, out.stderr[-2000:]
    [run_dir] = [d for d in os.listdir("runs")]
    assert any(f.endswith(".mp4") for f in os.listdir(os.path.join("runs", run_dir, "videos")))


def test_ppo_minibatches_of_one_sample_stay_finite(in_tmp_dir):
    """8 envs x 16 steps in 64 minibatches: dropping reset rows leaves minibatches of one
    sample, whose advantage has no spread to normalise by (its std is NaN)."""
    summary = run("ppo", num_envs=8, num_steps=16, num_minibatches=64, total_timesteps=4096)
    assert summary["stopped"] is None and finite(summary["mean_return"])


def optimizer_steps(name, **overrides):
    """The number of optimiser steps of one run, counted by torch.optim's global post-hook."""
    from torch.optim.optimizer import register_optimizer_step_post_hook

    steps = [0]
    handle = register_optimizer_step_post_hook(lambda optimizer, args, kwargs: steps.__setitem__(0, steps[0] + 1))
    try:
        summary = run(name, **overrides)
    finally:
        handle.remove()
    assert summary["stopped"] is None and finite(summary["mean_return"])
    return steps[0]


@pytest.mark.parametrize("name", ["ppo", "ppo_continuous"])
def test_ppo_target_kl_stops_after_the_epoch_that_passes_it(name, in_tmp_dir):
    """The KL is read per epoch, from that epoch's minibatches: a target_kl that every epoch's KL passes
    stops each iteration after exactly one epoch of minibatches, where no target runs them all."""
    args = load(name).Args(**TINY[name])
    iterations = args.total_timesteps // (args.num_envs * args.num_steps)
    assert optimizer_steps(name, **TINY[name]) == iterations * args.update_epochs * args.num_minibatches
    assert optimizer_steps(name, target_kl=1e-12, **TINY[name]) == iterations * args.num_minibatches


def test_ppo_continuous_minibatches_of_one_sample_stay_finite(in_tmp_dir):
    """1 env x 16 steps in 8 minibatches on InvertedPendulum (episodes of a few steps at first):
    dropping reset rows leaves minibatches of one sample, which must not be normalised by its own std."""
    summary = run("ppo_continuous", env_id="InvertedPendulum-v4", num_steps=16, num_minibatches=8,
                  update_epochs=2, total_timesteps=2048)
    assert summary["stopped"] is None and finite(summary["mean_return"])


def test_ppo_continuous_evaluation_leaves_training_alone(in_tmp_dir):
    """--eval-frequency normalises the eval env's observations by the current statistics without
    updating them: the same seed trains the same model with the same statistics with and without it."""
    import torch

    plain = run("ppo_continuous", save_model=True, **TINY["ppo_continuous"])
    evaluated = run("ppo_continuous", save_model=True, exp_name="evaluated", eval_frequency=256, eval_episodes=2,
                    **TINY["ppo_continuous"])
    assert evaluated["eval_step"] is not None and finite(evaluated["eval_return"])
    assert (plain["mean_return"], plain["episodes"]) == (evaluated["mean_return"], evaluated["episodes"])
    a, b = (torch.load(os.path.join(s["run_dir"], "ppo_continuous.pt"), weights_only=True) for s in (plain, evaluated))
    for part in ("model", "obs_rms", "return_rms"):
        for key in a[part]:
            assert torch.equal(a[part][key], b[part][key]), (part, key)
