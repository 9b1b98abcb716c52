r"""D4PG: Distributed Distributional Deep Deterministic Policy Gradient, continuous actions.

Barth-Maron, Hoffman, Budden, Dabney, Horgan, TB, Muldal, Heess, Lillicrap (2018),
"Distributed Distributional Deterministic Policy Gradients", arXiv:1804.08617. DDPG
(Lillicrap et al. 2015, arXiv:1509.02971) with four changes: a categorical distributional
critic (Bellemare, Dabney, Munos 2017, arXiv:1707.06887), N-step returns, prioritised replay
(Schaul et al. 2015, arXiv:1511.05952) and K actor processes that act in parallel with the
learner and feed one replay.

Deterministic actor, tanh output scaled to the env's bounds (never assumed to be ±1),
explored with Gaussian noise in units of the action scale:
$$ \mu_\theta(s) = \text{scale} \odot \tanh(f_\theta(s)) + \text{bias}, \qquad
   a_t = \text{clip}(\mu_\theta(s_t) + \epsilon, \text{low}, \text{high}),\;
   \epsilon \sim \mathcal N(0, (\sigma\,\text{scale})^2) \tag{1} $$

Distributional critic: the return Z(s, a) is a categorical distribution on a fixed support
of `num_atoms` atoms from v_min to v_max, with probabilities p_i = softmax of the critic's
logits; its mean is the Q-value:
$$ z_i = v_{min} + i\,\Delta z, \quad \Delta z = \frac{v_{max} - v_{min}}{N_{atoms} - 1}, \qquad
   Q_\phi(s, a) = \sum_i z_i\, p_i(s, a) \tag{2} $$

N-step transitions: from s_t, the discounted sum of up to N rewards and the discount of
the bootstrap, zero when the episode terminates inside the window (k ≤ N steps reach its
end or the window's); a truncation keeps γ^k and bootstraps from the final observation:
$$ R_t = \sum_{j=0}^{k-1} \gamma^j r_{t+j}, \qquad
   \gamma_t = \begin{cases} 0 & \text{terminated at } t+k \\ \gamma^k & \text{otherwise} \end{cases} \tag{3} $$

Target distribution: the target networks' Z'(s_{t+k}, μ'(s_{t+k})) with every atom moved to
R_t + γ_t z_j, projected back onto the support (each moved atom's mass split between its
two neighbouring atoms, linearly; atoms beyond v_min or v_max land on the end atoms):
$$ (\Phi \mathcal T Z')_i = \sum_j
   \left[1 - \frac{\left|[R_t + \gamma_t z_j]_{v_{min}}^{v_{max}} - z_i\right|}{\Delta z}\right]_0^1
   p'_j(s_{t+k}, \mu_{\theta'}(s_{t+k})) \tag{4} $$

Critic loss: the cross-entropy of the critic's distribution against the projected target
(its KL up to a constant), weighted by the importance weights w of prioritised replay:
$$ L(\phi) = \mathbb E_{i \sim P}\left[ w_i \cdot
   \left(-\sum_k (\Phi \mathcal T Z')_k \log p_k(s_i, a_i)\right)\right] \tag{5} $$

Actor: the deterministic policy gradient through the critic's mean (2), critic held fixed:
$$ \nabla_\theta J = \mathbb E_s\left[\nabla_a Q_\phi(s, a)|_{a=\mu_\theta(s)} \nabla_\theta \mu_\theta(s)\right], \quad
   Q_\phi(s, a) = \textstyle\sum_i z_i p_i(s, a) \tag{6} $$

Prioritised replay (the proportional variant): transition i is sampled with probability
P(i) ∝ p_i^α, where p_i is its latest KL divergence to the target ((5) less the target's
entropy, as in Rainbow; new transitions get the largest priority seen so far), found by a
sum tree in O(log n); the importance weights undo the bias, normalised by their batch
maximum, with β annealed linearly to 1 over the run:
$$ P(i) = \frac{p_i^\alpha}{\sum_k p_k^\alpha}, \qquad
   w_i = \frac{(n\,P(i))^{-\beta}}{\max_j (n\,P(j))^{-\beta}} \tag{7} $$

Target networks, Polyak-averaged after each learner step (τ = 1 with
--target-network-frequency 100 is the paper's hard copy every 100 steps):
$$ \theta' \leftarrow \tau\theta + (1 - \tau)\theta', \qquad \phi' \leftarrow \tau\phi + (1 - \tau)\phi' \tag{8} $$

Actors and learner: `--num-actors` K processes (torch.multiprocessing, spawn), each with
`--num-envs` environments and a shared-memory copy of μ. The run goes in rounds: the
learner publishes its actor's weights and tells every actor process to collect
`--rollout-steps` vector steps; while they act, the learner takes the gradient steps owed
for the data it already has (one per env step); then it adds the actors' N-step
transitions to the replay, in actor order. So acting and learning run at the same time,
the actors' weights are one round old, and a seed gives the same run every time. The
actor processes are born ignoring Ctrl-C and SIGTERM: the learner alone handles both and
stops them (and an actor whose learner has died stops by itself).
Environments: gymnasium vector envs in their default NEXT_STEP autoreset mode: the step
after an episode's end only resets that env; it is no transition and is not stored.

Run:
    python algos/d4pg.py --total-timesteps 20000                    # Pendulum-v1
    python algos/d4pg.py --num-actors 2 --total-timesteps 20000
    python algos/d4pg.py --env-id Hopper-v4 --learning-starts 25000
    python algos/d4pg.py --help

The support should cover the task's discounted returns, about r_min/(1-γ) to r_max/(1-γ);
returns beyond it are clipped to the end atoms. The default [-1000, 1000] covers rewards of
±10 per step at γ = 0.99: Hopper-v4's values (0 to about 400) and Pendulum-v1's (rewards in
[-16.3, 0]: only the worst states of a bad early policy fall below -1000, and the
projection keeps the mean exact inside the support). Other defaults are the
paper's (N = 5, 51 atoms, batch 256, σ = 0.3, Adam at 1e-4 for the actor) and Schaul et al.'s
(α = 0.6, β from 0.4), with 256×256 networks and a critic rate of 3e-4. Every 10,000 steps
the learner evaluates μ(s), without noise, for 10 episodes on a separate env.
"""

