"""How fast can an off-policy script go on this machine? The arithmetic behind the README's
speed section: the FLOPs of one env step with its gradient step, counted by PyTorch's
FlopCounterMode around a short real run of each script, against this CPU's rate for the
256x256 matrix products that make up nearly all of them.

    python benchmark/update_cost.py                 # ddpg, td3, sac on Pendulum-v1
    python benchmark/update_cost.py td3 --steps 20000 --learning-starts 5000

Prints MFLOP per step and the SPS ceiling of a run of --steps steps (updates after
--learning-starts only) if the products ran at the measured rate and nothing else cost
anything. Run it on an idle machine: the rates are measured, not looked up.
"""

import argparse
import contextlib
import importlib
import os
import sys
import tempfile
import time

import torch
from torch.utils.flop_counter import FlopCounterMode

DISAGREE = 1.3  # best / slowest trial above this: the trials disagree and the machine is not idle
ALGOS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "algos")


def matmul_rate(threads: int, n: int = 256, reps: int = 400, trials: int = 7) -> tuple:
    """FLOP/s of an n x n by n x n float32 product with `threads` threads: the best of
    several trials, since a ceiling should not count the moments another process ran, and
    the slowest trial, to tell whether the trials agree."""
    torch.set_num_threads(threads)
    a, b = torch.randn(n, n), torch.randn(n, n)
    for _ in range(100):
        a @ b
    times = []
    for _ in range(trials):
        start = time.perf_counter()
        for _ in range(reps):
            a @ b
        times.append(time.perf_counter() - start)
    return 2 * n**3 * reps / min(times), 2 * n**3 * reps / max(times)


def flops_per_step(name: str, updates: int = 400) -> float:
    """FLOPs of one env step with its gradient step (acting included), from a real run of
    algos/<name>.py on Pendulum-v1 on the CPU (its logs go to a temporary directory)."""
    if ALGOS not in sys.path:
        sys.path.insert(0, ALGOS)
    module = importlib.import_module(name)
    args = module.Args(env_id="Pendulum-v1", total_timesteps=1000 + updates, learning_starts=1000, cuda=False)
    if hasattr(args, "autotune"):
        args.autotune = True
    cwd = os.getcwd()
    with tempfile.TemporaryDirectory() as tmp, open(os.devnull, "w") as quiet:
        os.chdir(tmp)
        try:
            with contextlib.redirect_stdout(quiet), FlopCounterMode(display=False) as counter:
                module.train(args)
        finally:
            os.chdir(cwd)
    return counter.get_total_flops() / updates


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("scripts", nargs="*", default=["ddpg", "td3", "sac"])
    parser.add_argument("--steps", type=int, default=20_000)
    parser.add_argument("--learning-starts", type=int, default=5_000)
    opts = parser.parse_args()
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0  # before our own work adds to it
    measured = {t: matmul_rate(t) for t in (1, 2)}
    rates = {t: best for t, (best, _) in measured.items()}
    print(" ".join(f"{t} thread(s): {r / 1e9:.0f} GFLOP/s" for t, r in rates.items()) + " (256x256 products)")
    for t, (best, worst) in measured.items():
        if best > DISAGREE * worst:
            print(f"warning: the {t}-thread trials disagree ({worst / 1e9:.0f} to {best / 1e9:.0f} GFLOP/s): another "
                  "process is using the CPU, so these rates and ceilings are uncertain; run again on an idle machine")
    if load > 0.5:
        print(f"warning: load average {load:.1f} before the measurement: the machine is not idle")
    updates = opts.steps - opts.learning_starts
    for name in opts.scripts:
        flops = flops_per_step(name)
        ceilings = ", ".join(f"{opts.steps / (updates * flops / r):,.0f} SPS on {t} thread(s)" for t, r in rates.items())
        print(f"{name}: {flops / 1e6:.1f} MFLOP per step; ceiling for {opts.steps:,} steps: {ceilings}")


if __name__ == "__main__":
    main()
