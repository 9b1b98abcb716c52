"""ppo_atari.py: GAE against the slow loop of test_math; the environment stack seen from below
(a wrapper under every wrapper of the script records what the emulator does, frame by frame):
(4, 84, 84) uint8 stacked frames, the logged scores are the raw rewards of whole games while the
learning rewards are their signs, a lost life ends the training episode without resetting the
game, FIRE after every reset and every lost life; smoke, determinism, save / --eval-checkpoint,
bad input (in-process and from the command line). No learning test (DESIGN.md: smoke only; the
learning evidence is the Pong and Breakout curves of benchmark.sh)."""

import json
import math
import os
import subprocess
import sys

import gymnasium as gym
import numpy as np
import pytest
import torch

from conftest import ALGOS_DIR, TINY, load, run
from test_math import GAMMA, LAM, check, random_rollout, slow_gae

TINY = TINY["ppo_atari"]
SCRIPT = os.path.join(ALGOS_DIR, "ppo_atari.py")


def finite(x):
    return isinstance(x, (int, float)) and math.isfinite(x)


# ---------------------------------------------------------------- math: GAE (2), (3)


@pytest.mark.parametrize("seed", range(3))
def test_gae(seed):
    rewards, term, trunc, reset, values, episodes = random_rollout(64, 6, seed)
    fast = load("ppo_atari").gae(rewards, values, term, trunc, GAMMA, LAM)
    check(fast, slow_gae(rewards, values, episodes, GAMMA, LAM), reset)


# ---------------------------------------------------------------- the environment stack


class Emulator(gym.Wrapper):
    """Put right on gym.make's env, under every wrapper of the script: every frame's action and
    raw reward since the emulator's last reset, and how many resets it had."""

    def __init__(self, env):
        super().__init__(env)
        self.resets, self.actions, self.rewards = 0, [], []

    def step(self, action):
        obs, reward, terminated, truncated, info = self.env.step(action)
        self.actions.append(int(action))
        self.rewards.append(float(reward))
        return obs, reward, terminated, truncated, info

    def reset(self, **kwargs):
        self.resets, self.actions, self.rewards = self.resets + 1, [], []
        return self.env.reset(**kwargs)


@pytest.fixture
def stack(monkeypatch):
    """make(env_id) -> (the script's single env, the Emulator under it)."""
    real_make = gym.make

    def make(env_id, repeat_action_probability=0.0):
        made = []

        def make_under(*args, **kwargs):
            made.append(Emulator(real_make(*args, **kwargs)))
            return made[-1]

        monkeypatch.setattr(gym, "make", make_under)
        env = load("ppo_atari").make_env(env_id, 0, False, "unused", repeat_action_probability)()
        monkeypatch.setattr(gym, "make", real_make)
        return env, made[0]

    return make


def lives(env):
    return env.unwrapped.ale.lives()


def test_observations_are_four_stacked_uint8_frames():
    ppo_atari = load("ppo_atari")
    envs = gym.vector.SyncVectorEnv([ppo_atari.make_env("ALE/Breakout-v5", i, False, "unused", 0.0) for i in range(2)])
    assert envs.single_observation_space.shape == (4, 84, 84) and envs.single_observation_space.dtype == np.uint8
    obs, _ = envs.reset(seed=0)
    envs.action_space.seed(0)
    moved, done = False, np.zeros(2, dtype=bool)
    for _ in range(200):
        assert obs.shape == (2, 4, 84, 84) and obs.dtype == np.uint8
        new_obs, _, term, trunc, _ = envs.step(envs.action_space.sample())
        for i in np.flatnonzero(~(term | trunc | done)):  # the oldest frame leaves, the others move up one place
            np.testing.assert_array_equal(new_obs[i, :3], obs[i, 1:])
            moved |= not np.array_equal(new_obs[i, 3], obs[i, 3])
        obs = new_obs
        done = term | trunc  # the next step is a reset step: a new stack
    assert moved
    envs.close()


