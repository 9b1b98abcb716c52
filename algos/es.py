r"""Evolution strategies (OpenAI ES): a search distribution over policy parameters, Discrete or Box actions.

Salimans, Ho, Chen, Sidor, Sutskever (2017), "Evolution Strategies as a Scalable Alternative
to Reinforcement Learning", arXiv:1703.03864. No value function, no backpropagation through
the policy: the policy's parameters θ are the mean of a Gaussian, each generation plays one
episode with each of n perturbed copies of θ, and θ moves towards the perturbations that
scored well.

Objective: the expected fitness of the Gaussian-smoothed policy, where the fitness F of a
parameter vector is the (discounted, γ = 1 by default) return of one episode played with it:
$$ J(\theta) = \mathbb E_{\epsilon \sim \mathcal N(0, I)}\left[F(\theta + \sigma\epsilon)\right], \qquad
   F(\theta) = \textstyle\sum_t \gamma^t r_t \tag{1} $$

Its gradient needs no derivative of F. Write x = θ + σε ~ N(θ, σ²I): the score-function
identity ∇_θ E_x[F(x)] = E_x[F(x) ∇_θ log p_θ(x)], with ∇_θ log p_θ(x) = (x − θ)/σ², gives
(1/σ) E_ε[F(θ + σε) ε]. It is estimated from n perturbations in antithetic pairs,
ε_k and −ε_k (mirrored sampling: the even terms of F's Taylor expansion cancel within a pair):
$$ \nabla_\theta J = \frac{1}{\sigma}\mathbb E_\epsilon\left[F(\theta + \sigma\epsilon)\,\epsilon\right]
   \approx \hat g = \frac{1}{n\sigma}\sum_{i=1}^{n} F_i\,\epsilon_i
   = \frac{1}{n\sigma}\sum_{k=1}^{n/2} \left(F_k^+ - F_k^-\right)\epsilon_k \tag{2} $$

Fitness shaping: in (2) each F_i is not the return R_i itself but its centred rank among the
n returns of the generation, in [−1/2, 1/2]; tied returns share their mean rank, so a pair
whose two episodes score the same (CartPole's 500 and 500) adds nothing. The update then
ignores the returns' scale and outliers:
$$ F_i = \frac{\operatorname{rank}(R_i)}{n - 1} - \frac12, \qquad \operatorname{rank} \in \{0, \dots, n - 1\} \tag{3} $$

Update: Adam ascends (2), with an L2 weight decay λ on θ added to the gradient it is given:
$$ \theta \leftarrow \theta - \alpha\,\operatorname{Adam}\left(-\hat g + \lambda\theta\right) \tag{4} $$

Observation normalisation: the policy sees states normalised by the mean and variance of
every state visited by every perturbed policy so far (sums kept in float64, updated after
each generation, saved with the model), the variance floored at 10⁻² and the result clipped:
$$ \tilde s = \operatorname{clip}\left(\frac{s - m}{\sqrt{\max(v, 10^{-2})}}, -5, 5\right), \qquad
   m = \frac{1}{N}\sum s, \quad v = \frac{1}{N}\sum s^2 - m^2 \tag{5} $$

Policy: a deterministic MLP f_θ (64 × 64, tanh) on s̃; the argmax of its outputs for
Discrete actions, its tanh squashed into the action space's bounds for Box actions:
$$ a = \arg\max_j f_\theta(\tilde s)_j \quad\text{or}\quad
   a = \text{low} + (\text{high} - \text{low}) \odot \frac{\tanh f_\theta(\tilde s) + 1}{2} \tag{6} $$

Parallelism. Only seeds, returns and θ travel, never the noise: each generation draws one
noise seed and one env seed per pair, and ε_k is regenerated from its seed wherever it is
needed. Both members of a pair start their episode from the same state (the same env seed),
so that F_k⁺ − F_k⁻ measures the perturbation and not the start.
- One machine: `--num-workers` N processes play (default one per CPU core): the main process
  and N − 1 workers (torch.multiprocessing, spawn) that read θ and the statistics of (5) from
  shared memory. All take pairs from one queue as they free up (uneven episode lengths idle
  no process; the main process starts at once, so the workers' start-up costs no time), and a
  worker sends back one row of numbers per pair: the two fitnesses, the episodes' returns and
  lengths, and the sums of (5). The main process alone ranks, steps Adam (so torch.optim's
  hooks see the step) and publishes the new θ. The workers are born ignoring Ctrl-C and
  SIGTERM, and stop when the main process stops them or dies. N = 1: no worker at all.
- Several machines: under torchrun each rank (one process, no local workers) plays pairs
  k = rank, rank + W, ... of each generation and all_gathers its rows (returns, lengths and
  the small sums of (5): a few hundred bytes); every rank then applies the same update (4) to
  its own copy of θ, so θ itself never travels. Rank 0 alone writes the run directory; the
  summary records a checksum of θ from every rank (they agree). Same seed, same run: one
  process, N workers or W ranks give the same θ bit for bit.

What is counted and reported: global_step counts every env.step of every perturbed episode
(the training episodes; their count per generation varies, and the budget ends after the
first generation that reaches --total-timesteps). charts/episodic_return and the summary's
mean_return (last 20 episodes) are the returns of the perturbed policies θ ± σε: what ES
trains on. The unperturbed θ is measured by --eval-frequency (eval/episodic_return,
eval_return in the summary; its steps are not counted), as the paper reports.

Defaults: the authors' MuJoCo settings (σ = 0.02, Adam at α = 0.01, λ = 0.005, observation
normalisation with a 10⁻² variance floor and a ±5 clip, one episode per perturbation), with
the 64 × 64 tanh networks of the other scripts here; where they played 10,000 or more episodes
a generation on hundreds of cores, n = 50 here, which solves CartPole-v1 in 100k-300k steps
(6 seeds) and InvertedPendulum-v4 in about 250k. Their code adds λθ to an estimate without (2)'s 1/σ, so the
same λ weighs 1/σ = 50 times less against ĝ here.

Run:
    python algos/es.py                                        # CartPole-v1, one worker per core
    python algos/es.py --env-id InvertedPendulum-v4
    python algos/es.py --num-workers 1                         # the main process plays alone
    python algos/es.py --help
  two ranks on one machine (tested):
    torchrun --standalone --nproc-per-node 2 algos/es.py
  N machines with M ranks each (run on every machine; HOST:PORT reachable from all of them):
    torchrun --nnodes N --nproc-per-node M --rdzv-backend c10d --rdzv-endpoint HOST:PORT algos/es.py
"""