import contextlib
import copy
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
from collections import deque
from dataclasses import asdict, dataclass
from typing import Optional

import gymnasium as gym
import numpy as np
import torch
import torch.multiprocessing as mp
import torch.nn as nn
import tyro
from torch.utils.tensorboard import SummaryWriter


@dataclass
class Args:
    exp_name: str = os.path.basename(__file__)[: -len(".py")]
    """the name of this experiment (part of the run directory)"""
    seed: int = 1
    """seed of random, numpy, torch and the environments"""
    torch_deterministic: bool = True
    """use deterministic torch algorithms (same seed, same returns on CPU)"""
    cuda: bool = True
    """use CUDA for the learner when it is available (actors act on the CPU)"""
    track: bool = False
    """log to Weights & Biases (needs `pip install wandb`)"""
    wandb_project_name: str = "pg-reference"
    """the Weights & Biases project"""
    wandb_entity: Optional[str] = None
    """the Weights & Biases entity (team)"""
    capture_video: bool = False
    """record videos of actor 0's environment 0 into the run directory"""
    save_model: bool = False
    """save the actor and critic to runs/<run>/d4pg.pt at the end (and on Ctrl-C)"""
    eval_checkpoint: Optional[str] = None
    """path of a saved model: evaluate it (μ(s), no noise) without learning, then exit"""
    eval_frequency: int = 10_000
    """evaluate μ(s), without noise, on a separate env every this many env steps (0: never)"""
    eval_episodes: int = 10
    """episodes per evaluation (during training and for --eval-checkpoint)"""
    torch_threads: int = 1
    """CPU threads for torch in the learner (each actor process uses one)"""

    env_id: str = "Pendulum-v1"
    """the gymnasium environment id (Box actions, vector observations)"""
    total_timesteps: int = 1_000_000
    """total environment steps over all actors (Pendulum-v1 needs about 20,000)"""
    num_actors: int = 1
    """actor processes acting in parallel with the learner"""
    num_envs: int = 1
    """environments per actor process"""
    rollout_steps: int = 25
    """vector steps each actor takes per round (the actors' weights are one round old)"""
    policy_lr: float = 1e-4
    """Adam learning rate of the actor"""
    q_lr: float = 3e-4
    """Adam learning rate of the distributional critic"""
    buffer_size: int = 1_000_000
    """replay capacity in N-step transitions"""
    gamma: float = 0.99
    """discount factor γ in (3)"""
    n_step: int = 5
    """N of the N-step returns (3)"""
    num_atoms: int = 51
    """atoms of the categorical return distribution (2)"""
    v_min: float = -1000.0
    """lowest atom z_0 of (2): at or below most discounted returns, about r_min / (1 - γ)"""
    v_max: float = 1000.0
    """highest atom of (2): at or above most discounted returns, about r_max / (1 - γ)"""
    tau: float = 0.005
    """Polyak averaging coefficient τ in (8)"""
    target_network_frequency: int = 1
    """learner steps per target update (8)"""
    policy_frequency: int = 1
    """critic steps per actor step (1: every step, as in the paper)"""
    batch_size: int = 256
    """transitions per gradient step"""
    learning_starts: int = 5_000
    """env steps of uniformly random actions before learning starts"""
    exploration_noise: float = 0.3
    """std σ of the exploration noise in (1), in units of the action scale"""
    per: bool = True
    """prioritised replay (7); --no-per samples uniformly with unit weights"""
    per_alpha: float = 0.6
    """priority exponent α of (7)"""
    per_beta: float = 0.4
    """initial importance-sampling exponent β of (7), annealed linearly to 1"""
    per_eps: float = 1e-6
    """added to every priority so that no transition has probability 0"""