def test_logged_scores_are_raw_whole_games_and_learning_rewards_are_signs(stack):
    """Space Invaders pays 5 to 30 points an alien: the learning rewards are their signs, while
    the score logged at the end of a game is the sum of every raw reward of all its lives, and
    its length counts emulator frames."""
    env, emulator = stack("ALE/SpaceInvaders-v5")
    env.reset(seed=1)
    env.action_space.seed(1)
    big, scores, lost_lives = False, [], 0
    while len(scores) < 2:
        before = len(emulator.rewards)
        _, reward, terminated, truncated, info = env.step(env.action_space.sample())
        raw = sum(emulator.rewards[before:])
        assert reward == np.sign(raw)  # (7)
        big |= raw > 1
        if "episode" in info:
            assert terminated or truncated
            assert info["episode"]["r"] == sum(emulator.rewards)
            assert info["episode"]["l"] == len(emulator.actions)
            scores.append(float(info["episode"]["r"]))
        elif terminated:
            lost_lives += 1
        if terminated or truncated:
            env.reset()
    assert big and min(scores) > 0 and lost_lives >= 2 * (3 - 1)  # three lives a game, the last one ends it
    assert emulator.resets == 1 + len(scores)  # the emulator was reset at game overs only


def test_a_lost_life_ends_the_episode_but_not_the_game(stack):
    env, emulator = stack("ALE/Breakout-v5")
    env.reset(seed=2)
    env.action_space.seed(2)
    assert lives(env) == 5
    seen = 0
    while seen < 3:
        _, _, terminated, truncated, info = env.step(env.action_space.sample())
        if terminated and "episode" not in info:
            seen += 1
            left, frames = lives(env), len(emulator.actions)
            assert left == 5 - seen
            env.reset()
            assert emulator.resets == 1 and lives(env) == left  # the same game goes on
            assert len(emulator.actions) > frames and emulator.actions[frames:] == [1] * 4  # only FIRE was pressed
        else:
            assert not (terminated or truncated), "the game ended before three lives were lost"


def test_fire_after_every_reset_and_lost_life_for_games_that_have_fire(stack):
    """Breakout stands still until FIRE: with FireReset, a policy that never presses it still
    plays whole games (a NOOP-only evaluation ends); FIRE is what the stack presses after the
    no-ops of a reset and after every lost life. Freeway has no FIRE and no FireReset."""
    ppo_atari = load("ppo_atari")
    env, emulator = stack("ALE/Breakout-v5")
    assert any(isinstance(w, ppo_atari.FireReset) for w in wrappers(env))
    env.reset(seed=3)
    noops = len(emulator.actions) - 4
    assert 1 <= noops <= 30 and emulator.actions == [0] * noops + [1] * 4
    scores = ppo_atari.evaluate_policy(lambda obs: 0, env, 2, seed=3)
    assert len(scores) == 2 and emulator.resets == 1 + 1 + 2  # the reset above, the seeded one, one per game over
    freeway, _ = stack("ALE/Freeway-v5")
    assert "FIRE" not in freeway.unwrapped.get_action_meanings()
    assert not any(isinstance(w, ppo_atari.FireReset) for w in wrappers(freeway))


def test_without_fire_breakout_stands_still(stack):
    """The control for the test above: the same game, no FireReset, NOOP only: no life is lost."""
    env, _ = stack("ALE/Breakout-v5")
    inner = env
    while not isinstance(inner, load("ppo_atari").EpisodicLife):
        inner = inner.env
    inner.reset(seed=3)
    for _ in range(1000):
        _, _, terminated, truncated, _ = inner.step(0)
        assert not (terminated or truncated) and lives(env) == 5


def wrappers(env):
    while isinstance(env, gym.Wrapper):
        yield env
        env = env.env


def test_sticky_actions_reach_the_emulator():
    ppo_atari = load("ppo_atari")
    for p in (0.0, 0.25):
        env = ppo_atari.make_env("ALE/Pong-v5", 0, False, "unused", p)()
        assert env.unwrapped.ale.getFloat("repeat_action_probability") == pytest.approx(p)
        assert env.unwrapped._frameskip == 1  # AtariPreprocessing does the frame skip
        env.close()


# ---------------------------------------------------------------- smoke