import contextlib
import copy
import datetime
import functools
import importlib.metadata
import io
import json
import math
import os
import platform
import queue
import random
import signal
import sys
import time
import warnings
import zlib
from collections import deque
from dataclasses import asdict, dataclass
from typing import Optional

import gymnasium as gym
import numpy as np
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn as nn
import tyro
from torch.utils.tensorboard import SummaryWriter


@dataclass
class Args:
    exp_name: str = os.path.basename(__file__)[: -len(".py")]
    """the name of this experiment (part of the run directory)"""
    seed: int = 1
    """seed of random, numpy, torch, the perturbations and the environments"""
    torch_deterministic: bool = True
    """use deterministic torch algorithms (same seed, same returns on CPU)"""
    cuda: bool = True
    """unused: ES plays its policies and steps Adam on one vector, both on the CPU (kept for the common flags)"""
    track: bool = False
    """log to Weights & Biases (needs `pip install wandb`)"""
    wandb_project_name: str = "pg-reference"
    """the Weights & Biases project"""
    wandb_entity: Optional[str] = None
    """the Weights & Biases entity (team)"""
    capture_video: bool = False
    """record videos of the main process's env (rank 0's under torchrun) into the run directory"""
    save_model: bool = False
    """save θ and the observation statistics to runs/<run>/es.pt at the end (and on Ctrl-C)"""
    eval_checkpoint: Optional[str] = None
    """path of a saved model: evaluate it without learning, then exit"""
    eval_frequency: int = 0
    """evaluate the unperturbed θ on a separate env every this many env steps (0: never)"""
    eval_episodes: int = 10
    """episodes per evaluation (during training and for --eval-checkpoint)"""
    torch_threads: int = 1
    """CPU threads for torch in the main process (each worker uses one)"""

    env_id: str = "CartPole-v1"
    """the gymnasium environment id (Discrete or Box actions, vector observations)"""
    total_timesteps: int = 1_000_000
    """env steps of the perturbed episodes; training stops after the generation that reaches it"""
    learning_rate: float = 0.01
    """Adam learning rate α in (4)"""
    population_size: int = 50
    """perturbed policies per generation, n in (2): an even number (antithetic pairs θ ± σε)"""
    sigma: float = 0.02
    """standard deviation σ of the parameter perturbations"""
    weight_decay: float = 0.005
    """L2 coefficient λ on θ in (4)"""
    num_workers: int = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    """processes playing the perturbed policies, the main one included: one per CPU core; torchrun: unused"""
    num_envs: int = 1
    """episodes per perturbed policy, each from its own start (its fitness is their mean); 1 as in the paper"""
    gamma: float = 1.0
    """discount γ of the fitness (1); 1: the episodic return, as in the paper"""


# The valid range of every numeric Arg, checked by check_args before anything is written:
# "[" and "]" include an end, "(" and ")" exclude it. tests/test_args.py tries a value
# outside each range and NaN on every numeric field of Args, so a new field needs a line here.
ARG_RANGES = {
    "seed": "[0, 4294967295]",  # what random, numpy and torch all accept
    "eval_frequency": "[0, inf)",
    "eval_episodes": "[1, inf)",
    "torch_threads": "[1, 1024]",
    "total_timesteps": "[1, inf)",
    "learning_rate": "(0, inf)",
    "population_size": "[2, inf)",  # one antithetic pair; an odd n is refused in train()
    "sigma": "(0, inf)",
    "weight_decay": "[0, inf)",
    "num_workers": "[1, inf)",
    "num_envs": "[1, inf)",
    "gamma": "[0, 1]",
}
PROGRESS_SECONDS = 10.0  # a progress line after the first second, then every this many seconds
EVAL_SEED_OFFSET = 10_000  # the evaluation env's seed is args.seed + this: other starts than training's
EXIT_CODES = {None: 0, "non-finite": 1, "child-failed": 1, "interrupted": 130, "terminated": 143}  # as shells expect


