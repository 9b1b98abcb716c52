r"""SVPG: Stein Variational Policy Gradient, n policy particles with A2C gradients, discrete actions.

Liu, Ramachandran, Liu, Peng (2017), "Stein Variational Policy Gradient", arXiv:1704.02399.
Instead of one policy, SVPG keeps n particles θ_1 .. θ_n (the parameters of n policies) that
approximate the distribution maximising E_{θ∼q}[J(θ)] + α H(q), whose solution is
q(θ) ∝ exp(J(θ)/α) q_0(θ) (here a flat prior q_0, whose gradient vanishes). Stein variational
gradient descent (Liu & Wang 2016, arXiv:1608.04471) moves the particles towards it: each is
pulled by the kernel-weighted policy gradients of all particles and pushed away from the others.

Each particle estimates its own ∇J(θ_j) as a2c.py does (the A2C variant of the paper, one of
its two; REINFORCE is the other): its own N envs, its own critic V_j, T-step rollouts. A2C
because a2c.py reaches a return of 475 on CartPole-v1 in about 70k env steps where REINFORCE
needs over 200k, so a population fits a CPU budget, and because its update every T steps gives
the particles many small SVGD steps. n-step return and advantage of particle j (a2c.py's):
$$ R_t = r_t + \gamma (1 - \text{term}_t)\begin{cases} V_j(s_{t+1}) & d_t \text{ or } t = T-1 \\
   R_{t+1} & \text{otherwise} \end{cases} \tag{1} $$
$$ A_t = R_t - V_j(s_t) \tag{2} $$
The policy-gradient estimate (A_t held constant) and the critic's loss:
$$ \hat g_j = \nabla_{\theta_j} \mathbb{E}_t\left[A_t \log \pi_{\theta_j}(a_t|s_t)
   + c_e H(\pi_{\theta_j}(\cdot|s_t))\right] \approx \nabla_{\theta_j} J(\theta_j) \tag{3} $$
$$ L^{V}_j = \tfrac12\mathbb{E}_t\left[(R_t - V_j(s_t))^2\right] \tag{4} $$
Each particle's gradient of (3) and c_v (4) together is clipped to a global norm, as in a2c.py.

RBF kernel on the flattened policy parameters (the critics are helpers of the estimate (3), not
particles), its bandwidth by the median heuristic (Liu & Wang 2016; the form of the SVPG paper),
med the median of the n(n − 1)/2 distances ‖θ_i − θ_j‖ between distinct particles, and its
gradient in its first argument (h held constant):
$$ k(\theta, \theta') = \exp\left(-\lVert\theta - \theta'\rVert^2 / h\right) \tag{5} $$
$$ h = \text{med}^2 / \log n \tag{6} $$
$$ \nabla_{\theta_j} k(\theta_j, \theta_i) = -\tfrac{2}{h}(\theta_j - \theta_i)\, k(\theta_j, \theta_i) \tag{7} $$
The SVGD direction of every particle: a kernel-weighted average of the policy gradients (over
the temperature α) that pulls it to high return, plus the repulsive term that keeps it apart:
$$ \Delta\theta_i = \frac1n \sum_{j=1}^{n}\left[\hat g_j\, k(\theta_j, \theta_i) / \alpha
   + \nabla_{\theta_j} k(\theta_j, \theta_i)\right] \tag{8} $$
$$ \theta_i \leftarrow \theta_i + \epsilon\, \Delta\theta_i \tag{9} $$
(9) is taken by RMSProp, as in a2c.py: −Δθ_i is written into the .grad of particle i's policy
parameters, its critic keeps the gradient of c_v (4), and the optimiser steps. Small α trusts
the policy gradients; large α lets the repulsion spread the particles (α → ∞: no learning).

Defaults: a2c.py's for every particle (N = 8 envs × T = 5 steps, RMSProp 7e-4 decayed to 0,
clipping at 0.5); n = 4 particles, a population a CPU trains in a minute or two; 1M env steps
in all (250k per particle); α = 1. At α = 1 the repulsion visibly spreads the particles (on
CartPole-v1 their mean distance grew from about 20 to 120-180 over a run) while each still learns;
at α = 0.01 it stayed within 18-29 and the best particle first reached a return of 475 at 374k
env steps instead of 176k (seed 1, 600k steps; final particle means 273 and 247); at α = 10 the
repulsion slowed learning: no particle reached 475 in 1M steps (seed 1: best 405, mean 293).
The paper tunes α per task, on the scale of its J, and anneals it to move from exploration to
exploitation; here α is fixed, and relative to the scale of ĝ_j: a mean over samples, like a2c.py's
loss (so about (1 − γ) times a gradient of the discounted return), clipped.

The particles live in one batch: each layer holds the weights of all n particles (row i is
particle i's) and applies them with one batched matrix product, `ParticleLinear`; row i of the
flattened parameters [n, d] is θ_i. This is one forward and backward pass for all particles
instead of n: an update of 4 particles took 6.6 ms against 18.1 ms as 4 separate a2c.py Agents
(CartPole-v1 sizes, 500 updates, 3 alternating rounds: 5.9-7.2 ms against 15.9-19.3 ms), which at
the measured rollout time is about 1.7 times the SPS.

Environments: one gymnasium vector env of n·N envs in its default NEXT_STEP autoreset mode;
envs i·N .. (i + 1)·N − 1 are particle i's. After an episode ends at step t, row t + 1 of the
rollout holds the final observation of the old episode: V of that row is the truncation
bootstrap in (1), and the row itself (a "reset row") is no transition and is left out of the
losses.

Logs, besides the usual keys (the loss keys are means over the particles):
`charts/episodic_return` every episode of every particle, `charts/particle_<i>_return` the
episodes of particle i, `charts/particle_mean_return` and `charts/particle_best_return` the mean
and the best of the particles' last-20-episode means, `charts/particle_distance` the mean of the
distances ‖θ_i − θ_j‖ between particles, `charts/kernel_bandwidth` h of (6). summary.json's
mean_return is the mean over particles of each particle's last-20-episode mean
(episodes_in_mean: the fewest episodes any particle's mean covers); best_return is the best
particle's and particle_returns lists them all. Evaluation (`--eval-frequency`,
`--eval-checkpoint`) plays the best particle greedily.

Run:
    python algos/svpg.py                             # CartPole-v1
    python algos/svpg.py --env-id Acrobot-v1
    python algos/svpg.py --num-particles 8 --temperature 10
    python algos/svpg.py --help
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
    """save the model to runs/<run>/svpg.pt at the end (and on Ctrl-C)"""
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
    total_timesteps: int = 1_000_000
    """total environment steps over all envs of all particles"""
    learning_rate: float = 7e-4
    """RMSProp learning rate"""
    num_particles: int = 4
    """number of policy particles n (each with its own critic and envs; at least 2)"""
    temperature: float = 1.0
    """the temperature α of (8): smaller trusts the policy gradients, larger the repulsion between particles"""
    num_envs: int = 8
    """number of parallel environments of each particle"""
    num_steps: int = 5
    """steps per environment per update (the n of the n-step return)"""
    anneal_lr: bool = True
    """decay the learning rate linearly to 0"""
    gamma: float = 0.99
    """discount factor γ"""
    ent_coef: float = 0.0
    """entropy coefficient c_e in (3); CartPole needs none, raise it (0.01) where exploration is hard"""
    vf_coef: float = 0.5
    """value-loss coefficient c_v of (4)"""
    max_grad_norm: float = 0.5
    """gradient-norm clipping of each particle's gradient (policy and critic together)"""
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
    "num_particles": "[2, inf)",  # the bandwidth med²/log n needs two particles; one policy is a2c.py
    "temperature": "(0, inf)",
    "num_envs": "[1, inf)",
    "num_steps": "[1, inf)",
    "gamma": "[0, 1]",
    "ent_coef": "[0, inf)",
    "vf_coef": "[0, inf)",
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
        fail(f"{env_id} is an Atari game (pixel observations); svpg.py is for vector observations: "
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
        fail(f"{env_id} has continuous (Box) actions; svpg.py is for Discrete actions: use algos/ppo_continuous.py")
    if not isinstance(act_space, gym.spaces.Discrete):
        fail(f"{env_id} has {act_space} actions; svpg.py needs a Discrete action space")
    if not isinstance(obs_space, gym.spaces.Box) or len(obs_space.shape) != 1:
        fail(f"{env_id} has observations {obs_space}; svpg.py needs flat vectors")


def nstep_returns(rewards, values, terminations, truncations, gamma):
    """n-step returns R_t of equation (1) on a [T, ...] rollout (a2c.py's, on [T, n, N] here).

    values has T + 1 rows: V(s_0) .. V(s_T), the last being V(next_obs) after the rollout.
    Row t + 1 after an episode end holds the final observation (NEXT_STEP autoreset), so
    values[t + 1] is the truncation bootstrap. Rows that are reset steps get meaningless
    entries; the caller drops them.
    """
    dones = np.logical_or(terminations, truncations)
    returns = np.zeros_like(rewards)
    next_return = values[-1]
    for t in reversed(range(len(rewards))):
        tail = np.where(dones[t], values[t + 1], next_return)
        next_return = rewards[t] + gamma * (1.0 - terminations[t]) * tail  # (1)
        returns[t] = next_return
    return returns


def median_bandwidth(params: torch.Tensor) -> torch.Tensor:
    """Bandwidth h of equation (6) for particles params [n, d]: med² / log n, med the median (the
    mean of the two middle values for an even count) of the distances between distinct particles."""
    n = len(params)
    if n == 1:  # one particle: k(θ, θ) = 1 and ∇k(θ, θ) = 0 whatever h is
        return torch.ones((), dtype=params.dtype, device=params.device)
    med = torch.quantile(torch.pdist(params), 0.5)
    # floored: particles that coincide would give 0 / 0 in (5), where any h gives k = 1
    return (med ** 2 / math.log(n)).clamp(min=1e-12)  # (6)


def rbf_kernel(params: torch.Tensor, h: torch.Tensor):
    """The kernel matrix K[j, i] = k(θ_j, θ_i) of equation (5) for particles params [n, d], and its
    gradient in the first argument, grad_k[j, i] = ∇_{θ_j} k(θ_j, θ_i) of equation (7), [n, n, d]."""
    diff = params[:, None, :] - params[None, :, :]  # diff[j, i] = θ_j − θ_i
    k = torch.exp(-diff.pow(2).sum(-1) / h)  # (5)
    grad_k = -2.0 / h * diff * k[..., None]  # (7)
    return k, grad_k


def svgd_direction(params: torch.Tensor, grads: torch.Tensor, alpha: float, h: Optional[torch.Tensor] = None):
    """Δθ_i of equation (8) for every particle: params [n, d] the flattened policy parameters,
    grads [n, d] the policy-gradient estimates ĝ_j of (3) (ascent directions), alpha the temperature,
    h the bandwidth (None: the median heuristic (6)). Returns Δθ [n, d] and h."""
    if h is None:
        h = median_bandwidth(params)
    k, grad_k = rbf_kernel(params, h)
    delta = (k.T @ grads / alpha + grad_k.sum(0)) / len(params)  # (8)
    return delta, h


def numpy_mlp(net: nn.Sequential, particle: Optional[int] = None):
    """A NumPy copy of an MLP of ParticleLinear and Tanh layers, with its current weights: of all
    particles ([n, B, in] to [n, B, out]) or of one ([B, in] to [B, out]).

    Used to act one step at a time during a rollout: on a handful of observations torch's
    per-call overhead costs more than the arithmetic. It is taken once per rollout, when the
    weights stop changing; the log-probabilities that the loss needs still come from one
    batched torch pass over the rollout afterwards.
    """
    layers = []
    for m in net:
        if isinstance(m, ParticleLinear):
            w, b = m.weight.detach().cpu().numpy().copy(), m.bias.detach().cpu().numpy()[:, None].copy()
            if particle is not None:
                w, b = w[particle], b[particle]
            layers.append(lambda x, w=w, b=b: x @ w + b)
        elif isinstance(m, nn.Tanh):
            layers.append(np.tanh)
        else:
            raise NotImplementedError(f"numpy_mlp knows ParticleLinear and Tanh layers, not {m}")

    def forward(x):
        for layer in layers:
            x = layer(x)
        return x

    return forward


class ParticleLinear(nn.Module):
    """n independent Linear layers, one per particle, applied by one batched matrix product:
    x [n, ..., in] to [n, ..., out]; weight [n, in, out] and bias [n, out], row i particle i's.
    Each particle's weights are initialised as a2c.py's layer_init does a Linear."""

    def __init__(self, n: int, in_features: int, out_features: int, std: float = np.sqrt(2)):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(n, in_features, out_features))
        self.bias = nn.Parameter(torch.zeros(n, out_features))
        with torch.no_grad():
            for w in self.weight:
                w.copy_(nn.init.orthogonal_(torch.empty(out_features, in_features), std).T)

    def forward(self, x):
        y = torch.baddbmm(self.bias.unsqueeze(1), x.flatten(1, -2), self.weight)
        return y.view(*x.shape[:-1], -1)


