r"""IMPALA: actor processes and a learner with V-trace off-policy correction, discrete actions.

Espeholt, Soyer, Munos, Simonyan, Mnih, Ward, Doron, Firoiu, Harley, Dunning, Legg,
Kavukcuoglu (2018), "IMPALA: Scalable Distributed Deep-RL with Importance Weighted
Actor-Learner Architectures", arXiv:1802.01561.

Actors act with a behaviour policy μ, a copy of the learner's policy π_φ that lags behind
it, and send fixed-length unrolls of T steps with μ's log-probabilities; the learner trains
V_θ and π_φ on batches of unrolls and corrects for the lag with truncated importance
weights. An actor takes new weights between unrolls only: every step of an unroll is acted
by the same μ, whose version travels with the unroll, and the policy lag (learner updates
between the weights an unroll used and the update that learns from it) is logged as
`charts/policy_lag`.

Truncated importance weights of the learner's π_φ against μ:
$$ \rho_i = \min\left(\bar\rho, \frac{\pi_\phi(a_i|s_i)}{\mu(a_i|s_i)}\right), \qquad
   c_i = \min\left(\bar c, \frac{\pi_\phi(a_i|s_i)}{\mu(a_i|s_i)}\right) \tag{1} $$

Importance-weighted TD error (no bootstrap past a termination; at a truncation V(s_{i+1})
is the value of the final observation; r_i is the env's reward times `--reward-scale`):
$$ \delta_i = \rho_i\left(r_i + \gamma (1 - \text{term}_i) V_\theta(s_{i+1}) - V_\theta(s_i)\right) \tag{2} $$

V-trace target, the sum running to the end of the unroll or of the episode, whichever comes
first (at the unroll's end it bootstraps V_θ(s_T)):
$$ v_t = V_\theta(s_t) + \sum_{i=t}^{t+n-1} \gamma^{i-t}\Big(\prod_{j=t}^{i-1} c_j\Big)\delta_i \tag{3} $$

computed backwards by its recursion, cut at every episode end d_t = term_t or trunc_t:
$$ v_t - V_\theta(s_t) = \delta_t + \gamma c_t (1 - d_t)\left(v_{t+1} - V_\theta(s_{t+1})\right) \tag{4} $$

With π = μ and ρ̄, c̄ ≥ 1 every ρ_i = c_i = 1 and v_t is the n-step Bellman target of A2C.

Value loss, towards the V-trace target:
$$ L^V(\theta) = \tfrac12\,\mathbb E_t\left[(v_t - V_\theta(s_t))^2\right] \tag{5} $$

Policy gradient, with v_{t+1} (where the episode ends at t: V_θ of the final observation,
zero after a termination) held constant:
$$ \Delta\phi \propto \rho_t \nabla_\phi \log\pi_\phi(a_t|s_t)
   \left(r_t + \gamma (1 - \text{term}_t)\, v_{t+1} - V_\theta(s_t)\right) \tag{6} $$

Total loss (minimised), with the entropy bonus H:
$$ L = -\mathbb E_t\left[\rho_t \log\pi_\phi(a_t|s_t) A_t\right] + c_v L^V
   - c_e \mathbb E_t[H(\pi_\phi(\cdot|s_t))] \tag{7} $$
where A_t is the bracket of (6). The gradients of (7) are clipped to a global norm, then
RMSProp takes the step, as in the paper.

Environments: each actor steps `--num-envs` gymnasium vector envs in their default
NEXT_STEP autoreset mode. After an episode ends at step t, the next `step` call only
resets that env: row t+1 of the unroll holds the final observation of the old episode, so
V of that row is the truncation bootstrap of (2), and the row itself (a "reset row") is no
transition and is left out of every loss. Consecutive unrolls of an actor share one
observation: s_T of one is s_0 of the next.

Processes. One machine: `--num-actors` actor processes (torch.multiprocessing, spawn),
actors 1..K, and the learner in the main process. Unrolls are written into a pool of slots
in shared-memory tensors and slot numbers travel through one pipe per actor; μ's weights sit in shared
memory with a version number, written by the learner after each update and copied by an
actor under a lock before each unroll. Beyond one machine (torchrun): rank 0 is the learner
and ranks 1..W-1 are actors (`--num-actors` is not used); an actor `send`s each unroll to
rank 0 and `recv`s the learner's current weights before its next one, through
torch.distributed (gloo). The learner code is the same in both modes. Actors are born
ignoring Ctrl-C and SIGTERM: the learner stops them (and an actor whose learner has died
stops by itself). A failed actor stops the run with its error ("child-failed", exit 1).
The run is asynchronous: the same seed does not give the same returns twice.

Run:
    python algos/impala.py                                        # CartPole-v1, 2 actor processes
    python algos/impala.py --num-actors 4 --env-id Acrobot-v1
    torchrun --standalone --nproc-per-node 3 algos/impala.py      # learner + 2 actor ranks, one machine
    # N machines, M processes each (rank 0, the learner, writes runs/ on its machine):
    torchrun --nnodes N --nproc-per-node M --rdzv-backend c10d --rdzv-endpoint HOST:PORT algos/impala.py
    python algos/impala.py --help

Defaults: the paper's unroll length T = 20, ρ̄ = c̄ = 1, RMSProp and gradient clipping, and
its 640 steps per update (8 unrolls of 4 envs × 20 steps here, 32 × 20 there); sized for
CartPole: 64×64 tanh networks, losses averaged rather than summed (so the learning rate
does not depend on the batch size), RMSProp at 4e-3 annealed linearly to 0 with the α and ε
of a2c.py. Rewards are scaled by 0.01 (= 1 - γ) in the targets, as the paper clips them to
[-1, 1]: unscaled, CartPole's values approach 100, the critic's second tanh layer saturated
within a few hundred updates and gave every state the same value, and about one run in four
(Adam or RMSProp) collapsed to returns near 200 for good; scaled, 8 seeds of 8 ended at 500.
The entropy coefficient 1e-4 is the paper's 0.01 for these scaled rewards. Two actors: on a
2-core machine they step more env steps per second than one (the learner needs about a
quarter of an actor's CPU per env step).
"""

