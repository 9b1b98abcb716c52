"""impala.py: V-trace against a slow loop written from its definition, and against A2C's n-step
targets on-policy; the actors' weights fixed within an unroll and the policy lag logged; smoke
(one and two actor processes, the command line, torchrun with two ranks), save/evaluate, bad
input, an actor's own error, no process left after a normal run, Ctrl-C or a killed actor;
learning on CartPole-v1."""

import json
import math
import os
import re
import select
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from conftest import ALGOS_DIR, load, run

SCRIPT = os.path.join(ALGOS_DIR, "impala.py")
TINY = dict(total_timesteps=2000, num_actors=2)


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


def actor_pids(parent):
    """The actor processes of a learner: its children started by multiprocessing's spawn (not
    the resource tracker)."""
    pids = []
    for entry in os.listdir("/proc"):
        try:
            with open(f"/proc/{entry}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            with open(f"/proc/{entry}/cmdline") as f:
                cmdline = f.read()
        except (OSError, ValueError):
            continue
        if ppid == parent and "spawn_main" in cmdline:
            pids.append(int(entry))
    return pids


def start(args, **popen):
    """The script in its own process group, as from a shell, and its first progress line."""
    proc = subprocess.Popen([sys.executable, SCRIPT, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True,
                            # pytest-xdist workers ignore SIGINT and a child would inherit that: as from a shell
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL), **popen)
    deadline, line = time.time() + 240, ""
    while time.time() < deadline and not line.startswith("step"):
        if select.select([proc.stdout], [], [], 1.0)[0]:
            line = proc.stdout.readline()
            if not line:
                break
    assert line.startswith("step"), (line, proc.poll())
    return proc


# ---------------------------------------------------------------- math: V-trace (1)-(4), (6)


def random_unrolls(seed, T=12, B=5):
    """[T, B] columns in the NEXT_STEP layout: episodes end by termination or truncation inside
    the unroll (also on its last row), the row after each end is a reset row (reward 0, no end);
    log-probabilities of π and μ that differ."""
    rng = np.random.default_rng(seed)
    rewards = rng.normal(size=(T, B))
    terminations, truncations, resets = np.zeros((T, B)), np.zeros((T, B)), np.zeros((T, B), dtype=bool)
    resets[0] = rng.random(B) < 0.2  # the previous unroll ended an episode on its last row
    for b in range(B):
        for t in range(T):
            if resets[t, b]:
                rewards[t, b] = 0.0
                continue
            end = rng.random()
            terminations[t, b], truncations[t, b] = end < 0.12, 0.12 <= end < 0.24
            if (end < 0.24) and t + 1 < T:
                resets[t + 1, b] = True
    terminations[-1, 0], truncations[-1, 1] = 1.0, 1.0  # ends on the unroll's last row
    for col in (0, 1):
        if resets[-1, col]:
            resets[-1, col], rewards[-1, col] = False, rng.normal()
    values = rng.normal(size=(T + 1, B))
    behaviour_logp = np.log(rng.uniform(0.05, 1.0, size=(T, B)))
    target_logp = np.log(rng.uniform(0.05, 1.0, size=(T, B)))
    return behaviour_logp, target_logp, rewards, values, terminations, truncations, resets


def slow_vtrace(behaviour_logp, target_logp, rewards, values, terminations, truncations, gamma, rho_bar, c_bar):
    """The definition (3), term by term: for each row t, δ_i summed from i = t to the first
    episode end at or after t (or the unroll's last row), each weighted by γ^(i-t) and the
    product of c_j for t <= j < i; then the advantage of (6) with v_{t+1} read off the result."""
    T, B = rewards.shape
    vs, adv = np.zeros((T, B)), np.zeros((T, B))
    for b in range(B):
        ratio = [math.exp(target_logp[i, b] - behaviour_logp[i, b]) for i in range(T)]
        rho = [min(rho_bar, x) for x in ratio]
        c = [min(c_bar, x) for x in ratio]
        delta = [rho[i] * (rewards[i, b] + gamma * (1 - terminations[i, b]) * values[i + 1, b] - values[i, b])
                 for i in range(T)]
        done = [bool(terminations[i, b] or truncations[i, b]) for i in range(T)]
        for t in range(T):
            total, i = 0.0, t
            while True:
                total += gamma ** (i - t) * math.prod(c[t:i]) * delta[i]
                if done[i] or i == T - 1:
                    break
                i += 1
            vs[t, b] = values[t, b] + total
        for t in range(T):
            if done[t]:
                nxt = (1 - terminations[t, b]) * values[t + 1, b]  # the final observation's value, or 0
            else:
                nxt = vs[t + 1, b] if t + 1 < T else values[T, b]
            adv[t, b] = rho[t] * (rewards[t, b] + gamma * nxt - values[t, b])
    return vs, adv


def call_vtrace(case, gamma, rho_bar, c_bar):
    return load("impala").vtrace(*case[:6], gamma, rho_bar, c_bar)


@pytest.mark.parametrize("rho_bar,c_bar", [(1.0, 1.0), (0.5, 2.0), (2.0, 0.7), (1e9, 1e9)])
def test_vtrace_matches_slow_loop(rho_bar, c_bar):
    for seed, gamma in [(0, 0.99), (1, 0.9), (2, 0.5), (3, 1.0)]:
        case = random_unrolls(seed)
        resets = case[-1]
        assert resets.any() and case[4].any() and case[5].any()
        vs, adv = call_vtrace(case, gamma, rho_bar, c_bar)
        want_vs, want_adv = slow_vtrace(*case[:6], gamma, rho_bar, c_bar)
        valid = ~resets  # reset rows are no transitions: their entries mean nothing
        np.testing.assert_allclose(vs[valid], want_vs[valid], rtol=1e-10, atol=1e-10)
        np.testing.assert_allclose(adv[valid], want_adv[valid], rtol=1e-10, atol=1e-10)


def test_vtrace_episode_ends_by_hand():
    """One column, π = μ: rewards 1, 2 | reset | 4, 8; the first episode ends at row 1, the
    unroll after row 4 with V(s_5) = 100."""
    values = np.array([[10.0], [20.0], [30.0], [40.0], [50.0], [100.0]])  # row 2 holds the final observation
    rewards = np.array([[1.0], [2.0], [0.0], [4.0], [8.0]])
    zeros = np.zeros((5, 1))
    resets = np.array([[False], [False], [True], [False], [False]])
    g = 0.5
    for terminated in (True, False):
        term, trunc = zeros.copy(), zeros.copy()
        (term if terminated else trunc)[1, 0] = 1.0
        case = (zeros, zeros, rewards, values, term, trunc, resets)
        vs, adv = call_vtrace(case, g, 1.0, 1.0)
        tail = 0.0 if terminated else 30.0  # truncation: V of the final observation
        assert vs[1, 0] == pytest.approx(2.0 + g * tail)
        assert vs[0, 0] == pytest.approx(1.0 + g * vs[1, 0])
        assert vs[4, 0] == pytest.approx(8.0 + g * 100.0)
        assert vs[3, 0] == pytest.approx(4.0 + g * vs[4, 0])
        np.testing.assert_allclose(adv[~resets], (vs - values[:-1])[~resets])


@pytest.mark.parametrize("bar", [1.0, 3.0])
def test_vtrace_on_policy_is_the_nstep_bellman_target(bar):
    """π = μ and ρ̄, c̄ ≥ 1: every ρ = c = 1, v_t is the n-step return of A2C's nstep_returns
    (and of a loop), and the advantage of (6) is v_t - V(s_t)."""
    a2c = load("a2c")
    for seed, gamma in [(4, 0.99), (5, 0.8)]:
        behaviour_logp, _, rewards, values, term, trunc, resets = random_unrolls(seed)
        case = (behaviour_logp, behaviour_logp, rewards, values, term, trunc, resets)
        vs, adv = call_vtrace(case, gamma, bar, bar)
        nstep = a2c.nstep_returns(rewards, values, term, trunc, gamma)
        T, B = rewards.shape
        loop = np.zeros((T, B))
        for b in range(B):
            for t in range(T):  # r_t + γ r_{t+1} + ... to the episode's or the unroll's end, then the bootstrap
                total, i = 0.0, t
                while True:
                    total += gamma ** (i - t) * rewards[i, b]
                    if term[i, b]:
                        break
                    if trunc[i, b] or i == T - 1:
                        total += gamma ** (i - t + 1) * values[i + 1, b]
                        break
                    i += 1
                loop[t, b] = total
        valid = ~resets
        np.testing.assert_allclose(vs[valid], nstep[valid], rtol=1e-10, atol=1e-10)
        np.testing.assert_allclose(vs[valid], loop[valid], rtol=1e-10, atol=1e-10)
        np.testing.assert_allclose(adv[valid], (vs - values[:-1])[valid], rtol=1e-10, atol=1e-10)


def test_vtrace_truncates_the_importance_weights():
    """With π/μ = 4 everywhere, ρ̄ = 1 and c̄ = 0.5: δ_i uses ρ = 1 and the trace decays by 0.5 γ."""
    T = 3
    ones, zeros, values = np.ones((T, 1)), np.zeros((T, 1)), np.zeros((T + 1, 1))
    vs, adv = load("impala").vtrace(zeros, ones * math.log(4.0), ones, values, zeros, zeros, 1.0, 1.0, 0.5)
    np.testing.assert_allclose(vs[:, 0], [1 + 0.5 + 0.25, 1 + 0.5, 1.0])
    np.testing.assert_allclose(adv[:, 0], [1 + 1.5, 1 + 1.0, 1.0])


# ---------------------------------------------------------------- smoke


@pytest.mark.parametrize("num_actors", [1, 2])
def test_runs_and_writes_summary(num_actors):
    summary = run("impala", total_timesteps=2000, num_actors=num_actors)
    with open(os.path.join(summary["run_dir"], "summary.json")) as f:
        assert json.load(f) == summary
    assert summary["algorithm"] == "impala" and summary["stopped"] is None
    assert summary["global_step"] == 1920  # 3 batches of 8 unrolls x 20 steps x 4 envs
    for key in ["wall_seconds", "SPS", "mean_return", "policy_lag"]:
        assert finite(summary[key]), (key, summary[key])
    assert summary["episodes"] > 20 and summary["policy_lag"] >= 0


def test_weights_fixed_within_an_unroll_and_policy_lag_logged(monkeypatch):
    """Every step of an unroll carries the same weight version; where that version is the
    learner's own (lag 0), μ's recorded log-probabilities are π's to float precision at every
    step, so no step was acted with other weights. The lags are logged (the mean of every 10
    updates' unrolls) and summarised."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    impala = load("impala")
    seen, vtrace, policy_lag = [], impala.vtrace, impala.policy_lag

    def recording_policy_lag(step_versions, updates):
        lags = policy_lag(step_versions, updates)
        seen.append({"versions": step_versions.clone(), "lags": lags.clone()})
        return lags

    def recording_vtrace(behaviour_logp, target_logp, *rest):
        seen[-1]["mu"], seen[-1]["pi"] = behaviour_logp.copy(), target_logp.copy()
        return vtrace(behaviour_logp, target_logp, *rest)

    monkeypatch.setattr(impala, "policy_lag", recording_policy_lag)
    monkeypatch.setattr(impala, "vtrace", recording_vtrace)
    defaults = impala.Args()
    N, B = defaults.num_envs, defaults.batch_size
    summary = run("impala", total_timesteps=40 * B * defaults.unroll_length * N, num_actors=2)
    assert len(seen) == 40
    on_policy = off_policy = 0
    for update, batch in enumerate(seen):
        versions, lags = batch["versions"], batch["lags"]
        assert (versions == versions[:, :1]).all(), f"weights changed inside an unroll: {versions}"
        assert (lags >= 0).all() and (lags == update - versions[:, 0]).all()
        for b, lag in enumerate(lags.tolist()):
            gap = np.abs(batch["mu"][:, b * N:(b + 1) * N] - batch["pi"][:, b * N:(b + 1) * N]).max()
            if lag == 0:
                assert gap < 1e-5, (update, b, gap)
                on_policy += 1
            elif gap > 1e-4:
                off_policy += 1
    assert on_policy >= B and off_policy > 0  # the first batch is on-policy; later ones lag
    all_lags = torch.cat([batch["lags"] for batch in seen]).double()
    assert summary["policy_lag"] == pytest.approx(all_lags.mean().item())
    logged = EventAccumulator(summary["run_dir"]).Reload().Scalars("charts/policy_lag")  # every 10 updates
    assert [e.value for e in logged] == pytest.approx([all_lags[i:i + 10 * B].mean().item()
                                                       for i in range(0, 40 * B, 10 * B)])


def test_two_actor_processes_from_the_command_line(in_tmp_dir):
    proc = subprocess.run([sys.executable, SCRIPT, "--num-actors", "2", "--total-timesteps", "3200", "--no-cuda"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip().splitlines()[-1].startswith("run directory: runs/")
    [run_dir] = os.listdir("runs")
    with open(os.path.join("runs", run_dir, "summary.json")) as f:
        summary = json.load(f)
    assert summary["global_step"] == 3200 and finite(summary["mean_return"]) and finite(summary["policy_lag"])


def test_no_process_left_after_a_normal_run(in_tmp_dir):
    proc = subprocess.Popen([sys.executable, SCRIPT, "--total-timesteps", "3200", "--no-cuda"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-2000:]
    assert wait_for_empty_group(proc.pid, 10) == []


def test_torchrun_two_ranks(in_tmp_dir):
    """Learner on rank 0 and one actor rank, gloo on CPU: finishes cleanly, one summary.json."""
    proc = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                             SCRIPT, "--total-timesteps", "3200", "--no-cuda"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-3000:]
    assert "Traceback" not in err, err[-3000:]
    [run_dir] = os.listdir("runs")
    with open(os.path.join("runs", run_dir, "summary.json")) as f:
        summary = json.load(f)
    assert summary["stopped"] is None and summary["global_step"] == 3200 and finite(summary["mean_return"])
    assert summary["episodes"] > 20 and finite(summary["policy_lag"])
    assert wait_for_empty_group(proc.pid, 10) == []


def test_torchrun_refuses_one_process(in_tmp_dir):
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "1",
                           SCRIPT, "--total-timesteps", "3200", "--no-cuda"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    ours = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(ours) == 1 and "2 or more processes" in ours[0], proc.stderr[-2000:]
    assert not os.path.exists("runs")


def test_save_and_evaluate(capsys):
    summary = run("impala", save_model=True, **TINY)
    path = os.path.join(summary["run_dir"], "impala.pt")
    assert os.path.isfile(path)
    result = run("impala", eval_checkpoint=path, eval_episodes=2)
    assert result["mode"] == "eval" and result["episodes"] == 2 and finite(result["mean_return"])
    assert "mean return" in capsys.readouterr().out


def expect_refusal(capsys, must_mention, **overrides):
    with pytest.raises(SystemExit) as e:
        run("impala", **overrides)
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:"), err
    assert must_mention in err[0], err[0]
    assert not os.path.exists("runs"), "a refused run must not create runs/"


def test_bad_input(capsys):
    expect_refusal(capsys, "--num-actors", num_actors=0)
    expect_refusal(capsys, "--unroll-length", unroll_length=0)
    expect_refusal(capsys, "--batch-size", batch_size=0)
    expect_refusal(capsys, "--rho-bar", rho_bar=0.0)
    expect_refusal(capsys, "--c-bar", c_bar=-1.0)
    expect_refusal(capsys, "ppo_continuous.py", env_id="Pendulum-v1")
    expect_refusal(capsys, "NoSuchEnv-v0", env_id="NoSuchEnv-v0")
    expect_refusal(capsys, "one batch", total_timesteps=639)
    torch.save({"algorithm": "a2c", "args": {"env_id": "CartPole-v1"}}, "a2c.pt")
    expect_refusal(capsys, "a2c", eval_checkpoint="a2c.pt")


def test_bad_input_from_the_command_line(in_tmp_dir):
    for flags, must_mention in [(["--num-actors", "0"], "--num-actors"), (["--unroll-length", "0"], "--unroll-length"),
                                (["--env-id", "Pendulum-v1"], "Box"), (["--env-id", "NoSuchEnv-v0"], "NoSuchEnv-v0")]:
        proc = subprocess.run([sys.executable, SCRIPT, *flags], capture_output=True, text=True, timeout=120)
        lines = proc.stderr.strip().splitlines()
        assert proc.returncode == 2 and len(lines) == 1 and must_mention in lines[0], proc.stderr
        assert not os.path.exists("runs")


FAILING_ENV = '''
import multiprocessing
import gymnasium as gym
from gymnasium.envs.classic_control import CartPoleEnv


class FailingCartPole(CartPoleEnv):
    """CartPole that raises after 50 steps in an actor process (not in the learner's checks)."""

    def step(self, action):
        self.steps = getattr(self, "steps", 0) + 1
        if multiprocessing.parent_process() is not None and self.steps > 50:
            raise RuntimeError("the env broke at step 51\\nsecond line")
        return super().step(action)


gym.register("FailingCartPole-v0", entry_point=FailingCartPole, max_episode_steps=500)
'''


def test_an_actor_error_stops_the_run_with_its_message(in_tmp_dir, monkeypatch, capsys):
    """An exception in an actor process: the run stops ("child-failed") with the actor's own first line."""
    with open("failing_env.py", "w") as f:
        f.write(FAILING_ENV)
    monkeypatch.syspath_prepend(str(in_tmp_dir))  # the spawned actors inherit sys.path
    summary = run("impala", env_id="failing_env:FailingCartPole-v0", total_timesteps=100_000, num_actors=2)
    assert summary["stopped"] == "child-failed" and summary["global_step"] < 100_000
    assert re.fullmatch(r"actor [12] failed: RuntimeError: the env broke at step 51", summary["stop_reason"])
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"stopped: {summary['stop_reason']}"], err
    assert load("impala").EXIT_CODES["child-failed"] == 1


def test_ctrl_c_leaves_no_process(in_tmp_dir):
    proc = start(["--total-timesteps", "10000000", "--no-cuda", "--save-model"])
    os.killpg(proc.pid, signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130 and "Traceback" not in err, err[-2000:]
    [run_dir] = os.listdir("runs")
    with open(os.path.join("runs", run_dir, "summary.json")) as f:
        assert json.load(f)["stopped"] == "interrupted"
    assert os.path.isfile(os.path.join("runs", run_dir, "impala.pt"))
    assert wait_for_empty_group(proc.pid, 10) == []


def test_killed_actor_stops_the_run(in_tmp_dir):
    """SIGKILL to one actor process: the learner notices, names it, stops the other and exits 1."""
    proc = start(["--total-timesteps", "10000000", "--no-cuda"])
    actors = actor_pids(proc.pid)
    assert len(actors) == 2, actors
    os.kill(actors[0], signal.SIGKILL)
    try:
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 1, err[-2000:]
    lines = err.strip().splitlines()
    assert len(lines) == 1 and re.fullmatch(r"stopped: actor [12] failed: died \(killed by SIGKILL\)", lines[0]), err
    [run_dir] = os.listdir("runs")
    with open(os.path.join("runs", run_dir, "summary.json")) as f:
        summary = json.load(f)
    assert summary["stopped"] == "child-failed" and summary["stop_reason"] == lines[0][len("stopped: "):]
    assert wait_for_empty_group(proc.pid, 10) == []


def test_actors_stop_when_the_learner_dies(in_tmp_dir):
    """SIGKILL to the learner alone (no clean-up possible): its actor processes notice and exit."""
    proc = start(["--total-timesteps", "10000000", "--no-cuda"])
    proc.kill()
    proc.communicate(timeout=60)
    left = wait_for_empty_group(proc.pid, 30)
    if left:
        os.killpg(proc.pid, signal.SIGKILL)
    assert left == [], "actor processes outlived their learner"


# ---------------------------------------------------------------- learning


@pytest.mark.learning
def test_learns_cartpole():
    summary = run("impala", seed=1, num_actors=2)
    print(f"impala: mean return {summary['mean_return']:.1f} over the last {summary['episodes_in_mean']} episodes, "
          f"{summary['global_step']:,} steps, {summary['wall_seconds']:.0f} s, policy lag {summary['policy_lag']:.2f}")
    assert summary["episodes_in_mean"] == 20
    assert summary["mean_return"] >= 400.0
