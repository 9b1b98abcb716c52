"""d4pg.py: the categorical projection, N-step returns and the sum tree against slow
references; smoke (one and two actor processes), save/evaluate, bad input, determinism,
Ctrl-C, and learning on Pendulum-v1."""

import json
import math
import os
import select
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from conftest import ALGOS_DIR, load, run

TINY = dict(total_timesteps=600, learning_starts=200, rollout_steps=20)


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


# ---------------------------------------------------------------- math: projection (4)


def slow_projection(next_probs, returns, discounts, atoms):
    """The textbook loop: each moved atom's mass split between floor and ceiling."""
    B, N = next_probs.shape
    v_min, v_max = float(atoms[0]), float(atoms[-1])
    dz = (v_max - v_min) / (N - 1)
    out = np.zeros((B, N))
    for b in range(B):
        for j in range(N):
            tz = min(max(float(returns[b]) + float(discounts[b]) * float(atoms[j]), v_min), v_max)
            pos = (tz - v_min) / dz
            lo, hi = math.floor(pos), math.ceil(pos)
            lo, hi = min(max(lo, 0), N - 1), min(max(hi, 0), N - 1)
            p = float(next_probs[b, j])
            if lo == hi:
                out[b, lo] += p
            else:
                out[b, lo] += p * (hi - pos)
                out[b, hi] += p * (pos - lo)
    return out


def kernel_projection(next_probs, returns, discounts, atoms):
    """Equation (4) as the paper writes it: an [B, N, N] sum over the triangle kernel."""
    dz = atoms[1] - atoms[0]
    moved = (returns[:, None] + discounts[:, None] * atoms[None, :]).clamp(atoms[0], atoms[-1])
    weight = (1.0 - (moved[:, None, :] - atoms[None, :, None]).abs() / dz).clamp(0.0, 1.0)
    return torch.einsum("bij,bj->bi", weight, next_probs)


