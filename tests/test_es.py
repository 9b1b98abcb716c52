"""es.py: centred ranks and the ES gradient estimate (against slow references and a quadratic
with a known gradient), the policy and observation statistics; smoke (CartPole-v1 and
InvertedPendulum-v4, one to three playing processes, the command line, torchrun with two ranks);
save/evaluate, bad input, determinism across process counts; no process left after a normal
run, Ctrl-C, a worker's error or death, or the main process's death; learning on CartPole-v1."""

import json
import math
import os
import re
import select
import signal
import subprocess
import sys
import textwrap
import time

import gymnasium as gym
import numpy as np
import pytest
import torch

from conftest import ALGOS_DIR, load, run

TINY = dict(total_timesteps=5000, num_workers=1)
SCRIPT = os.path.join(ALGOS_DIR, "es.py")


def finite(x):
    return isinstance(x, (int, float)) and math.isfinite(x)


def living_in_group(pgid):
    """The processes of a process group that still run (Linux /proc). A zombie has finished: it
    waits only for init to reap it, which some containers' init does a second or two late."""
    pids = []
    for entry in os.listdir("/proc"):
        try:
            with open(f"/proc/{entry}/stat") as f:
                state, _, pgrp = f.read().rsplit(")", 1)[1].split()[:3]
        except (OSError, ValueError):  # not a process, or it has just gone
            continue
        if int(pgrp) == pgid and state != "Z":
            pids.append(int(entry))
    return pids


def wait_for_empty_group(pgid, seconds):
    deadline = time.time() + seconds
    while living_in_group(pgid) and time.time() < deadline:
        time.sleep(0.2)
    return living_in_group(pgid)


def workers_of(pid):
    """The worker processes (multiprocessing's spawn_main) started by process `pid`."""
    found = []
    for entry in os.listdir("/proc"):
        try:
            with open(f"/proc/{entry}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                cmdline = f.read()
        except (OSError, ValueError):
            continue
        if ppid == pid and b"spawn_main" in cmdline:
            found.append(int(entry))
    return found


def start(flags, env=None):
    """es.py in its own process group (Ctrl-C reaches all of it), as a shell would start it."""
    return subprocess.Popen([sys.executable, SCRIPT, *flags], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True, env=env,
                            # pytest-xdist workers ignore SIGINT and a child would inherit that: as from a shell
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))


def first_progress_line(proc, seconds=120):
    deadline, line = time.time() + seconds, ""
    while time.time() < deadline and not line.startswith("step"):
        if select.select([proc.stdout], [], [], 1.0)[0]:
            line = proc.stdout.readline()
            if not line:
                break
    assert line.startswith("step"), (line, proc.poll())


def only_summary():
    [run_dir] = os.listdir("runs")
    with open(os.path.join("runs", run_dir, "summary.json")) as f:
        return json.load(f)


# ---------------------------------------------------------------- math: centred ranks (3)


def slow_centered_ranks(returns):
    """Straight from (3): the rank of R_i is the number of returns below it, plus half the
    number of the others equal to it (equal returns share the mean of their ranks)."""
    flat = np.ravel(returns)
    n = len(flat)
    out = [((flat < r).sum() + ((flat == r).sum() - 1) / 2) / (n - 1) - 0.5 for r in flat]
    return np.reshape(out, np.shape(returns))


def test_centered_ranks_range_order_and_invariance():
    es = load("es")
    rng = np.random.default_rng(0)
    for n in [2, 3, 10, 51, 1000]:
        returns = rng.normal(size=n) * 100
        ranks = es.centered_ranks(returns)
        np.testing.assert_allclose(ranks, slow_centered_ranks(returns), atol=1e-12)
        # distinct returns: exactly the values i / (n - 1) - 1/2, the lowest return at -1/2, the highest at 1/2
        np.testing.assert_allclose(np.sort(ranks), np.arange(n) / (n - 1) - 0.5, atol=1e-12)
        assert ranks[returns.argmin()] == -0.5 and ranks[returns.argmax()] == 0.5
        assert abs(ranks.sum()) < 1e-9
        assert (np.diff(ranks[np.argsort(returns)]) > 0).all()
        # only the order counts: a monotone transform of the returns changes nothing
        np.testing.assert_array_equal(es.centered_ranks(np.exp(returns / 100) * 3 - 7), ranks)


