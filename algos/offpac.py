r"""Off-PAC: off-policy actor-critic with importance weights π/β from a replay, discrete actions.

Degris, White, Sutton (2012), "Off-Policy Actor-Critic", arXiv:1205.4839 (ICML 2012).

An on-policy actor-critic learns from what π itself just did and throws it away. Off-PAC
learns π from actions that another policy, the behaviour policy β, chose: here from a replay
of every transition seen so far, each stored with the probability β(a|s) that the action had
when it was taken.

The behaviour policy. Every num_steps vector steps the actor's weights are copied (θ̃, a
lagged copy of π_θ) and, until the next copy, the envs act with
$$ \beta(a|s) = (1 - \varepsilon)\,\pi_{\tilde\theta}(a|s) + \varepsilon / |\mathcal A| \tag{1} $$
Why this β: it follows π closely enough that the replay holds the states π visits, while the
ε-uniform part gives every action at least ε/|A| probability. So β covers every action π may
take (the ratios below exist) and π/β ≤ |A|/ε stays bounded; the lag lets one frozen NumPy
copy act for a whole rollout. Replayed transitions are older still: the ratios correct for
all of it, the ε-mixture, the lag and the age.

The paper's objective is π's value averaged over the states that β visits, J(θ) =
Σ_s d^β(s) V^π(s). Degris et al. drop the term Σ_a π ∇Q of its gradient
(their Theorem 1: ascending what remains still improves J) and rewrite the sum over actions
as an expectation under β, one importance weight per transition:
$$ \nabla_\theta J(\theta) \approx \mathbb E_\beta\left[\frac{\pi_\theta(a|s)}{\beta(a|s)}\,
   Q^\pi(s,a)\,\nabla_\theta\log\pi_\theta(a|s)\right] \tag{2} $$
States need no correction (J is defined on β's states) and only the one action is
reweighted, so no product of ratios along a trajectory appears. The ratio is clipped at ρ̄
(--rho-clip) to bound the variance of a rare large π/β, at the price of a bias where it
bites (logged as charts/rho_clipfrac):
$$ \rho = \min\left(\frac{\pi_\theta(a|s)}{\beta(a|s)},\ \bar\rho\right) \tag{3} $$
A baseline b(s) changes nothing in expectation, E_β[(π/β) b(s) ∇log π] = b(s) Σ_a ∇π(a|s) = 0,
so Q is replaced by the advantage over V^π(s) = Σ_b π(b|s) Q(s,b), computed from the critic:
$$ A(s,a) = Q_\phi(s,a) - \textstyle\sum_b \pi_\theta(b|s)\,Q_\phi(s,b) \tag{4} $$
The actor's loss over a minibatch D from the replay (ρ and A held constant), with an entropy
bonus; its gradient is (2) with the baseline (4) and the clip (3):
$$ L^\pi = -\mathbb E_D\left[\rho\,A(s,a)\log\pi_\theta(a|s)\right]
   - c_e\,\mathbb E_D\left[H(\pi_\theta(\cdot|s))\right] \tag{5} $$

The critic. The paper learns V with gradient-TD, λ-returns and importance weights in the
critic too. This script learns Q_φ(s, a) instead, by expected SARSA towards the current π:
Q conditions on the action, so which policy chose a does not matter, and the next action is
averaged under π exactly, so a one-step target needs no importance weight at all (lower
variance than importance-weighted TD for V). Q'_φ is a target network; no bootstrap after a
termination, the final observation's values after a truncation:
$$ y = r + \gamma\,(1 - \text{term})\sum_{a'}\pi_\theta(a'|s')\,Q'_\phi(s',a') \tag{6} $$
$$ L^Q = \tfrac12\,\mathbb E_D\left[(Q_\phi(s,a) - y)^2\right] \tag{7} $$
$$ \phi' \leftarrow \tau\phi + (1 - \tau)\phi' \tag{8} $$

Each iteration: one rollout of num_steps steps of num_envs envs with β of (1) into the
replay, then gradient_steps minibatch steps on (5) and (7) (separate Adam optimisers, each
network's gradient clipped to max_grad_norm) and a Polyak step (8) after each. Logged:
losses/policy_loss (the first term of (5)), losses/entropy, losses/qf1_loss (7),
losses/qf1_values (mean Q(s, a)), charts/avg_rho (mean ρ of the minibatch, after the clip),
charts/rho_clipfrac (the fraction clipped) and charts/learning_rate (the actor's), every 100
gradient steps.

Environments: gymnasium vector envs in their default NEXT_STEP autoreset mode. The step
that ends an episode returns its final observation as s', so (s, a, β(a|s), r, s', term) is
stored as it is and (6) bootstraps a truncation from it; the step after it is a reset step
(its action is ignored) and never enters the replay.

Defaults: the paper's experiments are linear and tabular, so the network settings are this
script's own, chosen on CartPole-v1: 64×64 tanh networks, ε = 0.05, ρ̄ = 10 (ACER's truncation
constant c), 4 gradient steps of batch 256 per rollout of 4 envs × 8 steps, Adam 3e-4 (actor)
and 1e-3 (critic) decayed linearly to 0, gradient norms clipped at 0.5, τ = 0.05. The replay
holds the last 10,000 transitions only: with all of a run's data the states of early, poor
policies dominate d^β and Q (seed 1, an earlier setting: 120 with every transition kept, 314
with the last 10,000); the fast target (τ = 0.05) lets values propagate over CartPole's
~100-step horizon within the budget; the clip and the decay keep a late spike of the critic's
error (the first failures after a long run of perfect episodes) from collapsing the policy.
Seeds 1-5 end at 500, 500, 500, 500 and 468 (mean of the last 20 episodes of β, 100,000
steps); Acrobot-v1 (seed 1): -114 (β), -79 (greedy).

Run:
    python algos/offpac.py                           # CartPole-v1
    python algos/offpac.py --env-id Acrobot-v1
    python algos/offpac.py --help
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
    """save the actor and the critics to runs/<run>/offpac.pt at the end (and on Ctrl-C)"""
    eval_checkpoint: Optional[str] = None
    """path of a saved model: evaluate it without learning, then exit"""
    eval_frequency: int = 10_000
    """evaluate the greedy policy on a separate env every this many env steps (0: never)"""
    eval_episodes: int = 10
    """episodes per evaluation (during training and for --eval-checkpoint)"""
    torch_threads: int = 1
    """CPU threads for torch (the 64x64 networks gain nothing from more)"""

    env_id: str = "CartPole-v1"
    """the gymnasium environment id (Discrete actions, vector observations)"""
    total_timesteps: int = 100_000
    """total environment steps over all envs"""
    num_envs: int = 4
    """number of parallel environments"""
    num_steps: int = 8
    """steps per environment per rollout; β's copy θ̃ of the actor in (1) is taken once per rollout"""
    buffer_size: int = 10_000
    """replay capacity (transitions): a small replay keeps β close to π and d^β close to π's states"""
    gamma: float = 0.99
    """discount factor γ in (6)"""
    tau: float = 0.05
    """target smoothing coefficient τ in (8)"""
    batch_size: int = 256
    """transitions per gradient step, sampled uniformly from the replay"""
    learning_starts: int = 1_000
    """env steps (of β) before the first gradient step"""
    gradient_steps: int = 4
    """gradient steps on (5) and (7) after each rollout"""
    policy_lr: float = 3e-4
    """Adam learning rate of the actor"""
    q_lr: float = 1e-3
    """Adam learning rate of the Q-network"""
    anneal_lr: bool = True
    """decay both learning rates linearly to 0"""
    epsilon: float = 0.05
    """weight ε of the uniform policy in the behaviour policy β of (1)"""
    rho_clip: float = 10.0
    """clip ρ̄ of the importance weight π/β in (3)"""
    ent_coef: float = 0.01
    """entropy coefficient c_e in (5)"""
    max_grad_norm: float = 0.5
    """gradient-norm clipping, for the actor and the Q-network each"""