def random_case(B=64, N=51, v_min=-10.0, v_max=10.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    atoms = torch.linspace(v_min, v_max, N, dtype=torch.float64)
    probs = torch.rand(B, N, generator=g, dtype=torch.float64).pow(3)
    probs /= probs.sum(-1, keepdim=True)
    returns = (torch.rand(B, generator=g, dtype=torch.float64) - 0.5) * 30  # some beyond the support
    discounts = torch.rand(B, generator=g, dtype=torch.float64)
    discounts[::5] = 0.0  # terminal transitions
    return probs, returns, discounts, atoms


def test_projection_matches_slow_loop_and_keeps_mass():
    d4pg = load("d4pg")
    for seed, N in [(0, 51), (1, 11), (2, 2)]:
        probs, returns, discounts, atoms = random_case(N=N, seed=seed)
        got = d4pg.categorical_projection(probs, returns, discounts, atoms)
        np.testing.assert_allclose(got.numpy(), slow_projection(probs, returns, discounts, atoms), atol=1e-12)
        np.testing.assert_allclose(got.numpy(), kernel_projection(probs, returns, discounts, atoms).numpy(), atol=1e-12)
        np.testing.assert_allclose(got.sum(-1).numpy(), 1.0, atol=1e-12)
        assert (got >= 0).all()


def test_projection_is_exact_on_atoms():
    """A shift by whole atoms with γ_t = 1 moves the distribution; mass pushed past an end
    piles up on the end atom."""
    d4pg = load("d4pg")
    probs, _, _, atoms = random_case(B=3, N=11, v_min=0.0, v_max=10.0)
    for shift in [0, 1, 3, -2]:
        got = d4pg.categorical_projection(probs, torch.full((3,), float(shift), dtype=torch.float64),
                                          torch.ones(3, dtype=torch.float64), atoms)
        want = torch.zeros_like(probs)
        for j in range(11):
            want[:, min(max(j + shift, 0), 10)] += probs[:, j]
        np.testing.assert_allclose(got.numpy(), want.numpy(), atol=1e-12)


def test_projection_clips_at_the_ends_and_ignores_the_bootstrap_at_termination():
    d4pg = load("d4pg")
    probs, _, _, atoms = random_case(B=4, N=21, v_min=-10.0, v_max=10.0)
    ones = torch.ones(4, dtype=torch.float64)
    high = d4pg.categorical_projection(probs, ones * 100.0, ones * 0.99, atoms)
    low = d4pg.categorical_projection(probs, ones * -100.0, ones * 0.99, atoms)
    np.testing.assert_allclose(high[:, -1].numpy(), 1.0, atol=1e-12)
    np.testing.assert_allclose(low[:, 0].numpy(), 1.0, atol=1e-12)
    # terminated (γ_t = 0): the target is R alone, split between its two neighbours (Δz = 1)
    term = d4pg.categorical_projection(probs, torch.tensor([2.25, -3.0, 9.5, 20.0], dtype=torch.float64),
                                       ones * 0.0, atoms)
    want = torch.zeros(4, 21, dtype=torch.float64)
    want[0, 12], want[0, 13] = 0.75, 0.25
    want[1, 7] = 1.0
    want[2, 19], want[2, 20] = 0.5, 0.5
    want[3, 20] = 1.0
    np.testing.assert_allclose(term.numpy(), want.numpy(), atol=1e-12)
    # the mean is kept exactly inside the support: E[target] = R + γ_t E[Z']
    probs, returns, discounts, atoms = random_case(B=32, N=51, v_min=-100.0, v_max=100.0)
    got = d4pg.categorical_projection(probs, returns, discounts, atoms)
    np.testing.assert_allclose((got * atoms).sum(-1).numpy(), (returns + discounts * (probs * atoms).sum(-1)).numpy(),
                               atol=1e-9)


# ---------------------------------------------------------------- math: N-step returns (3)


def stream(seed, num_envs=3, T=400):
    """A NEXT_STEP-layout stream of steps: episodes of random length that end by termination
    or truncation, the step after each end being a reset step (no transition)."""
    rng = np.random.default_rng(seed)
    steps = []  # (env, obs, action, reward, next_obs, terminated, truncated, is_reset_step)
    for env in range(num_envs):
        t, reset_step, obs = 0, False, rng.normal(size=2)
        while t < T:
            if reset_step:
                steps.append((env, None, None, 0.0, rng.normal(size=2), False, False, True))
                obs, reset_step = steps[-1][4], False
            else:
                end = rng.random()
                terminated, truncated = bool(end < 0.05), bool(0.05 <= end < 0.1)
                next_obs = rng.normal(size=2)
                steps.append((env, obs, rng.normal(size=1), float(rng.normal()), next_obs, terminated, truncated, False))
                obs, reset_step = next_obs, terminated or truncated
            t += 1
    return steps


def slow_nstep(steps, n, gamma):
    """From whole episodes: for each real step t of an episode of L steps, k = min(n, L - t),
    R = Σ_{j<k} γ^j r_{t+j}, next obs = the obs after step t+k-1, discount 0 if the
    episode terminated at step t+k-1 (its last), else γ^k."""
    out = []
    for env in sorted({s[0] for s in steps}):
        episode = []
        for s in [s for s in steps if s[0] == env] + [None]:
            if s is not None and s[7]:
                continue
            if s is not None:
                episode.append(s)
            ended = s is None or s[5] or s[6]
            if not ended:
                continue
            for t in range(len(episode)):
                closed = s is not None or t + n <= len(episode)  # the stream's end leaves short windows open
                k = min(n, len(episode) - t)
                if not closed or (s is None and k < n):
                    continue
                last = episode[t + k - 1]
                ret = sum(gamma**j * episode[t + j][3] for j in range(k))
                discount = 0.0 if last[5] else gamma**k
                out.append((env, t, episode[t][1], ret, last[4], discount))
            episode = []
    return out


def test_nstep_returns_match_whole_episodes():
    d4pg = load("d4pg")
    for seed, n, gamma in [(0, 5, 0.9), (1, 1, 0.99), (2, 3, 0.5)]:
        steps = stream(seed)
        buf = d4pg.NStepBuffer(3, n, gamma)
        got = []
        for env, obs, action, reward, next_obs, terminated, truncated, is_reset in steps:
            if not is_reset:
                got += [(env,) + tr for tr in buf.add(env, obs, action, reward, next_obs, terminated, truncated)]
        want = slow_nstep(steps, n, gamma)
        assert len(got) == len(want) and len(got) > 100
        assert any(w[5] == 0.0 for w in want)  # terminations inside windows
        assert n == 1 or any(gamma**n < w[5] < 1 for w in want)  # truncations inside windows: k < n
        key = lambda x: (x[0], tuple(x[1]))  # env, obs: unique in a random stream
        got = sorted(got, key=key)
        want = sorted([(w[0], w[2], w[3], w[4], w[5]) for w in want], key=key)
        for (ge, go, ga, gr, gn, gd), (we, wo, wr, wn, wd) in zip(got, want):
            assert ge == we and np.array_equal(go, wo) and np.array_equal(gn, wn)
            assert gr == pytest.approx(wr, abs=1e-12) and gd == pytest.approx(wd, abs=1e-15)


# ---------------------------------------------------------------- math: sum tree (7)


def test_sum_tree_sums_and_finds_prefixes():
    d4pg = load("d4pg")
    tree = d4pg.SumTree(5)  # 8 leaves, 3 unused
    p = np.array([1.0, 0.0, 2.5, 0.5, 4.0])
    tree.update(np.arange(5), p)
    assert tree.total() == pytest.approx(8.0)
    edges = np.cumsum(p)
    # a target in [edge_{i-1}, edge_i) finds leaf i; zero-priority leaf 1 is never found
    targets = np.array([0.0, 0.999, 1.0, 3.49, 3.5, 3.99, 4.0, 7.99])
    np.testing.assert_array_equal(tree.find(targets), [0, 0, 2, 2, 3, 3, 4, 4])
    tree.update(np.array([1, 4]), np.array([3.0, 0.0]))
    assert tree.total() == pytest.approx(7.0)
    np.testing.assert_array_equal(tree.find(np.array([1.5, 4.5, 6.9])), [1, 2, 3])
    assert edges[-1] == 8.0


@pytest.mark.parametrize("capacity", [1000, 7])
def test_sum_tree_samples_in_proportion_to_priority(capacity):
    """Chi-square test of 200k stratified draws against P(i) = p_i / Σp, then again after
    changing some priorities; the bound is the 0.9999 quantile, so a correct tree fails
    about once in 10,000 runs (and the seed is fixed)."""
    d4pg = load("d4pg")
    rng = np.random.default_rng(0)
    tree = d4pg.SumTree(capacity)
    p = rng.random(capacity) ** 2 + 0.01
    tree.update(np.arange(capacity), p)
    for round_ in range(2):
        counts = np.zeros(capacity)
        for _ in range(200):
            np.add.at(counts, tree.sample(1000, rng), 1)
        expected = 200_000 * p / p.sum()
        chi2 = ((counts - expected) ** 2 / expected).sum()
        dof = capacity - 1
        bound = dof + 3.72 * math.sqrt(2 * dof) + 10  # normal approximation of the 0.9999 quantile, with slack for small dof
        assert chi2 < bound, (round_, chi2, bound)
        changed = rng.choice(capacity, capacity // 3 + 1, replace=False)
        p[changed] = rng.random(len(changed)) * 3
        tree.update(changed, p[changed])


def test_importance_weights():
    d4pg = load("d4pg")
    rng = np.random.default_rng(0)
    rb = d4pg.ReplayBuffer(16, 2, 1, rng, per=True, alpha=0.6, eps=1e-6)
    rb.add(np.zeros((10, 2)), np.zeros((10, 1)), np.arange(10.0), np.zeros((10, 2)), np.ones(10))
    priorities = np.linspace(0.1, 2.0, 10)
    rb.update_priorities(np.arange(10), priorities)
    idx, batch = rb.sample(64, beta=0.5, device="cpu")
    p_alpha = (priorities + 1e-6) ** 0.6
    P = p_alpha[idx] / p_alpha.sum()
    w = (10 * P) ** -0.5
    np.testing.assert_allclose(batch[-1].numpy(), w / w.max(), rtol=1e-5)
    np.testing.assert_array_equal(batch[2].numpy(), idx.astype(np.float32))  # rows and weights belong together
    assert rb.max_priority == pytest.approx(2.0 + 1e-6)


# ---------------------------------------------------------------- smoke


def test_runs_and_writes_summary():
    summary = run("d4pg", **TINY)
    with open(os.path.join(summary["run_dir"], "summary.json")) as f:
        on_disk = json.load(f)
    assert on_disk == summary
    assert list(summary) == ["env_id", "algorithm", "exp_name", "seed", "global_step", "wall_seconds", "SPS",
                             "mean_return", "episodes_in_mean", "episodes", "eval_step", "eval_return", "stopped",
                             "stop_reason", "versions", "run_dir"]
    assert summary["algorithm"] == "d4pg" and summary["global_step"] == 600
    for key in ["global_step", "wall_seconds", "SPS", "mean_return"]:
        assert finite(summary[key]), (key, summary[key])
    # 600 steps: episodes end at steps 200 and 401 (each NEXT_STEP reset takes a step)
    assert summary["episodes_in_mean"] == 2 and summary["stopped"] is None
    assert any(f.startswith("events.out.tfevents") for f in os.listdir(summary["run_dir"]))


def test_two_actor_processes_from_the_command_line(in_tmp_dir):
    out = subprocess.run([sys.executable, os.path.join(ALGOS_DIR, "d4pg.py"), "--num-actors", "2", "--num-envs", "2",
                          "--total-timesteps", "1600", "--learning-starts", "400", "--rollout-steps", "20", "--no-cuda"],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    [run_dir] = os.listdir("runs")
    with open(os.path.join("runs", run_dir, "summary.json")) as f:
        summary = json.load(f)
    # 2 actors x 2 envs x 400 steps: each env finishes one 200-step episode (the next would end at 401)
    assert summary["global_step"] == 1600 and summary["episodes"] == 4 * 1
    assert finite(summary["mean_return"])


def test_save_and_evaluate(capsys):
    summary = run("d4pg", save_model=True, **TINY)
    path = os.path.join(summary["run_dir"], "d4pg.pt")
    assert os.path.isfile(path)
    result = run("d4pg", eval_checkpoint=path, eval_episodes=2)
    assert result["mode"] == "eval" and result["episodes"] == 2 and finite(result["mean_return"])
    assert "mean return" in capsys.readouterr().out


def expect_refusal(capsys, must_mention, **overrides):
    with pytest.raises(SystemExit) as e:
        run("d4pg", **overrides)
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:"), err
    assert must_mention in err[0], err[0]
    assert not os.path.exists("runs"), "a refused run must not create runs/"


def test_bad_input(capsys):
    expect_refusal(capsys, "ppo.py", env_id="CartPole-v1")
    expect_refusal(capsys, "NoSuchEnv-v0", env_id="NoSuchEnv-v0")
    expect_refusal(capsys, "--batch-size", batch_size=512, buffer_size=100)
    expect_refusal(capsys, "--learning-starts", total_timesteps=1000, learning_starts=1000)
    expect_refusal(capsys, "--total-timesteps", total_timesteps=0)
    expect_refusal(capsys, "--num-actors", num_actors=0)
    expect_refusal(capsys, "--torch-threads", torch_threads=0)
    expect_refusal(capsys, "--v-min", v_min=5.0, v_max=5.0)
    expect_refusal(capsys, "--policy-lr", policy_lr=-1.0)
    expect_refusal(capsys, "--exploration-noise", exploration_noise=-0.1)
    expect_refusal(capsys, "--buffer-size", buffer_size=100_000_000_000, total_timesteps=100_000_000_000)
    expect_refusal(capsys, "one round", total_timesteps=30, learning_starts=0, num_actors=2, rollout_steps=25)
    for other in ["td3", "sac"]:
        torch.save({"algorithm": other, "args": {"env_id": "Pendulum-v1"}}, f"{other}.pt")
        expect_refusal(capsys, other, eval_checkpoint=f"{other}.pt")


def test_same_seed_same_returns():
    """Rounds make the actor processes deterministic: same seed, same run."""
    a = run("d4pg", seed=3, **TINY)
    b = run("d4pg", seed=3, **TINY)
    c = run("d4pg", seed=4, **TINY)
    assert (a["mean_return"], a["episodes"], a["global_step"]) == (b["mean_return"], b["episodes"], b["global_step"])
    assert a["mean_return"] != c["mean_return"]


def test_ctrl_c_saves_and_closes(in_tmp_dir):
    """SIGINT to the whole process group, as a terminal's Ctrl-C, once training prints
    progress: the learner saves and writes its summary, both actor processes exit quietly,
    exit code 130."""
    proc = subprocess.Popen([sys.executable, os.path.join(ALGOS_DIR, "d4pg.py"), "--num-actors", "2",
                             "--total-timesteps", "40000", "--learning-starts", "500", "--save-model", "--no-cuda"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
                            # pytest-xdist workers ignore SIGINT and a child would inherit that: as from a shell
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline, line = time.time() + 240, ""
    while time.time() < deadline and not line.startswith("step"):  # the first progress line
        if select.select([proc.stdout], [], [], 1.0)[0]:
            line = proc.stdout.readline()
            if not line:
                break
    assert line.startswith("step"), (line, proc.poll())
    os.killpg(proc.pid, signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err[-2000:]
    assert "Traceback" not in err, err[-2000:]
    [run_dir] = os.listdir("runs")
    with open(os.path.join("runs", run_dir, "summary.json")) as f:
        summary = json.load(f)
    assert summary["stopped"] == "interrupted" and 0 < summary["global_step"] < 40000
    assert os.path.isfile(os.path.join("runs", run_dir, "d4pg.pt"))
    assert wait_for_empty_group(proc.pid, 0.5) == []  # no actor process or resource tracker left


def test_actors_stop_when_the_learner_dies(in_tmp_dir):
    """SIGKILL to the learner alone (no clean-up possible): its actor processes notice and exit."""
    proc = subprocess.Popen([sys.executable, os.path.join(ALGOS_DIR, "d4pg.py"), "--num-actors", "2",
                             "--total-timesteps", "40000", "--learning-starts", "500", "--no-cuda"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    deadline, line = time.time() + 240, ""
    while time.time() < deadline and not line.startswith("step"):
        if select.select([proc.stdout], [], [], 1.0)[0]:
            line = proc.stdout.readline()
            if not line:
                break
    assert line.startswith("step"), (line, proc.poll())
    proc.kill()
    proc.communicate(timeout=60)
    left = wait_for_empty_group(proc.pid, 30)  # an actor notices within a second once its round is done
    if left:
        os.killpg(proc.pid, signal.SIGKILL)
    assert left == [], "actor processes outlived their learner"


def actor_pids(pid):
    """The actor processes a learner spawned (its children, less multiprocessing's resource tracker)."""
    pids = []
    for entry in os.listdir("/proc"):
        try:
            with open(f"/proc/{entry}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                cmdline = f.read()
        except (OSError, ValueError):
            continue
        if ppid == pid and b"resource_tracker" not in cmdline:
            pids.append(int(entry))
    return pids


def test_a_killed_actor_stops_the_run_with_one_line(in_tmp_dir):
    """SIGKILL to one actor: the learner names it and the signal in one line, stops the other actor,
    writes summary.json (stopped: child-failed) and exits 1: no traceback, no hang, no process left."""
    proc = subprocess.Popen([sys.executable, os.path.join(ALGOS_DIR, "d4pg.py"), "--num-actors", "2",
                             "--total-timesteps", "40000", "--learning-starts", "500", "--no-cuda"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    deadline, line = time.time() + 240, ""
    while time.time() < deadline and not line.startswith("step"):
        if select.select([proc.stdout], [], [], 1.0)[0]:
            line = proc.stdout.readline()
            if not line:
                break
    assert line.startswith("step"), (line, proc.poll())
    actors = actor_pids(proc.pid)
    assert len(actors) == 2, actors
    os.kill(actors[0], signal.SIGKILL)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 1, err[-2000:]
    assert "Traceback" not in err, err[-2000:]
    assert err.strip().splitlines()[-1].startswith("stopped: actor "), err[-500:]
    assert "killed by SIGKILL" in err
    [run_dir] = os.listdir("runs")
    with open(os.path.join("runs", run_dir, "summary.json")) as f:
        summary = json.load(f)
    assert summary["stopped"] == "child-failed" and "killed by SIGKILL" in summary["stop_reason"]
    assert wait_for_empty_group(proc.pid, 10) == []


def test_an_actor_error_is_reported_in_its_own_words(in_tmp_dir):
    """An exception inside an actor reaches the learner as its first line, not as 'died'."""
    d4pg = load("d4pg")
    errors = d4pg.mp.get_context("spawn").Queue()
    with pytest.raises(SystemExit) as e:  # the actor's body, run here: its env cannot be made
        d4pg.actor_process(0, d4pg.Args(env_id="NoSuchEnv-v0"), None, "runs", None, None, errors)
    assert e.value.code == 1
    rank, message = errors.get(timeout=5)
    assert rank == 0 and message.startswith("NameNotFound: ") and "\n" not in message

    class Stopped:  # a finished process, as the learner sees it
        exitcode = 1

        def is_alive(self):
            return False

    errors.put((1, "ValueError: the env said no"))
    with pytest.raises(d4pg.ChildFailed, match="actor 1 failed: ValueError: the env said no"):
        d4pg.check_children([Stopped(), Stopped()], errors, "actor")
    with pytest.raises(d4pg.ChildFailed, match=r"actor 0 died \(exit code 1\)"):
        d4pg.check_children([Stopped()], errors, "actor")


def test_logs_the_shared_loss_keys():
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    summary = run("d4pg", **TINY)
    tags = set(EventAccumulator(summary["run_dir"]).Reload().Tags()["scalars"])
    for key in ["qf1_loss", "qf1_values", "actor_loss"]:
        assert f"losses/{key}" in tags, key
    assert "charts/SPS" in tags and "charts/episodic_return" in tags


# ---------------------------------------------------------------- learning


@pytest.mark.learning
def test_learns_pendulum():
    """Mean of the last 20 episodes (4,000 steps) after 15,000 steps, stricter than the
    last 10 while the returns still improve."""
    summary = run("d4pg", seed=1, total_timesteps=15_000)
    print(f"d4pg: mean return {summary['mean_return']:.1f} over the last {summary['episodes_in_mean']} episodes, "
          f"{summary['global_step']:,} steps, {summary['wall_seconds']:.0f} s")
    assert summary["episodes_in_mean"] == 20
    assert summary["mean_return"] >= -200.0