def fail(message: str):
    """Bad input: one clear line on stderr and exit code 2."""
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


def parse_args() -> Args:
    """The command line by tyro, whose boxed error message becomes one `error:` line."""
    box = io.StringIO()
    try:
        with contextlib.redirect_stderr(box):
            return tyro.cli(Args)
    except SystemExit as e:
        if not e.code:  # --help
            raise
        lines = [line.strip(" -─│╭╮╰╯") for line in box.getvalue().splitlines()]
        fail(next((line for line in lines[1:] if line), "cannot read the command line") + " (see --help)")


def check_args(args: Args):
    """Every numeric Arg finite and inside ARG_RANGES; --exp-name a plain directory name."""
    for name, interval in ARG_RANGES.items():
        value = getattr(args, name)
        if value is None:  # an Optional Arg that is off
            continue
        low, high = (float(x) for x in interval[1:-1].split(","))
        inside = (low < value or (interval[0] == "[" and value == low)) and \
                 (value < high or (interval[-1] == "]" and value == high))
        if not (math.isfinite(value) and inside):
            fail(f"--{name.replace('_', '-')} {value} is outside its valid range {interval}")
    if not args.exp_name or ".." in args.exp_name or any(c in args.exp_name for c in "/\\\0"):
        fail(f"--exp-name {args.exp_name!r} must be a plain name without '/', '\\' or '..' "
             "(runs/ holds one directory per run)")


class Terminated(KeyboardInterrupt):
    """SIGTERM (a scheduler's preemption), handled like Ctrl-C."""


def raise_if_stopped(stop_signals: list):
    """Raise KeyboardInterrupt (Ctrl-C) or Terminated (SIGTERM) once one has arrived. During
    training the two signals are only recorded in `stop_signals`, and the main process calls this
    at each generation and each pair it plays or takes: an exception raised wherever the signal
    happens to land can stop a library halfway, inside TensorBoard's writer queue (whose close()
    then waited up to its 120-s flush interval) or a multiprocessing queue."""
    if stop_signals:
        raise Terminated() if stop_signals[0] == signal.SIGTERM else KeyboardInterrupt()


class NonFinite(Exception):
    """A loss or parameter turned NaN or infinite: training stops."""


class ChildFailed(Exception):
    """A child process raised an error or died: training stops."""


def check_finite(global_step: int, losses: dict, *modules: nn.Module):
    """Raise NonFinite naming the first non-finite loss or parameter."""
    for name, value in losses.items():
        if not math.isfinite(value):
            raise NonFinite(f"{name} is {value} at step {global_step:,}")
    for module in modules:
        for name, p in module.named_parameters():
            if not torch.isfinite(p).all():
                raise NonFinite(f"parameter {name} is not finite at step {global_step:,}")


def versions() -> dict:
    """The versions behind a figure: written to summary.json and the TensorBoard log."""
    found = {"python": platform.python_version(), "torch": torch.__version__, "gymnasium": gym.__version__,
             "numpy": np.__version__}
    for dist_name in ("mujoco", "ale-py"):
        try:
            found[dist_name] = importlib.metadata.version(dist_name)
        except importlib.metadata.PackageNotFoundError:
            found[dist_name] = None
    return found


def make_env(env_id: str, idx: int, capture_video: bool, run_dir: str):
    def thunk():
        if capture_video and idx == 0:
            env = gym.make(env_id, render_mode="rgb_array")
            env = gym.wrappers.RecordVideo(env, os.path.join(run_dir, "videos"), disable_logger=True)
        else:
            env = gym.make(env_id)
        return gym.wrappers.RecordEpisodeStatistics(env)

    return thunk


def check_env(env_id: str, capture_video: bool = False):
    """Refuse an unknown id, a wrong action/observation space or an env that cannot render
    (with --capture-video) before anything starts."""
    if env_id.startswith("ALE/") or "NoFrameskip" in env_id:
        fail(f"{env_id} is an Atari game (pixel observations); es.py is for vector observations: "
             "use algos/ppo_atari.py")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # only a probe: the run itself shows gymnasium's warnings
            env = gym.make(env_id)
            if capture_video:
                try:
                    probe = gym.make(env_id, render_mode="rgb_array")
                    probe.reset(seed=0)
                    probe.render()
                    probe.close()
                except Exception as e:
                    first_line = (str(e).splitlines() or [""])[0]
                    fail(f"--capture-video cannot render {env_id} ({type(e).__name__}: {first_line}); "
                         "without a display, run with MUJOCO_GL=egl")
    except gym.error.Error as e:
        fail(f"cannot make env {env_id!r}: {e} (try --env-id CartPole-v1)")
    act_space, obs_space = env.action_space, env.observation_space
    env.close()
    if isinstance(act_space, gym.spaces.Box):
        if len(act_space.shape) != 1 or not (np.isfinite(act_space.low).all() and np.isfinite(act_space.high).all()):
            fail(f"{env_id} has actions {act_space}; es.py needs a flat Box with finite bounds (6)")
    elif not isinstance(act_space, gym.spaces.Discrete):
        fail(f"{env_id} has {act_space} actions; es.py needs a Discrete or a Box action space")
    if not isinstance(obs_space, gym.spaces.Box) or len(obs_space.shape) != 1:
        fail(f"{env_id} has observations {obs_space}; es.py needs flat vectors")