def test_runs_and_writes_summary():
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    summary = run("ppo_atari", **TINY)
    with open(os.path.join(summary["run_dir"], "summary.json")) as f:
        assert json.load(f) == summary
    assert summary["algorithm"] == "ppo_atari" and summary["stopped"] is None
    assert summary["global_step"] == TINY["total_timesteps"]
    for key in ["wall_seconds", "SPS"]:
        assert finite(summary[key]), (key, summary[key])
    tags = set(EventAccumulator(summary["run_dir"]).Reload().Tags()["scalars"])
    for key in ["losses/policy_loss", "losses/value_loss", "losses/entropy", "losses/approx_kl", "losses/clipfrac",
                "losses/explained_variance", "charts/SPS", "charts/learning_rate"]:
        assert key in tags, key


def test_same_seed_same_model():
    def model(seed):
        summary = run("ppo_atari", seed=seed, save_model=True, **TINY)
        return torch.load(os.path.join(summary["run_dir"], "ppo_atari.pt"), weights_only=True)["model"]

    a, b, c = model(3), model(3), model(4)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)


def test_save_and_evaluate(capsys):
    summary = run("ppo_atari", save_model=True, env_id="ALE/Pong-v5", **TINY)
    path = os.path.join(summary["run_dir"], "ppo_atari.pt")
    ckpt = torch.load(path, weights_only=True)
    assert ckpt["algorithm"] == "ppo_atari" and {"model", "args"} <= set(ckpt)
    result = run("ppo_atari", eval_checkpoint=path, eval_episodes=1)
    assert result["mode"] == "eval" and result["episodes"] == 1 and result["env_id"] == "ALE/Pong-v5"
    assert -21 <= result["mean_return"] <= 21  # a whole game of Pong
    assert "mean return" in capsys.readouterr().out
    with pytest.raises(SystemExit) as e:
        run("ppo", eval_checkpoint=path)
    assert e.value.code == 2


# ---------------------------------------------------------------- bad input


def expect_refusal(capsys, must_mention, **overrides):
    with pytest.raises(SystemExit) as e:
        run("ppo_atari", **{**TINY, **overrides})
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:"), err
    assert must_mention in err[0], err[0]
    assert not os.path.exists("runs"), "a refused run must not create runs/"


def test_bad_input(capsys):
    expect_refusal(capsys, "algos/ppo.py", env_id="CartPole-v1")
    expect_refusal(capsys, "algos/ppo_continuous.py", env_id="Pendulum-v1")
    expect_refusal(capsys, "ALE/NoSuchGame-v5", env_id="ALE/NoSuchGame-v5")
    expect_refusal(capsys, "NoSuchEnv-v0", env_id="NoSuchEnv-v0")
    expect_refusal(capsys, "--total-timesteps", total_timesteps=0)
    expect_refusal(capsys, "less than one batch", total_timesteps=63)
    expect_refusal(capsys, "--num-minibatches", num_minibatches=100_000)
    expect_refusal(capsys, "--repeat-action-probability", repeat_action_probability=1.0)
    expect_refusal(capsys, "--repeat-action-probability", repeat_action_probability=-0.1)
    expect_refusal(capsys, "--clip-coef", clip_coef=0.0)
    expect_refusal(capsys, "--learning-rate", learning_rate=float("nan"))
    torch.save({"algorithm": "ppo", "args": {"env_id": "CartPole-v1"}}, "ppo.pt")
    expect_refusal(capsys, "not ppo_atari.py", eval_checkpoint="ppo.pt")
    expect_refusal(capsys, "no checkpoint", eval_checkpoint="missing.pt")


def test_bad_input_from_the_command_line(in_tmp_dir):
    for flags, must_mention in [(["--env-id", "CartPole-v1"], "algos/ppo.py"),
                                (["--env-id", "ALE/NoSuchGame-v5"], "NoSuchGame"),
                                (["--repeat-action-probability", "1.5"], "--repeat-action-probability"),
                                (["--num-envs", "x"], "--num-envs")]:
        proc = subprocess.run([sys.executable, SCRIPT, *flags], capture_output=True, text=True, timeout=120)
        lines = proc.stderr.strip().splitlines()
        assert proc.returncode == 2 and len(lines) == 1 and lines[0].startswith("error:"), proc.stderr
        assert must_mention in lines[0], lines[0]
        assert "Traceback" not in proc.stderr
        assert not os.path.exists("runs")
