r"""TD3: Twin Delayed Deep Deterministic policy gradient, continuous actions.

Fujimoto, van Hoof, Meger (2018), "Addressing Function Approximation Error in
Actor-Critic Methods", arXiv:1802.09477. It is DDPG (Lillicrap et al. 2015,
arXiv:1509.02971) with three changes against the overestimation of Q: clipped double-Q
targets from twin critics, target policy smoothing, and delayed actor updates.

Deterministic actor, tanh output scaled to the env's bounds [low, high] (scale = (high -
low)/2, bias = (high + low)/2, per action dimension; never assumed to be ±1):
$$ \mu_\theta(s) = \text{scale} \odot \tanh(f_\theta(s)) + \text{bias} \tag{1} $$

Exploration: Gaussian noise on the actor's action, scaled to the action range:
$$ a_t = \text{clip}(\mu_\theta(s_t) + \epsilon, \text{low}, \text{high}), \quad
   \epsilon \sim \mathcal N(0, (\sigma_{explore}\,\text{scale})^2) \tag{2} $$

Target policy smoothing: the target actor μ' with clipped noise, per sample, with
σ = policy_noise · scale and c = noise_clip · scale, clamped to the bounds again:
$$ \tilde a' = \text{clip}\left(\mu_{\theta'}(s') + \text{clip}(\epsilon, -c, c), \text{low}, \text{high}\right),
   \quad \epsilon \sim \mathcal N(0, \sigma^2) \tag{3} $$

Clipped double-Q target from the twin target critics Q'_1, Q'_2 (no bootstrap past a
termination; a truncation bootstraps from the final observation):
$$ y = r + \gamma (1 - \text{term}) \min_{j=1,2} Q_{\phi'_j}(s', \tilde a') \tag{4} $$

Critic losses, both critics regress on the same y:
$$ L(\phi_j) = \mathbb{E}_{(s,a,r,s')\sim\mathcal D}\left[(Q_{\phi_j}(s, a) - y)^2\right], \quad j = 1, 2 \tag{5} $$

Delayed actor update, every `policy_frequency` critic steps: ascend Q_1 along the
deterministic policy gradient (the critic held fixed):
$$ J(\theta) = \mathbb{E}_{s\sim\mathcal D}\left[Q_{\phi_1}(s, \mu_\theta(s))\right], \quad
   \nabla_\theta J = \mathbb{E}_s\left[\nabla_a Q_{\phi_1}(s, a)|_{a=\mu_\theta(s)}
   \nabla_\theta \mu_\theta(s)\right] \tag{6} $$

Target networks, updated with the actor by Polyak averaging:
$$ \theta' \leftarrow \tau\theta + (1 - \tau)\theta', \qquad
   \phi'_j \leftarrow \tau\phi_j + (1 - \tau)\phi'_j \tag{7} $$

Replay: a ring buffer of (s, a, r, s', term) in preallocated NumPy arrays, sampled
uniformly. Environments: gymnasium vector envs in their default NEXT_STEP autoreset mode.
The step that ends an episode returns its true final observation as s' (stored with its
term flag, so a truncation bootstraps); the next `step` call is a reset step that ignores
the action and returns the first observation of a new episode: that row is no transition
and is not stored.

Evaluation: every `eval_frequency` env steps, `eval_episodes` episodes of μ(s) without
noise on a separate env, reset with the same seed each time (the paper's metric: 10
episodes every 5,000 steps).

Run:
    python algos/td3.py --total-timesteps 20000          # Pendulum-v1
    python algos/td3.py --env-id Hopper-v4 --learning-starts 25000
    python algos/td3.py --help

Defaults are CleanRL's td3_continuous_action.py (one lr 3e-4 for both networks, batch 256,
256×256 ReLU networks, τ = 0.005, noise 0.1 / 0.2 / clip 0.5, delay 2, one gradient step
per vector step) except learning_starts: 5,000 instead of 25,000, enough for Pendulum and
still fine for Hopper-v4. Evaluation every 10,000 steps, 10 episodes.
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
    """save the actor and critics to runs/<run>/td3.pt at the end (and on Ctrl-C)"""
    eval_checkpoint: Optional[str] = None
    """path of a saved model: evaluate it (μ(s), no noise) without learning, then exit"""
    eval_frequency: int = 10_000
    """evaluate the deterministic policy μ(s) on a separate env every this many env steps (0: never)"""
    eval_episodes: int = 10
    """episodes per evaluation (during training and for --eval-checkpoint)"""
    torch_threads: int = 1
    """CPU threads for torch (more only pay on cores that no other process uses)"""

    env_id: str = "Pendulum-v1"
    """the gymnasium environment id (Box actions, vector observations)"""
    total_timesteps: int = 1_000_000
    """total environment steps over all envs (Pendulum-v1 needs about 20,000)"""
    learning_rate: float = 3e-4
    """Adam learning rate of the actor and the critics"""
    num_envs: int = 1
    """number of parallel environments (one gradient step per vector step)"""
    buffer_size: int = 1_000_000
    """replay capacity in transitions"""
    gamma: float = 0.99
    """discount factor γ in (4)"""
    tau: float = 0.005
    """Polyak averaging coefficient τ in (7)"""
    batch_size: int = 256
    """transitions per gradient step"""
    learning_starts: int = 5_000
    """env steps of uniformly random actions before learning starts"""
    exploration_noise: float = 0.1
    """std of the exploration noise in (2), in units of the action scale"""
    policy_frequency: int = 2
    """critic steps per actor and target update (the delay d of (6) and (7))"""
    policy_noise: float = 0.2
    """std of the target smoothing noise in (3), in units of the action scale"""
    noise_clip: float = 0.5
    """clip c of the target smoothing noise in (3), in units of the action scale"""


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
    "policy_frequency": "[1, inf)",
    "policy_noise": "[0, inf)",
    "noise_clip": "[0, inf)",
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
        fail(f"{env_id} is an Atari game (pixel observations); td3.py is for vector observations: "
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
        fail(f"{env_id} has Discrete actions; td3.py is for continuous (Box) actions: use algos/ppo.py")
    if not isinstance(act_space, gym.spaces.Box) or len(act_space.shape) != 1:
        fail(f"{env_id} has {act_space} actions; td3.py needs a flat Box action space")
    if not (np.isfinite(act_space.low).all() and np.isfinite(act_space.high).all()):
        fail(f"{env_id} has unbounded actions {act_space}; td3.py scales tanh to finite bounds")
    if not isinstance(obs_space, gym.spaces.Box) or len(obs_space.shape) != 1:
        fail(f"{env_id} has observations {obs_space}; td3.py needs flat vectors")


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


def smoothed_target_action(mu_next, noise, noise_clip, action_scale, low, high):
    """Target policy smoothing, equation (3): μ'(s') plus the noise ε (already in action
    units, ε ~ N(0, (policy_noise·scale)²)) clipped to ±noise_clip·scale, then clamped to
    [low, high]. All tensors broadcast over the batch."""
    c = noise_clip * action_scale
    return (mu_next + noise.clamp(-c, c)).clamp(low, high)  # (3)


def td3_target(rewards, terminations, next_q1, next_q2, gamma):
    """Clipped double-Q target y of equation (4), per transition of a batch."""
    return rewards + gamma * (1.0 - terminations) * torch.minimum(next_q1, next_q2)  # (4)


@torch.no_grad()
def polyak_update(target: nn.Module, source: nn.Module, tau: float):
    """Equation (7): θ' ← τθ + (1 − τ)θ' for every parameter."""
    for t, s in zip(target.parameters(), source.parameters()):
        t.lerp_(s, tau)  # (7)


class ReplayBuffer:
    """A ring buffer of transitions in preallocated NumPy arrays, sampled uniformly."""

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
        """Store a batch of rows (one per env that made a real transition)."""
        idx = (self.pos + np.arange(len(obs))) % self.capacity
        self.obs[idx], self.actions[idx], self.rewards[idx] = obs, actions, rewards
        self.next_obs[idx], self.terminations[idx] = next_obs, terminations
        self.pos = (self.pos + len(obs)) % self.capacity
        self.size = min(self.size + len(obs), self.capacity)

    def sample(self, batch_size: int, device):
        idx = self.rng.integers(0, self.size, batch_size)
        return [torch.as_tensor(x[idx], device=device)
                for x in (self.obs, self.actions, self.rewards, self.next_obs, self.terminations)]


class Actor(nn.Module):
    def __init__(self, obs_dim: int, act_dim: int, low: np.ndarray, high: np.ndarray):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(obs_dim, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(),
                                 nn.Linear(256, act_dim), nn.Tanh())
        self.register_buffer("action_scale", torch.as_tensor((high - low) / 2.0, dtype=torch.float32))
        self.register_buffer("action_bias", torch.as_tensor((high + low) / 2.0, dtype=torch.float32))

    def forward(self, obs):
        return self.net(obs) * self.action_scale + self.action_bias  # (1)

    @torch.inference_mode()
    def act(self, obs: np.ndarray) -> np.ndarray:
        """μ(s) of NumPy observations from the envs, as NumPy actions (no noise)."""
        return self(torch.as_tensor(obs, dtype=torch.float32, device=self.action_scale.device)).cpu().numpy()


class QNetwork(nn.Module):
    """Q(s, a): a 256×256 ReLU MLP of [s, a]."""

    def __init__(self, obs_dim: int, act_dim: int):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(obs_dim + act_dim, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(),
                                 nn.Linear(256, 1))

    def forward(self, obs, actions):
        """[B] values."""
        return self.net(torch.cat([obs, actions], -1)).squeeze(-1)


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
    if saved_by != "td3":
        fail(f"{args.eval_checkpoint} was saved by {saved_by or 'another program'}, not td3.py: "
             "evaluate it with the script that saved it")
    args.env_id = ckpt["args"]["env_id"]
    check_env(args.env_id, args.capture_video)
    run_name = f"{args.env_id.replace('/', '-')}__{args.exp_name}-eval__{args.seed}__{int(time.time())}"
    device, run_dir, writer = setup(args, run_name)
    env = make_env(args.env_id, 0, args.capture_video, run_dir)()
    low, high = env.action_space.low, env.action_space.high
    actor = Actor(env.observation_space.shape[0], env.action_space.shape[0], low, high).to(device)
    actor.load_state_dict(ckpt["actor"])
    returns = evaluate_policy(actor.act, env, args.eval_episodes, args.seed)
    for i, r in enumerate(returns):
        writer.add_scalar("eval/episodic_return", r, i + 1)
    env.close()
    writer.close()
    summary = dict(env_id=args.env_id, algorithm="td3", mode="eval", seed=args.seed, checkpoint=args.eval_checkpoint,
                   episodes=len(returns), mean_return=float(np.mean(returns)), std_return=float(np.std(returns)),
                   stopped=None, versions=versions(), run_dir=run_dir)
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
    if device.type == "cpu":  # tiny Adam moments and gradients turn denormal, and denormals slow every op:
        torch.set_flush_denormal(True)  # +12% measured (Pendulum-v1, 8k steps: 126 → 142 steps per CPU second)
    envs = gym.vector.SyncVectorEnv([make_env(args.env_id, i, args.capture_video, run_dir)
                                     for i in range(args.num_envs)])
    envs.action_space.seed(args.seed)
    eval_env = make_env(args.env_id, -1, False, run_dir)() if args.eval_frequency else None
    low, high = envs.single_action_space.low, envs.single_action_space.high  # the env's bounds, not ±1
    actor = Actor(obs_dim, act_dim, low, high).to(device)
    # two plain critics: stacked into one batched product per layer they measured no faster (within ±6%, 1 thread)
    qf1, qf2 = QNetwork(obs_dim, act_dim).to(device), QNetwork(obs_dim, act_dim).to(device)
    actor_target = Actor(obs_dim, act_dim, low, high).to(device)
    qf1_target, qf2_target = QNetwork(obs_dim, act_dim).to(device), QNetwork(obs_dim, act_dim).to(device)
    actor_target.load_state_dict(actor.state_dict())
    qf1_target.load_state_dict(qf1.state_dict())
    qf2_target.load_state_dict(qf2.state_dict())
    saved = {"actor": actor, "qf1": qf1, "qf2": qf2, "actor_target": actor_target, "qf1_target": qf1_target,
             "qf2_target": qf2_target}
    fused = True if device.type in ("cpu", "cuda") else None
    actor_optimizer = torch.optim.Adam(actor.parameters(), lr=args.learning_rate, fused=fused)
    critic_optimizer = torch.optim.Adam([*qf1.parameters(), *qf2.parameters()], lr=args.learning_rate, fused=fused)
    rng = np.random.default_rng(args.seed)
    rb = ReplayBuffer(capacity, obs_dim, act_dim, rng)
    explore_std = args.exploration_noise * (high - low) / 2.0
    t_low, t_high = torch.as_tensor(low, device=device), torch.as_tensor(high, device=device)
    policy_std = args.policy_noise * actor.action_scale

    global_step, start_time = 0, time.time()
    next_progress, next_eval = start_time + 1.0, args.eval_frequency
    recent_returns = deque(maxlen=20)
    episodes, last_eval = 0, None
    # saved instead of the model if training turns non-finite
    last_finite = copy.deepcopy({name: m.state_dict() for name, m in saved.items()})
    obs, _ = envs.reset(seed=args.seed)
    reset_step = np.zeros(args.num_envs, dtype=bool)  # this step of env i only resets it (NEXT_STEP)
    actor_loss = None
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
                mu = actor.act(obs)
                actions = (mu + rng.normal(0.0, explore_std, mu.shape)).clip(low, high).astype(np.float32)  # (2)
            next_obs, rewards, terminations, truncations, infos = envs.step(actions)
            global_step += args.num_envs
            if "episode" in infos:
                for i in np.flatnonzero(infos["_episode"]):
                    r, length = float(infos["episode"]["r"][i]), int(infos["episode"]["l"][i])
                    recent_returns.append(r)
                    episodes += 1
                    writer.add_scalar("charts/episodic_return", r, global_step)
                    writer.add_scalar("charts/episodic_length", length, global_step)
            real = ~reset_step  # a reset step's obs is a final obs and its action was ignored
            rb.add(obs[real], actions[real], rewards[real], next_obs[real], terminations[real])
            reset_step = terminations | truncations
            obs = next_obs

            if global_step > args.learning_starts:
                b_obs, b_actions, b_rewards, b_next_obs, b_terminations = rb.sample(args.batch_size, device)
                with torch.no_grad():
                    noise = torch.randn_like(b_actions) * policy_std
                    next_actions = smoothed_target_action(actor_target(b_next_obs), noise, args.noise_clip,
                                                          actor.action_scale, t_low, t_high)  # (3)
                    y = td3_target(b_rewards, b_terminations, qf1_target(b_next_obs, next_actions),
                                   qf2_target(b_next_obs, next_actions), args.gamma)  # (4)
                qf1_values, qf2_values = qf1(b_obs, b_actions), qf2(b_obs, b_actions)
                qf1_loss, qf2_loss = ((qf1_values - y) ** 2).mean(), ((qf2_values - y) ** 2).mean()  # (5)
                critic_optimizer.zero_grad(set_to_none=True)
                (qf1_loss + qf2_loss).backward()
                critic_optimizer.step()

                if iteration % args.policy_frequency == 0:
                    # Q_1 held fixed: the gradient reaches the action, not the critic's weights
                    qf1.requires_grad_(False)
                    actor_loss = -qf1(b_obs, actor(b_obs)).mean()  # (6)
                    actor_optimizer.zero_grad(set_to_none=True)
                    actor_loss.backward()
                    qf1.requires_grad_(True)
                    actor_optimizer.step()
                    polyak_update(actor_target, actor, args.tau)  # (7)
                    polyak_update(qf1_target, qf1, args.tau)  # (7)
                    polyak_update(qf2_target, qf2, args.tau)  # (7)

                if iteration % 100 == 0:  # .item() waits for the device: only now and then
                    losses = {"losses/qf1_loss": qf1_loss.item(), "losses/qf2_loss": qf2_loss.item(),
                              "losses/qf1_values": qf1_values.mean().item(),
                              "losses/qf2_values": qf2_values.mean().item()}
                    if actor_loss is not None:
                        losses["losses/actor_loss"] = actor_loss.item()
                    check_finite(global_step, losses, *saved.values())
                    last_finite = copy.deepcopy({name: m.state_dict() for name, m in saved.items()})
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
    finally:
        for s, handler in previous_handlers.items():
            signal.signal(s, handler)
    if stopped:
        print(f"stopped: {stop_reason}", file=sys.stderr)

    if args.save_model:
        path = os.path.join(run_dir, "td3.pt")
        torch.save({"algorithm": "td3", "args": asdict(args), **{name: m.state_dict() for name, m in saved.items()}},
                   path)
        print(f"model saved to {path}")
    envs.close()
    if eval_env is not None:
        eval_env.close()
    writer.close()
    wall = time.time() - start_time
    eval_step, eval_return = last_eval or (None, None)
    summary = dict(env_id=args.env_id, algorithm="td3", exp_name=args.exp_name, seed=args.seed,
                   global_step=global_step, wall_seconds=wall, SPS=global_step / wall,
                   mean_return=float(np.mean(recent_returns)) if recent_returns else None,
                   episodes_in_mean=len(recent_returns), episodes=episodes,
                   eval_step=eval_step, eval_return=eval_return,
                   stopped=stopped, stop_reason=stop_reason, versions=versions(), run_dir=run_dir)
    return write_summary(run_dir, summary)


if __name__ == "__main__":
    sys.exit(EXIT_CODES[train(parse_args())["stopped"]])