# The valid range of every numeric Arg, checked by check_args before anything is written:
# "[" and "]" include an end, "(" and ")" exclude it. tests/test_args.py tries a value
# outside each range and NaN on every numeric field of Args, so a new field needs a line here.
ARG_RANGES = {
    "seed": "[0, 4294967295]",  # what random, numpy and torch all accept
    "eval_frequency": "[0, inf)",
    "eval_episodes": "[1, inf)",
    "torch_threads": "[1, 1024]",
    "total_timesteps": "[1, inf)",
    "num_envs": "[1, inf)",
    "num_steps": "[1, inf)",
    "buffer_size": "[1, inf)",
    "gamma": "[0, 1]",
    "tau": "(0, 1]",
    "batch_size": "[1, inf)",
    "learning_starts": "[0, inf)",
    "gradient_steps": "[1, inf)",
    "policy_lr": "(0, inf)",
    "q_lr": "(0, inf)",
    "epsilon": "[0, 1]",  # 0: β is the lagged π alone; 1: uniform random behaviour
    "rho_clip": "(0, inf)",
    "ent_coef": "[0, inf)",
    "max_grad_norm": "(0, inf)",
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
        fail(f"{env_id} is an Atari game (pixel observations); offpac.py is for vector observations: "
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
        fail(f"{env_id} has continuous (Box) actions; offpac.py is for Discrete actions: use algos/sac.py")
    if not isinstance(act_space, gym.spaces.Discrete):
        fail(f"{env_id} has {act_space} actions; offpac.py needs a Discrete action space")
    if not isinstance(obs_space, gym.spaces.Box) or len(obs_space.shape) != 1:
        fail(f"{env_id} has observations {obs_space}; offpac.py needs flat vectors")


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


def behaviour_probs(logits: np.ndarray, epsilon: float) -> np.ndarray:
    """Equation (1): β(·|s) = (1 − ε) softmax(logits) + ε/|A| for a batch of the lagged actor's logits."""
    z = np.exp(logits - logits.max(-1, keepdims=True))
    return (1.0 - epsilon) * z / z.sum(-1, keepdims=True) + epsilon / logits.shape[-1]  # (1)


def importance_weights(log_prob, behaviour_prob, rho_clip: float):
    """Equation (3): ρ = min(π(a|s)/β(a|s), ρ̄) from log π(a|s) and the stored β(a|s) (torch tensors)."""
    return torch.clamp(log_prob.exp() / behaviour_prob, max=rho_clip)  # (3)


def advantages(q_values, probs, actions):
    """Equation (4): A(s, a) = Q(s, a) − Σ_b π(b|s) Q(s, b), from Q(s, ·) and π(·|s) ([B, |A|] tensors)."""
    q_taken = q_values.gather(-1, actions.unsqueeze(-1)).squeeze(-1)
    return q_taken - (probs * q_values).sum(-1)  # (4)


def policy_gradient_loss(log_prob, rho, advantage):
    """The first term of (5), −mean(ρ A log π(a|s)) with ρ and A held constant: its gradient is the
    estimate (2) of ∇J, with the clip (3) and the baseline (4)."""
    return -(rho.detach() * advantage.detach() * log_prob).mean()  # (2), (5)


def expected_sarsa_target(rewards, terminations, next_probs, next_q, gamma: float):
    """Equation (6): y = r + γ(1 − term) Σ_a' π(a'|s') Q'(s', a'); NumPy arrays or torch tensors.

    s' is the observation the step returned, the final one when the episode ended there, so a
    truncation bootstraps from it and a termination adds nothing.
    """
    return rewards + gamma * (1.0 - terminations) * (next_probs * next_q).sum(-1)  # (6)


@torch.no_grad()
def polyak_update(target: nn.Module, source: nn.Module, tau: float):
    """Equation (8): θ' ← τθ + (1 − τ)θ' for every parameter."""
    for t, s in zip(target.parameters(), source.parameters()):
        t.lerp_(s, tau)  # (8)


def numpy_mlp(net: nn.Sequential):
    """A NumPy copy of an MLP of Linear and Tanh layers, with its current weights.

    Used to act one step at a time during a rollout: on a handful of observations torch's
    per-call overhead costs more than the arithmetic. It is taken once per rollout and is the
    lagged copy π_θ̃ of β in (1); the log-probabilities that the losses need come from torch
    passes over minibatches of the replay.
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


def mlp(obs_dim: int, out_dim: int, out_std: float):
    return nn.Sequential(
        layer_init(nn.Linear(obs_dim, 64)), nn.Tanh(),
        layer_init(nn.Linear(64, 64)), nn.Tanh(),
        layer_init(nn.Linear(64, out_dim), std=out_std),
    )


class Actor(nn.Module):
    """π_θ(a|s): a categorical distribution over the logits of an MLP."""

    def __init__(self, obs_dim: int, n_actions: int):
        super().__init__()
        self.logits = mlp(obs_dim, n_actions, out_std=0.01)

    def forward(self, obs):
        """log π(·|s) for a batch: [B, |A|]."""
        return self.logits(obs).log_softmax(-1)


class QNetwork(nn.Module):
    """Q_φ(s, ·): one output per action."""

    def __init__(self, obs_dim: int, n_actions: int):
        super().__init__()
        self.q = mlp(obs_dim, n_actions, out_std=1.0)

    def forward(self, obs):
        return self.q(obs)


class ReplayBuffer:
    """Uniform replay of (s, a, β(a|s), r, s', term) in preallocated NumPy arrays."""

    def __init__(self, capacity: int, obs_dim: int, rng: np.random.Generator):
        self.obs = np.zeros((capacity, obs_dim), dtype=np.float32)
        self.actions = np.zeros(capacity, dtype=np.int64)
        self.behaviour_probs = np.zeros(capacity, dtype=np.float32)
        self.rewards = np.zeros(capacity, dtype=np.float32)
        self.next_obs = np.zeros((capacity, obs_dim), dtype=np.float32)
        self.terminations = np.zeros(capacity, dtype=np.float32)
        self.capacity, self.pos, self.size, self.rng = capacity, 0, 0, rng

    @staticmethod
    def nbytes(capacity: int, obs_dim: int) -> int:
        """The memory the arrays above take: float32 s, s', β(a|s), r, term and an int64 a per transition."""
        return capacity * (4 * (2 * obs_dim + 3) + 8)

    def add(self, obs, actions, behaviour_probs, rewards, next_obs, terminations):
        """Store a batch of rows (one per env that made a real transition)."""
        idx = (self.pos + np.arange(len(obs))) % self.capacity
        self.obs[idx], self.actions[idx], self.behaviour_probs[idx] = obs, actions, behaviour_probs
        self.rewards[idx], self.next_obs[idx], self.terminations[idx] = rewards, next_obs, terminations
        self.pos = (self.pos + len(obs)) % self.capacity
        self.size = min(self.size + len(obs), self.capacity)

    def sample(self, batch_size: int, device):
        idx = self.rng.integers(0, self.size, batch_size)
        return [torch.as_tensor(x[idx], device=device) for x in
                (self.obs, self.actions, self.behaviour_probs, self.rewards, self.next_obs, self.terminations)]


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
    if saved_by != "offpac":
        fail(f"{args.eval_checkpoint} was saved by {saved_by or 'another program'}, not offpac.py: "
             "evaluate it with the script that saved it")
    args.env_id = ckpt["args"]["env_id"]
    check_env(args.env_id, args.capture_video)
    run_name = f"{args.env_id.replace('/', '-')}__{args.exp_name}-eval__{args.seed}__{int(time.time())}"
    device, run_dir, writer = setup(args, run_name)
    env = make_env(args.env_id, 0, args.capture_video, run_dir)()
    actor = Actor(env.observation_space.shape[0], env.action_space.n).to(device)
    actor.load_state_dict(ckpt["actor"])
    logits = numpy_mlp(actor.logits)
    returns = evaluate_policy(lambda o: int(logits(o).argmax()), env, args.eval_episodes, args.seed)
    for i, r in enumerate(returns):
        writer.add_scalar("eval/episodic_return", r, i + 1)
    env.close()
    writer.close()
    summary = dict(env_id=args.env_id, algorithm="offpac", mode="eval", seed=args.seed, checkpoint=args.eval_checkpoint,
                   episodes=len(returns), mean_return=float(np.mean(returns)), std_return=float(np.std(returns)),
                   stopped=None, versions=versions(), run_dir=run_dir)
    print(f"eval {args.env_id}: mean return {summary['mean_return']:.2f} ± {summary['std_return']:.2f} "
          f"over {len(returns)} episodes")
    return write_summary(run_dir, summary)


def train(args: Args) -> dict:
    check_args(args)
    if args.eval_checkpoint:
        return evaluate(args)
    if args.learning_starts >= args.total_timesteps:
        fail(f"--learning-starts {args.learning_starts} is not below --total-timesteps {args.total_timesteps}: "
             "nothing would be learned; start learning earlier or raise the budget")
    if args.batch_size > args.buffer_size:
        fail(f"--batch-size {args.batch_size} is larger than --buffer-size {args.buffer_size}; "
             "raise the buffer or shrink the batch")
    rollout_size = args.num_envs * args.num_steps
    num_iterations = args.total_timesteps // rollout_size
    if num_iterations == 0:
        fail(f"--total-timesteps {args.total_timesteps} is less than one rollout of {rollout_size} "
             "(--num-envs x --num-steps); raise it or shrink the rollout")
    check_env(args.env_id, args.capture_video)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # check_env has refused what is wrong: this reads the sizes only
        probe = gym.make(args.env_id)
    obs_dim, n_actions = probe.observation_space.shape[0], probe.action_space.n
    probe.close()
    capacity = min(args.buffer_size, args.total_timesteps)  # a run never stores more transitions than it steps
    check_memory(ReplayBuffer.nbytes(capacity, obs_dim),
                 f"--buffer-size {args.buffer_size:,} (a replay of {capacity:,} transitions)")

    run_name = f"{args.env_id.replace('/', '-')}__{args.exp_name}__{args.seed}__{int(time.time())}"
    device, run_dir, writer = setup(args, run_name)
    envs = gym.vector.SyncVectorEnv([make_env(args.env_id, i, args.capture_video, run_dir)
                                     for i in range(args.num_envs)])
    envs.action_space.seed(args.seed)
    eval_env = make_env(args.env_id, -1, False, run_dir)() if args.eval_frequency else None
    actor = Actor(obs_dim, n_actions).to(device)
    qf, qf_target = QNetwork(obs_dim, n_actions).to(device), QNetwork(obs_dim, n_actions).to(device)
    qf_target.load_state_dict(qf.state_dict())
    saved = {"actor": actor, "qf": qf, "qf_target": qf_target}  # what --save-model writes
    fused = True if device.type in ("cpu", "cuda") else None
    actor_optimizer = torch.optim.Adam(actor.parameters(), lr=args.policy_lr, fused=fused)
    q_optimizer = torch.optim.Adam(qf.parameters(), lr=args.q_lr, fused=fused)
    rng = np.random.default_rng(args.seed)
    rb = ReplayBuffer(capacity, obs_dim, rng)

    T, N, B = args.num_steps, args.num_envs, args.batch_size
    global_step, gradient_step, start_time = 0, 0, time.time()
    next_progress, next_eval = start_time + 1.0, args.eval_frequency
    recent_returns = deque(maxlen=20)
    episodes, last_eval = 0, None
    # saved instead of the models if training turns non-finite
    last_finite = copy.deepcopy({name: m.state_dict() for name, m in saved.items()})
    obs, _ = envs.reset(seed=args.seed)
    obs = obs.astype(np.float32)
    reset_step = np.zeros(N, dtype=bool)  # this step of env i is the reset step after an episode end
    rows = np.arange(N)
    stopped = stop_reason = None
    stop_signals = []  # Ctrl-C and SIGTERM, recorded here and raised at the next env step
    previous_handlers = {s: signal.signal(s, lambda signum, frame: stop_signals.append(signum))
                         for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        for iteration in range(1, num_iterations + 1):
            if args.anneal_lr:
                for optimizer, lr in ((actor_optimizer, args.policy_lr), (q_optimizer, args.q_lr)):
                    optimizer.param_groups[0]["lr"] = lr * (1.0 - (iteration - 1.0) / num_iterations)
            # β of (1) for this rollout: a frozen NumPy copy θ̃ of the actor, mixed with ε-uniform. a ~ β in two
            # stages: with probability ε a uniform action, else a ~ π_θ̃ by the Gumbel-max trick (argmax(logits
            # + g), g ~ Gumbel(0, 1), is a sample of the softmax distribution); noise from the seeded generator.
            logits_fn = numpy_mlp(actor.logits)
            gumbel = rng.gumbel(size=(T, N, n_actions)).astype(np.float32)
            explore = rng.random((T, N)) < args.epsilon
            uniform = rng.integers(0, n_actions, (T, N))
            for step in range(T):
                raise_if_stopped(stop_signals)
                logits = logits_fn(obs)
                actions = np.where(explore[step], uniform[step], (logits + gumbel[step]).argmax(-1))
                beta = behaviour_probs(logits.astype(np.float64), args.epsilon)[rows, actions]  # β(a|s) of (1)
                next_obs, rewards, term, trunc, infos = envs.step(actions)
                next_obs = next_obs.astype(np.float32)
                global_step += N
                keep = ~reset_step  # NEXT_STEP autoreset: a reset step is no transition
                if keep.all():
                    rb.add(obs, actions, beta, rewards, next_obs, term)
                elif keep.any():
                    rb.add(obs[keep], actions[keep], beta[keep], rewards[keep], next_obs[keep], term[keep])
                reset_step = term | trunc
                obs = next_obs
                if "episode" in infos:
                    for i in np.flatnonzero(infos["_episode"]):
                        r, length = float(infos["episode"]["r"][i]), int(infos["episode"]["l"][i])
                        recent_returns.append(r)
                        episodes += 1
                        writer.add_scalar("charts/episodic_return", r, global_step)
                        writer.add_scalar("charts/episodic_length", length, global_step)

            if global_step > args.learning_starts and rb.size:
                for _ in range(args.gradient_steps):
                    b_obs, b_actions, b_behaviour, b_rewards, b_next_obs, b_terms = rb.sample(B, device)
                    with torch.no_grad():
                        y = expected_sarsa_target(b_rewards, b_terms, actor(b_next_obs).exp(), qf_target(b_next_obs),
                                                  args.gamma)  # (6)
                    logp = actor(b_obs)
                    probs = logp.exp()
                    q_values = qf(b_obs)
                    qf1_values = q_values.gather(-1, b_actions.unsqueeze(-1)).squeeze(-1)
                    qf1_loss = 0.5 * ((qf1_values - y) ** 2).mean()  # (7)

                    log_prob = logp.gather(-1, b_actions.unsqueeze(-1)).squeeze(-1)
                    rho = importance_weights(log_prob.detach(), b_behaviour, args.rho_clip)  # (3)
                    advantage = advantages(q_values.detach(), probs.detach(), b_actions)  # (4)
                    pg_loss = policy_gradient_loss(log_prob, rho, advantage)  # (2), (5)
                    entropy = -(probs * logp).sum(-1).mean()
                    actor_loss = pg_loss - args.ent_coef * entropy  # (5)

                    actor_optimizer.zero_grad(set_to_none=True)
                    q_optimizer.zero_grad(set_to_none=True)
                    (actor_loss + qf1_loss).backward()  # the two losses share no parameters
                    nn.utils.clip_grad_norm_(actor.parameters(), args.max_grad_norm, foreach=True)
                    nn.utils.clip_grad_norm_(qf.parameters(), args.max_grad_norm, foreach=True)
                    actor_optimizer.step()
                    q_optimizer.step()
                    polyak_update(qf_target, qf, args.tau)  # (8)
                    gradient_step += 1

                    if gradient_step % 100 == 0:  # reading losses syncs with the device: not every step
                        ratio = log_prob.detach().exp() / b_behaviour
                        losses = {"losses/policy_loss": pg_loss.item(), "losses/entropy": entropy.item(),
                                  "losses/qf1_loss": qf1_loss.item(), "losses/qf1_values": qf1_values.mean().item(),
                                  "charts/avg_rho": rho.mean().item(),
                                  "charts/rho_clipfrac": (ratio > args.rho_clip).float().mean().item()}
                        check_finite(global_step, losses, *saved.values())
                        last_finite = copy.deepcopy({name: m.state_dict() for name, m in saved.items()})
                        for key, value in losses.items():
                            writer.add_scalar(key, value, global_step)
                        writer.add_scalar("charts/learning_rate", actor_optimizer.param_groups[0]["lr"], global_step)
                        writer.add_scalar("charts/SPS", int(global_step / (time.time() - start_time)), global_step)

            if args.eval_frequency and global_step >= next_eval:
                greedy = numpy_mlp(actor.logits)
                eval_returns = evaluate_policy(lambda o: int(greedy(o).argmax()), eval_env, args.eval_episodes,
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
        path = os.path.join(run_dir, "offpac.pt")
        torch.save({"algorithm": "offpac", "args": asdict(args), **{name: m.state_dict() for name, m in saved.items()}},
                   path)
        print(f"model saved to {path}")
    envs.close()
    if eval_env is not None:
        eval_env.close()
    writer.close()
    wall = time.time() - start_time
    eval_step, eval_return = last_eval or (None, None)
    summary = dict(env_id=args.env_id, algorithm="offpac", exp_name=args.exp_name, seed=args.seed,
                   global_step=global_step, wall_seconds=wall, SPS=global_step / wall,
                   mean_return=float(np.mean(recent_returns)) if recent_returns else None,
                   episodes_in_mean=len(recent_returns), episodes=episodes,
                   eval_step=eval_step, eval_return=eval_return,
                   stopped=stopped, stop_reason=stop_reason, versions=versions(), run_dir=run_dir)
    return write_summary(run_dir, summary)


if __name__ == "__main__":
    sys.exit(EXIT_CODES[train(parse_args())["stopped"]])
