r"""MADDPG: Multi-Agent Deep Deterministic Policy Gradient, decentralised actors, centralised critics.

Lowe, Wu, Tamar, Harb, Abbeel, Mordatch (2017), "Multi-Agent Actor-Critic for Mixed
Cooperative-Competitive Environments", arXiv:1706.02275. It is DDPG (Lillicrap et al. 2015,
arXiv:1509.02971) for N agents: agent i acts on its own observation o_i alone, but learns
with a critic Q_i that sees every observation and every action. Seen from one agent, the
others' changing policies make its environment non-stationary; given all actions, Q_i's
environment is stationary again. `--independent` gives each critic only (o_i, a_i):
independent DDPG, the same file with the critic's input as the one difference.

Actor of agent i, deterministic, tanh scaled to its action bounds [low, high] (scale =
(high - low)/2, bias = (high + low)/2 per dimension). MPE's continuous actions are Box(0, 1)
per agent, so this is 0.5 tanh(f) + 0.5 = sigmoid(2f): [no-op, left, right, down, up]
(+ communication), the env moving the agent by (right − left, up − down):
$$ a_i = \mu_{\theta_i}(o_i) = \text{scale}_i \odot \tanh(f_{\theta_i}(o_i)) + \text{bias}_i \tag{1} $$

Exploration: Gaussian noise on each actor's action, scaled to its range (the paper's
discrete MPE actions used Gumbel-softmax samples; on Box actions Gaussian noise as in
DDPG/TD3: uncorrelated in time, which is what 25-step episodes need, with one parameter):
$$ a_i = \text{clip}(\mu_{\theta_i}(o_i) + \epsilon_i, \text{low}_i, \text{high}_i), \quad
   \epsilon_i \sim \mathcal N(0, (\sigma_{explore}\,\text{scale}_i)^2) \tag{2} $$

The input of critic i: all observations and all actions (centralised), or, with
`--independent`, agent i's own:
$$ x_i = (o_1, \dots, o_N, a_1, \dots, a_N) \quad\text{or}\quad x_i = (o_i, a_i) \tag{3} $$

Critic target from the target actors μ'_j and critic Q'_i (no bootstrap past a
termination; a truncation, which is how every MPE episode ends at max_cycles, bootstraps
from the final observations):
$$ y_i = r_i + \gamma (1 - \text{term}_i)\, Q'_i(x'_i)\big|_{a'_j = \mu'_j(o'_j)\ \forall j} \tag{4} $$

Critic loss of each agent:
$$ L(\phi_i) = \mathbb{E}_{(\mathbf o, \mathbf a, \mathbf r, \mathbf o')\sim\mathcal D}
   \left[(Q_i(x_i) - y_i)^2\right] \tag{5} $$

Actor loss of each agent, minimised with its critic held fixed; a_i is the actor's own
μ_i(o_i), the other agents' actions a_j are the replayed ones:
$$ L(\theta_i) = -\mathbb{E}_{\mathcal D}\left[Q_i(x_i)\big|_{a_i=\mu_{\theta_i}(o_i)}\right] \tag{6} $$

whose gradient is the multi-agent deterministic policy gradient:
$$ \nabla_{\theta_i} J = \mathbb{E}_{\mathcal D}\left[\nabla_{\theta_i}\mu_{\theta_i}(o_i)\,
   \nabla_{a_i} Q_i(x_i)\big|_{a_i=\mu_{\theta_i}(o_i)}\right] \tag{7} $$

Target networks, by Polyak averaging after each update:
$$ \theta'_i \leftarrow \tau\theta_i + (1 - \tau)\theta'_i, \qquad
   \phi'_i \leftarrow \tau\phi_i + (1 - \tau)\phi'_i \tag{8} $$

The team return, logged as `charts/episodic_return` (and so the summary's mean_return and
`eval/episodic_return`), is the sum of the agents' episode returns:
$$ R_{team} = \sum_{i=1}^N \sum_{t=0}^{T-1} r_{i,t} \tag{9} $$
Each agent's own return is logged as `charts/return_<agent name>` (`charts/return_agent_0`,
`charts/return_adversary_0`, ...). In simple_spread every agent is rewarded with half the
shared coverage term and half its own collision penalty (mpe2's local_ratio 0.5); in
simple_adversary and simple_tag the teams compete and the team return mixes their rewards.

The paper's code adds to each actor's loss (6) a small penalty on its outputs before the
squashing (1), f_θi(o_i): without it, a large learning rate can drive tanh into saturation,
where the actor's gradient (7) vanishes and its actions stay at the bounds (|a_i| is the size
of agent i's action):
$$ L_{reg}(\theta_i) = \lambda\,\mathbb{E}_{\mathcal D}\left[\tfrac{1}{|a_i|}\lVert f_{\theta_i}(o_i)\rVert^2\right]
   \tag{10} $$

Environments: mpe2 (PettingZoo's parallel API) with continuous actions and episodes of
`max_cycles` steps: simple_spread_v3 (3 cooperating agents), simple_adversary_v3 (1
adversary, 2 agents; observation sizes 8 and 10) and simple_tag_v3 (3 predators, 1 prey).
`num_envs` such envs are stepped one after the other; the joint observation o = (o_1..o_N)
of all envs goes through each actor once per step, as one batch. An env whose episode ends
is reset at once: its transition stores the true final observations as o' (with the
termination flags, so a truncation bootstraps) and its row of o becomes the new episode's
first observations. Replay: one ring buffer of joint transitions (o, a, r_1..r_N, o',
term_1..term_N) in preallocated NumPy arrays, shared by the agents and sampled uniformly, so
agent i's critic sees the same samples of the other agents' actions. `global_step` counts
joint steps (one step of one env moves all its agents).

All critics are updated by one backward pass of the sum of their losses (5), and all actors
by one of the sum of (6) + (10): agent i's parameters appear in its own loss only, so each gets
exactly the gradient of its own loss, and one Adam over all of them is N Adams (Adam is
per parameter). The N actors live in one batch, and so do the N critics: each layer holds the
weights of all agents (row i is agent i's) and applies them with one batched matrix product,
`AgentLinear` (svpg.py's `ParticleLinear` for agents). The inputs of different sizes (the
observations of simple_adversary, 8 and 10; the critics' (o_i, a_i) with `--independent`) are
zero-padded to the largest: a zero input adds nothing to a linear layer's output and gives its
weight a zero gradient, so the padding weights stay 0 and row i is exactly agent i's own MLP.
The actor loss evaluates critic i on x_i with a_i = μ_i(o_i): the N inputs stacked as [N, B, D].
Gradient clipping stays per agent network (the norm over agent i's rows of all its tensors),
and (8) is one lerp per batched tensor (6 for the N actors, 6 for the N critics). An update
of simple_spread's 3 agents (batch 256) took 4.7-5.5 ms against 6.7-7.9 ms with one network
per agent (1,000 updates, 2 alternating rounds, on a machine shared with other jobs): 631 and
644 SPS against 455 and 514 over 25k steps at the same settings.

Evaluation: every `eval_frequency` env steps, `eval_episodes` episodes of μ(o) without
noise on a separate env, reset with the same seed each time.

Run:
    python algos/maddpg.py                                    # simple_spread_v3
    python algos/maddpg.py --independent                      # the same with independent DDPG critics
    python algos/maddpg.py --env-id simple_adversary_v3
    python algos/maddpg.py --help

Defaults: from the paper's code (github.com/openai/maddpg, experiments/train.py and
maddpg/trainer/maddpg.py): γ = 0.95, τ = 0.01, lr 1e-2 for actors and critics, two hidden
layers of 64 ReLU units, gradient norms clipped to 0.5 per network, the penalty (10) with
λ = 1e-3, replay 1e6, episodes of 25 steps. Changed so that simple_spread_v3 learns within a
CPU test budget of 100,000 steps: the paper's code updates once every 100 env steps with batch
1024 (after 1024 × 25 transitions), which needs about a million steps; here one update every
10 env steps, batch 256, 4 envs, 5,000 steps of uniformly random actions first, exploration
noise 0.1 of the action scale. Evaluation every 10,000 steps, 10 episodes. Measured on
simple_spread_v3, seed 1, 100k steps, by the deterministic evaluation over 100 episodes of the
evaluation seed (a uniformly random policy: −75.8 on the same episodes, the learning test's
threshold −53.0): lr 1e-3 with an update every 5 steps and no penalty −51.8 (noise 0.2: −53.5;
lr 3e-3: −51.0; an update every 2 steps over 50k steps: −62.9); lr 1e-2 −48.1, but seed 2
−59.5 (threshold −56.4), and with an update every 10 steps it fell to −108, far below
random; the penalty (10) kept lr 1e-2 stable: −50.1 (seed 2: −52.6), −50.4 with an update
every 10 steps at 70% of the CPU time (every 20 steps: −53.5; noise 0.3: −50.5; batch 1024
every 20 steps: −62.3).
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
from collections import deque
from dataclasses import asdict, dataclass
from typing import Optional

import gymnasium as gym
import numpy as np
import torch
import torch.nn as nn
import tyro
from gymnasium.utils.save_video import capped_cubic_video_schedule, save_video
from mpe2 import simple_adversary_v3, simple_spread_v3, simple_tag_v3
from pettingzoo.utils.conversions import aec_to_parallel
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
    """save the actors and critics to runs/<run>/maddpg.pt at the end (and on Ctrl-C)"""
    eval_checkpoint: Optional[str] = None
    """path of a saved model: evaluate it (μ(o), no noise) without learning, then exit"""
    eval_frequency: int = 10_000
    """evaluate the deterministic policies μ(o) on a separate env every this many env steps (0: never)"""
    eval_episodes: int = 10
    """episodes per evaluation (during training and for --eval-checkpoint)"""
    torch_threads: int = 1
    """CPU threads for torch (more only pay on cores that no other process uses)"""

    env_id: str = "simple_spread_v3"
    """the mpe2 task: simple_spread_v3, simple_adversary_v3 or simple_tag_v3"""
    total_timesteps: int = 1_000_000
    """total environment steps over all envs (one step moves every agent of one env)"""
    learning_rate: float = 1e-2
    """Adam learning rate of the actors and the critics (the paper's)"""
    num_envs: int = 4
    """number of parallel environments (each actor acts on all of them in one batch)"""
    buffer_size: int = 1_000_000
    """replay capacity in joint transitions"""
    gamma: float = 0.95
    """discount factor γ in (4)"""
    tau: float = 0.01
    """Polyak averaging coefficient τ in (8)"""
    batch_size: int = 256
    """joint transitions per gradient step (the paper: 1024)"""
    learning_starts: int = 5_000
    """env steps of uniformly random actions before learning starts"""
    exploration_noise: float = 0.1
    """std of the exploration noise in (2), in units of the action scale"""
    train_frequency: int = 10
    """env steps between updates, one gradient step of every critic and actor (the paper: 100)"""
    actor_reg: float = 1e-3
    """weight λ of the actors' penalty (10) on their outputs before tanh (the paper's code's)"""
    max_grad_norm: float = 0.5
    """clip each network's gradient to this norm (the paper's code: 0.5)"""
    max_cycles: int = 25
    """steps per episode (mpe2's max_cycles; the paper: 25)"""
    independent: bool = False
    """decentralised critics: Q_i(o_i, a_i) instead of Q_i(o_1..o_N, a_1..a_N) (independent DDPG)"""


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
    "buffer_size": "[1, inf)",
    "gamma": "[0, 1]",
    "tau": "(0, 1]",
    "batch_size": "[1, inf)",
    "learning_starts": "[0, inf)",
    "exploration_noise": "[0, inf)",
    "train_frequency": "[1, inf)",
    "actor_reg": "[0, inf)",
    "max_grad_norm": "(0, inf)",
    "max_cycles": "[1, inf)",
}
PROGRESS_SECONDS = 10.0  # a progress line after the first second, then every this many seconds
EVAL_SEED_OFFSET = 10_000  # the evaluation env's seed is args.seed + this: other starts than training's
EXIT_CODES = {None: 0, "non-finite": 1, "interrupted": 130, "terminated": 143}  # as shells expect
TASKS = {"simple_spread_v3": simple_spread_v3, "simple_adversary_v3": simple_adversary_v3,
         "simple_tag_v3": simple_tag_v3}


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


