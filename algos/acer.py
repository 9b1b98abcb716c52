r"""ACER: actor-critic with experience replay, discrete actions.

Wang, Bapst, Heess, Mnih, Munos, Kavukcuoglu, de Freitas (2017), "Sample Efficient
Actor-Critic with Experience Replay", arXiv:1611.01224. Retrace: Munos, Stepleton,
Harutyunyan, Bellemare (2016), "Safe and Efficient Off-Policy Reinforcement Learning",
arXiv:1606.02647.

One network with a shared torso and two heads: the policy's logits φ_θ(s), so that
π(·|s) = softmax(φ_θ(s)), and Q_θ(s, ·), one value per action. Every iteration the N
vector envs take T steps with the current policy, and the segment goes into a replay
together with the behaviour policy μ's whole probability vector μ(·|s_t) at every step
(the bias correction (6) needs μ at the actions not taken). The learner then takes one
on-policy step on that segment and n replay steps (12), each on N columns (one env's T
steps each) drawn uniformly from the stored segments.

Importance weights of the learner's π against the μ that acted (the seed notes write β for
μ and ω for ρ); ρ_t = ρ(a_t) at s_t, and ρ = 1 on-policy:
$$ \rho(a) = \frac{\pi(a|s)}{\mu(a|s)} \tag{1} $$

The value of a state under π from the Q head:
$$ V(s) = \sum_a \pi(a|s)\, Q_\theta(s, a) \tag{2} $$

Retrace targets, with the traces
$$ c_i = \lambda \min(1, \rho_i) \tag{3} $$
computed backwards over a segment; an episode end d_t = term_t or trunc_t cuts the
recursion, a termination adds nothing after r_t, a truncation adds γ V of the final
observation, and the last row of the segment adds γ V(s_T):
$$ Q^{ret}_t = r_t + \gamma (1 - \text{term}_t) \begin{cases} V(s_{t+1}) & d_t \text{ or } t = T-1 \\
   c_{t+1}\left(Q^{ret}_{t+1} - Q_\theta(s_{t+1}, a_{t+1})\right) + V(s_{t+1}) & \text{otherwise}
   \end{cases} \tag{4} $$
Unrolled, Q^ret_t = Q(s_t, a_t) + Σ_{i≥t} γ^{i-t} (c_{t+1}⋯c_i) (r_i + γ V(s_{i+1}) − Q(s_i, a_i)),
Retrace's off-policy return: the product of truncated traces never explodes, and
on-policy with λ = 1 (every c_i = 1) it is an unbiased multi-step estimate of Q^π.

Value loss (Q^ret held constant):
$$ L^Q = \tfrac12\,\mathbb E_t\left[\left(Q^{ret}_t - Q_\theta(s_t, a_t)\right)^2\right] \tag{5} $$

Policy gradient with respect to the logits φ = φ_θ(s_t): the importance weight of the taken
action truncated at c, plus a bias correction over all actions that puts back, under π,
what the truncation removed (V(s_t) is the baseline, all weights held constant):
$$ \hat g_t = \min(c, \rho_t) \nabla_\phi \log\pi(a_t|s_t) \left(Q^{ret}_t - V(s_t)\right)
   + \sum_a \left[1 - \frac{c}{\rho(a)}\right]_+ \pi(a|s_t) \nabla_\phi \log\pi(a|s_t)
   \left(Q_\theta(s_t, a) - V(s_t)\right) \tag{6} $$
The seed notes' E_β[ω F(a)] = E_π[F(a)], split at c: μ(a) min(c, ρ(a)) + π(a) [1 − c/ρ(a)]_+
= π(a) for every a, so with Q^ret in place of Q the expectation of (6) over a_t ~ μ is the
on-policy gradient E_{a~π}[∇_φ log π(a|s_t) Q(s_t, a)], while no weight exceeds c. With the
entropy bonus H:
$$ g_t = \hat g_t + c_e \nabla_\phi H(\pi(\cdot|s_t)) \tag{7} $$

Efficient trust region. An average policy network θ_a follows θ by Polyak averaging after
every step:
$$ \theta_a \leftarrow \alpha\, \theta_a + (1 - \alpha)\, \theta \tag{8} $$
and the step in φ is kept close to it by the linearised constraint k_tᵀ z ≤ δ, where for
softmax logits
$$ k_t = \nabla_\phi D_{KL}\left(\pi_{\theta_a}(\cdot|s_t) \,\|\, \pi(\cdot|s_t)\right)
   = \pi(\cdot|s_t) - \pi_{\theta_a}(\cdot|s_t) \tag{9} $$
The closest direction to g_t under that constraint, min ½‖z − g_t‖² s.t. k_tᵀ z ≤ δ, has a
closed form:
$$ z^*_t = g_t - \max\left(0, \frac{k_t^\top g_t - \delta}{\lVert k_t \rVert^2}\right) k_t \tag{10} $$

z*_t is back-propagated from the logits into θ (held constant, as the paper does) together
with the value loss: the surrogate minimised is
$$ L = -\mathbb E_t\left[z^{*\top}_t \phi_\theta(s_t)\right] + c_v L^Q \tag{11} $$
Its gradients are clipped to a global norm, then RMSProp takes the step, as in the paper.

The number of replay steps after each on-policy step is drawn as in the paper's Algorithm 1
(r = 0 is on-policy ACER; r is the mean number of replay steps per on-policy step):
$$ n \sim \text{Poisson}(r), \quad r = \texttt{--replay-ratio} \tag{12} $$

Logged besides the shared keys: `losses/policy_loss` (minus the mean of the surrogate whose
logit gradient is (6), both terms), `losses/bias_correction` (its second term alone),
`losses/value_loss` (5), `losses/entropy`, `charts/avg_rho` (the mean ρ_t of the replayed
steps since the last log: how far off-policy the replay is) and
`charts/trust_region_active` (the fraction of rows whose constraint in (10) binds).

Environments: gymnasium vector envs in their default NEXT_STEP autoreset mode. After an
episode ends at step t, the next `step` call returns the first observation of a new
episode and ignores its action, so row t+1 of a segment holds the final observation of the
old episode: V of that row is the truncation bootstrap in (4), and the row itself (a
"reset row") is no transition and is left out of every loss, on-policy and replayed.

Run:
    python algos/acer.py                              # CartPole-v1
    python algos/acer.py --env-id Acrobot-v1
    python algos/acer.py --help

Defaults: the paper's Atari settings where they carry over: segments of T = 20 steps (its
k), replay ratio 4, c = 10, δ = 1, α = 0.99, λ = 1, RMSProp with clipping at norm 10, a
replay of 50,000 steps (its memory per thread). Sized for CartPole: 4 envs, a 64×64 tanh
torso, replay steps from 1,000 stored steps on, RMSProp at a2c.py's 7e-4 annealed linearly
to 0, no entropy bonus. Rewards are scaled by 0.1 in the targets (the paper clips them to
[-1, 1]): unscaled, CartPole's Q approaches 100 and its loss dominates the shared torso;
four settings of seed 1 (entropy 0 to 0.01, learning rate 7e-4 or 1.5e-3) ended between
283 and 476 after 100k steps. Scaled, seeds 1-3 averaged 493-500 over the episodes
between 20k and 40k steps and all ended at 500 after 100k steps. On CartPole the replayed
steps stay close to on-policy (mean ρ_t 0.98-1.01) and with δ = 1 the trust region seldom
binds (charts/trust_region_active was 0 at every logged step of seeds 1-3); with
--delta 0.01 it binds on a quarter of the early steps and seed 1 ended at 486. Acrobot-v1
with the defaults: seed 1 ended at -85.1 after 100k steps.
"""