import contextlib
import copy
import datetime
import importlib.metadata
import io
import json
import math
import multiprocessing.connection
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
    """seed of random, numpy, torch and the environments"""
    torch_deterministic: bool = True
    """use deterministic torch algorithms (the actors still run asynchronously)"""
    cuda: bool = True
    """use CUDA for the learner when it is available (actors act on the CPU)"""
    track: bool = False
    """log to Weights & Biases (needs `pip install wandb`)"""
    wandb_project_name: str = "pg-reference"
    """the Weights & Biases project"""
    wandb_entity: Optional[str] = None
    """the Weights & Biases entity (team)"""
    capture_video: bool = False
    """record videos of actor 1's environment 0 into the run directory (one machine only)"""
    save_model: bool = False
    """save the model to runs/<run>/impala.pt at the end (and on Ctrl-C)"""
    eval_checkpoint: Optional[str] = None
    """path of a saved model: evaluate it without learning, then exit"""
    eval_frequency: int = 0
    """evaluate the greedy policy on a separate env every this many env steps (0: never)"""
    eval_episodes: int = 10
    """episodes per evaluation (during training and for --eval-checkpoint)"""
    torch_threads: int = 1
    """CPU threads for torch in the learner (each actor process uses one)"""

    env_id: str = "CartPole-v1"
    """the gymnasium environment id (Discrete actions, vector observations)"""
    total_timesteps: int = 500_000
    """total environment steps over all actors"""
    learning_rate: float = 4e-3
    """RMSProp learning rate"""
    num_actors: int = 2
    """actor processes on one machine (2 suits 2 cores; under torchrun the actors are ranks 1..W-1)"""
    num_envs: int = 4
    """environments per actor"""
    unroll_length: int = 20
    """steps per environment in one unroll (T)"""
    batch_size: int = 8
    """unrolls per learner update"""
    anneal_lr: bool = True
    """decay the learning rate linearly to 0"""
    gamma: float = 0.99
    """discount factor γ"""
    reward_scale: float = 0.01
    """rewards r_t in (2) and (6) are the env's times this (the logged returns are not scaled)"""
    rho_bar: float = 1.0
    """truncation ρ̄ of the importance weights in (2) and (6)"""
    c_bar: float = 1.0
    """truncation c̄ of the trace coefficients in (4)"""
    ent_coef: float = 1e-4
    """entropy coefficient c_e in (7), for the scaled rewards"""
    vf_coef: float = 0.5
    """value-loss coefficient c_v in (7)"""
    max_grad_norm: float = 0.5
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
    "num_actors": "[1, inf)",
    "num_envs": "[1, inf)",
    "unroll_length": "[1, inf)",
    "batch_size": "[1, inf)",
    "gamma": "[0, 1]",
    "reward_scale": "(0, inf)",
    "rho_bar": "(0, inf)",
    "c_bar": "(0, inf)",
    "ent_coef": "[0, inf)",
    "vf_coef": "[0, inf)",
    "max_grad_norm": "(0, inf)",
    "rmsprop_alpha": "[0, 1)",  # at 1 the average of squared gradients never leaves 0
    "rmsprop_eps": "(0, inf)",
}
PROGRESS_SECONDS = 10.0  # a progress line after the first second, then every this many seconds
EVAL_SEED_OFFSET = 10_000  # the evaluation env's seed is args.seed + this: other starts than training's
EXIT_CODES = {None: 0, "non-finite": 1, "child-failed": 1, "interrupted": 130, "terminated": 143}  # as shells expect
DIST_TIMEOUT = datetime.timedelta(minutes=10)  # a torch.distributed send or receive that waits longer fails


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
    each update: an exception raised wherever the signal happens to land can stop a library
    halfway, inside TensorBoard's writer queue (whose close() then waited up to its 120-s flush
    interval), a pipe to an actor, or an optimiser's step."""
    if stop_signals:
        raise Terminated() if stop_signals[0] == signal.SIGTERM else KeyboardInterrupt()