class RecordVideo:
    """gymnasium's RecordVideo for a PettingZoo parallel env: the episodes of its capped cubic
    schedule (0, 1, 8, 27, ..., then every 1,000th) saved as mp4 files in `video_folder`."""

    def __init__(self, env, video_folder: str):
        self.env, self.video_folder, self.episode, self.frames = env, video_folder, -1, []

    def reset(self, seed=None):
        self.save()
        out = self.env.reset(seed=seed)
        self.episode += 1
        if capped_cubic_video_schedule(self.episode):
            self.frames.append(self.env.render())
        return out

    def step(self, actions):
        out = self.env.step(actions)
        if self.frames:
            self.frames.append(self.env.render())
        return out

    def save(self):
        if self.frames:
            save_video(self.frames, self.video_folder, episode_trigger=lambda _: True, episode_index=self.episode,
                       fps=self.env.metadata.get("render_fps", 10))
        self.frames = []

    def close(self):
        self.save()
        self.env.close()

    def __getattr__(self, name):  # agents, possible_agents, action_space, ...: the env's own
        return getattr(self.env, name)


def make_env(env_id: str, idx: int, capture_video: bool, run_dir: str, max_cycles: int = 25):
    """An mpe2 task as a PettingZoo parallel env with continuous (Box) actions: the raw env turned
    parallel. mpe2's own `parallel_env` adds two wrappers (clip the actions to their bounds,
    enforce reset before step) that this file does not need, since it clips the actions itself
    and resets first, and whose attribute look-ups took 30% of an env step here."""
    def thunk():
        render_mode = "rgb_array" if capture_video and idx == 0 else None
        env = aec_to_parallel(TASKS[env_id].raw_env(continuous_actions=True, max_cycles=max_cycles,
                                                    render_mode=render_mode))
        return RecordVideo(env, os.path.join(run_dir, "videos")) if render_mode else env

    return thunk