import contextlib
import copy
import importlib.metadata
import io
import json
import math
import os
import platform
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
    """use CUDA when it is available"""
    track: bool = False
    """log to Weights & Biases (needs `pip install wandb`)"""
    wandb_project_name: str = "pg-reference"
    """the Weights & Biases project"""
    wandb_entity: Optional[str] = None
    """the Weights & Biases entity (team)"""
    capture_video: bool = False
    """record videos of environment 0 into the run directory"""
    save_model: bool = False
    """save the model to runs/<run>/acer.pt at the end (and on Ctrl-C)"""
    eval_checkpoint: Optional[str] = None
    """path of a saved model: evaluate it without learning, then exit"""
    eval_frequency: int = 0
    """evaluate the greedy policy on a separate env every this many env steps (0: never)"""
    eval_episodes: int = 10
    """episodes per evaluation (during training and for --eval-checkpoint)"""
    torch_threads: int = 1
    """CPU threads for torch (the 64x64 networks gain nothing from more)"""


    env_id: str = "CartPole-v1"
    """the gymnasium environment id (Discrete actions, vector observations)"""
    total_timesteps: int = 100_000
    """total environment steps over all envs"""
    learning_rate: float = 7e-4
    """RMSProp learning rate"""
    num_envs: int = 4
    """number of parallel environments"""
    num_steps: int = 20
    """steps per environment per segment (the T of the Retrace recursion (4))"""
    anneal_lr: bool = True
    """decay the learning rate linearly to 0"""
    gamma: float = 0.99
    """discount factor γ"""
    replay_ratio: float = 4.0
    """mean number r of replay steps per on-policy step, drawn from Poisson(r) in (12) (0: on-policy only)"""
    buffer_size: int = 50_000
    """replay capacity in env steps (whole segments of num_steps x num_envs)"""
    replay_start: int = 1_000
    """env steps stored before the replay steps begin"""
    c: float = 10.0
    """truncation constant c of the importance weights in (6)"""
    retrace_lambda: float = 1.0
    """λ of the Retrace traces (3)"""
    delta: float = 1.0
    """trust-region bound δ in (10)"""
    avg_alpha: float = 0.99
    """weight α of the old average in the average policy network's update (8)"""
    ent_coef: float = 0.0
    """entropy coefficient c_e in (7); CartPole needs none, raise it (0.01) where exploration is hard"""
    vf_coef: float = 0.5
    """value-loss coefficient c_v in (11)"""
    reward_scale: float = 0.1
    """rewards are multiplied by this in the Retrace targets (4)"""
    max_grad_norm: float = 10.0
    """global gradient-norm clipping"""
    rmsprop_alpha: float = 0.99
    """RMSProp smoothing constant"""
    rmsprop_eps: float = 1e-5
    """RMSProp epsilon"""


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
    "num_envs": "[1, inf)",
    "num_steps": "[2, inf)",  # a reset row never follows a reset row: every column has a transition
    "gamma": "[0, 1]",
    "replay_ratio": "[0, inf)",
    "buffer_size": "[1, inf)",
    "replay_start": "[0, inf)",
    "c": "(0, inf)",
    "retrace_lambda": "[0, 1]",
    "delta": "(0, inf)",
    "avg_alpha": "[0, 1]",
    "ent_coef": "[0, inf)",
    "vf_coef": "[0, inf)",
    "reward_scale": "(0, inf)",
    "max_grad_norm": "(0, inf)",
    "rmsprop_alpha": "[0, 1)",  # at 1 the average of squared gradients never leaves 0
    "rmsprop_eps": "(0, inf)",
}
PROGRESS_SECONDS = 10.0  # a progress line after the first second, then every this many seconds
EVAL_SEED_OFFSET = 10_000  # the evaluation env's seed is args.seed + this: other starts than training's
EXIT_CODES = {None: 0, "non-finite": 1, "interrupted": 130, "terminated": 143}  # as shells expect


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
    training the two signals are only recorded in `stop_signals`, and the loop calls this at each
    env step: an exception raised wherever the signal happens to land can stop a library halfway,
    inside TensorBoard's writer queue (whose close() then waited up to its 120-s flush interval)
    or between an optimiser's updates of the parameters and of its moments."""
    if stop_signals:
        raise Terminated() if stop_signals[0] == signal.SIGTERM else KeyboardInterrupt()


