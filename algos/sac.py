r"""SAC: Soft Actor-Critic for continuous (Box) actions, twin soft Q-functions, a
tanh-squashed Gaussian policy and (with --autotune) a learned temperature α.

Haarnoja, Zhou, Abbeel, Levine (2018), "Soft Actor-Critic: Off-Policy Maximum Entropy
Deep Reinforcement Learning with a Stochastic Actor", arXiv:1801.01290. Twin critics,
the automatic temperature and this loop: Haarnoja, Zhou, Hartikainen, Tucker, Ha, Tan,
Kumar, Zhu, Gupta, Abbeel, Levine (2018), "Soft Actor-Critic Algorithms and
Applications", arXiv:1812.05905.

SAC maximises reward plus entropy, E[Σ_t γ^t (r_t + α H(π(·|s_t)))], off-policy from a
replay buffer D. The policy samples u from a Gaussian and squashes it into the env's
bounds (scale and bias from the action space, never assumed ±1):
$$ u = \mu_\phi(s) + \sigma_\phi(s)\odot\epsilon,\; \epsilon \sim \mathcal N(0, I), \qquad
   a = \text{scale}\odot\tanh(u) + \text{bias} \tag{1} $$

The log-std head is bounded by tanh rescaling (CleanRL's form, log σ ∈ [-5, 2]):
$$ \log\sigma = \log\sigma_{min} + \tfrac12(\log\sigma_{max} - \log\sigma_{min})(\tanh(x) + 1) \tag{2} $$

Log-probability by change of variables, with the stable form of log(1 - tanh²u):
$$ \log\pi(a|s) = \sum_j \left[\log\mathcal N(u_j; \mu_j, \sigma_j) - \log\text{scale}_j
   - 2\left(\log 2 - u_j - \text{softplus}(-2u_j)\right)\right] \tag{3} $$

Soft target, a' ~ π(·|s') freshly sampled, Q'_j the target networks; bootstrap through a
truncation, not through a termination:
$$ y = r + \gamma(1 - \text{term})\left(\min_{j=1,2} Q'_j(s', a') - \alpha\log\pi(a'|s')\right) \tag{4} $$

Critic loss (the papers' factor ½ dropped, as in CleanRL; under Adam it only rescales ε):
$$ J_Q = \sum_{j=1,2} \mathbb E_{(s,a,r,s') \sim D}\left[(Q_j(s, a) - y)^2\right] \tag{5} $$

Actor loss, ã ~ π(·|s) by (1) so the gradient flows through the sample (reparameterisation),
the critics held fixed:
$$ J_\pi = \mathbb E_{s \sim D}\left[\alpha\log\pi(\tilde a|s) - \min_{j=1,2} Q_j(s, \tilde a)\right] \tag{6} $$

Temperature loss (1812.05905, eq. 18), target entropy H̄ = -target_entropy_scale · |A|:
$$ J(\alpha) = \mathbb E_{s \sim D, a \sim \pi}\left[-\alpha\log\pi(a|s) - \alpha\bar H\right] \tag{7} $$

Target networks follow by Polyak averaging:
$$ \bar\theta \leftarrow \tau\theta + (1 - \tau)\bar\theta \tag{8} $$

losses/entropy logs the policy's entropy estimate -E[log π(ã|s)] of the actor step's
samples, the figure that (7) drives towards H̄. Evaluation (--eval-frequency, and
--eval-checkpoint) acts with the deterministic action a = scale ⊙ tanh(μ(s)) + bias.

Environments: gymnasium vector envs in their default NEXT_STEP autoreset mode. The step
that ends an episode returns its final observation as next_obs, so (s, a, r, s', term) is
stored as it is; the step after it is a reset step (its action is ignored and it returns
the first observation of the next episode) and is not stored.

Updates: after learning_starts env steps (uniform random actions until then), one critic
step per vector-env step; every policy_frequency steps, policy_frequency actor (and α) steps
(CleanRL's delayed schedule: on average one actor step per env step).

Run:
    python algos/sac.py                                  # Pendulum-v1
    python algos/sac.py --env-id Hopper-v4 --total-timesteps 1000000
    python algos/sac.py --torch-threads 2                # faster on an otherwise idle 2-core CPU
    python algos/sac.py --help

Defaults are CleanRL's sac_continuous_action.py: 256×256 ReLU networks, batch 256,
buffer 1e6, τ = 0.005, policy lr 3e-4, Q lr 1e-3, learning starts 5e3, autotuned α starting at
α = 1 (log α = 0) as in CleanRL and the authors' code, learned at the policy's rate 3e-4 (the
authors' single rate; CleanRL uses the Q rate). Starting at 1 or at 0.2 measured the same here
(Pendulum-v1, 15k steps, seeds 1-3: -140.4 and -137.2; Hopper-v4, 60k steps, seeds 1-2: 1,359
and 423 against 561 and 1,250), so the file follows the references. --alpha is the fixed α of
--no-autotune (CleanRL's 0.2).
Every 10,000 steps the deterministic policy is evaluated for 10 episodes on a separate env.
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
import torch.nn.functional as F
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
    """save the actor, the critics and α to runs/<run>/sac.pt at the end (and on Ctrl-C)"""
    eval_checkpoint: Optional[str] = None
    """path of a saved model: evaluate it (deterministic action) without learning, then exit"""
    eval_frequency: int = 10_000
    """evaluate the deterministic policy on a separate env every this many env steps (0: never)"""
    eval_episodes: int = 10
    """episodes per evaluation (during training and for --eval-checkpoint)"""
    torch_threads: int = 1
    """CPU threads for torch (more only pay on cores that no other process uses)"""

    env_id: str = "Pendulum-v1"
    """the gymnasium environment id (Box actions, vector observations)"""
    total_timesteps: int = 1_000_000
    """total environment steps over all envs"""
    num_envs: int = 1
    """number of parallel environments"""
    buffer_size: int = 1_000_000
    """replay buffer capacity (transitions)"""
    gamma: float = 0.99
    """discount factor γ in (4)"""
    tau: float = 0.005
    """target smoothing coefficient τ in (8)"""
    batch_size: int = 256
    """transitions per gradient step, sampled uniformly from the buffer"""
    learning_starts: int = 5_000
    """env steps of uniform random actions before learning starts"""
    policy_lr: float = 3e-4
    """Adam learning rate of the policy (and of α)"""
    q_lr: float = 1e-3
    """Adam learning rate of the twin Q-networks"""
    policy_frequency: int = 2
    """every this many env steps, take this many actor steps (delayed, as in TD3/CleanRL)"""
    target_network_frequency: int = 1
    """Polyak-update (8) the target networks every this many env steps"""
    alpha: float = 0.2
    """the fixed entropy temperature α with --no-autotune (--autotune starts at α = 1)"""
    autotune: bool = True
    """learn α by (7) against the target entropy"""
    target_entropy_scale: float = 1.0
    """target entropy H̄ in (7) is -target_entropy_scale × (action dimensions)"""


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
    "buffer_size": "[1, inf)",
    "gamma": "[0, 1]",
    "tau": "(0, 1]",
    "batch_size": "[1, inf)",
    "learning_starts": "[0, inf)",
    "policy_lr": "(0, inf)",
    "q_lr": "(0, inf)",
    "policy_frequency": "[1, inf)",
    "target_network_frequency": "[1, inf)",
    "alpha": "[0, inf)",  # 0 is plain (unregularised) RL with --no-autotune
    "target_entropy_scale": "[0, inf)",  # H̄ = -scale·|A| <= 0, the usual targets
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
        fail(f"{env_id} is an Atari game (pixel observations); sac.py is for vector observations: "
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
        fail(f"{env_id} has Discrete actions; sac.py is for continuous (Box) actions: use algos/ppo.py")
    if not isinstance(act_space, gym.spaces.Box) or len(act_space.shape) != 1:
        fail(f"{env_id} has {act_space} actions; sac.py needs a flat Box action space")
    if not np.all(np.isfinite(act_space.low)) or not np.all(np.isfinite(act_space.high)):
        fail(f"{env_id} has unbounded actions {act_space}; the tanh policy of sac.py needs finite bounds")
    if not isinstance(obs_space, gym.spaces.Box) or len(obs_space.shape) != 1:
        fail(f"{env_id} has observations {obs_space}; sac.py needs flat vectors")


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


LOG_STD_MIN, LOG_STD_MAX = -5.0, 2.0  # bounds of log σ in (2)


def squash_log_std(x):
    """Equation (2): an unbounded network output to log σ in [LOG_STD_MIN, LOG_STD_MAX]."""
    return LOG_STD_MIN + 0.5 * (LOG_STD_MAX - LOG_STD_MIN) * (torch.tanh(x) + 1)  # (2)


def tanh_gaussian_log_prob(u, mean, log_std, action_scale):
    """Equation (3): log π(a|s) of a = scale·tanh(u) + bias with u ~ N(mean, exp(log_std)²),
    summed over the action dimensions. log(1 - tanh²u) = 2(log 2 - u - softplus(-2u)) is exact
    and stays finite where tanh(u) rounds to ±1."""
    gaussian = -0.5 * ((u - mean) / log_std.exp()) ** 2 - log_std - 0.5 * math.log(2 * math.pi)
    log_det = torch.log(action_scale) + 2 * (math.log(2) - u - F.softplus(-2 * u))
    return (gaussian - log_det).sum(-1)  # (3)


def soft_q_target(rewards, terminations, next_q1, next_q2, next_log_prob, alpha, gamma):
    """Equation (4): the soft Bellman target y from the target critics' values at (s', a') and
    log π(a'|s'); terminations (1.0 / 0.0) cut the bootstrap, truncations do not."""
    return rewards + gamma * (1.0 - terminations) * (torch.min(next_q1, next_q2) - alpha * next_log_prob)  # (4)


@torch.no_grad()
def polyak_update(target: nn.Module, source: nn.Module, tau: float):
    """Equation (8): θ' ← τθ + (1 − τ)θ' for every parameter."""
    for t, s in zip(target.parameters(), source.parameters()):
        t.lerp_(s, tau)  # (8)


class Actor(nn.Module):
    """Tanh-squashed Gaussian policy (1) with a state-dependent log σ (2)."""

    def __init__(self, obs_dim: int, act_dim: int, low: np.ndarray, high: np.ndarray):
        super().__init__()
        self.trunk = nn.Sequential(nn.Linear(obs_dim, 256), nn.ReLU(inplace=True),
                                   nn.Linear(256, 256), nn.ReLU(inplace=True))
        self.head = nn.Linear(256, 2 * act_dim)  # mean and log σ in one matmul
        # the env's bounds: a = scale·tanh(u) + bias covers [low, high] exactly
        self.register_buffer("action_scale", torch.as_tensor((high - low) / 2.0, dtype=torch.float32))
        self.register_buffer("action_bias", torch.as_tensor((high + low) / 2.0, dtype=torch.float32))

    def forward(self, obs):
        mean, x = self.head(self.trunk(obs)).chunk(2, -1)
        return mean, squash_log_std(x)

    def sample(self, obs):
        """a ~ π(·|s) by (1), reparameterised, and log π(a|s) by (3)."""
        mean, log_std = self(obs)
        u = mean + log_std.exp() * torch.randn_like(mean)  # (1)
        action = self.action_scale * torch.tanh(u) + self.action_bias  # (1)
        return action, tanh_gaussian_log_prob(u, mean, log_std, self.action_scale)

    def deterministic(self, obs):
        """The evaluation action scale·tanh(μ(s)) + bias."""
        return self.action_scale * torch.tanh(self(obs)[0]) + self.action_bias

    @torch.inference_mode()
    def act(self, obs: np.ndarray) -> np.ndarray:
        """The evaluation action for one NumPy observation (evaluate_policy's `act`)."""
        obs = torch.as_tensor(obs, dtype=torch.float32, device=self.action_scale.device)
        return self.deterministic(obs).cpu().numpy()


class QNetwork(nn.Module):
    """Q(s, a): a 256×256 ReLU MLP of [s, a]."""

    def __init__(self, obs_dim: int, act_dim: int):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(obs_dim + act_dim, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(),
                                 nn.Linear(256, 1))

    def forward(self, obs, actions):
        """[B] values."""
        return self.net(torch.cat([obs, actions], -1)).squeeze(-1)


class ReplayBuffer:
    """Uniform replay of (s, a, r, s', term) in preallocated NumPy arrays."""

    def __init__(self, capacity: int, obs_dim: int, act_dim: int, rng: np.random.Generator):
        self.obs = np.zeros((capacity, obs_dim), dtype=np.float32)
        self.actions = np.zeros((capacity, act_dim), dtype=np.float32)
        self.rewards = np.zeros(capacity, dtype=np.float32)
        self.next_obs = np.zeros((capacity, obs_dim), dtype=np.float32)
        self.terminations = np.zeros(capacity, dtype=np.float32)
        self.capacity, self.pos, self.size, self.rng = capacity, 0, 0, rng

    @staticmethod
    def nbytes(capacity: int, obs_dim: int, act_dim: int) -> int:
        """The memory the arrays above take: float32 s, a, r, s', term per transition."""
        return capacity * 4 * (2 * obs_dim + act_dim + 2)

    def add(self, obs, actions, rewards, next_obs, terminations):
        idx = (self.pos + np.arange(len(obs))) % self.capacity
        self.obs[idx], self.actions[idx], self.rewards[idx] = obs, actions, rewards
        self.next_obs[idx], self.terminations[idx] = next_obs, terminations
        self.pos = (self.pos + len(obs)) % self.capacity
        self.size = min(self.size + len(obs), self.capacity)

    def sample(self, batch_size: int, device):
        idx = self.rng.integers(0, self.size, batch_size)
        return [torch.as_tensor(x[idx], device=device)
                for x in (self.obs, self.actions, self.rewards, self.next_obs, self.terminations)]


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
    """--eval-checkpoint: act with the deterministic action scale·tanh(μ(s)) + bias, no learning."""
    if not os.path.isfile(args.eval_checkpoint):
        fail(f"no checkpoint at {args.eval_checkpoint}")
    try:
        ckpt = torch.load(args.eval_checkpoint, map_location="cpu", weights_only=True)
    except Exception as e:
        fail(f"cannot read {args.eval_checkpoint} as a checkpoint ({type(e).__name__})")
    saved_by = ckpt.get("algorithm") if isinstance(ckpt, dict) else None
    if saved_by != "sac":
        fail(f"{args.eval_checkpoint} was saved by {saved_by or 'another program'}, not sac.py: "
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
    summary = dict(env_id=args.env_id, algorithm="sac", mode="eval", seed=args.seed, checkpoint=args.eval_checkpoint,
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
    num_steps = args.total_timesteps // args.num_envs
    if num_steps == 0:
        fail(f"--total-timesteps {args.total_timesteps} is less than one step of --num-envs {args.num_envs}; "
             "raise it")
    check_env(args.env_id, args.capture_video)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # check_env has refused what is wrong: this reads the sizes only
        probe = gym.make(args.env_id)
    obs_dim, act_dim = probe.observation_space.shape[0], probe.action_space.shape[0]
    probe.close()
    capacity = min(args.buffer_size, args.total_timesteps)  # a run never stores more transitions than it steps
    check_memory(ReplayBuffer.nbytes(capacity, obs_dim, act_dim),
                 f"--buffer-size {args.buffer_size:,} (a replay of {capacity:,} transitions)")

    run_name = f"{args.env_id.replace('/', '-')}__{args.exp_name}__{args.seed}__{int(time.time())}"
    device, run_dir, writer = setup(args, run_name)
    if device.type == "cpu":
        torch.set_flush_denormal(True)  # tiny gradients and Adam moments turn denormal: ~20% slower without
    envs = gym.vector.SyncVectorEnv([make_env(args.env_id, i, args.capture_video, run_dir)
                                     for i in range(args.num_envs)])
    envs.action_space.seed(args.seed)
    eval_env = make_env(args.env_id, -1, False, run_dir)() if args.eval_frequency else None
    space = envs.single_action_space
    actor = Actor(obs_dim, act_dim, space.low, space.high).to(device)
    qf1, qf2 = QNetwork(obs_dim, act_dim).to(device), QNetwork(obs_dim, act_dim).to(device)
    qf1_target, qf2_target = QNetwork(obs_dim, act_dim).to(device), QNetwork(obs_dim, act_dim).to(device)
    qf1_target.load_state_dict(qf1.state_dict())
    qf2_target.load_state_dict(qf2.state_dict())
    saved = {"actor": actor, "qf1": qf1, "qf2": qf2, "qf1_target": qf1_target,  # and the α used: --save-model
             "qf2_target": qf2_target}
    fused = True if device.type in ("cpu", "cuda") else None
    q_optimizer = torch.optim.Adam([*qf1.parameters(), *qf2.parameters()], lr=args.q_lr, fused=fused)
    actor_optimizer = torch.optim.Adam(actor.parameters(), lr=args.policy_lr, fused=fused)
    if args.autotune:  # α = exp(log α): we optimise log α (as CleanRL), which keeps α positive; (7) is unchanged
        log_alpha = torch.zeros((), device=device, requires_grad=True)  # α starts at 1, as the references
        a_optimizer = torch.optim.Adam([log_alpha], lr=args.policy_lr, fused=fused)
        alpha = log_alpha.detach().exp()
    else:
        alpha = torch.tensor(args.alpha, device=device)
    target_entropy = -args.target_entropy_scale * act_dim  # H̄ of (7)
    rng = np.random.default_rng(args.seed)
    rb = ReplayBuffer(capacity, obs_dim, act_dim, rng)

    N = args.num_envs
    global_step, start_time = 0, time.time()
    next_progress, next_eval = start_time + 1.0, args.eval_frequency
    recent_returns = deque(maxlen=20)
    episodes, last_eval = 0, None
    # saved instead of the model if training turns non-finite
    last_finite, last_finite_alpha = copy.deepcopy({name: m.state_dict() for name, m in saved.items()}), alpha
    obs, _ = envs.reset(seed=args.seed)
    obs = obs.astype(np.float32)
    reset_step = np.zeros(N, dtype=bool)  # this step of env i is the reset step after an episode end
    actor_loss = alpha_loss = log_prob = None
    stopped = stop_reason = None
    stop_signals = []  # Ctrl-C and SIGTERM, recorded here and raised at the next env step
    previous_handlers = {s: signal.signal(s, lambda signum, frame: stop_signals.append(signum))
                         for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        for step in range(1, num_steps + 1):
            raise_if_stopped(stop_signals)
            if global_step < args.learning_starts:
                actions = envs.action_space.sample().astype(np.float32)
            else:
                with torch.inference_mode():
                    actions = actor.sample(torch.as_tensor(obs, device=device))[0].cpu().numpy()
            next_obs, rewards, term, trunc, infos = envs.step(actions)
            next_obs = next_obs.astype(np.float32)
            global_step += N
            keep = ~reset_step  # NEXT_STEP autoreset: a reset step is no transition
            if keep.all():
                rb.add(obs, actions, rewards, next_obs, term)
            elif keep.any():
                rb.add(obs[keep], actions[keep], rewards[keep], next_obs[keep], term[keep])
            reset_step = term | trunc
            obs = next_obs
            if "episode" in infos:
                for i in np.flatnonzero(infos["_episode"]):
                    r, length = float(infos["episode"]["r"][i]), int(infos["episode"]["l"][i])
                    recent_returns.append(r)
                    episodes += 1
                    writer.add_scalar("charts/episodic_return", r, global_step)
                    writer.add_scalar("charts/episodic_length", length, global_step)

            if global_step > args.learning_starts:
                b_obs, b_actions, b_rewards, b_next_obs, b_terms = rb.sample(args.batch_size, device)
                with torch.no_grad():
                    next_actions, next_log_prob = actor.sample(b_next_obs)
                    y = soft_q_target(b_rewards, b_terms, qf1_target(b_next_obs, next_actions),
                                      qf2_target(b_next_obs, next_actions), next_log_prob, alpha, args.gamma)  # (4)
                qf1_values, qf2_values = qf1(b_obs, b_actions), qf2(b_obs, b_actions)
                qf1_loss, qf2_loss = ((qf1_values - y) ** 2).mean(), ((qf2_values - y) ** 2).mean()
                q_optimizer.zero_grad(set_to_none=True)
                (qf1_loss + qf2_loss).backward()  # (5)
                q_optimizer.step()

                if step % args.policy_frequency == 0:
                    for _ in range(args.policy_frequency):  # delayed, compensated: as many actor steps as skipped
                        pi, log_prob = actor.sample(b_obs)
                        # the critics held fixed: the gradient reaches the action, not their weights
                        qf1.requires_grad_(False)
                        qf2.requires_grad_(False)
                        actor_loss = (alpha * log_prob - torch.min(qf1(b_obs, pi), qf2(b_obs, pi))).mean()  # (6)
                        actor_optimizer.zero_grad(set_to_none=True)
                        actor_loss.backward()
                        qf1.requires_grad_(True)
                        qf2.requires_grad_(True)
                        actor_optimizer.step()
                        if args.autotune:  # log π of the sample just drawn, no second actor pass
                            alpha_loss = (-log_alpha.exp() * (log_prob.detach() + target_entropy)).mean()  # (7)
                            a_optimizer.zero_grad(set_to_none=True)
                            alpha_loss.backward()
                            a_optimizer.step()
                            alpha = log_alpha.detach().exp()

                if step % args.target_network_frequency == 0:
                    polyak_update(qf1_target, qf1, args.tau)  # (8)
                    polyak_update(qf2_target, qf2, args.tau)  # (8)

                if step % 100 == 0:  # reading losses syncs with the device: not every step
                    losses = {"losses/qf1_loss": qf1_loss.item(), "losses/qf2_loss": qf2_loss.item(),
                              "losses/qf1_values": qf1_values.mean().item(),
                              "losses/qf2_values": qf2_values.mean().item(), "losses/alpha": alpha.item()}
                    if actor_loss is not None:
                        losses["losses/actor_loss"] = actor_loss.item()
                        losses["losses/entropy"] = -log_prob.detach().mean().item()  # the estimate (7) tunes α by
                    if alpha_loss is not None:
                        losses["losses/alpha_loss"] = alpha_loss.item()
                    check_finite(global_step, losses, *saved.values())
                    last_finite = copy.deepcopy({name: m.state_dict() for name, m in saved.items()})
                    last_finite_alpha = alpha  # a new tensor after every step of (7), never changed in place
                    for key, value in losses.items():
                        writer.add_scalar(key, value, global_step)
                    writer.add_scalar("charts/SPS", int(global_step / (time.time() - start_time)), global_step)

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
        alpha = last_finite_alpha
    finally:
        for s, handler in previous_handlers.items():
            signal.signal(s, handler)
    if stopped:
        print(f"stopped: {stop_reason}", file=sys.stderr)

    if args.save_model:
        path = os.path.join(run_dir, "sac.pt")
        torch.save({"algorithm": "sac", "args": asdict(args), **{name: m.state_dict() for name, m in saved.items()},
                    "alpha": alpha.item()}, path)  # the α used: learned, or --alpha with --no-autotune
        print(f"model saved to {path}")
    envs.close()
    if eval_env is not None:
        eval_env.close()
    writer.close()
    wall = time.time() - start_time
    eval_step, eval_return = last_eval or (None, None)
    summary = dict(env_id=args.env_id, algorithm="sac", exp_name=args.exp_name, seed=args.seed, global_step=global_step,
                   wall_seconds=wall, SPS=global_step / wall,
                   mean_return=float(np.mean(recent_returns)) if recent_returns else None,
                   episodes_in_mean=len(recent_returns), episodes=episodes,
                   eval_step=eval_step, eval_return=eval_return,
                   stopped=stopped, stop_reason=stop_reason, versions=versions(), run_dir=run_dir)
    return write_summary(run_dir, summary)


if __name__ == "__main__":
    sys.exit(EXIT_CODES[train(parse_args())["stopped"]])