def check_env(env_id: str, capture_video: bool = False):
    """Refuse an unknown task or a wrong action/observation space before anything starts."""
    if env_id not in TASKS:
        hint = (" (a gymnasium id: for one agent use algos/ddpg.py)" if "-v" in env_id else "")
        fail(f"unknown mpe2 task {env_id!r}{hint}: maddpg.py runs {', '.join(TASKS)}")
    env = make_env(env_id, -1, False, "")()
    if capture_video:
        try:
            probe = TASKS[env_id].parallel_env(continuous_actions=True, render_mode="rgb_array")
            probe.reset(seed=0)
            probe.render()
            probe.close()
        except Exception as e:
            first_line = (str(e).splitlines() or [""])[0]
            fail(f"--capture-video cannot render {env_id} ({type(e).__name__}: {first_line})")
    spaces = {agent: (env.action_space(agent), env.observation_space(agent)) for agent in env.possible_agents}
    env.close()
    for agent, (act_space, obs_space) in spaces.items():
        if not isinstance(act_space, gym.spaces.Box) or len(act_space.shape) != 1 or \
                not (np.isfinite(act_space.low).all() and np.isfinite(act_space.high).all()):
            fail(f"{env_id}: agent {agent} has {act_space} actions; maddpg.py needs bounded flat Box actions")
        if not isinstance(obs_space, gym.spaces.Box) or len(obs_space.shape) != 1:
            fail(f"{env_id}: agent {agent} has observations {obs_space}; maddpg.py needs flat vectors")


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