def test_centered_ranks_ties():
    es = load("es")
    np.testing.assert_allclose(es.centered_ranks(np.array([1.0, 2.0, 2.0, 3.0])), [-0.5, 0.0, 0.0, 0.5])
    np.testing.assert_allclose(es.centered_ranks(np.array([500.0, 500.0, 500.0, 500.0])), 0.0)  # all solved: no signal
    np.testing.assert_allclose(es.centered_ranks(np.array([9.0, 9.0, 1.0])), [0.25, 0.25, -0.5])
    rng = np.random.default_rng(1)
    for _ in range(20):
        returns = rng.integers(0, 5, size=(13, 2)).astype(float)  # many ties, in the [pairs, 2] layout of train()
        ranks = es.centered_ranks(returns)
        assert ranks.shape == (13, 2)
        np.testing.assert_allclose(ranks, slow_centered_ranks(returns), atol=1e-12)
        assert abs(ranks.sum()) < 1e-9 and ranks.min() >= -0.5 and ranks.max() <= 0.5
        for value in np.unique(returns):  # equal returns, equal fitness
            assert np.ptp(ranks[returns == value]) == 0


def test_antithetic_pairs_are_ranked_jointly_and_ties_cancel():
    """Ranks are taken over the whole population, not within pairs; a pair whose members score
    the same adds nothing to (2); swapping the members of every pair (or reversing the order of
    the returns) negates the estimate."""
    es = load("es")
    rng = np.random.default_rng(2)
    returns = rng.normal(size=(8, 2))
    returns[3, 1] = returns[3, 0]  # pair 3: a tie
    noise = rng.normal(size=(8, 5)).astype(np.float32)
    shaped = es.centered_ranks(returns)
    np.testing.assert_array_equal(shaped, es.centered_ranks(returns.ravel()).reshape(8, 2))
    g = es.es_gradient(shaped, noise, 0.1)
    other = noise.copy()
    other[3] = rng.normal(size=5)
    np.testing.assert_allclose(es.es_gradient(shaped, other, 0.1), g, atol=1e-12)
    np.testing.assert_allclose(es.es_gradient(es.centered_ranks(returns[:, ::-1]), noise, 0.1), -g, atol=1e-12)
    np.testing.assert_allclose(es.es_gradient(es.centered_ranks(-returns), noise, 0.1), -g, atol=1e-12)


# ---------------------------------------------------------------- math: the estimate (2)


def test_es_gradient_matches_the_sum_over_the_population():
    """(1 / (nσ)) Σ_i F_i ε_i over the n = 2P perturbations, ε of the second member being -ε_k."""
    es = load("es")
    rng = np.random.default_rng(3)
    P, d, sigma = 7, 11, 0.05
    fitness = rng.normal(size=(P, 2))
    noise = rng.normal(size=(P, d)).astype(np.float32)
    population = [(fitness[k, 0], noise[k].astype(np.float64)) for k in range(P)] + \
                 [(fitness[k, 1], -noise[k].astype(np.float64)) for k in range(P)]
    slow = sum(F * eps for F, eps in population) / (len(population) * sigma)
    np.testing.assert_allclose(es.es_gradient(fitness, noise, sigma), slow, atol=1e-12)


def test_perturbations_regenerate_from_their_seeds():
    es = load("es")
    a, b, c = es.perturbation(123, 10_000), es.perturbation(123, 10_000), es.perturbation(124, 10_000)
    assert a.dtype == np.float32 and np.array_equal(a, b) and not np.array_equal(a, c)
    assert abs(a.mean()) < 0.05 and abs(a.std() - 1) < 0.05  # N(0, 1): 5 standard errors and more


