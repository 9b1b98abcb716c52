"""What every script does the same way (CONTRIBUTING.md), tested on every script in algos/:
the run directory stays under runs/, a non-finite loss stops training with its reason in a
valid summary.json, Ctrl-C and SIGTERM stop cleanly with the shells' exit codes, progress shows
within seconds and the last line names the run directory, the versions are recorded."""

import json
import math
import os
import select
import signal
import subprocess
import sys
import time

import gymnasium as gym
import pytest
import torch
from torch.optim.optimizer import register_optimizer_step_post_hook

from conftest import ALGOS, ALGOS_DIR, TINY, load, run


def test_every_script_has_a_tiny_budget():
    assert set(ALGOS) <= set(TINY), f"add {sorted(set(ALGOS) - set(TINY))} to TINY in tests/conftest.py"


def refused(name, capsys, **overrides):
    with pytest.raises(SystemExit) as e:
        run(name, **TINY[name], **overrides)
    assert e.value.code == 2
    captured = capsys.readouterr()
    err = captured.err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:") and "Traceback" not in captured.err, err
    return err[0]


@pytest.mark.parametrize("name", ALGOS)
def test_run_directory_stays_under_runs(name, in_tmp_dir, capsys):
    os.mkdir("work")
    os.chdir("work")
    for exp_name in ["/../../../escaped", "a/b", "..", "../up", "a\\b", "", "x" * 300]:
        line = refused(name, capsys, exp_name=exp_name)
        assert "--exp-name" in line, line
        assert os.listdir(".") == [] and os.listdir("..") == ["work"], exp_name
    with open("runs", "w"):
        pass
    assert "runs is a file" in refused(name, capsys)


@pytest.mark.parametrize("name", ALGOS)
def test_unwritable_runs_is_one_line(name, in_tmp_dir, capsys, monkeypatch):
    def makedirs(*args, **kwargs):  # as root, a read-only directory would still be writable
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(os, "makedirs", makedirs)
    assert "Permission denied" in refused(name, capsys)


# Scripts whose optimiser steps run in spawned processes, out of reach of this process's hook.
OPTIMISER_IN_CHILDREN = {"a3c"}


@pytest.mark.parametrize("name", ALGOS)
def test_non_finite_stops_training(name, in_tmp_dir, capsys):
    """NaN weights after the 5th optimiser step: training stops at the next check, with the
    reason in summary.json (valid JSON: no NaN), the last finite model saved."""
    steps = [0]

    def poison(optimizer, args, kwargs):
        steps[0] += 1
        if steps[0] == 5:
            with torch.no_grad():
                for group in optimizer.param_groups:
                    for p in group["params"]:
                        p.fill_(float("nan"))

    handle = register_optimizer_step_post_hook(poison)
    try:
        budget = dict(TINY[name], total_timesteps=TINY[name]["total_timesteps"] * 20)
        if name in OPTIMISER_IN_CHILDREN:  # the hook lives in this process only: overflow the weights instead
            budget["learning_rate"] = 1e30
        summary = run(name, save_model=True, **budget)
    finally:
        handle.remove()
    assert summary["stopped"] == "non-finite", summary
    assert summary["global_step"] < budget["total_timesteps"]
    assert "stopped" in capsys.readouterr().err
    with open(os.path.join(summary["run_dir"], "summary.json")) as f:
        on_disk = json.loads(f.read(), parse_constant=lambda c: pytest.fail(f"summary.json holds {c}"))
    assert on_disk == summary and summary["stop_reason"]
    ckpt = torch.load(os.path.join(summary["run_dir"], f"{name}.pt"), weights_only=True)
    tensors = [v for v in ckpt.values() if isinstance(v, dict)]
    for state in tensors:
        for key, value in state.items():
            if torch.is_tensor(value) and value.is_floating_point():
                assert torch.isfinite(value).all(), f"{key} saved non-finite"
    assert load(name).EXIT_CODES["non-finite"] not in (0, 2)