def scale_to_bounds(u, scale, bias):
    """Equation (1): the actor's last layer u mapped into [bias - scale, bias + scale] = [low, high]."""
    return torch.tanh(u) * scale + bias  # (1)


def padded_index(sizes: list, offsets: list, width: int, pad: int) -> torch.Tensor:
    """[N, width] column indices: row i picks sizes[i] columns from offsets[i] on, then `pad` (the
    index of a zero column) up to `width`."""
    rows = [list(range(o, o + s)) + [pad] * (width - s) for s, o in zip(sizes, offsets)]
    return torch.tensor(rows, dtype=torch.long)


def per_agent(x, index):
    """x [B, D] to [N, B, W]: row i is x[:, index[i]], index D meaning a zero column."""
    x = torch.cat([x, x.new_zeros(x.shape[0], 1)], -1)
    return x.index_select(-1, index.flatten()).view(x.shape[0], *index.shape).transpose(0, 1)


def critic_index(obs_dims: list, act_dims: list, independent: bool) -> Optional[torch.Tensor]:
    """The columns of [o_1..o_N, a_1..a_N] that make up each critic's input x_i of (3): None for
    centralised critics (every x_i is all of them), else [N, D], row i the columns of (o_i, a_i)
    zero-padded to the largest such size D."""
    if not independent:
        return None
    obs_dim, act_dim = sum(obs_dims), sum(act_dims)
    obs_offsets, act_offsets = np.cumsum([0] + obs_dims[:-1]), np.cumsum([0] + act_dims[:-1])
    width = max(o + a for o, a in zip(obs_dims, act_dims))
    pad = obs_dim + act_dim  # the zero column
    rows = [list(range(oo, oo + o)) + list(range(obs_dim + ao, obs_dim + ao + a)) + [pad] * (width - o - a)
            for o, a, oo, ao in zip(obs_dims, act_dims, obs_offsets, act_offsets)]
    return torch.tensor(rows, dtype=torch.long)


def critic_inputs(obs, actions, n: int, index=None):
    """Equation (3) for the n agents at once: x [n, B, D], row i agent i's critic input, from the
    joint observation obs [B, O] and either one joint action [B, A] for every critic or, [n, B, A],
    one for each (the actor loss (6) gives critic i a joint action with its own a_i = μ_i(o_i)).
    index: None for centralised critics (x_i = [o, a]), critic_index's columns for independent ones."""
    if actions.dim() == 2:  # the same input for every critic
        x = torch.cat([obs, actions], -1)  # (3)
        return x.expand(n, *x.shape) if index is None else per_agent(x, index)  # (3)
    x = torch.cat([obs.expand(n, *obs.shape), actions], -1)  # (3)
    if index is None:
        return x
    x = torch.cat([x, x.new_zeros(*x.shape[:-1], 1)], -1)
    return torch.gather(x, -1, index.unsqueeze(1).expand(-1, x.shape[1], -1))  # (3)


def with_own_actions(actions, mu, own):
    """The joint actions of the actor losses (6), [N, B, A]: row i is the replayed joint action
    [B, A] with agent i's part a_i replaced by μ_i(o_i) from mu = [μ_1(o_1)..μ_N(o_N)] [B, A];
    own [N, A] is True on agent i's columns of row i."""
    return torch.where(own.unsqueeze(1), mu, actions)


def preactivation_penalty(u, own):
    """Equation (10) summed over the agents: Σ_i mean over the batch and agent i's columns of u²,
    u = f_θ(o) [B, A] the actors' outputs before (1), own [N, A] True on agent i's columns."""
    per_column = u.pow(2).mean(0)  # [A]
    return ((per_column * own).sum(1) / own.sum(1)).sum()  # (10)


def maddpg_target(rewards, terminations, next_q, gamma):
    """Critic targets y_i of equation (4), [B, N] (one column per agent); next_q[:, i] = Q'_i(x'_i)."""
    return rewards + gamma * (1.0 - terminations) * next_q  # (4)


@torch.no_grad()
def clip_grad_norms_(parameters, max_norm: float) -> torch.Tensor:
    """Clip each agent's network's gradient to norm max_norm, as nn.utils.clip_grad_norm_ on that
    network alone would: the parameters are AgentLinear tensors [N, ...], agent i's norm is over
    row i of all of them. Returns the N norms before clipping."""
    grads = [p.grad for p in parameters if p.grad is not None]
    norms = torch.linalg.vector_norm(torch.cat([g.flatten(1) for g in grads], 1), dim=1)
    coef = (max_norm / (norms + 1e-6)).clamp(max=1.0)
    for g in grads:
        g.mul_(coef.view(-1, *[1] * (g.dim() - 1)))
    return norms