def centered_ranks(returns: np.ndarray) -> np.ndarray:
    """Fitness shaping of equation (3): each of the n ≥ 2 returns replaced by its rank among
    them, 0 for the lowest, scaled to [−1/2, 1/2]. Equal returns share the mean of their ranks,
    so the shaped fitnesses always sum to zero and a tie is a tie."""
    _, inverse, counts = np.unique(returns, return_inverse=True, return_counts=True)
    first = np.cumsum(counts) - counts  # the rank of the first of each group of equal returns
    ranks = (first + (counts - 1) / 2.0)[inverse.reshape(-1)]
    return (ranks / (len(ranks) - 1) - 0.5).reshape(np.shape(returns))  # (3)


def perturbation(seed: int, size: int) -> np.ndarray:
    """ε ~ N(0, I) of one antithetic pair, regenerated from its seed wherever it is needed (a
    worker, the update, every rank): seeds travel, the noise never does."""
    return np.random.default_rng(seed).standard_normal(size, dtype=np.float32)


def es_gradient(fitness: np.ndarray, noise: np.ndarray, sigma: float) -> np.ndarray:
    """The estimate ĝ of equation (2) from P antithetic pairs (n = 2P perturbations).

    fitness: [P, 2], the (shaped) fitness of θ + σε_k and of θ − σε_k; noise: [P, d], ε_k.
    Σ_i F_i ε_i over the n perturbations is Σ_k (F_k⁺ − F_k⁻) ε_k, as ε of the second member is −ε_k.
    """
    return (fitness[:, 0] - fitness[:, 1]) @ noise.astype(np.float64) / (fitness.size * sigma)  # (2)


def observation_statistics(count: float, total: np.ndarray, squares: np.ndarray):
    """The mean and the floored standard deviation of (5) from the float64 sums of the visited
    states (0 and 1 before any state is seen)."""
    if count == 0:
        return np.zeros_like(total), np.ones_like(total)
    mean = total / count
    return mean, np.sqrt(np.maximum(squares / count - mean**2, 1e-2))  # (5)


class Policy(nn.Module):
    """The MLP f_θ of (6), 64 × 64 tanh, with all its weights in one flat parameter θ: the
    vector that ES perturbs and Adam steps. Acting is done in NumPy (make_policy)."""

    def __init__(self, obs_dim: int, out_dim: int, seed: int):
        super().__init__()
        self.shapes = [(obs_dim, 64), (64, 64), (64, out_dim)]
        generator = torch.Generator().manual_seed(seed)  # every rank builds the same θ
        parts = []
        for (fan_in, fan_out), gain in zip(self.shapes, [np.sqrt(2), np.sqrt(2), 0.01]):
            weight = nn.init.orthogonal_(torch.empty(fan_out, fan_in), gain, generator=generator)
            parts += [weight.T.flatten(), torch.zeros(fan_out)]
        self.theta = nn.Parameter(torch.cat(parts))


def make_policy(theta: np.ndarray, shapes: list, obs_mean: np.ndarray, obs_std: np.ndarray, action_space):
    """The deterministic policy of (6) with parameters θ (any flat vector, perturbed or not):
    one observation to one action, in NumPy (a forward pass on one state is cheaper there)."""
    layers, i = [], 0
    for fan_in, fan_out in shapes:
        layers.append((theta[i:i + fan_in * fan_out].reshape(fan_in, fan_out),
                       theta[i + fan_in * fan_out:i + (fan_in + 1) * fan_out]))
        i += (fan_in + 1) * fan_out

    def forward(s):
        x = np.clip((s - obs_mean) / obs_std, -5.0, 5.0)  # (5)
        for w, b in layers[:-1]:
            x = np.tanh(x @ w + b)
        return x @ layers[-1][0] + layers[-1][1]

    if isinstance(action_space, gym.spaces.Discrete):
        return lambda s: int(forward(s).argmax())  # (6)
    low, high = action_space.low.astype(np.float64), action_space.high.astype(np.float64)
    return lambda s: (low + (high - low) * (np.tanh(forward(s)) + 1.0) / 2.0).astype(action_space.dtype)  # (6)


def run_episode(env, act, seed: int, gamma: float):
    """One episode of `act` from env.reset(seed=seed): its fitness F of (1), its return and
    length, and the sums of the states it acted on and of their squares, for (5)."""
    obs, _ = env.reset(seed=seed)
    visited, fitness, discount = [], 0.0, 1.0
    while True:
        visited.append(obs)
        obs, reward, terminated, truncated, info = env.step(act(obs))
        fitness += discount * float(reward)  # (1)
        discount *= gamma
        if terminated or truncated:
            states = np.asarray(visited, dtype=np.float64)
            return fitness, float(info["episode"]["r"]), int(info["episode"]["l"]), states.sum(0), (states**2).sum(0)