def command(name, extra=()):
    flags = []
    for key, value in dict(TINY[name], total_timesteps=10_000_000).items():
        flags += ["--" + key.replace("_", "-"), str(value)]
    return [sys.executable, os.path.join(ALGOS_DIR, f"{name}.py"), *flags, "--no-cuda", "--save-model", *extra]


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "sigterm"])
@pytest.mark.parametrize("name", ALGOS)
def test_signal_stops_cleanly(name, sig, in_tmp_dir):
    """The first progress line within seconds; then Ctrl-C (130) or SIGTERM (143) to the whole
    process group: logs closed, summary.json and the model written, no process left behind."""
    proc = subprocess.Popen(command(name), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True,
                            # pytest-xdist workers ignore SIGINT and a child would inherit that: as from a shell
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    started, line = time.time(), ""
    while time.time() < started + 120 and not line.startswith("step"):
        if select.select([proc.stdout], [], [], 1.0)[0]:
            line = proc.stdout.readline()
            if not line:
                break
    assert line.startswith("step"), (line, proc.poll(), proc.stderr.read() if proc.poll() is not None else "")
    os.killpg(proc.pid, sig)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == {signal.SIGINT: 130, signal.SIGTERM: 143}[sig], err[-2000:]
    assert "Traceback" not in err, err[-2000:]
    assert out.strip().splitlines()[-1].startswith("run directory: runs/"), out[-500:]
    [run_dir] = os.listdir("runs")
    with open(os.path.join("runs", run_dir, "summary.json")) as f:
        summary = json.load(f)
    assert summary["stopped"] == {signal.SIGINT: "interrupted", signal.SIGTERM: "terminated"}[sig]
    assert os.path.isfile(os.path.join("runs", run_dir, f"{name}.pt"))
    deadline = time.time() + 10  # children and the resource tracker exit once their parent is gone
    while time.time() < deadline:
        try:
            os.killpg(proc.pid, 0)
        except ProcessLookupError:
            break  # the group is empty: no actor process or resource tracker left
        time.sleep(0.2)
    else:
        pytest.fail("processes of the run are still alive 10 s after it exited")


# Scripts whose main process steps a gymnasium SyncVectorEnv in its training loop.
STEPS_A_VECTOR_ENV = [n for n in ALGOS if n not in {"a3c", "impala", "d4pg", "es", "maddpg"}]


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "sigterm"])
@pytest.mark.parametrize("name", STEPS_A_VECTOR_ENV)
def test_a_signal_is_acted_on_between_env_steps(name, sig, in_tmp_dir, monkeypatch):
    """Ctrl-C or SIGTERM arriving inside a library call (here the 300th env step) lets that call
    finish, and training stops before the next step. An exception raised inside the library,
    where the signal happened to land, could leave its locks and queues halfway: TensorBoard's
    writer then hung in close() for up to two minutes in about one stop in ten."""
    real_step, calls, finished = gym.vector.SyncVectorEnv.step, [0], [0]

    def step(self, actions):
        calls[0] += 1
        if calls[0] == 300:
            os.kill(os.getpid(), sig)
            for _ in range(1000):  # bytecodes: a handler that raises at once would raise here
                pass
        result = real_step(self, actions)
        finished[0] = calls[0]
        return result

    monkeypatch.setattr(gym.vector.SyncVectorEnv, "step", step)
    summary = run(name, save_model=True, **dict(TINY[name], total_timesteps=10_000_000))
    assert summary["stopped"] == {signal.SIGINT: "interrupted", signal.SIGTERM: "terminated"}[sig]
    assert calls[0] == finished[0] == 300
    assert os.path.isfile(os.path.join(summary["run_dir"], f"{name}.pt"))
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # the handlers are given back


@pytest.mark.parametrize("name", ALGOS)
def test_summary_records_versions_and_evaluation(name, in_tmp_dir):
    budget = TINY[name]["total_timesteps"]
    summary = run(name, eval_frequency=budget // 2, eval_episodes=2, **TINY[name])
    assert set(summary["versions"]) == {"python", "torch", "gymnasium", "numpy", "mujoco", "ale-py"}
    assert summary["versions"]["torch"] == torch.__version__
    assert summary["stopped"] is None and summary["stop_reason"] is None
    assert summary["eval_step"] >= budget // 2 and math.isfinite(summary["eval_return"])
    assert any(f.startswith("events.out.tfevents") for f in os.listdir(summary["run_dir"]))


@pytest.mark.parametrize("name", ALGOS)
def test_structure_of_the_shared_parts(name):
    with open(os.path.join(ALGOS_DIR, f"{name}.py")) as f:
        text = f.read()
    assert 'sys.exit(EXIT_CODES[train(parse_args())["stopped"]])' in text
    long = [i + 1 for i, line in enumerate(text.splitlines()) if len(line) > 120]
    assert not long, f"{name}.py: lines over 120 characters: {long}"
    for private in ["torch._foreach", "first_only=", "frozen=", "detached="]:
        assert private not in text, f"{name}.py: {private} (CONTRIBUTING.md has the one form)"


@pytest.mark.parametrize("name", [n for n in ALGOS if hasattr(load(n), "check_memory")])
def test_memory_check_refuses_too_much_and_runs_without_sysconf(name, capsys, monkeypatch):
    """A replay larger than physical memory is one line; where os.sysconf does not exist (Windows)
    the check cannot tell and steps aside instead of failing."""
    with pytest.raises(SystemExit) as e:
        load(name).check_memory(2**62, "--buffer-size")
    assert e.value.code == 2 and capsys.readouterr().err.startswith("error: --buffer-size needs")
    monkeypatch.delattr(os, "sysconf")
    assert load(name).check_memory(2**62, "--buffer-size") is None