def test_es_gradient_on_a_quadratic_within_its_statistical_bound():
    """F(x) = bᵀx - ½ xᵀAx has the gradient g = b - Aθ at θ, and J(θ) of (1) has the same
    gradient (the smoothing adds the constant -½σ² tr A). Within an antithetic pair the even
    terms cancel exactly: F(θ + σε) - F(θ - σε) = 2σ gᵀε, so (2) on raw returns is
    ĝ = (1/P) Σ_k (gᵀε_k) ε_k, the mean of P independent vectors X = (gᵀε) ε with
    E[X] = g (unbiased) and, by Isserlis' theorem E[ε_i ε_j ε_k ε_l] = δ_ij δ_kl + δ_ik δ_jl + δ_il δ_jk,
    Cov[X] = E[(gᵀε)² εεᵀ] - ggᵀ = |g|² I + ggᵀ. So ĝ - g has covariance C = (|g|² I + ggᵀ) / P and,
    by the central limit theorem (P = 20,000), the Mahalanobis distance z = (ĝ - g)ᵀ C⁻¹ (ĝ - g) is
    χ² with d degrees of freedom: below 27.86, the 0.9999 quantile of χ²(6), in all but 1 run in
    10,000 (and the seeds are fixed). It must also be above 0.172, the 0.0001 quantile: an
    estimate too close to g would mean the noise is not what (2) says. A wrong scale (the 1/σ
    or 1/n of (2) missing) moves ĝ by a multiple of g and z by thousands."""
    es = load("es")
    rng = np.random.default_rng(4)
    d, P = 6, 20_000
    M = rng.normal(size=(d, d))
    A, b, theta = M @ M.T / d + np.eye(d), rng.normal(size=d), rng.normal(size=d)
    g = b - A @ theta
    C = (g @ g * np.eye(d) + np.outer(g, g)) / P
    for sigma, seed in [(0.02, 10), (0.5, 11), (3.0, 12)]:
        seeds = np.random.default_rng(seed).integers(0, 2**31, size=P)
        noise = np.stack([es.perturbation(int(s), d) for s in seeds])
        x_plus, x_minus = theta + sigma * noise.astype(np.float64), theta - sigma * noise.astype(np.float64)
        F = lambda x: x @ b - 0.5 * np.einsum("pi,ij,pj->p", x, A, x)  # noqa: E731
        fitness = np.stack([F(x_plus), F(x_minus)], axis=1)
        error = es.es_gradient(fitness, noise, sigma) - g
        z = error @ np.linalg.solve(C, error)
        assert 0.172 < z < 27.86, (sigma, z)


# ---------------------------------------------------------------- policy and observation statistics (5), (6)


def test_observation_statistics():
    es = load("es")
    mean, std = es.observation_statistics(0.0, np.zeros(3), np.zeros(3))
    assert np.array_equal(mean, np.zeros(3)) and np.array_equal(std, np.ones(3))
    rng = np.random.default_rng(5)
    states = rng.normal(size=(500, 3)) * [10.0, 1.0, 0.01] + [3.0, -1.0, 0.0]
    mean, std = es.observation_statistics(500.0, states.sum(0), (states**2).sum(0))
    np.testing.assert_allclose(mean, states.mean(0), atol=1e-9)
    np.testing.assert_allclose(std[:2], states.std(0)[:2], rtol=1e-9)
    assert std[2] == pytest.approx(0.1)  # a variance below 10⁻² is floored there