def evaluate_pair(env, args: Args, shapes: list, theta: np.ndarray, obs_mean, obs_std, task) -> np.ndarray:
    """Play θ + σε_k and θ − σε_k, num_envs episodes each, the j-th episode of both from the same
    start (env seed + j). One row of numbers, all that leaves a worker or a rank:
    [k, F⁺, F⁻, returns (2 × num_envs), lengths (2 × num_envs), Σs, Σs²]."""
    k, noise_seed, env_seed = task
    eps = perturbation(noise_seed, theta.size)
    fitness, returns, lengths = [], [], []
    total, squares = np.zeros(len(obs_mean)), np.zeros(len(obs_mean))
    for sign in (1.0, -1.0):
        act = make_policy(theta + sign * args.sigma * eps, shapes, obs_mean, obs_std, env.action_space)
        episodes = [run_episode(env, act, env_seed + j, args.gamma) for j in range(args.num_envs)]
        fitness.append(np.mean([e[0] for e in episodes]))
        returns += [e[1] for e in episodes]
        lengths += [e[2] for e in episodes]
        total += sum(e[3] for e in episodes)
        squares += sum(e[4] for e in episodes)
    return np.concatenate([[k], fitness, returns, lengths, total, squares])


def worker_process(rank: int, args: Args, shapes: list, shared_theta, shared_obs, run_dir: str, tasks, results,
                   errors, stop):
    """One worker: plays the pairs it takes from `tasks` with the θ and observation statistics
    of their generation (shared memory, written by the main process between generations only)
    and sends back one row each. Stops when told, or when the main process has died. An error
    goes to the main process as one line."""
    try:
        play_pairs(rank, args, shapes, shared_theta, shared_obs, run_dir, tasks, results, stop)
    except Exception as e:
        errors.put((rank, f"{type(e).__name__}: {(str(e).splitlines() or [''])[0]}"))
        sys.exit(1)  # the main process reports the line; no traceback of the child's own


def play_pairs(rank: int, args: Args, shapes: list, shared_theta, shared_obs, run_dir: str, tasks, results, stop):
    torch.set_num_threads(1)
    results.cancel_join_thread()  # a stopped main process reads no more: exit without waiting to flush
    env = make_env(args.env_id, rank, False, run_dir)()  # a video comes from the main process's env
    generation = None
    try:
        while not stop.is_set() and mp.parent_process().is_alive():
            try:
                task = tasks.get(timeout=1.0)
            except queue.Empty:
                continue
            if task[0] != generation:  # a new generation: its θ and statistics are published
                generation, theta = task[0], shared_theta.numpy().astype(np.float64)
                obs_mean, obs_std = shared_obs.numpy().astype(np.float64)
            results.put(evaluate_pair(env, args, shapes, theta, obs_mean, obs_std, task[1:]))
    finally:
        env.close()


def check_children(processes: list, errors, role: str):
    """Raise ChildFailed if a child process has stopped: with the first line of its own error if it
    sent one, else its exit code (a negative code is the signal that killed it)."""
    for rank, p in enumerate(processes):
        if not p.is_alive():
            try:
                rank, message = errors.get(timeout=1.0)  # its last words may still be on their way
            except queue.Empty:
                code = p.exitcode
                message = f"killed by {signal.Signals(-code).name}" if code < 0 else f"exit code {code}"
                raise ChildFailed(f"{role} {rank} died ({message})")
            raise ChildFailed(f"{role} {rank} failed: {message}")


def collect(play_pair, tasks, results, errors, processes: list, count: int, stop_signals: list) -> list:
    """The rows of the `count` pairs of a generation, whose tasks are on the queue. The main
    process plays pairs from it too while any are left (so the workers' start-up costs no time)
    and takes the workers' rows; ChildFailed if a worker has stopped."""
    rows = []
    while len(rows) < count:
        raise_if_stopped(stop_signals)
        with contextlib.suppress(queue.Empty):
            rows.append(play_pair(tasks.get(timeout=0.01)[1:]))
        with contextlib.suppress(queue.Empty):
            while len(rows) < count:
                rows.append(results.get_nowait())
        check_children(processes, errors, "worker")
    return rows


def gather(rows: list, width: int, pairs: int, world_size: int) -> list:
    """Under torchrun: every rank's rows to every rank (all_gather; padded to the same count,
    the padding's k = −1). A rank that has gone stops the others as a failed child."""
    mine = torch.full((math.ceil(pairs / world_size), width), -1.0, dtype=torch.float64)
    if rows:
        mine[:len(rows)] = torch.as_tensor(np.stack(rows))
    everyone = [torch.empty_like(mine) for _ in range(world_size)]
    try:
        dist.all_gather(everyone, mine)
    except RuntimeError as e:  # gloo: a peer closed its connection
        raise ChildFailed(f"another rank failed: {(str(e).splitlines() or [''])[0]}") from None
    return [row for row in torch.cat(everyone).numpy() if row[0] >= 0]