class NonFinite(Exception):
    """A loss or parameter turned NaN or infinite: training stops."""


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
        fail(f"{env_id} is an Atari game (pixel observations); acer.py is for vector observations: "
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
        fail(f"{env_id} has continuous (Box) actions; acer.py is for Discrete actions: use algos/ppo_continuous.py")
    if not isinstance(act_space, gym.spaces.Discrete):
        fail(f"{env_id} has {act_space} actions; acer.py needs a Discrete action space")
    if not isinstance(obs_space, gym.spaces.Box) or len(obs_space.shape) != 1:
        fail(f"{env_id} has observations {obs_space}; acer.py needs flat vectors")


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


def retrace(rewards, q_taken, values, rho, terminations, truncations, gamma, lam):
    """Retrace targets Q^ret_t of equation (4) on a [T, N] segment, with the traces (3).

    q_taken holds Q(s_t, a_t) and rho the importance weights ρ_t of (1), both [T, N]; values
    has T + 1 rows, V(s_0) .. V(s_T) of (2), the last being V of the observation after the
    segment. Row t + 1 after an episode end holds the final observation (NEXT_STEP autoreset),
    so values[t + 1] is the truncation bootstrap. Reset rows get meaningless entries; the
    caller drops them (the row before a reset row ends an episode, so it never reads them).
    """
    dones = np.logical_or(terminations, truncations)
    traces = lam * np.minimum(1.0, rho)  # (3)
    q_ret = np.zeros_like(rewards)
    carry = values[-1]  # what row t + 1 hands back to row t; after the last row, V(s_T)
    for t in reversed(range(len(rewards))):
        tail = np.where(dones[t], values[t + 1], carry)
        q_ret[t] = rewards[t] + gamma * (1.0 - terminations[t]) * tail  # (4)
        carry = traces[t] * (q_ret[t] - q_taken[t]) + values[t]  # (4)
    return q_ret


def importance_weights(pi, mu, actions, c: float):
    """Equation (1) and the weights of (6) from π(·|s) and μ(·|s) ([B, A]) and the actions
    taken ([B]): ρ_t, its truncation min(c, ρ_t) and the bias-correction weights
    [1 - c/ρ(a)]_+ of every action."""
    rho = pi / mu  # (1)
    rho_t = rho.gather(-1, actions.unsqueeze(-1)).squeeze(-1)
    return rho_t, rho_t.clamp(max=c), (1.0 - c / rho).clamp(min=0.0)


def acer_policy_objective(logits, mu, actions, q_ret, q, c: float):
    """Per row, the two terms of a surrogate whose gradient with respect to the logits is ĝ_t
    of equation (6): the truncated importance-weighted term and the bias correction. Only
    log π carries the gradient: weights, π(a), Q and V are constants of (6)."""
    log_pi = logits.log_softmax(-1)
    pi = log_pi.exp().detach()
    v = (pi * q).sum(-1)  # (2)
    _, truncated, correction = importance_weights(pi, mu, actions, c)
    log_pi_taken = log_pi.gather(-1, actions.unsqueeze(-1)).squeeze(-1)
    return (truncated * (q_ret - v) * log_pi_taken,  # (6)
            (correction * pi * (q - v.unsqueeze(-1)) * log_pi).sum(-1))  # (6)


def trust_region(g, k, delta: float):
    """Equation (10): per row, the z closest to g with kᵀz ≤ δ (g, k: [B, A]).

    Where kᵀg ≤ δ, z = g; otherwise g minus the multiple of k that lands on the constraint's
    boundary. The clamp of ‖k‖² only avoids 0/0 where k = 0 (the average equals the policy):
    there kᵀg - δ = -δ < 0 and z = g.
    """
    excess = ((k * g).sum(-1) - delta).clamp(min=0.0) / (k * k).sum(-1).clamp(min=1e-12)
    return g - excess.unsqueeze(-1) * k  # (10)


@torch.no_grad()
def polyak_update(target: nn.Module, source: nn.Module, tau: float):
    """Equation (8): θ' ← τθ + (1 − τ)θ' for every parameter (τ = 1 − α)."""
    for t, s in zip(target.parameters(), source.parameters()):
        t.lerp_(s, tau)  # (8)


def numpy_mlp(net: nn.Sequential):
    """A NumPy copy of an MLP of Linear and Tanh layers, with its current weights.

    Used to act one step at a time during a rollout: on a handful of observations torch's
    per-call overhead costs more than the arithmetic. It is taken once per rollout, when the
    weights stop changing; the log-probabilities that the loss needs still come from one
    batched torch pass over the rollout afterwards.
    """
    layers = []
    for m in net:
        if isinstance(m, nn.Linear):
            w, b = m.weight.detach().cpu().numpy().T.copy(), m.bias.detach().cpu().numpy().copy()
            layers.append(lambda x, w=w, b=b: x @ w + b)
        elif isinstance(m, nn.Tanh):
            layers.append(np.tanh)
        else:
            raise NotImplementedError(f"numpy_mlp knows Linear and Tanh layers, not {m}")

    def forward(x):
        for layer in layers:
            x = layer(x)
        return x

    return forward


def layer_init(layer, std=np.sqrt(2), bias_const=0.0):
    nn.init.orthogonal_(layer.weight, std)
    nn.init.constant_(layer.bias, bias_const)
    return layer


class Agent(nn.Module):
    """A torso shared by the policy head (the logits φ_θ(s)) and the Q head (Q_θ(s, ·))."""

    def __init__(self, obs_dim: int, n_actions: int):
        super().__init__()
        self.torso = nn.Sequential(
            layer_init(nn.Linear(obs_dim, 64)), nn.Tanh(),
            layer_init(nn.Linear(64, 64)), nn.Tanh(),
        )
        self.actor = layer_init(nn.Linear(64, n_actions), std=0.01)
        self.q = layer_init(nn.Linear(64, n_actions), std=1.0)

    def forward(self, obs):
        hidden = self.torso(obs)
        return self.actor(hidden), self.q(hidden)

    def policy_net(self) -> nn.Sequential:
        """obs -> logits, the layers that acting needs (for numpy_mlp)."""
        return nn.Sequential(*self.torso, self.actor)


class SegmentReplay:
    """The last `capacity` segments of T steps of N envs, each in the rollout's [T, N] layout,
    with μ's probabilities of every action and the reset rows."""

    def __init__(self, capacity: int, T: int, N: int, obs_dim: int, n_actions: int, rng: np.random.Generator):
        self.obs = np.zeros((capacity, T + 1, N, obs_dim), dtype=np.float32)  # s_0 .. s_T
        self.mu = np.zeros((capacity, T, N, n_actions), dtype=np.float32)
        self.actions = np.zeros((capacity, T, N), dtype=np.int64)
        self.rewards = np.zeros((capacity, T, N), dtype=np.float32)
        self.terminations = np.zeros((capacity, T, N), dtype=np.float32)
        self.truncations = np.zeros((capacity, T, N), dtype=np.float32)
        self.resets = np.zeros((capacity, T, N), dtype=bool)
        self.capacity, self.pos, self.size, self.rng = capacity, 0, 0, rng

    @staticmethod
    def nbytes(capacity: int, T: int, N: int, obs_dim: int, n_actions: int) -> int:
        """The memory the arrays above take."""
        return capacity * N * (4 * (T + 1) * obs_dim + T * (4 * n_actions + 8 + 3 * 4 + 1))

    def add(self, segment: dict):
        for name, value in segment.items():
            getattr(self, name)[self.pos] = value
        self.pos = (self.pos + 1) % self.capacity
        self.size = min(self.size + 1, self.capacity)

    def sample(self, columns: int) -> dict:
        """`columns` env columns of T steps, each from a uniformly drawn segment and env, as [T, columns]."""
        seg = self.rng.integers(0, self.size, columns)
        env = self.rng.integers(0, self.obs.shape[2], columns)
        names = ("obs", "mu", "actions", "rewards", "terminations", "truncations", "resets")
        return {name: np.swapaxes(getattr(self, name)[seg, :, env], 0, 1) for name in names}


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
    """--eval-checkpoint: act greedily with a saved model, no learning."""
    if not os.path.isfile(args.eval_checkpoint):
        fail(f"no checkpoint at {args.eval_checkpoint}")
    try:
        ckpt = torch.load(args.eval_checkpoint, map_location="cpu", weights_only=True)
    except Exception as e:
        fail(f"cannot read {args.eval_checkpoint} as a checkpoint ({type(e).__name__})")
    saved_by = ckpt.get("algorithm") if isinstance(ckpt, dict) else None
    if saved_by != "acer":
        fail(f"{args.eval_checkpoint} was saved by {saved_by or 'another program'}, not acer.py: "
             "evaluate it with the script that saved it")
    args.env_id = ckpt["args"]["env_id"]
    check_env(args.env_id, args.capture_video)
    run_name = f"{args.env_id.replace('/', '-')}__{args.exp_name}-eval__{args.seed}__{int(time.time())}"
    device, run_dir, writer = setup(args, run_name)
    env = make_env(args.env_id, 0, args.capture_video, run_dir)()
    agent = Agent(env.observation_space.shape[0], env.action_space.n).to(device)
    agent.load_state_dict(ckpt["agent"])
    logits = numpy_mlp(agent.policy_net())
    returns = evaluate_policy(lambda o: int(logits(o).argmax()), env, args.eval_episodes, args.seed)
    for i, r in enumerate(returns):
        writer.add_scalar("eval/episodic_return", r, i + 1)
    env.close()
    writer.close()
    summary = dict(env_id=args.env_id, algorithm="acer", mode="eval", seed=args.seed, checkpoint=args.eval_checkpoint,
                   episodes=len(returns), mean_return=float(np.mean(returns)), std_return=float(np.std(returns)),
                   stopped=None, versions=versions(), run_dir=run_dir)
    print(f"eval {args.env_id}: mean return {summary['mean_return']:.2f} ± {summary['std_return']:.2f} "
          f"over {len(returns)} episodes")
    return write_summary(run_dir, summary)


def train(args: Args) -> dict:
    check_args(args)
    if args.eval_checkpoint:
        return evaluate(args)
    T, N = args.num_steps, args.num_envs
    num_iterations = args.total_timesteps // (T * N)
    if num_iterations == 0:
        fail(f"--total-timesteps {args.total_timesteps} is less than one segment of {T * N} "
             "(--num-steps x --num-envs); raise it or shrink the segment")
    capacity = min(args.buffer_size, args.total_timesteps) // (T * N)  # whole segments
    if capacity == 0:
        fail(f"--buffer-size {args.buffer_size} is less than one segment of {T * N} (--num-steps x --num-envs); "
             "raise it")
    if args.replay_ratio > 0 and args.replay_start > capacity * T * N:
        fail(f"--replay-start {args.replay_start} is more than the replay holds ({capacity * T * N} steps): "
             "the replay would never start; lower it or raise --buffer-size")
    check_env(args.env_id, args.capture_video)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # check_env has refused what is wrong: this reads the sizes only
        probe = gym.make(args.env_id)
    obs_dim, n_actions = probe.observation_space.shape[0], probe.action_space.n
    probe.close()
    check_memory(SegmentReplay.nbytes(capacity, T, N, obs_dim, n_actions),
                 f"--buffer-size {args.buffer_size:,} (a replay of {capacity:,} segments of {T} steps x {N} envs)")

    run_name = f"{args.env_id.replace('/', '-')}__{args.exp_name}__{args.seed}__{int(time.time())}"
    device, run_dir, writer = setup(args, run_name)
    envs = gym.vector.SyncVectorEnv([make_env(args.env_id, i, args.capture_video, run_dir) for i in range(N)])
    envs.action_space.seed(args.seed)
    eval_env = make_env(args.env_id, -1, False, run_dir)() if args.eval_frequency else None
    agent = Agent(obs_dim, n_actions).to(device)
    average = copy.deepcopy(agent).requires_grad_(False)  # θ_a of (8)
    saved = {"agent": agent, "average": average}
    optimizer = torch.optim.RMSprop(agent.parameters(), lr=args.learning_rate, alpha=args.rmsprop_alpha,
                                    eps=args.rmsprop_eps, foreach=True)  # RMSprop has no fused form
    rng = np.random.default_rng(args.seed)
    replay = SegmentReplay(capacity, T, N, obs_dim, n_actions, rng)

    def learn(batch: dict) -> dict:
        """One gradient step of (11) on a [T, N] segment (on-policy or replayed); returns its statistics."""
        b = {name: torch.as_tensor(value, device=device) for name, value in batch.items()}
        logits, q = agent(b["obs"])  # rows s_0 .. s_T
        with torch.no_grad():
            avg_logits = average(b["obs"][:-1])[0]
            values = (logits.softmax(-1) * q).sum(-1)  # (2)
        q_taken = q[:-1].gather(-1, b["actions"].unsqueeze(-1)).squeeze(-1)
        valid = ~b["resets"].reshape(-1)  # reset rows hold no transition
        flat = {name: x.reshape(-1, *x.shape[2:])[valid] for name, x in
                dict(logits=logits[:-1], q=q[:-1], avg_logits=avg_logits, mu=b["mu"], actions=b["actions"]).items()}
        rho = importance_weights(logits[:-1].detach().softmax(-1), b["mu"], b["actions"], args.c)[0]
        q_ret = torch.as_tensor(retrace(
            args.reward_scale * batch["rewards"], q_taken.detach().cpu().numpy(), values.cpu().numpy(),
            rho.cpu().numpy(), batch["terminations"], batch["truncations"], args.gamma, args.retrace_lambda),
            device=device).reshape(-1)[valid]

        # g of (7) per row, taken with respect to a detached copy of the logits, then projected by (10)
        phi = flat["logits"].detach().requires_grad_(True)
        truncated, correction = acer_policy_objective(phi, flat["mu"], flat["actions"], q_ret, flat["q"].detach(),
                                                      args.c)
        entropy = -(phi.softmax(-1) * phi.log_softmax(-1)).sum(-1)
        (g,) = torch.autograd.grad((truncated + correction + args.ent_coef * entropy).sum(), phi)  # (7)
        k = phi.detach().softmax(-1) - flat["avg_logits"].softmax(-1)  # (9)
        z = trust_region(g, k, args.delta)  # (10)
        value_loss = 0.5 * ((q_ret - q_taken.reshape(-1)[valid]) ** 2).mean()  # (5)
        loss = -(z * flat["logits"]).sum(-1).mean() + args.vf_coef * value_loss  # (11)

        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(agent.parameters(), args.max_grad_norm, foreach=True)
        optimizer.step()
        polyak_update(average, agent, 1.0 - args.avg_alpha)  # (8)
        return {"losses/policy_loss": -(truncated + correction).detach().mean(),
                "losses/bias_correction": -correction.detach().mean(), "losses/value_loss": value_loss.detach(),
                "losses/entropy": entropy.detach().mean(), "charts/avg_rho": rho.reshape(-1)[valid].mean(),
                "charts/trust_region_active": ((k * g).sum(-1) > args.delta).float().mean()}

    # Segment storage on the host (the envs live there); it goes into the replay after each rollout.
    segment = dict(obs=np.zeros((T + 1, N, obs_dim), dtype=np.float32),
                   mu=np.zeros((T, N, n_actions), dtype=np.float32), actions=np.zeros((T, N), dtype=np.int64),
                   rewards=np.zeros((T, N), dtype=np.float32),
                   terminations=np.zeros((T, N), dtype=np.float32), truncations=np.zeros((T, N), dtype=np.float32),
                   resets=np.zeros((T, N), dtype=bool))  # resets[t]: row t is the reset step after an episode ended
    obs, mu, actions, rewards = segment["obs"], segment["mu"], segment["actions"], segment["rewards"]

    global_step, start_time = 0, time.time()
    next_progress, next_eval = start_time + 1.0, args.eval_frequency
    recent_returns = deque(maxlen=20)
    episodes, last_eval, replayed_rho = 0, None, []
    # saved instead of the model if training turns non-finite
    last_finite = copy.deepcopy({name: m.state_dict() for name, m in saved.items()})
    next_obs, _ = envs.reset(seed=args.seed)
    next_done = np.zeros(N, dtype=bool)
    stopped = stop_reason = None
    stop_signals = []  # Ctrl-C and SIGTERM, recorded here and raised at the next env step
    previous_handlers = {s: signal.signal(s, lambda signum, frame: stop_signals.append(signum))
                         for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        for iteration in range(1, num_iterations + 1):
            if args.anneal_lr:
                optimizer.param_groups[0]["lr"] = args.learning_rate * (1.0 - (iteration - 1.0) / num_iterations)

            # a ~ μ = π(·|s) by the Gumbel-max trick: argmax(logits + g), g ~ Gumbel(0, 1), is a
            # sample of the softmax distribution; noise from the seeded generator.
            logits_fn = numpy_mlp(agent.policy_net())
            gumbel = rng.gumbel(size=(T, N, n_actions)).astype(np.float32)
            for step in range(T):
                raise_if_stopped(stop_signals)
                obs[step], segment["resets"][step] = next_obs, next_done
                step_logits = logits_fn(next_obs)
                step_probs = np.exp(step_logits - step_logits.max(-1, keepdims=True))
                mu[step] = step_probs / step_probs.sum(-1, keepdims=True)
                actions[step] = (step_logits + gumbel[step]).argmax(-1)
                next_obs, rewards[step], term, trunc, infos = envs.step(actions[step])
                segment["terminations"][step], segment["truncations"][step] = term, trunc
                next_done = term | trunc
                global_step += N
                if "episode" in infos:
                    for i in np.flatnonzero(infos["_episode"]):
                        r, length = float(infos["episode"]["r"][i]), int(infos["episode"]["l"][i])
                        recent_returns.append(r)
                        episodes += 1
                        writer.add_scalar("charts/episodic_return", r, global_step)
                        writer.add_scalar("charts/episodic_length", length, global_step)
            obs[T] = next_obs
            replay.add(segment)

            stats = learn(segment)
            replay_steps = rng.poisson(args.replay_ratio) if replay.size * T * N >= args.replay_start else 0  # (12)
            for _ in range(replay_steps):
                replay_stats = learn(replay.sample(N))
                replayed_rho.append(replay_stats["charts/avg_rho"])

            sps = int(global_step / (time.time() - start_time))
            # Losses read, checked (check_finite, then the copy of the last finite model) and logged every
            # 20 iterations, about every 100 gradient steps as in the off-policy scripts: reading them
            # after each step would wait for every step to finish.
            if iteration % 20 == 0 or iteration == num_iterations:
                losses = {key: value.item() for key, value in stats.items()}
                if replayed_rho:
                    losses["charts/avg_rho"] = torch.stack(replayed_rho).mean().item()
                replayed_rho = []
                check_finite(global_step, losses, *saved.values())
                last_finite = copy.deepcopy({name: m.state_dict() for name, m in saved.items()})
                writer.add_scalar("charts/learning_rate", optimizer.param_groups[0]["lr"], global_step)
                for key, value in losses.items():
                    writer.add_scalar(key, value, global_step)
                writer.add_scalar("charts/SPS", sps, global_step)

            if args.eval_frequency and global_step >= next_eval:
                logits_fn = numpy_mlp(agent.policy_net())
                eval_returns = evaluate_policy(lambda o: int(logits_fn(o).argmax()), eval_env, args.eval_episodes,
                                               args.seed + EVAL_SEED_OFFSET)
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
        for name, m in saved.items():
            m.load_state_dict(last_finite[name])
    finally:
        for s, handler in previous_handlers.items():
            signal.signal(s, handler)
    if stopped:
        print(f"stopped: {stop_reason}", file=sys.stderr)

    if args.save_model:
        path = os.path.join(run_dir, "acer.pt")
        torch.save({"algorithm": "acer", "args": asdict(args), **{name: m.state_dict() for name, m in saved.items()}},
                   path)
        print(f"model saved to {path}")
    envs.close()
    if eval_env is not None:
        eval_env.close()
    writer.close()
    wall = time.time() - start_time
    eval_step, eval_return = last_eval or (None, None)
    summary = dict(env_id=args.env_id, algorithm="acer", exp_name=args.exp_name, seed=args.seed,
                   global_step=global_step, wall_seconds=wall, SPS=global_step / wall,
                   mean_return=float(np.mean(recent_returns)) if recent_returns else None,
                   episodes_in_mean=len(recent_returns), episodes=episodes,
                   eval_step=eval_step, eval_return=eval_return,
                   stopped=stopped, stop_reason=stop_reason, versions=versions(), run_dir=run_dir)
    return write_summary(run_dir, summary)


if __name__ == "__main__":
    sys.exit(EXIT_CODES[train(parse_args())["stopped"]])