def test_policy_actions_are_bounded_and_greedy():
    es = load("es")
    policy = es.Policy(4, 3, seed=0)
    assert policy.theta.numel() == 4 * 64 + 64 + 64 * 64 + 64 + 64 * 3 + 3
    theta = np.random.default_rng(6).normal(size=policy.theta.numel()) * 5
    mean, std = np.zeros(4), np.ones(4)
    box = gym.spaces.Box(low=np.array([-3, 0, 10], np.float32), high=np.array([3, 0.5, 10.5], np.float32))
    act = es.make_policy(theta, policy.shapes, mean, std, box)
    for s in np.random.default_rng(7).normal(size=(100, 4)) * 100:
        a = act(s)
        assert a.dtype == np.float32 and box.contains(a), a
    discrete = es.make_policy(theta, policy.shapes, mean, std, gym.spaces.Discrete(3))
    s = np.ones(4)
    w = [theta[:256].reshape(4, 64), theta[256:320], theta[320:4416].reshape(64, 64), theta[4416:4480],
         theta[4480:4672].reshape(64, 3), theta[4672:]]
    logits = np.tanh(np.tanh(s @ w[0] + w[1]) @ w[2] + w[3]) @ w[4] + w[5]
    assert discrete(s) == int(logits.argmax())
    assert es.Policy(4, 3, seed=0).theta.equal(policy.theta)  # every rank builds the same θ from the seed


# ---------------------------------------------------------------- smoke


def test_runs_and_counts_every_env_step(monkeypatch):
    """One process: every env.step of every perturbed episode is in global_step, each
    perturbed episode is one training episode, the budget ends after a whole generation."""
    real_step, steps = gym.wrappers.RecordEpisodeStatistics.step, [0]

    def step(self, action):
        steps[0] += 1
        return real_step(self, action)

    monkeypatch.setattr(gym.wrappers.RecordEpisodeStatistics, "step", step)
    summary = run("es", **TINY)
    with open(os.path.join(summary["run_dir"], "summary.json")) as f:
        assert json.load(f) == summary
    assert summary["algorithm"] == "es" and summary["stopped"] is None
    assert summary["global_step"] == steps[0] >= 5000
    assert summary["episodes"] == 50 * summary["generations"] and summary["episodes_in_mean"] == 20
    for key in ["global_step", "wall_seconds", "SPS", "mean_return"]:
        assert finite(summary[key]), (key, summary[key])
    assert any(f.startswith("events.out.tfevents") for f in os.listdir(summary["run_dir"]))


def test_inverted_pendulum():
    """Box actions (bounded by the policy), two players, two episodes per perturbation, evaluation."""
    summary = run("es", env_id="InvertedPendulum-v4", total_timesteps=3000, num_workers=2, num_envs=2,
                  eval_frequency=1000, eval_episodes=2)
    assert summary["stopped"] is None and summary["global_step"] >= 3000 and finite(summary["mean_return"])
    assert summary["episodes"] == 2 * 50 * summary["generations"] and finite(summary["eval_return"])


def test_one_two_or_three_players_give_the_same_run():
    """Pairs are played by whichever process is free, but the noise and the starts come from the
    pairs' seeds: the same θ bit for bit with the main process alone or with one or two workers."""
    one = run("es", seed=3, total_timesteps=8000, num_workers=1)
    for n in [2, 3]:
        many = run("es", seed=3, total_timesteps=8000, num_workers=n, exp_name=f"players{n}")
        assert one["processes"] == 1 and many["processes"] == n
        for key in ["theta_crc32", "global_step", "episodes", "mean_return"]:
            assert one[key] == many[key], (n, key)
    other = run("es", seed=4, total_timesteps=8000, num_workers=1)
    assert other["theta_crc32"] != one["theta_crc32"]


def test_save_and_evaluate(capsys):
    summary = run("es", save_model=True, **TINY)
    path = os.path.join(summary["run_dir"], "es.pt")
    ckpt = torch.load(path, weights_only=True)
    assert ckpt["algorithm"] == "es" and ckpt["obs_stats"]["count"] == summary["global_step"]
    result = run("es", eval_checkpoint=path, eval_episodes=2)
    assert result["mode"] == "eval" and result["episodes"] == 2 and finite(result["mean_return"])
    assert "mean return" in capsys.readouterr().out
    with pytest.raises(SystemExit) as e:
        run("a2c", eval_checkpoint=path)
    assert e.value.code == 2