def setup(args: Args, run_name: str):
    """Seeding, device, the run directory and logging, shared by training and evaluation."""
    run_dir = os.path.join("runs", run_name)
    if os.path.exists("runs") and not os.path.isdir("runs"):
        fail("runs is a file, not a directory: move it away or start from another directory")
    if len(run_name.encode()) > 255:
        fail(f"the run name {run_name[:40]}... is longer than the file system allows (255 bytes): "
             "shorten --exp-name")
    for attempt in range(2, 100):  # a run of the same name started in the same second: add -2, -3, ...
        try:
            os.makedirs(run_dir)
            break
        except FileExistsError:
            run_dir = os.path.join("runs", f"{run_name}-{attempt}")
        except OSError as e:
            fail(f"cannot create the run directory {run_dir}: {e.strerror}")
    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)
    torch.backends.cudnn.deterministic = args.torch_deterministic
    device = torch.device("cuda" if torch.cuda.is_available() and args.cuda else "cpu")
    if device.type == "cpu":
        torch.set_num_threads(args.torch_threads)
    if args.track:
        try:
            import wandb
        except ImportError:
            fail("--track needs Weights & Biases: pip install wandb")
        wandb.init(project=args.wandb_project_name, entity=args.wandb_entity, sync_tensorboard=True,
                   config=asdict(args), name=run_name, save_code=True)
    writer = SummaryWriter(run_dir)
    table = {**asdict(args), **{f"version/{k}": v for k, v in versions().items()}}
    writer.add_text("hyperparameters", "|param|value|\n|-|-|\n" + "\n".join(f"|{k}|{v}|" for k, v in table.items()))
    return device, run_dir, writer


def evaluate_policy(act, env, episodes: int, seed: int) -> list:
    """Returns of `episodes` episodes of the deterministic policy `act` (one observation to one
    action), the env reset with `seed` first so that every evaluation starts from the same states."""
    returns = []
    obs, _ = env.reset(seed=seed)
    while len(returns) < episodes:
        obs, _, terminated, truncated, info = env.step(act(obs))
        if terminated or truncated:
            returns.append(float(info["episode"]["r"]))
            obs, _ = env.reset()
    return returns


def write_summary(run_dir: str, summary: dict) -> dict:
    """summary.json. JSON has no NaN: a non-finite number is written as null and its key listed
    under `non_finite` (the reason is in `stopped` / `stop_reason`)."""
    bad = [k for k, v in summary.items() if isinstance(v, float) and not math.isfinite(v)]
    summary = {k: None if k in bad else v for k, v in summary.items()}
    if bad:
        summary["non_finite"] = bad
    with open(os.path.join(run_dir, "summary.json"), "w") as f:
        json.dump(summary, f, indent=2, allow_nan=False)
    print(f"run directory: {run_dir} (summary.json, TensorBoard log)", flush=True)
    return summary


def evaluate(args: Args) -> dict:
    """--eval-checkpoint: act with the saved θ and observation statistics, no learning."""
    if not os.path.isfile(args.eval_checkpoint):
        fail(f"no checkpoint at {args.eval_checkpoint}")
    try:
        ckpt = torch.load(args.eval_checkpoint, map_location="cpu", weights_only=True)
    except Exception as e:
        fail(f"cannot read {args.eval_checkpoint} as a checkpoint ({type(e).__name__})")
    saved_by = ckpt.get("algorithm") if isinstance(ckpt, dict) else None
    if saved_by != "es":
        fail(f"{args.eval_checkpoint} was saved by {saved_by or 'another program'}, not es.py: "
             "evaluate it with the script that saved it")
    args.env_id = ckpt["args"]["env_id"]
    check_env(args.env_id, args.capture_video)
    run_name = f"{args.env_id.replace('/', '-')}__{args.exp_name}-eval__{args.seed}__{int(time.time())}"
    device, run_dir, writer = setup(args, run_name)
    env = make_env(args.env_id, 0, args.capture_video, run_dir)()
    space = env.action_space
    out_dim = space.n if isinstance(space, gym.spaces.Discrete) else space.shape[0]
    policy = Policy(env.observation_space.shape[0], out_dim, args.seed)
    policy.load_state_dict(ckpt["model"])
    stats = ckpt["obs_stats"]
    act = make_policy(policy.theta.detach().numpy().astype(np.float64), policy.shapes, stats["mean"].numpy(),
                      stats["std"].numpy(), space)
    returns = evaluate_policy(act, env, args.eval_episodes, args.seed)
    for i, r in enumerate(returns):
        writer.add_scalar("eval/episodic_return", r, i + 1)
    env.close()
    writer.close()
    summary = dict(env_id=args.env_id, algorithm="es", mode="eval", seed=args.seed, checkpoint=args.eval_checkpoint,
                   episodes=len(returns), mean_return=float(np.mean(returns)), std_return=float(np.std(returns)),
                   stopped=None, versions=versions(), run_dir=run_dir)
    print(f"eval {args.env_id}: mean return {summary['mean_return']:.2f} ± {summary['std_return']:.2f} "
          f"over {len(returns)} episodes")
    return write_summary(run_dir, summary)