@torch.no_grad()
def polyak_update(target: nn.Module, source: nn.Module, tau: float):
    """Equation (8): θ' ← τθ + (1 − τ)θ' for every parameter."""
    for t, s in zip(target.parameters(), source.parameters()):
        t.lerp_(s, tau)  # (8)


class ReplayBuffer:
    """A ring buffer of joint transitions in preallocated NumPy arrays, sampled uniformly."""

    def __init__(self, capacity: int, obs_dim: int, act_dim: int, num_agents: int, rng: np.random.Generator):
        self.obs = np.zeros((capacity, obs_dim), dtype=np.float32)
        self.actions = np.zeros((capacity, act_dim), dtype=np.float32)
        self.rewards = np.zeros((capacity, num_agents), dtype=np.float32)
        self.next_obs = np.zeros((capacity, obs_dim), dtype=np.float32)
        self.terminations = np.zeros((capacity, num_agents), dtype=np.float32)
        self.capacity, self.pos, self.size, self.rng = capacity, 0, 0, rng

    @staticmethod
    def nbytes(capacity: int, obs_dim: int, act_dim: int, num_agents: int) -> int:
        """The memory the arrays above take: float32 o, a, r, o', term per joint transition."""
        return capacity * 4 * (2 * obs_dim + act_dim + 2 * num_agents)

    def add(self, obs, actions, rewards, next_obs, terminations):
        """Store a batch of rows (one per env)."""
        idx = (self.pos + np.arange(len(obs))) % self.capacity
        self.obs[idx], self.actions[idx], self.rewards[idx] = obs, actions, rewards
        self.next_obs[idx], self.terminations[idx] = next_obs, terminations
        self.pos = (self.pos + len(obs)) % self.capacity
        self.size = min(self.size + len(obs), self.capacity)

    def sample(self, batch_size: int, device):
        idx = self.rng.integers(0, self.size, batch_size)
        return [torch.as_tensor(x[idx], device=device)
                for x in (self.obs, self.actions, self.rewards, self.next_obs, self.terminations)]


class AgentLinear(nn.Module):
    """N independent Linear layers, one per agent, applied by one batched matrix product:
    x [N, B, in] to [N, B, out]; weight [N, in, out] and bias [N, out], row i agent i's. Agents
    whose layers are smaller (in_dims[i] < in, out_dims[i] < out) are zero-padded: their extra
    weights start at 0 and, fed zero inputs or their outputs unused, get zero gradients and stay
    0, so row i computes exactly agent i's own Linear(in_dims[i], out_dims[i]). Each agent's
    weights are initialised as nn.Linear initialises that layer (uniform in ±1/√in_dims[i])."""

    def __init__(self, in_dims: list, out_dims: list):
        super().__init__()
        n, fan_in, fan_out = len(in_dims), max(in_dims), max(out_dims)
        self.weight = nn.Parameter(torch.zeros(n, fan_in, fan_out))
        self.bias = nn.Parameter(torch.zeros(n, fan_out))
        with torch.no_grad():
            for i, (d_in, d_out) in enumerate(zip(in_dims, out_dims)):
                layer = nn.Linear(d_in, d_out)
                self.weight[i, :d_in, :d_out] = layer.weight.T
                self.bias[i, :d_out] = layer.bias

    def forward(self, x):
        return torch.baddbmm(self.bias.unsqueeze(1), x, self.weight)


def agent_mlp(in_dims: list, out_dims: list, hidden: int = 64) -> nn.Sequential:
    """N MLPs in_dims[i] → 64 → 64 → out_dims[i] with ReLUs (the paper's size), batched."""
    n = len(in_dims)
    return nn.Sequential(AgentLinear(in_dims, [hidden] * n), nn.ReLU(), AgentLinear([hidden] * n, [hidden] * n),
                         nn.ReLU(), AgentLinear([hidden] * n, out_dims))


class Actors(nn.Module):
    """The N actors μ_i(o_i) of (1): the joint observation [o_1..o_N] [B, O] to the joint action
    [μ_1(o_1)..μ_N(o_N)] [B, A], all in one batched MLP (AgentLinear layers)."""

    def __init__(self, obs_dims: list, act_dims: list, lows: list, highs: list):
        super().__init__()
        n, width = len(obs_dims), max(act_dims)
        self.net = agent_mlp(obs_dims, act_dims)
        self.register_buffer("obs_index", padded_index(obs_dims, np.cumsum([0] + obs_dims[:-1]).tolist(),
                                                       max(obs_dims), sum(obs_dims)))
        # agent i's a_i: columns i·width .. i·width + act_dims[i] of the padded outputs side by side
        self.register_buffer("act_columns", torch.tensor([i * width + k for i in range(n)
                                                          for k in range(act_dims[i])], dtype=torch.long))
        low, high = np.concatenate(lows), np.concatenate(highs)
        self.register_buffer("action_scale", torch.as_tensor((high - low) / 2.0, dtype=torch.float32))
        self.register_buffer("action_bias", torch.as_tensor((high + low) / 2.0, dtype=torch.float32))

    def preactivations(self, obs):
        """f_θ(o) = [f_θ1(o_1)..f_θN(o_N)] [B, A], the actors' outputs before (1)."""
        u = self.net(per_agent(obs, self.obs_index))  # [N, B, width]
        return u.transpose(0, 1).flatten(1)[:, self.act_columns]  # [B, A]

    def forward(self, obs):
        return scale_to_bounds(self.preactivations(obs), self.action_scale, self.action_bias)  # (1)

    @torch.inference_mode()
    def act(self, obs: np.ndarray) -> np.ndarray:
        """μ(o) of NumPy joint observations from the envs ([B, O] or one [O]), as NumPy joint actions
        (no noise)."""
        x = torch.as_tensor(obs, dtype=torch.float32, device=self.action_scale.device)
        return self(x.view(-1, x.shape[-1])).view(*x.shape[:-1], -1).cpu().numpy()