class Agent(nn.Module):
    """n particles: policies π_{θ_i} (actor) and their critics V_i, in ParticleLinear layers."""

    def __init__(self, n: int, obs_dim: int, n_actions: int):
        super().__init__()
        self.critic = nn.Sequential(
            ParticleLinear(n, obs_dim, 64), nn.Tanh(),
            ParticleLinear(n, 64, 64), nn.Tanh(),
            ParticleLinear(n, 64, 1, std=1.0),
        )
        self.actor = nn.Sequential(
            ParticleLinear(n, obs_dim, 64), nn.Tanh(),
            ParticleLinear(n, 64, 64), nn.Tanh(),
            ParticleLinear(n, 64, n_actions, std=0.01),
        )

    def policy(self, obs, actions):
        """log π(a|s) and the entropy H(π(·|s)) for a batch of each particle, obs [n, ..., obs_dim]."""
        logp = self.actor(obs).log_softmax(-1)
        return logp.gather(-1, actions.unsqueeze(-1)).squeeze(-1), -(logp.exp() * logp).sum(-1)


def flat(tensors, n: int) -> torch.Tensor:
    """Parameters (or their gradients) of all particles as rows [n, d]: row i is θ_i flattened."""
    return torch.cat([t.reshape(n, -1) for t in tensors], 1)


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
    """--eval-checkpoint: act greedily with the best particle of a saved model, no learning."""
    if not os.path.isfile(args.eval_checkpoint):
        fail(f"no checkpoint at {args.eval_checkpoint}")
    try:
        ckpt = torch.load(args.eval_checkpoint, map_location="cpu", weights_only=True)
    except Exception as e:
        fail(f"cannot read {args.eval_checkpoint} as a checkpoint ({type(e).__name__})")
    saved_by = ckpt.get("algorithm") if isinstance(ckpt, dict) else None
    if saved_by != "svpg":
        fail(f"{args.eval_checkpoint} was saved by {saved_by or 'another program'}, not svpg.py: "
             "evaluate it with the script that saved it")
    args.env_id = ckpt["args"]["env_id"]
    check_env(args.env_id, args.capture_video)
    run_name = f"{args.env_id.replace('/', '-')}__{args.exp_name}-eval__{args.seed}__{int(time.time())}"
    device, run_dir, writer = setup(args, run_name)
    env = make_env(args.env_id, 0, args.capture_video, run_dir)()
    agent = Agent(ckpt["args"]["num_particles"], env.observation_space.shape[0], env.action_space.n).to(device)
    agent.load_state_dict(ckpt["model"])
    logits = numpy_mlp(agent.actor, ckpt["best_particle"])
    returns = evaluate_policy(lambda o: int(logits(o).argmax()), env, args.eval_episodes, args.seed)
    for i, r in enumerate(returns):
        writer.add_scalar("eval/episodic_return", r, i + 1)
    env.close()
    writer.close()
    summary = dict(env_id=args.env_id, algorithm="svpg", mode="eval", seed=args.seed, checkpoint=args.eval_checkpoint,
                   particle=ckpt["best_particle"], episodes=len(returns), mean_return=float(np.mean(returns)),
                   std_return=float(np.std(returns)), stopped=None, versions=versions(), run_dir=run_dir)
    print(f"eval {args.env_id}: mean return {summary['mean_return']:.2f} ± {summary['std_return']:.2f} "
          f"over {len(returns)} episodes (particle {ckpt['best_particle']})")
    return write_summary(run_dir, summary)