def train(args: Args) -> dict:
    check_args(args)
    if args.eval_checkpoint:
        return evaluate(args)
    if args.population_size % 2:
        fail(f"--population-size {args.population_size} is odd: the perturbations come in antithetic pairs "
             f"θ ± σε; use {args.population_size + 1}")
    pairs = args.population_size // 2
    distributed = "RANK" in os.environ  # started by torchrun
    rank, world_size = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    if pairs < world_size:
        fail(f"--population-size {args.population_size} has {pairs} antithetic pairs for {world_size} ranks: "
             f"every rank needs one; use at least {2 * world_size}")
    check_env(args.env_id, args.capture_video)
    if distributed:
        dist.init_process_group("gloo", timeout=datetime.timedelta(minutes=10))
    lead = rank == 0  # writes the run directory, logs and prints

    run_name = f"{args.env_id.replace('/', '-')}__{args.exp_name}__{args.seed}__{int(time.time())}"
    if lead:
        _, run_dir, writer = setup(args, run_name)
    else:  # the other ranks write nothing; their randomness is all in seeds shared with rank 0
        run_dir, writer = None, None
        torch.set_num_threads(args.torch_threads)
    env = make_env(args.env_id, rank, args.capture_video and lead, run_dir)()
    eval_env = make_env(args.env_id, -1, False, run_dir)() if args.eval_frequency and lead else None
    obs_dim, space = env.observation_space.shape[0], env.action_space
    policy = Policy(obs_dim, space.n if isinstance(space, gym.spaces.Discrete) else space.shape[0], args.seed)
    optimizer = torch.optim.Adam(policy.parameters(), lr=args.learning_rate, weight_decay=args.weight_decay,
                                 fused=True)
    size = policy.theta.numel()
    obs_count, obs_total, obs_squares = 0.0, np.zeros(obs_dim), np.zeros(obs_dim)
    rng = np.random.default_rng(args.seed)
    width = 3 + 4 * args.num_envs + 2 * obs_dim  # of a row of evaluate_pair

    # the main process and num_workers - 1 spawned workers play pairs from one queue, with θ and the statistics
    # of (5) in shared memory; under torchrun a rank is one player
    spawned = 0 if distributed else min(args.num_workers, pairs) - 1
    shared_theta = torch.zeros(size).share_memory_()
    shared_obs = torch.zeros(2, obs_dim, dtype=torch.float64).share_memory_()
    ctx = mp.get_context("spawn")
    tasks, results, errors, stop = (ctx.Queue(), ctx.Queue(), ctx.Queue(), ctx.Event()) if spawned else [None] * 4
    processes = [ctx.Process(target=worker_process, daemon=True,
                             args=(rank, args, policy.shapes, shared_theta, shared_obs, run_dir, tasks, results,
                                   errors, stop))
                 for rank in range(spawned)]

    global_step, generation, start_time = 0, 0, time.time()
    next_progress, next_eval = start_time + 1.0, args.eval_frequency
    recent_returns = deque(maxlen=20)
    episodes, last_eval = 0, None
    last_finite = copy.deepcopy(policy.state_dict())  # saved instead of θ if training turns non-finite
    stopped = stop_reason = None
    stop_signals = []  # Ctrl-C and SIGTERM, recorded here and raised at the next generation
    # the workers are born ignoring Ctrl-C and SIGTERM (an ignored signal stays ignored in a new
    # process, and Python then installs no KeyboardInterrupt): the main process alone stops them
    previous_handlers = {s: signal.signal(s, signal.SIG_IGN) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        try:
            for p in processes:
                p.start()
        finally:
            for s in previous_handlers:
                signal.signal(s, lambda signum, frame: stop_signals.append(signum))
        while global_step < args.total_timesteps:
            raise_if_stopped(stop_signals)
            noise_seeds, env_seeds = rng.integers(0, 2**31, size=(2, pairs))  # the same on every rank
            work = [(k, int(noise_seeds[k]), int(env_seeds[k])) for k in range(pairs)]
            obs_mean, obs_std = observation_statistics(obs_count, obs_total, obs_squares)
            theta = policy.theta.detach().numpy().astype(np.float64)
            play_pair = functools.partial(evaluate_pair, env, args, policy.shapes, theta, obs_mean, obs_std)
            if processes:
                with torch.no_grad():
                    shared_theta.copy_(policy.theta)
                    shared_obs.copy_(torch.as_tensor(np.stack([obs_mean, obs_std])))
                for task in work:
                    tasks.put((generation, *task))
                rows = collect(play_pair, tasks, results, errors, processes, pairs, stop_signals)
            else:  # the main process alone plays (this rank's share of) the pairs
                rows = [play_pair(task) for task in work[rank::world_size]]
                if distributed:
                    rows = gather(rows, width, pairs, world_size)
            rows = np.stack(sorted(rows, key=lambda row: row[0]))  # pair order, however they were played
            m = args.num_envs
            fitness = rows[:, 1:3]
            returns, lengths = rows[:, 3:3 + 2 * m], rows[:, 3 + 2 * m:3 + 4 * m]
            generation += 1
            global_step += int(lengths.sum())
            episodes += returns.size

            shaped = centered_ranks(fitness)  # (3)
            noise = np.stack([perturbation(s, size) for s in noise_seeds])
            gradient = es_gradient(shaped, noise, args.sigma)  # (2)
            optimizer.zero_grad(set_to_none=True)
            policy.theta.grad = torch.as_tensor(-gradient, dtype=policy.theta.dtype)  # Adam descends -ĝ
            optimizer.step()  # (4), λθ added by Adam's weight_decay
            # observation statistics (5) of this generation's states, for the next one
            obs_count += float(lengths.sum())
            obs_total += rows[:, 3 + 4 * m:3 + 4 * m + obs_dim].sum(0)
            obs_squares += rows[:, 3 + 4 * m + obs_dim:].sum(0)

            gradient_norm = float(np.linalg.norm(gradient))
            check_finite(global_step, {"charts/gradient_norm": gradient_norm}, policy)
            last_finite = copy.deepcopy(policy.state_dict())
            recent_returns.extend(returns.ravel())
            if not lead:
                continue
            for r, length in zip(returns.ravel(), lengths.ravel()):
                writer.add_scalar("charts/episodic_return", r, global_step)
                writer.add_scalar("charts/episodic_length", length, global_step)
            sps = int(global_step / (time.time() - start_time))
            writer.add_scalar("charts/SPS", sps, global_step)
            writer.add_scalar("charts/learning_rate", optimizer.param_groups[0]["lr"], global_step)
            writer.add_scalar("charts/gradient_norm", gradient_norm, global_step)
            writer.add_scalar("charts/theta_norm", policy.theta.norm().item(), global_step)
            writer.add_scalar("charts/population_return", returns.mean(), global_step)

            if args.eval_frequency and global_step >= next_eval:
                obs_mean, obs_std = observation_statistics(obs_count, obs_total, obs_squares)
                act = make_policy(policy.theta.detach().numpy().astype(np.float64), policy.shapes, obs_mean, obs_std,
                                  space)
                eval_returns = evaluate_policy(act, eval_env, args.eval_episodes, args.seed + EVAL_SEED_OFFSET)
                last_eval = (global_step, float(np.mean(eval_returns)))
                writer.add_scalar("eval/episodic_return", last_eval[1], global_step)
                next_eval = (global_step // args.eval_frequency + 1) * args.eval_frequency
            if time.time() >= next_progress:
                mean_ret = np.mean(recent_returns) if recent_returns else float("nan")
                print(f"step {global_step:>11,}  SPS {sps:>6,}  return(last 20) {mean_ret:8.2f}", flush=True)
                next_progress = time.time() + PROGRESS_SECONDS
    except KeyboardInterrupt as e:
        stopped = "terminated" if isinstance(e, Terminated) else "interrupted"
        stop_reason = f"{'SIGTERM' if stopped == 'terminated' else 'Ctrl-C'} at step {global_step:,}"
    except NonFinite as e:
        stopped, stop_reason = "non-finite", str(e)
        policy.load_state_dict(last_finite)
    except ChildFailed as e:
        stopped, stop_reason = "child-failed", str(e)
    finally:
        for s, handler in previous_handlers.items():
            signal.signal(s, handler)
        # stop the workers in every case, also on an error: each finishes its episode and exits
        if processes:
            stop.set()
            tasks.cancel_join_thread()  # pairs nobody will play: do not wait to flush them at exit
        for p in processes:
            if p.pid is not None:  # started
                p.join(timeout=10)
                if p.is_alive():  # it ignores SIGTERM
                    p.kill()
                    p.join()
    checksums = [zlib.crc32(policy.theta.detach().numpy().tobytes())]
    if distributed:
        if stopped is None:  # the ranks applied the same updates: θ is the same everywhere
            everyone = [torch.zeros(1, dtype=torch.int64) for _ in range(world_size)]
            with contextlib.suppress(RuntimeError):  # a rank that stopped early has left: rank 0's own only
                dist.all_gather(everyone, torch.tensor(checksums, dtype=torch.int64))
                checksums = [int(c) for c in everyone]
        dist.destroy_process_group()
    env.close()
    if not lead:
        return dict(stopped=stopped, stop_reason=stop_reason)
    if stopped:
        print(f"stopped: {stop_reason}", file=sys.stderr)

    if args.save_model:
        path = os.path.join(run_dir, "es.pt")
        obs_mean, obs_std = observation_statistics(obs_count, obs_total, obs_squares)
        torch.save({"algorithm": "es", "args": asdict(args), "model": policy.state_dict(),
                    "obs_stats": {"mean": torch.as_tensor(obs_mean), "std": torch.as_tensor(obs_std),
                                  "count": torch.tensor(obs_count, dtype=torch.float64)}}, path)
        print(f"model saved to {path}")
    if eval_env is not None:
        eval_env.close()
    writer.close()
    wall = time.time() - start_time
    eval_step, eval_return = last_eval or (None, None)
    summary = dict(env_id=args.env_id, algorithm="es", exp_name=args.exp_name, seed=args.seed, global_step=global_step,
                   wall_seconds=wall, SPS=global_step / wall,
                   mean_return=float(np.mean(recent_returns)) if recent_returns else None,
                   episodes_in_mean=len(recent_returns), episodes=episodes,
                   eval_step=eval_step, eval_return=eval_return,
                   stopped=stopped, stop_reason=stop_reason,
                   generations=generation, processes=(spawned + 1) * world_size, theta_crc32=checksums,
                   versions=versions(), run_dir=run_dir)
    return write_summary(run_dir, summary)


if __name__ == "__main__":
    sys.exit(EXIT_CODES[train(parse_args())["stopped"]])