class Critics(nn.Module):
    """The N critics Q_i(x_i): x [N, B, D] of (3) to [B, N] values, one batched MLP."""

    def __init__(self, input_dims: list):
        super().__init__()
        self.net = agent_mlp(input_dims, [1] * len(input_dims))

    def forward(self, x):
        return self.net(x).squeeze(-1).T


class Task:
    """The agents of an mpe2 task, their sizes and bounds, and the conversion between PettingZoo's
    per-agent dicts and the joint vectors [o_1..o_N], [a_1..a_N] that the replay and networks use."""

    def __init__(self, env):
        self.agents = list(env.possible_agents)
        self.obs_dims = [env.observation_space(a).shape[0] for a in self.agents]
        self.act_dims = [env.action_space(a).shape[0] for a in self.agents]
        self.lows = [env.action_space(a).low for a in self.agents]
        self.highs = [env.action_space(a).high for a in self.agents]
        self.low, self.high = np.concatenate(self.lows), np.concatenate(self.highs)
        self.act_splits = np.cumsum(self.act_dims)[:-1]

    def joint_obs(self, obs: dict) -> np.ndarray:
        return np.concatenate([obs[a] for a in self.agents])

    def action_dict(self, joint_action: np.ndarray) -> dict:
        return dict(zip(self.agents, np.split(joint_action, self.act_splits)))


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


def evaluate_policy(act, env, task: Task, episodes: int, seed: int) -> list:
    """Team returns (9) of `episodes` episodes of the deterministic policies `act` (one joint
    observation to one joint action), the env reset with `seed` first so that every evaluation
    starts from the same states."""
    returns, team_return = [], 0.0
    obs, _ = env.reset(seed=seed)
    while len(returns) < episodes:
        obs, rewards, _, _, _ = env.step(task.action_dict(act(task.joint_obs(obs))))
        team_return += sum(rewards.values())
        if not env.agents:  # every agent's episode has ended
            returns.append(team_return)
            team_return = 0.0
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
    """--eval-checkpoint: act with μ(o), no exploration noise, no learning."""
    if not os.path.isfile(args.eval_checkpoint):
        fail(f"no checkpoint at {args.eval_checkpoint}")
    try:
        ckpt = torch.load(args.eval_checkpoint, map_location="cpu", weights_only=True)
    except Exception as e:
        fail(f"cannot read {args.eval_checkpoint} as a checkpoint ({type(e).__name__})")
    saved_by = ckpt.get("algorithm") if isinstance(ckpt, dict) else None
    if saved_by != "maddpg":
        fail(f"{args.eval_checkpoint} was saved by {saved_by or 'another program'}, not maddpg.py: "
             "evaluate it with the script that saved it")
    args.env_id, args.max_cycles = ckpt["args"]["env_id"], ckpt["args"]["max_cycles"]
    check_env(args.env_id, args.capture_video)
    run_name = f"{args.env_id.replace('/', '-')}__{args.exp_name}-eval__{args.seed}__{int(time.time())}"
    device, run_dir, writer = setup(args, run_name)
    env = make_env(args.env_id, 0, args.capture_video, run_dir, args.max_cycles)()
    task = Task(env)
    actors = Actors(task.obs_dims, task.act_dims, task.lows, task.highs).to(device)
    actors.load_state_dict(ckpt["actors"])
    returns = evaluate_policy(actors.act, env, task, args.eval_episodes, args.seed)
    for i, r in enumerate(returns):
        writer.add_scalar("eval/episodic_return", r, i + 1)
    env.close()
    writer.close()
    summary = dict(env_id=args.env_id, algorithm="maddpg", mode="eval", seed=args.seed,
                   checkpoint=args.eval_checkpoint, episodes=len(returns), mean_return=float(np.mean(returns)),
                   std_return=float(np.std(returns)), stopped=None, versions=versions(), run_dir=run_dir)
    print(f"eval {args.env_id}: mean return {summary['mean_return']:.2f} ± {summary['std_return']:.2f} "
          f"over {len(returns)} episodes")
    return write_summary(run_dir, summary)