# The valid range of every numeric Arg, checked by check_args before anything is written:
# "[" and "]" include an end, "(" and ")" exclude it. tests/test_args.py tries a value
# outside each range and NaN on every numeric field of Args, so a new field needs a line here.
ARG_RANGES = {
    "seed": "[0, 4294967295]",  # what random, numpy and torch all accept
    "eval_frequency": "[0, inf)",
    "eval_episodes": "[1, inf)",
    "torch_threads": "[1, 1024]",
    "total_timesteps": "[1, inf)",
    "num_actors": "[1, inf)",
    "num_envs": "[1, inf)",
    "rollout_steps": "[1, inf)",
    "policy_lr": "(0, inf)",
    "q_lr": "(0, inf)",
    "buffer_size": "[1, inf)",
    "gamma": "[0, 1]",
    "n_step": "[1, inf)",
    "num_atoms": "[2, inf)",  # Δz of (2) needs two atoms
    # the support's ends are values of the task's returns, which may have any sign and size:
    # unbounded, but v_min < v_max is checked in train()
    "v_min": "(-inf, inf)",
    "v_max": "(-inf, inf)",
    "tau": "(0, 1]",
    "target_network_frequency": "[1, inf)",
    "policy_frequency": "[1, inf)",
    "batch_size": "[1, inf)",
    "learning_starts": "[0, inf)",
    "exploration_noise": "[0, inf)",
    "per_alpha": "[0, inf)",
    "per_beta": "[0, 1]",
    "per_eps": "(0, inf)",
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
    training the two signals are only recorded in `stop_signals`, and the learner calls this at
    each of its rounds and gradient steps: an exception raised wherever the signal happens to land
    can stop a library halfway, inside TensorBoard's writer queue (whose close() then waited up to
    its 120-s flush interval), a multiprocessing queue, or an optimiser's step."""
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
    for dist in ("mujoco", "ale-py"):
        try:
            found[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            found[dist] = None
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
        fail(f"{env_id} is an Atari game (pixel observations); d4pg.py is for vector observations: "
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
        fail(f"cannot make env {env_id!r}: {e} (try --env-id Pendulum-v1)")
    act_space, obs_space = env.action_space, env.observation_space
    env.close()
    if isinstance(act_space, gym.spaces.Discrete):
        fail(f"{env_id} has Discrete actions; d4pg.py is for continuous (Box) actions: use algos/ppo.py")
    if not isinstance(act_space, gym.spaces.Box) or len(act_space.shape) != 1:
        fail(f"{env_id} has {act_space} actions; d4pg.py needs a flat Box action space")
    if not (np.isfinite(act_space.low).all() and np.isfinite(act_space.high).all()):
        fail(f"{env_id} has unbounded actions {act_space}; d4pg.py scales tanh to finite bounds")
    if not isinstance(obs_space, gym.spaces.Box) or len(obs_space.shape) != 1:
        fail(f"{env_id} has observations {obs_space}; d4pg.py needs flat vectors")


def check_memory(nbytes: int, what: str):
    """Refuse a buffer larger than the machine's physical memory before allocating it: NumPy
    would reserve it lazily and the run would die when the replay fills, hours later."""
    try:
        physical = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):  # no sysconf (Windows): the size cannot be checked
        return
    if nbytes > physical:
        fail(f"{what} needs {nbytes / 2**30:,.1f} GiB, more than the {physical / 2**30:,.1f} GiB of physical "
             "memory of this machine: make it smaller")


def categorical_projection(next_probs, returns, discounts, atoms):
    """Equation (4): the target distribution on the support `atoms` [N]. next_probs [B, N]
    are the target critic's probabilities p'_j at the bootstrap state; returns [B] and
    discounts [B] are R_t and γ_t of (3). Each atom moves to R + γ_t z_j, clipped to
    [v_min, v_max]; the triangle kernel of (4) is nonzero only at the two atoms around it,
    so its mass goes to atom ⌊b⌋ with weight 1 - (b - ⌊b⌋) and to ⌊b⌋ + 1 with weight
    b - ⌊b⌋, where b = (moved - v_min) / Δz: O(N) per transition instead of O(N²)."""
    n = atoms.shape[0]
    moved = (returns[:, None] + discounts[:, None] * atoms[None, :]).clamp(atoms[0], atoms[-1])  # [B, N] over j
    b = (moved - atoms[0]) / (atoms[1] - atoms[0])
    lower = b.floor().clamp(0, n - 1)
    upper_weight = b - lower  # (4): 1 - |b - i| at i = ⌊b⌋ + 1, and 1 minus it at ⌊b⌋
    target = torch.zeros_like(next_probs)
    target.scatter_add_(1, lower.long(), next_probs * (1.0 - upper_weight))  # (4)
    target.scatter_add_(1, (lower + 1).clamp(max=n - 1).long(), next_probs * upper_weight)  # (4)
    return target


@torch.no_grad()
def polyak_update(target: nn.Module, source: nn.Module, tau: float):
    """Equation (8): θ' ← τθ + (1 − τ)θ' for every parameter."""
    for t, s in zip(target.parameters(), source.parameters()):
        t.lerp_(s, tau)  # (8)


class NStepBuffer:
    """Equation (3) online, per environment: keeps each env's last N (s, a, r) and emits
    (s_t, a_t, R_t, s_{t+k}, γ_t) once a window is full or the episode ends (then every
    pending start is flushed, with k shorter than N)."""

    def __init__(self, num_envs: int, n: int, gamma: float):
        self.windows = [deque() for _ in range(num_envs)]
        self.n, self.gamma = n, gamma

    def _emit(self, window, next_obs, terminated: bool):
        obs, action, _ = window[0]
        k = len(window)
        ret = sum(self.gamma**j * r for j, (_, _, r) in enumerate(window))  # (3)
        discount = 0.0 if terminated else self.gamma**k  # (3)
        return obs, action, ret, next_obs, discount

    def add(self, env: int, obs, action, reward: float, next_obs, terminated: bool, truncated: bool) -> list:
        """One real step of env `env`; returns the transitions it completes."""
        window = self.windows[env]
        window.append((obs, action, reward))
        out = []
        if terminated or truncated:
            while window:
                out.append(self._emit(window, next_obs, terminated))
                window.popleft()
        elif len(window) == self.n:
            out.append(self._emit(window, next_obs, False))
            window.popleft()
        return out


class SumTree:
    """Priorities in the leaves of a complete binary tree whose inner nodes hold the sums of
    their children: updating a leaf and drawing a leaf with probability proportional to
    its value both take O(log n), for a whole batch at once."""

    def __init__(self, capacity: int):
        self.leaves = 1 << max(0, capacity - 1).bit_length()  # a power of two >= capacity
        self.tree = np.zeros(2 * self.leaves, dtype=np.float64)  # node k has children 2k, 2k+1; root 1

    def total(self) -> float:
        return float(self.tree[1])

    def update(self, indices: np.ndarray, values: np.ndarray):
        nodes = np.asarray(indices) + self.leaves
        self.tree[nodes] = values
        for _ in range(self.leaves.bit_length() - 1):  # up one level at a time to the root
            nodes = nodes // 2  # repeated nodes just write the same sum twice
            self.tree[nodes] = self.tree[2 * nodes] + self.tree[2 * nodes + 1]

    def find(self, targets: np.ndarray) -> np.ndarray:
        """The leaves where the prefix sums of the priorities first exceed `targets`."""
        nodes = np.ones(len(targets), dtype=np.int64)
        targets = np.array(targets, dtype=np.float64)
        while nodes[0] < self.leaves:
            left = 2 * nodes
            go_right = targets >= self.tree[left]
            targets -= self.tree[left] * go_right
            nodes = left + go_right
        return nodes - self.leaves

    def sample(self, batch_size: int, rng: np.random.Generator) -> np.ndarray:
        """Stratified: one draw from each of batch_size equal slices of the total."""
        bounds = self.total() * (np.arange(batch_size) + rng.random(batch_size)) / batch_size
        return self.find(bounds)


class ReplayBuffer:
    """A ring buffer of N-step transitions in preallocated NumPy arrays, sampled in
    proportion to priority (7) through a sum tree, or uniformly with per=False."""

    def __init__(self, capacity: int, obs_dim: int, act_dim: int, rng: np.random.Generator,
                 per: bool, alpha: float, eps: float):
        self.obs = np.zeros((capacity, obs_dim), dtype=np.float32)
        self.actions = np.zeros((capacity, act_dim), dtype=np.float32)
        self.returns = np.zeros(capacity, dtype=np.float32)
        self.next_obs = np.zeros((capacity, obs_dim), dtype=np.float32)
        self.discounts = np.zeros(capacity, dtype=np.float32)
        self.capacity, self.pos, self.size, self.rng = capacity, 0, 0, rng
        self.tree = SumTree(capacity) if per else None
        self.alpha, self.eps, self.max_priority = alpha, eps, 1.0

    @staticmethod
    def nbytes(capacity: int, obs_dim: int, act_dim: int, per: bool) -> int:
        """The five float32 arrays above and, with per, the sum tree's float64 nodes."""
        tree = 2 * 8 * (1 << max(0, capacity - 1).bit_length()) if per else 0
        return capacity * 4 * (2 * obs_dim + act_dim + 2) + tree

    def add(self, obs, actions, returns, next_obs, discounts):
        idx = (self.pos + np.arange(len(obs))) % self.capacity
        self.obs[idx], self.actions[idx], self.returns[idx] = obs, actions, returns
        self.next_obs[idx], self.discounts[idx] = next_obs, discounts
        if self.tree is not None:
            self.tree.update(idx, np.full(len(idx), self.max_priority**self.alpha))
        self.pos = (self.pos + len(obs)) % self.capacity
        self.size = min(self.size + len(obs), self.capacity)

    def sample(self, batch_size: int, beta: float, device):
        if self.tree is None:
            idx, weights = self.rng.integers(0, self.size, batch_size), np.ones(batch_size)
        else:
            idx = np.minimum(self.tree.sample(batch_size, self.rng), self.size - 1)  # guard float round-off
            probs = self.tree.tree[idx + self.tree.leaves] / self.tree.total()  # (7)
            weights = (self.size * probs) ** -beta  # (7)
            weights /= weights.max()
        batch = [torch.as_tensor(x[idx], device=device)
                 for x in (self.obs, self.actions, self.returns, self.next_obs, self.discounts)]
        return idx, batch + [torch.as_tensor(weights, dtype=torch.float32, device=device)]

    def update_priorities(self, idx: np.ndarray, priorities: np.ndarray):
        priorities = priorities + self.eps
        self.max_priority = max(self.max_priority, float(priorities.max()))
        self.tree.update(idx, priorities**self.alpha)  # (7)


class Actor(nn.Module):
    def __init__(self, obs_dim: int, act_dim: int, low: np.ndarray, high: np.ndarray):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(obs_dim, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(),
                                 nn.Linear(256, act_dim), nn.Tanh())
        self.register_buffer("action_scale", torch.as_tensor((high - low) / 2.0, dtype=torch.float32))
        self.register_buffer("action_bias", torch.as_tensor((high + low) / 2.0, dtype=torch.float32))
        self.low, self.high = low, high

    def forward(self, obs):
        return self.net(obs) * self.action_scale + self.action_bias  # (1)

    @torch.inference_mode()
    def act(self, obs: np.ndarray) -> np.ndarray:
        """μ(s) for one NumPy observation, no noise (evaluate_policy's `act`), inside the bounds."""
        mu = self(torch.as_tensor(obs, dtype=torch.float32, device=self.action_scale.device))
        return np.clip(mu.cpu().numpy(), self.low, self.high)


class DistributionalCritic(nn.Module):
    """Logits of Z(s, a) over the atoms (2): a 256×256 ReLU MLP of [s, a]."""

    def __init__(self, obs_dim: int, act_dim: int, num_atoms: int):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(obs_dim + act_dim, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(),
                                 nn.Linear(256, num_atoms))

    def forward(self, obs, actions):
        return self.net(torch.cat([obs, actions], -1))


def next_command(commands):
    """The learner's next round number, or None to stop: also when the learner has died, so
    that no actor process outlives it."""
    while True:
        try:
            return commands.get(timeout=1.0)
        except queue.Empty:
            if not mp.parent_process().is_alive():
                return None


def actor_process(rank: int, args: Args, shared_actor: Actor, run_dir: str, commands, results, errors):
    """One actor: waits for a round number, acts `rollout_steps` vector steps with the
    shared weights (uniformly random before learning_starts) and sends back its N-step
    transitions and finished episodes. None stops it. An error goes to the learner as one line."""
    try:
        act_in_rounds(rank, args, shared_actor, run_dir, commands, results)
    except Exception as e:
        errors.put((rank, f"{type(e).__name__}: {(str(e).splitlines() or [''])[0]}"))
        sys.exit(1)  # the learner reports the line; no traceback of the child's own


def act_in_rounds(rank: int, args: Args, shared_actor: Actor, run_dir: str, commands, results):
    torch.set_num_threads(1)
    seed = args.seed + 1000 * (rank + 1)
    rng = np.random.default_rng(seed)
    torch.manual_seed(seed)
    envs = gym.vector.SyncVectorEnv([make_env(args.env_id, rank * args.num_envs + i, args.capture_video, run_dir)
                                     for i in range(args.num_envs)])
    low, high = envs.single_action_space.low, envs.single_action_space.high
    explore_std = args.exploration_noise * (high - low) / 2.0
    nstep = NStepBuffer(args.num_envs, args.n_step, args.gamma)
    steps_per_round = args.num_actors * args.num_envs * args.rollout_steps
    obs, _ = envs.reset(seed=[args.seed + rank * args.num_envs + i for i in range(args.num_envs)])
    reset_step = np.zeros(args.num_envs, dtype=bool)  # this step of env i only resets it (NEXT_STEP)
    try:
        while (round_ := next_command(commands)) is not None:
            transitions, episodes = [], []
            for _ in range(args.rollout_steps):
                if round_ * steps_per_round < args.learning_starts:
                    actions = rng.uniform(low, high, (args.num_envs, len(low))).astype(np.float32)
                else:
                    with torch.inference_mode():
                        mu = shared_actor(torch.as_tensor(obs, dtype=torch.float32)).numpy()
                    actions = (mu + rng.normal(0.0, explore_std, mu.shape)).clip(low, high).astype(np.float32)  # (1)
                next_obs, rewards, terminations, truncations, infos = envs.step(actions)
                for i in np.flatnonzero(~reset_step):  # a reset step's action was ignored: no transition
                    transitions += nstep.add(i, obs[i], actions[i], float(rewards[i]), next_obs[i],
                                             bool(terminations[i]), bool(truncations[i]))
                if "episode" in infos:
                    episodes += [(float(infos["episode"]["r"][i]), int(infos["episode"]["l"][i]))
                                 for i in np.flatnonzero(infos["_episode"])]
                reset_step = terminations | truncations
                obs = next_obs
            results.put((round_, [np.array(x, dtype=np.float32) for x in zip(*transitions)], episodes))
    finally:
        envs.close()
        results.cancel_join_thread()  # a stopped learner reads no more: exit without waiting to flush


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
    """--eval-checkpoint: act with μ(s), no exploration noise, no learning."""
    if not os.path.isfile(args.eval_checkpoint):
        fail(f"no checkpoint at {args.eval_checkpoint}")
    try:
        ckpt = torch.load(args.eval_checkpoint, map_location="cpu", weights_only=True)
    except Exception as e:
        fail(f"cannot read {args.eval_checkpoint} as a checkpoint ({type(e).__name__})")
    saved_by = ckpt.get("algorithm") if isinstance(ckpt, dict) else None
    if saved_by != "d4pg":
        fail(f"{args.eval_checkpoint} was saved by {saved_by or 'another program'}, not d4pg.py: "
             "evaluate it with the script that saved it")
    args.env_id = ckpt["args"]["env_id"]
    check_env(args.env_id, args.capture_video)
    run_name = f"{args.env_id.replace('/', '-')}__{args.exp_name}-eval__{args.seed}__{int(time.time())}"
    device, run_dir, writer = setup(args, run_name)
    env = make_env(args.env_id, 0, args.capture_video, run_dir)()
    space = env.action_space
    actor = Actor(env.observation_space.shape[0], space.shape[0], space.low, space.high).to(device)
    actor.load_state_dict(ckpt["actor"])
    returns = evaluate_policy(actor.act, env, args.eval_episodes, args.seed)
    for i, r in enumerate(returns):
        writer.add_scalar("eval/episodic_return", r, i + 1)
    env.close()
    writer.close()
    summary = dict(env_id=args.env_id, algorithm="d4pg", mode="eval", seed=args.seed, checkpoint=args.eval_checkpoint,
                   episodes=len(returns), mean_return=float(np.mean(returns)), std_return=float(np.std(returns)),
                   stopped=None, versions=versions(), run_dir=run_dir)
    print(f"eval {args.env_id}: mean return {summary['mean_return']:.2f} ± {summary['std_return']:.2f} "
          f"over {len(returns)} episodes")
    return write_summary(run_dir, summary)


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


def receive(results, processes: list, rank: int, errors):
    """The next message of one actor; ChildFailed if any actor has stopped."""
    while True:
        try:
            return results.get(timeout=1.0)
        except queue.Empty:
            check_children(processes, errors, "actor")


def train(args: Args) -> dict:
    check_args(args)
    if args.eval_checkpoint:
        return evaluate(args)
    if args.learning_starts >= args.total_timesteps:
        fail(f"--learning-starts {args.learning_starts} is not below --total-timesteps {args.total_timesteps}: "
             "nothing would be learned; raise the budget or start learning earlier")
    if args.batch_size > args.buffer_size:
        fail(f"--batch-size {args.batch_size} is larger than --buffer-size {args.buffer_size}; "
             "shrink the batch or grow the buffer")
    if not args.v_min < args.v_max:
        fail(f"--v-min {args.v_min} must be below --v-max {args.v_max}: the support of (2) runs from one to the other")
    steps_per_round = args.num_actors * args.num_envs * args.rollout_steps
    num_rounds = args.total_timesteps // steps_per_round
    if num_rounds == 0:
        fail(f"--total-timesteps {args.total_timesteps} is less than one round of {steps_per_round} steps "
             "(num-actors x num-envs x rollout-steps); raise it")
    check_env(args.env_id, args.capture_video)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # check_env has refused what is wrong: this reads the sizes only
        probe = gym.make(args.env_id)
    obs_dim, act_dim = probe.observation_space.shape[0], probe.action_space.shape[0]
    low, high = probe.action_space.low, probe.action_space.high  # the env's bounds, not ±1
    probe.close()
    capacity = min(args.buffer_size, args.total_timesteps)  # a run never stores more transitions than it steps
    check_memory(ReplayBuffer.nbytes(capacity, obs_dim, act_dim, args.per),
                 f"--buffer-size {args.buffer_size:,} (a replay of {capacity:,} transitions"
                 + (" and its sum tree)" if args.per else ")"))

    run_name = f"{args.env_id.replace('/', '-')}__{args.exp_name}__{args.seed}__{int(time.time())}"
    device, run_dir, writer = setup(args, run_name)
    if device.type == "cpu":
        torch.set_flush_denormal(True)  # tiny gradients and Adam moments turn denormal and slow every op
    eval_env = make_env(args.env_id, -1, False, run_dir)() if args.eval_frequency else None
    actor = Actor(obs_dim, act_dim, low, high).to(device)
    critic = DistributionalCritic(obs_dim, act_dim, args.num_atoms).to(device)
    actor_target = Actor(obs_dim, act_dim, low, high).to(device)
    critic_target = DistributionalCritic(obs_dim, act_dim, args.num_atoms).to(device)
    actor_target.load_state_dict(actor.state_dict())
    critic_target.load_state_dict(critic.state_dict())
    saved = {"actor": actor, "critic": critic, "actor_target": actor_target, "critic_target": critic_target}
    fused = True if device.type in ("cpu", "cuda") else None
    actor_optimizer = torch.optim.Adam(actor.parameters(), lr=args.policy_lr, fused=fused)
    critic_optimizer = torch.optim.Adam(critic.parameters(), lr=args.q_lr, fused=fused)
    atoms = torch.linspace(args.v_min, args.v_max, args.num_atoms, device=device)  # (2)
    rng = np.random.default_rng(args.seed)
    rb = ReplayBuffer(capacity, obs_dim, act_dim, rng, args.per, args.per_alpha, args.per_eps)

    # the actors' copy of μ lives in shared memory; the learner overwrites it between rounds only
    shared_actor = Actor(obs_dim, act_dim, low, high).share_memory()
    ctx = mp.get_context("spawn")
    commands = [ctx.Queue() for _ in range(args.num_actors)]
    results = [ctx.Queue() for _ in range(args.num_actors)]
    errors = ctx.Queue()
    processes = [ctx.Process(target=actor_process, daemon=True,
                             args=(rank, args, shared_actor, run_dir, commands[rank], results[rank], errors))
                 for rank in range(args.num_actors)]

    def learner_step(step: int, beta: float):
        """One critic step (5), every policy_frequency steps an actor step (6), the targets (8);
        returns the critic loss, its log-probabilities and the actor loss (None if no actor step)."""
        idx, batch = rb.sample(args.batch_size, beta, device)
        b_obs, b_actions, b_returns, b_next_obs, b_discounts, b_weights = batch
        with torch.no_grad():
            next_probs = critic_target(b_next_obs, actor_target(b_next_obs)).softmax(-1)
            target = categorical_projection(next_probs, b_returns, b_discounts, atoms)  # (4)
        log_probs = critic(b_obs, b_actions).log_softmax(-1)
        cross_entropy = -(target * log_probs).sum(-1)
        critic_loss = (b_weights * cross_entropy).mean()  # (5)
        critic_optimizer.zero_grad(set_to_none=True)
        critic_loss.backward()
        critic_optimizer.step()
        if rb.tree is not None:  # priority: the KL to the target (the loss less the target's entropy), as in Rainbow
            kl = cross_entropy.detach() + torch.special.xlogy(target, target).sum(-1)
            rb.update_priorities(idx, kl.clamp(min=0.0).cpu().numpy())  # (7)
        actor_loss = None
        if step % args.policy_frequency == 0:
            critic.requires_grad_(False)  # the gradient reaches the action, not the critic's weights
            q_mu = (critic(b_obs, actor(b_obs)).softmax(-1) * atoms).sum(-1)  # (2)
            actor_loss = -q_mu.mean()  # (6)
            actor_optimizer.zero_grad(set_to_none=True)
            actor_loss.backward()
            critic.requires_grad_(True)
            actor_optimizer.step()
        if step % args.target_network_frequency == 0:
            polyak_update(actor_target, actor, args.tau)  # (8)
            polyak_update(critic_target, critic, args.tau)  # (8)
        return critic_loss, log_probs.detach(), actor_loss

    global_step, learner_steps, owed, start_time = 0, 0, 0, time.time()
    next_progress, next_eval = start_time + 1.0, args.eval_frequency
    recent_returns = deque(maxlen=20)
    episodes, last_eval = 0, None
    # saved instead of the model if training turns non-finite
    last_finite = copy.deepcopy({name: m.state_dict() for name, m in saved.items()})
    actor_loss = None
    stopped = stop_reason = None
    stop_signals = []  # Ctrl-C and SIGTERM, recorded here and raised at the next learner step
    # the actors are born ignoring Ctrl-C and SIGTERM (an ignored signal stays ignored in a new
    # process, and Python then installs no KeyboardInterrupt): the learner alone stops them
    previous_handlers = {s: signal.signal(s, signal.SIG_IGN) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        try:
            for p in processes:
                p.start()
        finally:
            for s in previous_handlers:
                signal.signal(s, lambda signum, frame: stop_signals.append(signum))
        for round_ in range(num_rounds):
            raise_if_stopped(stop_signals)
            with torch.no_grad():
                for t, s in zip(shared_actor.state_dict().values(), actor.state_dict().values()):
                    t.copy_(s)
            for q in commands:
                q.put(round_)
            for _ in range(owed):  # while the actors act: one gradient step per env step already received
                raise_if_stopped(stop_signals)
                learner_steps += 1
                beta = args.per_beta + (1.0 - args.per_beta) * min(1.0, global_step / args.total_timesteps)  # (7)
                critic_loss, log_probs, new_actor_loss = learner_step(learner_steps, beta)
                actor_loss = actor_loss if new_actor_loss is None else new_actor_loss
                if learner_steps % 100 == 0:  # reading losses syncs with the device: not every step
                    losses = {"losses/qf1_loss": critic_loss.item(),
                              "losses/qf1_values": (log_probs.exp() * atoms).sum(-1).mean().item()}  # (2)
                    if actor_loss is not None:
                        losses["losses/actor_loss"] = actor_loss.item()
                    check_finite(global_step, losses, *saved.values())
                    last_finite = copy.deepcopy({name: m.state_dict() for name, m in saved.items()})
                    for key, value in losses.items():
                        writer.add_scalar(key, value, global_step)
                    writer.add_scalar("charts/SPS", int(global_step / (time.time() - start_time)), global_step)
            for rank in range(args.num_actors):
                _, transitions, finished = receive(results[rank], processes, rank, errors)
                if transitions:
                    rb.add(*transitions)
                for r, length in finished:
                    recent_returns.append(r)
                    episodes += 1
                    writer.add_scalar("charts/episodic_return", r, global_step)
                    writer.add_scalar("charts/episodic_length", length, global_step)
            global_step += steps_per_round
            owed = max(0, min(steps_per_round, global_step - args.learning_starts))
            if rb.size < args.batch_size:
                owed = 0

            if args.eval_frequency and global_step >= next_eval:
                eval_returns = evaluate_policy(actor.act, eval_env, args.eval_episodes, args.seed + EVAL_SEED_OFFSET)
                last_eval = (global_step, float(np.mean(eval_returns)))
                writer.add_scalar("eval/episodic_return", last_eval[1], global_step)
                next_eval = (global_step // args.eval_frequency + 1) * args.eval_frequency
            if time.time() >= next_progress:
                sps = int(global_step / (time.time() - start_time))
                mean_ret = np.mean(recent_returns) if recent_returns else float("nan")
                print(f"step {global_step:>11,}  SPS {sps:>6,}  return(last 20) {mean_ret:8.2f}", flush=True)
                next_progress = time.time() + PROGRESS_SECONDS
    except KeyboardInterrupt as e:
        stopped = "terminated" if isinstance(e, Terminated) else "interrupted"
        stop_reason = f"{'SIGTERM' if stopped == 'terminated' else 'Ctrl-C'} at step {global_step:,}"
    except NonFinite as e:
        stopped, stop_reason = "non-finite", str(e)
        for name, m in saved.items():
            m.load_state_dict(last_finite[name])
    except ChildFailed as e:
        stopped, stop_reason = "child-failed", str(e)
    finally:
        for s, handler in previous_handlers.items():
            signal.signal(s, handler)
        # stop the actors in every case, also on an error: each finishes its round, closes its envs and exits
        for p, q in zip(processes, commands):
            if p.pid is not None:  # started
                q.put(None)
        for p in processes:
            if p.pid is not None:
                p.join(timeout=10)
                if p.is_alive():  # it ignores SIGTERM
                    p.kill()
                    p.join()
    if stopped:
        print(f"stopped: {stop_reason}", file=sys.stderr)

    if args.save_model:
        path = os.path.join(run_dir, "d4pg.pt")
        torch.save({"algorithm": "d4pg", "args": asdict(args), **{name: m.state_dict() for name, m in saved.items()}},
                   path)
        print(f"model saved to {path}")
    if eval_env is not None:
        eval_env.close()
    writer.close()
    wall = time.time() - start_time
    eval_step, eval_return = last_eval or (None, None)
    summary = dict(env_id=args.env_id, algorithm="d4pg", exp_name=args.exp_name, seed=args.seed,
                   global_step=global_step, wall_seconds=wall, SPS=global_step / wall,
                   mean_return=float(np.mean(recent_returns)) if recent_returns else None,
                   episodes_in_mean=len(recent_returns), episodes=episodes,
                   eval_step=eval_step, eval_return=eval_return,
                   stopped=stopped, stop_reason=stop_reason, versions=versions(), run_dir=run_dir)
    return write_summary(run_dir, summary)


if __name__ == "__main__":
    sys.exit(EXIT_CODES[train(parse_args())["stopped"]])