def train(args: Args) -> dict:
    check_args(args)
    if args.eval_checkpoint:
        return evaluate(args)
    batch_size = args.num_particles * args.num_envs * args.num_steps
    num_iterations = args.total_timesteps // batch_size
    if num_iterations == 0:
        fail(f"--total-timesteps {args.total_timesteps} is less than one batch of {batch_size} "
             "(--num-particles x --num-envs x --num-steps); raise it or shrink the batch")
    check_env(args.env_id, args.capture_video)

    run_name = f"{args.env_id.replace('/', '-')}__{args.exp_name}__{args.seed}__{int(time.time())}"
    device, run_dir, writer = setup(args, run_name)
    n, T, N = args.num_particles, args.num_steps, args.num_envs
    envs = gym.vector.SyncVectorEnv([make_env(args.env_id, i, args.capture_video, run_dir)
                                     for i in range(n * N)])  # envs i*N .. (i+1)*N - 1: particle i's
    envs.action_space.seed(args.seed)
    eval_env = make_env(args.env_id, -1, False, run_dir)() if args.eval_frequency else None
    obs_dim, n_actions = envs.single_observation_space.shape[0], envs.single_action_space.n
    agent = Agent(n, obs_dim, n_actions).to(device)
    # One optimiser over all particles: RMSProp's statistics are per parameter entry, so this is
    # each particle's own RMSProp step on its own rows.
    optimizer = torch.optim.RMSprop(agent.parameters(), lr=args.learning_rate, alpha=args.rmsprop_alpha,
                                    eps=args.rmsprop_eps, foreach=True)  # RMSprop has no fused form
    policy_params = list(agent.actor.parameters())
    rng = np.random.default_rng(args.seed)

    # Rollout storage on the host (the envs live there), [T, n, N]; one copy to `device` per update.
    obs = np.zeros((T, n, N, obs_dim), dtype=np.float32)
    actions = np.zeros((T, n, N), dtype=np.int64)
    rewards = np.zeros((T, n, N), dtype=np.float32)
    terminations = np.zeros((T, n, N), dtype=np.float32)
    truncations = np.zeros((T, n, N), dtype=np.float32)
    resets = np.zeros((T, n, N), dtype=bool)  # row t is the reset step after an episode ended at t - 1

    global_step, start_time = 0, time.time()
    next_progress, next_eval = start_time + 1.0, args.eval_frequency
    recent_returns = [deque(maxlen=20) for _ in range(n)]  # each particle's last 20 episodes

    def particle_returns():
        return [float(np.mean(r)) if r else None for r in recent_returns]

    def best_particle():
        means = [-math.inf if r is None else r for r in particle_returns()]
        return int(np.argmax(means))

    episodes, last_eval = 0, None
    last_finite = copy.deepcopy(agent.state_dict())  # saved instead of the model if training turns non-finite
    next_obs, _ = envs.reset(seed=args.seed)
    next_done = np.zeros((n, N), dtype=bool)
    stopped = stop_reason = None
    stop_signals = []  # Ctrl-C and SIGTERM, recorded here and raised at the next env step
    previous_handlers = {s: signal.signal(s, lambda signum, frame: stop_signals.append(signum))
                         for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        for iteration in range(1, num_iterations + 1):
            if args.anneal_lr:
                optimizer.param_groups[0]["lr"] = args.learning_rate * (1.0 - (iteration - 1.0) / num_iterations)

            # a ~ π_i(·|s) by the Gumbel-max trick: argmax(logits + g), g ~ Gumbel(0, 1), is a
            # sample of the softmax distribution; noise from the seeded generator.
            logits_fn = numpy_mlp(agent.actor)
            gumbel = rng.gumbel(size=(T, n, N, n_actions)).astype(np.float32)
            for step in range(T):
                raise_if_stopped(stop_signals)
                obs[step], resets[step] = next_obs.reshape(n, N, obs_dim), next_done
                actions[step] = (logits_fn(obs[step]) + gumbel[step]).argmax(-1)
                next_obs, reward, term, trunc, infos = envs.step(actions[step].reshape(-1))
                rewards[step], terminations[step], truncations[step] = (x.reshape(n, N) for x in (reward, term, trunc))
                next_done = (term | trunc).reshape(n, N)
                global_step += n * N
                if "episode" in infos:
                    for e in np.flatnonzero(infos["_episode"]):
                        r, length = float(infos["episode"]["r"][e]), int(infos["episode"]["l"][e])
                        recent_returns[e // N].append(r)
                        episodes += 1
                        writer.add_scalar("charts/episodic_return", r, global_step)
                        writer.add_scalar("charts/episodic_length", length, global_step)
                        writer.add_scalar(f"charts/particle_{e // N}_return", r, global_step)

            # [n, T + 1, N, obs_dim]: particle first, as the ParticleLinear layers take it
            all_obs = torch.as_tensor(np.concatenate([obs, next_obs.reshape(1, n, N, obs_dim).astype(np.float32)]),
                                      device=device).transpose(0, 1)
            values = agent.critic(all_obs).squeeze(-1)  # V_i(s_0) .. V_i(s_T), with gradient
            returns = nstep_returns(rewards, values.detach().transpose(0, 1).cpu().numpy(), terminations, truncations,
                                    args.gamma)
            returns = torch.as_tensor(returns, device=device).transpose(0, 1)
            valid = torch.as_tensor(~resets, device=device).transpose(0, 1).float()  # reset rows hold no transition
            count = valid.sum((1, 2)).clamp(min=1.0)
            log_prob, entropy = agent.policy(all_obs[:, :-1], torch.as_tensor(actions, device=device).transpose(0, 1))
            advantages = (returns - values[:, :-1]).detach()  # (2)
            pg_loss = -(advantages * log_prob * valid).sum((1, 2)) / count  # [n]: −(3) without the entropy
            v_loss = 0.5 * ((returns - values[:, :-1]) ** 2 * valid).sum((1, 2)) / count  # (4)
            entropy_loss = (entropy * valid).sum((1, 2)) / count
            # The particles share no weights, so the gradient of the sum holds each particle's own gradient in its rows.
            loss = (pg_loss + args.vf_coef * v_loss - args.ent_coef * entropy_loss).sum()

            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            # Each particle's gradient (policy and critic) clipped to a global norm, as a2c.py clips its one.
            norms = flat([p.grad for p in agent.parameters()], n).norm(dim=1)
            scale = (args.max_grad_norm / (norms + 1e-6)).clamp(max=1.0)
            for p in agent.parameters():
                p.grad.mul_(scale.view(-1, *[1] * (p.dim() - 1)))
            theta = flat([p.detach() for p in policy_params], n)
            delta, h = svgd_direction(theta, -flat([p.grad for p in policy_params], n), args.temperature)  # ĝ_j: (3)
            for p, d in zip(policy_params, delta.split([p[0].numel() for p in policy_params], 1)):
                p.grad = -d.reshape(p.shape)  # RMSProp descends: −Δθ_i makes the ascent step (9)
            optimizer.step()

            sps = int(global_step / (time.time() - start_time))
            # Losses read, checked (check_finite, then the copy of the last finite model) and logged every
            # 25 updates, as a2c.py does (there checking each update cost 32% SPS).
            if iteration % 25 == 0 or iteration == num_iterations:
                losses = {"losses/value_loss": v_loss.mean().item(), "losses/policy_loss": pg_loss.mean().item(),
                          "losses/entropy": entropy_loss.mean().item()}
                check_finite(global_step, losses, agent)
                last_finite = copy.deepcopy(agent.state_dict())
                writer.add_scalar("charts/learning_rate", optimizer.param_groups[0]["lr"], global_step)
                for key, value in losses.items():
                    writer.add_scalar(key, value, global_step)
                writer.add_scalar("charts/SPS", sps, global_step)
                writer.add_scalar("charts/kernel_bandwidth", h.item(), global_step)
                writer.add_scalar("charts/particle_distance", torch.pdist(theta).mean().item(), global_step)
                means = [r for r in particle_returns() if r is not None]
                if means:
                    writer.add_scalar("charts/particle_mean_return", np.mean(means), global_step)
                    writer.add_scalar("charts/particle_best_return", max(means), global_step)

            if args.eval_frequency and global_step >= next_eval:
                logits = numpy_mlp(agent.actor, best_particle())
                eval_returns = evaluate_policy(lambda o: int(logits(o).argmax()), eval_env, args.eval_episodes,
                                               args.seed + EVAL_SEED_OFFSET)
                last_eval = (global_step, float(np.mean(eval_returns)))
                writer.add_scalar("eval/episodic_return", last_eval[1], global_step)
                next_eval = (global_step // args.eval_frequency + 1) * args.eval_frequency
            if time.time() >= next_progress:
                means = [r for r in particle_returns() if r is not None]
                mean_ret, best_ret = (np.mean(means), max(means)) if means else (float("nan"), float("nan"))
                print(f"step {global_step:>11,}  SPS {sps:>6,}  return(last 20) {mean_ret:8.2f}  best particle "
                      f"{best_ret:8.2f}", flush=True)
                next_progress = time.time() + PROGRESS_SECONDS
    except KeyboardInterrupt as e:
        stopped = "terminated" if isinstance(e, Terminated) else "interrupted"
        stop_reason = f"{'SIGTERM' if stopped == 'terminated' else 'Ctrl-C'} at step {global_step:,}"
    except NonFinite as e:
        stopped, stop_reason = "non-finite", str(e)
        agent.load_state_dict(last_finite)
    finally:
        for s, handler in previous_handlers.items():
            signal.signal(s, handler)
    if stopped:
        print(f"stopped: {stop_reason}", file=sys.stderr)

    if args.save_model:
        path = os.path.join(run_dir, "svpg.pt")
        torch.save({"algorithm": "svpg", "args": asdict(args), "model": agent.state_dict(),
                    "best_particle": best_particle()}, path)
        print(f"model saved to {path}")
    envs.close()
    if eval_env is not None:
        eval_env.close()
    writer.close()
    wall = time.time() - start_time
    eval_step, eval_return = last_eval or (None, None)
    means = [r for r in particle_returns() if r is not None]
    summary = dict(env_id=args.env_id, algorithm="svpg", exp_name=args.exp_name, seed=args.seed,
                   global_step=global_step, wall_seconds=wall, SPS=global_step / wall,
                   mean_return=float(np.mean(means)) if means else None,
                   episodes_in_mean=min(len(r) for r in recent_returns), episodes=episodes,
                   best_return=max(means) if means else None, particle_returns=particle_returns(),
                   eval_step=eval_step, eval_return=eval_return,
                   stopped=stopped, stop_reason=stop_reason, versions=versions(), run_dir=run_dir)
    return write_summary(run_dir, summary)


if __name__ == "__main__":
    sys.exit(EXIT_CODES[train(parse_args())["stopped"]])