def train(args: Args) -> dict:
    check_args(args)
    if args.eval_checkpoint:
        return evaluate(args)
    if args.batch_size > args.buffer_size:
        fail(f"--batch-size {args.batch_size} is larger than --buffer-size {args.buffer_size}; "
             "shrink the batch or grow the buffer")
    if args.learning_starts >= args.total_timesteps:
        fail(f"--learning-starts {args.learning_starts} is not below --total-timesteps {args.total_timesteps}: "
             "nothing would be learned; raise the budget or start learning earlier")
    num_iterations = args.total_timesteps // args.num_envs
    if num_iterations == 0:
        fail(f"--total-timesteps {args.total_timesteps} is less than one step of --num-envs {args.num_envs}; "
             "raise it")
    check_env(args.env_id, args.capture_video)
    probe = make_env(args.env_id, -1, False, "", args.max_cycles)()
    task = Task(probe)
    probe.close()
    obs_dim, act_dim, n = sum(task.obs_dims), sum(task.act_dims), len(task.agents)
    capacity = min(args.buffer_size, args.total_timesteps)  # a run never stores more transitions than it steps
    check_memory(ReplayBuffer.nbytes(capacity, obs_dim, act_dim, n),
                 f"--buffer-size {args.buffer_size:,} (a replay of {capacity:,} transitions)")

    run_name = f"{args.env_id.replace('/', '-')}__{args.exp_name}__{args.seed}__{int(time.time())}"
    device, run_dir, writer = setup(args, run_name)
    if device.type == "cpu":  # tiny Adam moments and gradients turn denormal, and denormals slow every op
        torch.set_flush_denormal(True)
    envs = [make_env(args.env_id, i, args.capture_video, run_dir, args.max_cycles)() for i in range(args.num_envs)]
    eval_env = make_env(args.env_id, -1, False, run_dir, args.max_cycles)() if args.eval_frequency else None
    critic_dims = [(d + a if args.independent else obs_dim + act_dim) for d, a in zip(task.obs_dims, task.act_dims)]
    actors = Actors(task.obs_dims, task.act_dims, task.lows, task.highs).to(device)
    critics = Critics(critic_dims).to(device)
    actors_target = copy.deepcopy(actors)
    critics_target = copy.deepcopy(critics)
    saved = {"actors": actors, "critics": critics, "actors_target": actors_target, "critics_target": critics_target}
    fused = True if device.type in ("cpu", "cuda") else None
    actor_optimizer = torch.optim.Adam(actors.parameters(), lr=args.learning_rate, fused=fused)
    critic_optimizer = torch.optim.Adam(critics.parameters(), lr=args.learning_rate, fused=fused)
    rng = np.random.default_rng(args.seed)
    rb = ReplayBuffer(capacity, obs_dim, act_dim, n, rng)
    low, high = task.low, task.high
    explore_std = args.exploration_noise * (high - low) / 2.0
    index = critic_index(task.obs_dims, task.act_dims, args.independent)  # the columns of x_i in (3)
    index = None if index is None else index.to(device)
    own = torch.zeros(n, act_dim, dtype=torch.bool, device=device)  # own[i]: agent i's columns of a joint action
    for i, (start, size) in enumerate(zip(np.cumsum([0] + task.act_dims[:-1]), task.act_dims)):
        own[i, start:start + size] = True

    global_step, start_time = 0, time.time()
    next_progress, next_eval, next_update = start_time + 1.0, args.eval_frequency, args.learning_starts
    recent_returns = deque(maxlen=20)
    recent_agent_returns = deque(maxlen=20)
    episodes, updates, last_eval = 0, 0, None
    # saved instead of the model if training turns non-finite
    last_finite = copy.deepcopy({name: m.state_dict() for name, m in saved.items()})
    obs = np.stack([task.joint_obs(env.reset(seed=args.seed + i)[0]) for i, env in enumerate(envs)])
    next_obs = np.zeros_like(obs)
    rewards = np.zeros((args.num_envs, n), dtype=np.float32)
    terminations = np.zeros((args.num_envs, n), dtype=np.float32)
    episode_returns, episode_lengths = np.zeros((args.num_envs, n)), np.zeros(args.num_envs, dtype=int)
    stopped = stop_reason = None
    stop_signals = []  # Ctrl-C and SIGTERM, recorded here and raised at the next env step
    previous_handlers = {s: signal.signal(s, lambda signum, frame: stop_signals.append(signum))
                         for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        for iteration in range(1, num_iterations + 1):
            raise_if_stopped(stop_signals)
            if global_step < args.learning_starts:
                actions = rng.uniform(low, high, (args.num_envs, act_dim)).astype(np.float32)
            else:
                mu = actors.act(obs)
                actions = (mu + rng.normal(0.0, explore_std, mu.shape)).clip(low, high).astype(np.float32)  # (2)
                if not np.isfinite(mu).all():  # a NaN action would turn the whole physics state NaN
                    raise NonFinite(f"the actors' actions are not finite at step {global_step:,}")
            reset_obs = {}
            for e, env in enumerate(envs):
                o, r, term, trunc, _ = env.step(task.action_dict(actions[e]))
                next_obs[e] = task.joint_obs(o)  # the true final observations when the episode ends
                rewards[e] = [r[a] for a in task.agents]
                terminations[e] = [term[a] for a in task.agents]
                episode_returns[e] += rewards[e]
                episode_lengths[e] += 1
                if not env.agents:  # every agent's episode has ended (MPE ends them together)
                    reset_obs[e] = task.joint_obs(env.reset()[0])
            global_step += args.num_envs
            rb.add(obs, actions, rewards, next_obs, terminations)
            obs = next_obs.copy()
            for e, first_obs in reset_obs.items():
                team_return = float(episode_returns[e].sum())  # (9)
                recent_returns.append(team_return)
                recent_agent_returns.append(episode_returns[e].copy())
                episodes += 1
                writer.add_scalar("charts/episodic_return", team_return, global_step)
                writer.add_scalar("charts/episodic_length", int(episode_lengths[e]), global_step)
                for agent, r in zip(task.agents, episode_returns[e]):
                    writer.add_scalar(f"charts/return_{agent}", float(r), global_step)
                episode_returns[e], episode_lengths[e], obs[e] = 0.0, 0, first_obs

            while global_step >= next_update and global_step > args.learning_starts:
                next_update += args.train_frequency
                updates += 1
                b_obs, b_actions, b_rewards, b_next_obs, b_terminations = rb.sample(args.batch_size, device)
                with torch.no_grad():
                    next_actions = actors_target(b_next_obs)
                    next_q = critics_target(critic_inputs(b_next_obs, next_actions, n, index))
                    y = maddpg_target(b_rewards, b_terminations, next_q, args.gamma)  # (4)
                qf_values = critics(critic_inputs(b_obs, b_actions, n, index))
                qf_loss = ((qf_values - y) ** 2).mean(0).sum()  # (5), summed over the agents
                critic_optimizer.zero_grad(set_to_none=True)
                qf_loss.backward()
                clip_grad_norms_(critics.parameters(), args.max_grad_norm)  # per agent
                critic_optimizer.step()

                # the critics held fixed: the gradient reaches a_i, not the critics' weights, which is (7)
                critics.requires_grad_(False)
                u = actors.preactivations(b_obs)
                mu = scale_to_bounds(u, actors.action_scale, actors.action_bias)  # (1)
                x = critic_inputs(b_obs, with_own_actions(b_actions, mu, own), n, index)  # x_i with a_i = μ_i(o_i)
                actor_loss = -critics(x).mean(0).sum()  # (6), summed over the agents
                if args.actor_reg:
                    actor_loss = actor_loss + args.actor_reg * preactivation_penalty(u, own)  # (10)
                actor_optimizer.zero_grad(set_to_none=True)
                actor_loss.backward()  # (7): ∇μ_i · ∇_{a_i} Q_i reaches each actor by the chain rule
                critics.requires_grad_(True)
                clip_grad_norms_(actors.parameters(), args.max_grad_norm)  # per agent
                actor_optimizer.step()
                polyak_update(actors_target, actors, args.tau)  # (8)
                polyak_update(critics_target, critics, args.tau)  # (8)

                if updates % 100 == 0:  # .item() waits for the device: only now and then
                    losses = {"losses/qf1_loss": qf_loss.item() / n, "losses/qf1_values": qf_values.mean().item(),
                              "losses/actor_loss": actor_loss.item() / n}
                    check_finite(global_step, losses, *saved.values())
                    last_finite = copy.deepcopy({name: m.state_dict() for name, m in saved.items()})
                    for key, value in losses.items():
                        writer.add_scalar(key, value, global_step)
                    writer.add_scalar("charts/SPS", int(global_step / (time.time() - start_time)), global_step)

            if args.eval_frequency and global_step >= next_eval:
                eval_returns = evaluate_policy(actors.act, eval_env, task, args.eval_episodes,
                                               args.seed + EVAL_SEED_OFFSET)
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
    finally:
        for s, handler in previous_handlers.items():
            signal.signal(s, handler)
    if stopped:
        print(f"stopped: {stop_reason}", file=sys.stderr)

    if args.save_model:
        path = os.path.join(run_dir, "maddpg.pt")
        torch.save({"algorithm": "maddpg", "args": asdict(args), **{name: m.state_dict() for name, m in saved.items()}},
                   path)
        print(f"model saved to {path}")
    for env in envs:
        env.close()
    if eval_env is not None:
        eval_env.close()
    writer.close()
    wall = time.time() - start_time
    eval_step, eval_return = last_eval or (None, None)
    agent_means = np.mean(recent_agent_returns, 0) if recent_agent_returns else [None] * n
    summary = dict(env_id=args.env_id, algorithm="maddpg", exp_name=args.exp_name, seed=args.seed,
                   global_step=global_step, wall_seconds=wall, SPS=global_step / wall,
                   mean_return=float(np.mean(recent_returns)) if recent_returns else None,
                   episodes_in_mean=len(recent_returns), episodes=episodes,
                   eval_step=eval_step, eval_return=eval_return,
                   agent_returns={a: None if m is None else float(m) for a, m in zip(task.agents, agent_means)},
                   stopped=stopped, stop_reason=stop_reason, versions=versions(), run_dir=run_dir)
    return write_summary(run_dir, summary)


if __name__ == "__main__":
    sys.exit(EXIT_CODES[train(parse_args())["stopped"]])