class NonFinite(Exception):
    """A loss or parameter turned NaN or infinite: training stops."""


class ChildFailed(Exception):
    """An actor process died or raised an error: training stops."""


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
        fail(f"{env_id} is an Atari game (pixel observations); impala.py is for vector observations: "
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
        fail(f"{env_id} has continuous (Box) actions; impala.py is for Discrete actions: use algos/ppo_continuous.py")
    if not isinstance(act_space, gym.spaces.Discrete):
        fail(f"{env_id} has {act_space} actions; impala.py needs a Discrete action space")
    if not isinstance(obs_space, gym.spaces.Box) or len(obs_space.shape) != 1:
        fail(f"{env_id} has observations {obs_space}; impala.py needs flat vectors")


def vtrace(behaviour_logp, target_logp, rewards, values, terminations, truncations, gamma: float,
           rho_bar: float, c_bar: float):
    """V-trace targets v_t (3) and the policy-gradient advantages ρ_t A_t of (6), on NumPy
    arrays of shape [T, B] (a loop of T small steps: NumPy's are cheaper than torch's).

    behaviour_logp = log μ(a_t|s_t), target_logp = log π(a_t|s_t); values has T + 1 rows,
    V(s_0) .. V(s_T), the last being the observation after the unroll. Row t + 1 after an
    episode end holds the final observation (NEXT_STEP autoreset), so values[t + 1] is the
    truncation bootstrap; the sum (3) stops at every episode end. Reset rows (the row after
    an episode end) get meaningless entries; the caller leaves them out of the losses.
    """
    ratios = np.exp(target_logp - behaviour_logp)
    rhos = np.minimum(ratios, rho_bar)  # (1)
    cs = np.minimum(ratios, c_bar)  # (1)
    not_terminated = 1.0 - terminations
    not_done = 1.0 - np.maximum(terminations, truncations)
    deltas = rhos * (rewards + gamma * not_terminated * values[1:] - values[:-1])  # (2)
    vs_minus_v = np.zeros_like(deltas)
    acc = np.zeros_like(deltas[0])
    for t in reversed(range(len(deltas))):
        acc = deltas[t] + gamma * cs[t] * not_done[t] * acc  # (3) by its recursion (4)
        vs_minus_v[t] = acc
    vs = values[:-1] + vs_minus_v
    # v_{t+1}: the next target inside the episode, V(s_T) after the unroll, V(final obs) at an episode end
    next_vs = np.where(not_done > 0, np.concatenate([vs[1:], values[-1:]]), values[1:])
    pg_advantages = rhos * (rewards + gamma * not_terminated * next_vs - values[:-1])  # (6)
    return vs, pg_advantages


def policy_lag(step_versions: torch.Tensor, updates: int) -> torch.Tensor:
    """Learner updates between the weights each unroll was acted with and the update that learns
    from it: `updates` done so far less the version of the weights; step_versions [B, T] holds
    it for every step, all the same within an unroll (an actor takes weights between unrolls)."""
    return updates - step_versions[:, 0]


def numpy_mlp(net: nn.Sequential):
    """A NumPy copy of an MLP of Linear and Tanh layers, with its current weights.

    The actors act with it one step at a time: on a handful of observations torch's per-call
    overhead costs more than the arithmetic. It is taken once per unroll, between unrolls, so
    one unroll is acted by one μ.
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
    def __init__(self, obs_dim: int, n_actions: int):
        super().__init__()
        self.critic = nn.Sequential(
            layer_init(nn.Linear(obs_dim, 64)), nn.Tanh(),
            layer_init(nn.Linear(64, 64)), nn.Tanh(),
            layer_init(nn.Linear(64, 1), std=1.0),
        )
        self.actor = nn.Sequential(
            layer_init(nn.Linear(obs_dim, 64)), nn.Tanh(),
            layer_init(nn.Linear(64, 64)), nn.Tanh(),
            layer_init(nn.Linear(64, n_actions), std=0.01),
        )


def unroll_buffers(num_slots: int, T: int, N: int, obs_dim: int) -> dict:
    """Slots of unrolls: what an actor writes in T steps of N envs. Episode returns and
    lengths sit at the row where the episode ended (length 0: none ended there)."""
    return {
        "obs": torch.zeros(num_slots, T + 1, N, obs_dim),  # s_0 .. s_T
        "actions": torch.zeros(num_slots, T, N, dtype=torch.int64),
        "logp": torch.zeros(num_slots, T, N),  # log μ(a_t|s_t)
        "rewards": torch.zeros(num_slots, T, N),
        "terminations": torch.zeros(num_slots, T, N),
        "truncations": torch.zeros(num_slots, T, N),
        "resets": torch.zeros(num_slots, T, N, dtype=torch.bool),  # row t is the reset step after an episode end
        "version": torch.zeros(num_slots, T, dtype=torch.int64),  # of μ's weights, at every step
        "episode_return": torch.zeros(num_slots, T, N),
        "episode_length": torch.zeros(num_slots, T, N, dtype=torch.int64),
    }


def run_actor(rank: int, args: Args, buffers: dict, jobs, deliver, run_dir: Optional[str]):
    """Actor `rank` (1..K) in either mode: for each job (a slot, the version of μ's weights and
    μ's logits as a NumPy function, all taken before the unroll starts), act T steps of its N
    envs into the slot, then deliver it."""
    T, N = args.unroll_length, args.num_envs
    envs = gym.vector.SyncVectorEnv([make_env(args.env_id, (rank - 1) * N + i, args.capture_video, run_dir)
                                     for i in range(N)])
    n_actions = envs.single_action_space.n
    rng = np.random.default_rng([args.seed, rank])
    buf = {key: value.numpy() for key, value in buffers.items()}  # views of the same memory
    obs, _ = envs.reset(seed=[args.seed + (rank - 1) * N + i for i in range(N)])
    done = np.zeros(N, dtype=bool)
    envs_index = np.arange(N)
    try:
        for slot, version, logits_fn in jobs:
            # a ~ μ(·|s) by the Gumbel-max trick: argmax(logits + g), g ~ Gumbel(0, 1), is a sample of the softmax
            gumbel = rng.gumbel(size=(T, N, n_actions)).astype(np.float32)
            for t in range(T):
                buf["obs"][slot, t], buf["resets"][slot, t], buf["version"][slot, t] = obs, done, version
                logits = logits_fn(obs)
                actions = (logits + gumbel[t]).argmax(-1)
                shifted = logits - logits.max(-1, keepdims=True)
                logp = shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))
                buf["actions"][slot, t], buf["logp"][slot, t] = actions, logp[envs_index, actions]
                obs, rewards, terminations, truncations, infos = envs.step(actions)
                buf["rewards"][slot, t] = rewards
                buf["terminations"][slot, t], buf["truncations"][slot, t] = terminations, truncations
                done = terminations | truncations
                buf["episode_return"][slot, t], buf["episode_length"][slot, t] = 0.0, 0
                if "episode" in infos:
                    ended = infos["_episode"]
                    buf["episode_return"][slot, t, ended] = infos["episode"]["r"][ended]
                    buf["episode_length"][slot, t, ended] = infos["episode"]["l"][ended]
            buf["obs"][slot, T] = obs
            deliver(slot)
    finally:
        envs.close()


def actor_process(rank: int, args: Args, buffers: dict, weights: nn.Module, version, lock, conn, errors,
                  run_dir: str):
    """One machine: an actor process. It reads the number of a free slot from its pipe (None: stop),
    copies μ's weights and their version from shared memory under the lock, acts one unroll into
    the slot and sends the slot number back."""
    torch.set_num_threads(1)
    parent_alive = mp.parent_process().is_alive

    def jobs():
        while True:
            while not conn.poll(1.0):
                if not parent_alive():
                    return
            try:
                slot = conn.recv()
            except EOFError:  # the learner has gone
                return
            if slot is None:
                return
            while not lock.acquire(timeout=1.0):  # a learner killed while holding it never releases it
                if not parent_alive():
                    return
            try:
                logits_fn, weights_version = numpy_mlp(weights), version.value
            finally:
                lock.release()
            yield slot, weights_version, logits_fn

    try:
        run_actor(rank, args, buffers, jobs(), conn.send, run_dir)
    except Exception as e:
        errors.put((rank, f"{type(e).__name__}: {(str(e).splitlines() or [''])[0]}"))
        sys.exit(1)


def actor_rank(rank: int, args: Args, obs_dim: int, n_actions: int) -> dict:
    """Under torchrun: actor `rank` receives a version number (negative: stop) and μ's weights
    from rank 0 before each unroll, and sends the unroll back, one tensor at a time."""
    torch.set_num_threads(1)
    actor = Agent(obs_dim, n_actions).actor
    buffers = unroll_buffers(1, args.unroll_length, args.num_envs, obs_dim)
    header = torch.zeros(1, dtype=torch.int64)

    def jobs():
        while True:
            dist.recv(header, src=0)
            if header.item() < 0:
                return
            for p in actor.parameters():
                dist.recv(p.data, src=0)
            yield 0, header.item(), numpy_mlp(actor)

    def deliver(slot):
        for value in buffers.values():
            dist.send(value[slot], dst=0)

    try:
        run_actor(rank, args, buffers, jobs(), deliver, None)
    except KeyboardInterrupt:  # Ctrl-C reaches every rank: rank 0 reports it
        return {"stopped": "interrupted"}
    except Exception as e:
        print(f"error: actor {rank} failed: {type(e).__name__}: {(str(e).splitlines() or [''])[0]}", file=sys.stderr)
        return {"stopped": "child-failed"}
    return {"stopped": None}


class SharedMemoryActors:
    """The learner's side on one machine: actor processes fill slots of shared-memory unroll
    buffers. Slot numbers travel through one pipe per actor: the learner sends an actor the
    number of a free slot, the actor sends it back once the unroll is in it. Each actor holds
    up to two slots (the one it acts into and the next), and `num_unrolls` slot numbers are
    sent in all, so the actors step the budget exactly. (An mp.Queue would do the same, but
    after each put its feeder thread takes the GIL from the learner, whose next torch call
    then waited 1.0 ms on average, against 0.06 ms with the pipes.)"""

    def __init__(self, args: Args, actor: nn.Module, obs_dim: int, num_unrolls: int, run_dir: str):
        ctx = mp.get_context("spawn")
        num_slots = args.batch_size + 2 * args.num_actors  # a batch to gather, two in each actor's hands
        self.buffers = {k: v.share_memory_() for k, v in
                        unroll_buffers(num_slots, args.unroll_length, args.num_envs, obs_dim).items()}
        self.weights = copy.deepcopy(actor).cpu().share_memory()
        self.version, self.lock, self.errors = ctx.Value("q", 0, lock=False), ctx.Lock(), ctx.Queue()
        ranks = range(1, args.num_actors + 1)
        pipes = {rank: ctx.Pipe() for rank in ranks}
        self.conns = {rank: pipes[rank][0] for rank in ranks}
        self.actor_ends = {rank: pipes[rank][1] for rank in ranks}
        self.processes = {rank: ctx.Process(target=actor_process, daemon=True,
                                            args=(rank, args, self.buffers, self.weights, self.version, self.lock,
                                                  self.actor_ends[rank], self.errors, run_dir))
                          for rank in ranks}
        self.free, self.full = deque(range(num_slots)), deque()
        self.in_hand = {rank: 0 for rank in ranks}
        self.num_unrolls, self.issued = num_unrolls, 0

    def start(self):
        # born ignoring Ctrl-C and SIGTERM (an ignored signal stays ignored in a new process, and
        # Python then installs no KeyboardInterrupt): the learner alone stops them
        previous_sigint = signal.signal(signal.SIGINT, signal.SIG_IGN)
        previous_sigterm = signal.signal(signal.SIGTERM, signal.SIG_IGN)
        try:
            for rank, p in self.processes.items():
                p.start()
                self.actor_ends[rank].close()  # the actor's copy alone: its pipe ends (EOF) when it dies
        finally:
            signal.signal(signal.SIGINT, previous_sigint)
            signal.signal(signal.SIGTERM, previous_sigterm)
        self.hand_out()

    def hand_out(self):
        """Free slots to the actors holding the fewest, up to two each, while the budget lasts."""
        while self.free and self.issued < self.num_unrolls:
            rank = min(self.in_hand, key=self.in_hand.get)
            if self.in_hand[rank] == 2:
                return
            try:
                self.conns[rank].send(self.free.popleft())
            except OSError:  # a broken pipe: the actor has died
                self.failed(rank)
            self.in_hand[rank] += 1
            self.issued += 1

    def check(self):
        """Raise ChildFailed if an actor process has ended, with its own error if it sent one."""
        for rank, p in self.processes.items():
            if p.exitcode is not None:
                messages = {}
                with contextlib.suppress(queue.Empty):
                    while True:
                        r, message = self.errors.get(timeout=1.0)
                        messages[r] = message
                code = p.exitcode
                died = f"died (killed by {signal.Signals(-code).name})" if code < 0 else f"died (exit code {code})"
                raise ChildFailed(f"actor {rank} failed: {messages.get(rank, died)}")

    def failed(self, rank: int):
        """Actor `rank` has closed its pipe: it has died or is about to."""
        self.processes[rank].join(timeout=10)
        self.check()
        raise ChildFailed(f"actor {rank} failed: its pipe closed")

    def next_unroll(self) -> int:
        """The slot of the next finished unroll."""
        while not self.full:
            ready = multiprocessing.connection.wait(list(self.conns.values()), timeout=1.0)
            if not ready:  # a second with nothing: has an actor died? (its pipe then also reads EOF, below)
                self.check()
            for rank, conn in self.conns.items():
                if conn in ready:
                    try:
                        self.full.append(conn.recv())
                    except (EOFError, OSError):  # the pipe has closed: the actor has died
                        self.failed(rank)
                    self.in_hand[rank] -= 1
            self.hand_out()
        return self.full.popleft()

    def release(self, slots):
        """The learner has copied these slots: hand them out again."""
        self.free.extend(slots)
        self.hand_out()

    def publish(self, actor: nn.Module, version: int):
        """μ's new weights, written between two actors' copies."""
        while not self.lock.acquire(timeout=1.0):  # an actor killed while holding it never releases it
            self.check()
        try:
            with torch.no_grad():
                for shared, p in zip(self.weights.parameters(), actor.parameters()):
                    shared.copy_(p)
            self.version.value = version
        finally:
            self.lock.release()

    def close(self):
        for rank, p in self.processes.items():
            if p.pid is not None:  # started
                with contextlib.suppress(OSError):  # its pipe is closed if it has died
                    self.conns[rank].send(None)
        for p in self.processes.values():
            if p.pid is not None:
                p.join(timeout=10)
                if p.is_alive():  # it ignores SIGTERM
                    p.kill()
                    p.join()


class DistributedActors:
    """The learner's side under torchrun: ranks 1..W-1 send unrolls, which rank 0 receives into
    its own slots; each receipt is answered at once with the current weights (or a stop)."""

    def __init__(self, args: Args, actor: nn.Module, obs_dim: int, num_unrolls: int):
        self.buffers = unroll_buffers(args.batch_size, args.unroll_length, args.num_envs, obs_dim)
        self.free = list(range(args.batch_size))
        self.num_unrolls, self.issued = num_unrolls, 0
        self.weights, self.version = [p.detach().cpu().clone() for p in actor.parameters()], 0

    def start(self):
        for rank in range(1, dist.get_world_size()):
            self.reply(rank)

    def reply(self, rank: int):
        """The next job of actor `rank`: the current weights while the budget lasts, else stop."""
        try:
            if self.issued < self.num_unrolls:
                dist.send(torch.tensor([self.version]), dst=rank)
                for w in self.weights:
                    dist.send(w, dst=rank)
                self.issued += 1
            else:
                dist.send(torch.tensor([-1]), dst=rank)
        except RuntimeError as e:  # the rank has gone
            raise ChildFailed(f"actor {rank} failed: {(str(e).splitlines() or [''])[0]}") from None

    def next_unroll(self) -> int:
        slot = self.free.pop()
        values = list(self.buffers.values())
        try:
            src = dist.recv(values[0][slot])  # from whichever actor sends first
            for value in values[1:]:
                dist.recv(value[slot], src=src)
        except RuntimeError as e:  # a rank has gone
            raise ChildFailed(f"an actor failed: {(str(e).splitlines() or [''])[0]}") from None
        self.reply(src)
        return slot

    def release(self, slots):
        self.free.extend(slots)

    def publish(self, actor: nn.Module, version: int):
        with torch.no_grad():
            for w, p in zip(self.weights, actor.parameters()):
                w.copy_(p)
        self.version = version

    def close(self):
        pass  # after the last unroll every actor has had its stop; stopped early, torchrun ends the other ranks


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
    if saved_by != "impala":
        fail(f"{args.eval_checkpoint} was saved by {saved_by or 'another program'}, not impala.py: "
             "evaluate it with the script that saved it")
    args.env_id = ckpt["args"]["env_id"]
    check_env(args.env_id, args.capture_video)
    run_name = f"{args.env_id.replace('/', '-')}__{args.exp_name}-eval__{args.seed}__{int(time.time())}"
    device, run_dir, writer = setup(args, run_name)
    env = make_env(args.env_id, 0, args.capture_video, run_dir)()
    agent = Agent(env.observation_space.shape[0], env.action_space.n).to(device)
    agent.load_state_dict(ckpt["model"])
    logits = numpy_mlp(agent.actor)
    returns = evaluate_policy(lambda o: int(logits(o).argmax()), env, args.eval_episodes, args.seed)
    for i, r in enumerate(returns):
        writer.add_scalar("eval/episodic_return", r, i + 1)
    env.close()
    writer.close()
    summary = dict(env_id=args.env_id, algorithm="impala", mode="eval", seed=args.seed,
                   checkpoint=args.eval_checkpoint, episodes=len(returns), mean_return=float(np.mean(returns)),
                   std_return=float(np.std(returns)), stopped=None, versions=versions(), run_dir=run_dir)
    print(f"eval {args.env_id}: mean return {summary['mean_return']:.2f} ± {summary['std_return']:.2f} "
          f"over {len(returns)} episodes")
    return write_summary(run_dir, summary)


def train(args: Args) -> dict:
    check_args(args)
    distributed = "RANK" in os.environ  # started by torchrun
    if args.eval_checkpoint:
        if distributed:
            fail("--eval-checkpoint runs in one process: start it with python, not torchrun")
        return evaluate(args)
    if distributed and int(os.environ.get("WORLD_SIZE", "1")) < 2:
        fail("under torchrun impala.py needs 2 or more processes (rank 0 learns, the others act): "
             "use --nproc-per-node 2 or more, or run it with python")
    if distributed and args.capture_video:
        fail("--capture-video records an actor's env into runs/, which the actor ranks do not write: "
             "record on one machine (python algos/impala.py --capture-video)")
    T, N, B = args.unroll_length, args.num_envs, args.batch_size
    steps_per_update = B * T * N
    num_updates = args.total_timesteps // steps_per_update
    if num_updates == 0:
        fail(f"--total-timesteps {args.total_timesteps} is less than one batch of {steps_per_update} steps "
             "(batch-size x unroll-length x num-envs); raise it or shrink the batch")
    check_env(args.env_id, args.capture_video)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # check_env has refused what is wrong: this reads the sizes only
        probe = gym.make(args.env_id)
    obs_dim, n_actions = probe.observation_space.shape[0], probe.action_space.n
    probe.close()
    if distributed:
        dist.init_process_group("gloo", timeout=DIST_TIMEOUT)
        if dist.get_rank() > 0:
            try:
                return actor_rank(dist.get_rank(), args, obs_dim, n_actions)
            finally:
                dist.destroy_process_group()

    run_name = f"{args.env_id.replace('/', '-')}__{args.exp_name}__{args.seed}__{int(time.time())}"
    device, run_dir, writer = setup(args, run_name)
    eval_env = make_env(args.env_id, -1, False, run_dir)() if args.eval_frequency else None
    agent = Agent(obs_dim, n_actions).to(device)
    optimizer = torch.optim.RMSprop(agent.parameters(), lr=args.learning_rate, alpha=args.rmsprop_alpha,
                                    eps=args.rmsprop_eps, foreach=True)  # RMSprop has no fused form
    num_unrolls = num_updates * B
    actors = (DistributedActors(args, agent.actor, obs_dim, num_unrolls) if distributed
              else SharedMemoryActors(args, agent.actor, obs_dim, num_unrolls, run_dir))

    global_step, start_time = 0, time.time()
    next_progress, next_eval = start_time + 1.0, args.eval_frequency
    recent_returns = deque(maxlen=20)
    episodes, last_eval = 0, None
    lag_sum, lag_count, logged = 0, 0, (0, 0)  # policy lags summed over all unrolls, and at the last log
    last_finite = copy.deepcopy(agent.state_dict())  # saved instead of the model if training turns non-finite
    stopped = stop_reason = None
    stop_signals = []  # Ctrl-C and SIGTERM, recorded here and raised at the next update
    previous_handlers = {s: signal.signal(s, lambda signum, frame: stop_signals.append(signum))
                         for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        actors.start()
        for update in range(num_updates):
            raise_if_stopped(stop_signals)
            if args.anneal_lr:
                optimizer.param_groups[0]["lr"] = args.learning_rate * (1.0 - update / num_updates)
            slots = [actors.next_unroll() for _ in range(B)]
            # one copy of each buffer, [rows, B * N, ...] (column b * N + i is env i of unroll b): the slots are free
            # again once it is made; version stays [B, T]
            batch = {key: value[slots] if key == "version" else value.transpose(0, 1)[:, slots].flatten(1, 2)
                     for key, value in actors.buffers.items()}
            actors.release(slots)
            lags = policy_lag(batch["version"], update)
            lag_sum, lag_count = lag_sum + int(lags.sum()), lag_count + B
            global_step += steps_per_update
            ended = batch["episode_length"] > 0
            for r, length in zip(batch["episode_return"][ended].tolist(), batch["episode_length"][ended].tolist()):
                recent_returns.append(r)
                episodes += 1
                writer.add_scalar("charts/episodic_return", r, global_step)
                writer.add_scalar("charts/episodic_length", length, global_step)

            obs = batch["obs"].to(device)
            actions = batch["actions"].to(device)
            logits = agent.actor(obs[:-1])
            values = agent.critic(obs).squeeze(-1)  # V(s_0) .. V(s_T), with gradient
            logp_all = logits.log_softmax(-1)
            target_logp = logp_all.gather(-1, actions.unsqueeze(-1)).squeeze(-1)
            entropy = -(logp_all.exp() * logp_all).sum(-1)
            vs, pg_advantages = (torch.as_tensor(x, device=device) for x in vtrace(
                batch["logp"].numpy(), target_logp.detach().cpu().numpy(),
                args.reward_scale * batch["rewards"].numpy(), values.detach().cpu().numpy(),
                batch["terminations"].numpy(), batch["truncations"].numpy(),
                args.gamma, args.rho_bar, args.c_bar))
            valid = ~batch["resets"].to(device)  # reset rows hold no transition
            pg_loss = -(pg_advantages * target_logp)[valid].mean()  # (6)
            v_loss = 0.5 * ((vs - values[:-1])[valid] ** 2).mean()  # (5)
            entropy_loss = entropy[valid].mean()
            loss = pg_loss + args.vf_coef * v_loss - args.ent_coef * entropy_loss  # (7)

            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            nn.utils.clip_grad_norm_(agent.parameters(), args.max_grad_norm, foreach=True)
            optimizer.step()

            actors.publish(agent.actor, update + 1)

            sps = int(global_step / (time.time() - start_time))
            # Losses read, checked (check_finite, then the copy of the last finite model) and logged every
            # 10 updates, as a2c does every 25: doing it after each update took 1.2 of the learner's 4.2 ms
            # of CPU per update (CartPole-v1 defaults, 500 updates), CPU the actors share on a small machine.
            if (update + 1) % 10 == 0 or update + 1 == num_updates:
                losses = {"losses/value_loss": v_loss.item(), "losses/policy_loss": pg_loss.item(),
                          "losses/entropy": entropy_loss.item()}
                check_finite(global_step, losses, agent)
                last_finite = copy.deepcopy(agent.state_dict())
                writer.add_scalar("charts/learning_rate", optimizer.param_groups[0]["lr"], global_step)
                for key, value in losses.items():
                    writer.add_scalar(key, value, global_step)
                writer.add_scalar("charts/SPS", sps, global_step)
                # the mean lag of the unrolls learned from since the last line
                writer.add_scalar("charts/policy_lag", (lag_sum - logged[0]) / (lag_count - logged[1]), global_step)
                logged = (lag_sum, lag_count)

            if args.eval_frequency and global_step >= next_eval:
                greedy = numpy_mlp(agent.actor)
                eval_returns = evaluate_policy(lambda o: int(greedy(o).argmax()), eval_env, args.eval_episodes,
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
        agent.load_state_dict(last_finite)
    except ChildFailed as e:
        stopped, stop_reason = "child-failed", str(e)
    finally:
        for s, handler in previous_handlers.items():
            signal.signal(s, handler)
        actors.close()  # in every case, also on an error
    if stopped:
        print(f"stopped: {stop_reason}", file=sys.stderr)

    if args.save_model:
        path = os.path.join(run_dir, "impala.pt")
        torch.save({"algorithm": "impala", "args": asdict(args), "model": agent.state_dict()}, path)
        print(f"model saved to {path}")
    if eval_env is not None:
        eval_env.close()
    writer.close()
    wall = time.time() - start_time
    eval_step, eval_return = last_eval or (None, None)
    summary = dict(env_id=args.env_id, algorithm="impala", exp_name=args.exp_name, seed=args.seed,
                   global_step=global_step, wall_seconds=wall, SPS=global_step / wall,
                   mean_return=float(np.mean(recent_returns)) if recent_returns else None,
                   episodes_in_mean=len(recent_returns), episodes=episodes,
                   eval_step=eval_step, eval_return=eval_return,
                   policy_lag=lag_sum / lag_count if lag_count else None,
                   stopped=stopped, stop_reason=stop_reason, versions=versions(), run_dir=run_dir)
    summary = write_summary(run_dir, summary)
    if distributed:
        dist.destroy_process_group()
    return summary


if __name__ == "__main__":
    sys.exit(EXIT_CODES[train(parse_args())["stopped"]])