def test_two_players_from_the_command_line(in_tmp_dir):
    """A normal run, the main process and one worker: exit 0, one summary, no process of the run left."""
    proc = start(["--num-workers", "2", "--total-timesteps", "20000", "--no-cuda"])
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-2000:]
    assert out.strip().splitlines()[-1].startswith("run directory: runs/")
    summary = only_summary()
    assert summary["processes"] == 2 and summary["global_step"] >= 20000 and finite(summary["mean_return"])
    assert wait_for_empty_group(proc.pid, 10) == []


def test_torchrun_two_ranks(in_tmp_dir):
    """torchrun --standalone --nproc-per-node 2 on CPU (gloo): exit 0, one summary.json (rank 0's),
    both ranks end with the same θ, and it is the θ of the same run in one process."""
    flags = ["--total-timesteps", "8000", "--seed", "3", "--no-cuda"]
    proc = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                             SCRIPT, *flags], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-3000:]
    assert out.count("run directory: runs/") == 1
    summary = only_summary()
    assert summary["processes"] == 2 and len(summary["theta_crc32"]) == 2
    assert summary["theta_crc32"][0] == summary["theta_crc32"][1]
    assert wait_for_empty_group(proc.pid, 10) == []
    local = run("es", seed=3, total_timesteps=8000, num_workers=1, exp_name="local")
    assert local["theta_crc32"][0] == summary["theta_crc32"][0]
    assert (local["global_step"], local["mean_return"]) == (summary["global_step"], summary["mean_return"])


# ---------------------------------------------------------------- bad input


def expect_refusal(capsys, must_mention, **overrides):
    with pytest.raises(SystemExit) as e:
        run("es", **overrides)
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:"), err
    assert must_mention in err[0], err[0]
    assert not os.path.exists("runs"), "a refused run must not create runs/"


def test_bad_input(capsys, monkeypatch):
    expect_refusal(capsys, "--num-workers", num_workers=0)
    expect_refusal(capsys, "--sigma", sigma=0.0)
    expect_refusal(capsys, "--sigma", sigma=-0.1)
    expect_refusal(capsys, "--population-size", population_size=1)
    expect_refusal(capsys, "--population-size 51 is odd", population_size=51)
    expect_refusal(capsys, "NoSuchEnv-v0", env_id="NoSuchEnv-v0")
    expect_refusal(capsys, "ppo_atari.py", env_id="ALE/Breakout-v5")
    expect_refusal(capsys, "--total-timesteps", total_timesteps=0)
    expect_refusal(capsys, "--num-envs", num_envs=0)
    expect_refusal(capsys, "--gamma", gamma=1.5)
    torch.save({"algorithm": "a2c", "args": {"env_id": "CartPole-v1"}}, "a2c.pt")
    expect_refusal(capsys, "a2c", eval_checkpoint="a2c.pt")
    # under torchrun every rank refuses alike, before the process group forms: 4 ranks, 2 pairs
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "4")
    expect_refusal(capsys, "every rank needs one", population_size=4)


def test_bad_input_from_the_command_line(in_tmp_dir):
    for flags, must_mention in [(["--num-workers", "0"], "--num-workers"), (["--sigma", "0"], "--sigma"),
                                (["--population-size", "7"], "odd"), (["--env-id", "NoSuchEnv-v0"], "NoSuchEnv-v0")]:
        out = subprocess.run([sys.executable, SCRIPT, *flags], capture_output=True, text=True, timeout=120)
        lines = out.stderr.strip().splitlines()
        assert out.returncode == 2 and len(lines) == 1 and must_mention in lines[0], out.stderr
        assert not os.path.exists("runs")


# ---------------------------------------------------------------- processes: Ctrl-C, a failed or killed worker


def test_ctrl_c_stops_every_process(in_tmp_dir):
    """SIGINT to the whole process group, as a terminal's Ctrl-C: the workers ignore it, the main
    process stops them, saves, writes its summary and exits with 130; no process left."""
    proc = start(["--num-workers", "3", "--total-timesteps", "50000000", "--save-model", "--no-cuda"])
    first_progress_line(proc)
    os.killpg(proc.pid, signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err[-2000:]
    assert err.strip().splitlines() == [err.strip().splitlines()[0]] and err.startswith("stopped: Ctrl-C"), err
    summary = only_summary()
    assert summary["stopped"] == "interrupted" and os.path.isfile(os.path.join(summary["run_dir"], "es.pt"))
    assert wait_for_empty_group(proc.pid, 10) == []


def test_killed_worker_stops_the_run(in_tmp_dir):
    """SIGKILL to one worker: the main process notices, names it, stops the other, saves and
    exits 1 (child-failed) with one line on stderr; no hang, no process left."""
    proc = start(["--num-workers", "3", "--total-timesteps", "50000000", "--save-model", "--no-cuda"])
    first_progress_line(proc)
    workers = workers_of(proc.pid)
    assert len(workers) == 2, workers
    os.kill(workers[1], signal.SIGKILL)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 1, err[-2000:]
    lines = err.strip().splitlines()
    assert len(lines) == 1 and re.fullmatch(r"stopped: worker [01] died \(killed by SIGKILL\)", lines[0]), err
    summary = only_summary()
    assert summary["stopped"] == "child-failed" and summary["stop_reason"] == lines[0][len("stopped: "):]
    assert os.path.isfile(os.path.join(summary["run_dir"], "es.pt"))
    assert wait_for_empty_group(proc.pid, 10) == []


BROKEN_ENV = """
import multiprocessing

import gymnasium as gym
from gymnasium.envs.classic_control import CartPoleEnv


class BrokenCartPole(CartPoleEnv):
    # breaks after 3,000 steps in a worker process (the main process, which plays too, never breaks)
    def step(self, action):
        self.steps = getattr(self, "steps", 0) + 1
        if self.steps == 3000 and multiprocessing.parent_process() is not None:
            raise ValueError("the simulator broke\\nsecond line")
        return super().step(action)


gym.register("Broken-v0", entry_point=BrokenCartPole, max_episode_steps=500)
"""


def test_worker_error_is_reported_in_one_line(in_tmp_dir):
    """An exception inside a worker (its env breaks): the main process reports the worker and the
    first line of its error, exits 1, no traceback, no process left."""
    with open("brokenenv.py", "w") as f:
        f.write(textwrap.dedent(BROKEN_ENV))
    env = dict(os.environ, PYTHONPATH=os.getcwd())  # the workers import it too ("module:EnvId")
    proc = start(["--env-id", "brokenenv:Broken-v0", "--num-workers", "3", "--total-timesteps", "1000000",
                  "--no-cuda"], env=env)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 1, err[-2000:]
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    assert lines[0].startswith("stopped: worker ") and lines[0].endswith("failed: ValueError: the simulator broke")
    assert only_summary()["stopped"] == "child-failed"
    assert wait_for_empty_group(proc.pid, 10) == []


def test_workers_stop_when_the_main_process_dies(in_tmp_dir):
    """SIGKILL to the main process alone (no clean-up possible): its workers notice and exit."""
    proc = start(["--num-workers", "3", "--total-timesteps", "50000000", "--no-cuda"])
    first_progress_line(proc)
    assert len(workers_of(proc.pid)) == 2
    proc.kill()
    proc.communicate(timeout=60)
    left = wait_for_empty_group(proc.pid, 30)  # a worker notices within a second of its episode's end
    if left:
        os.killpg(proc.pid, signal.SIGKILL)
    assert left == [], "worker processes outlived the main process"


# ---------------------------------------------------------------- learning


@pytest.mark.learning
def test_learns_cartpole():
    """Mean return of the last 20 perturbed episodes (the training episodes) on CartPole-v1."""
    summary = run("es", seed=1, total_timesteps=500_000)
    print(f"es: mean return {summary['mean_return']:.1f} over the last {summary['episodes_in_mean']} episodes, "
          f"{summary['global_step']:,} steps, {summary['wall_seconds']:.0f} s")
    assert summary["episodes_in_mean"] == 20
    assert summary["mean_return"] >= 475.0
