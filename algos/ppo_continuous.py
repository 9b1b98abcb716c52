r"""PPO for continuous (Box) actions: Gaussian policy, clipped surrogate, GAE, and
observation/reward normalisation.

Schulman, Wolski, Dhariwal, Radford, Klimov (2017), "Proximal Policy Optimization
Algorithms", arXiv:1707.06347. Advantages by GAE: Schulman, Moritz, Levine, Jordan,
Abbeel (2016), "High-Dimensional Continuous Control Using Generalized Advantage
Estimation", arXiv:1506.02438. The normalisations follow the reference implementation
(OpenAI baselines' VecNormalize); why they matter: Engstrom, Ilyas, Santurkar, Tsipras,
Janoos, Rudolph, Madry (2020), "Implementation Matters in Deep Policy Gradients",
arXiv:2005.12729.

Policy: a diagonal Gaussian whose mean is a network and whose log-std is one learned
vector, independent of the state:
$$ \pi_\theta(a|s) = \mathcal N(\mu_\theta(s), \text{diag}(\sigma^2)), \quad
   \log\pi_\theta(a|s) = \sum_j \left[-\frac{(a_j - \mu_j)^2}{2\sigma_j^2} - \log\sigma_j
   - \tfrac12\log 2\pi\right], \quad H = \sum_j \left[\log\sigma_j + \tfrac12(1 + \log 2\pi)\right] \tag{1} $$

Probability ratio:
$$ r_t(\theta) = \frac{\pi_\theta(a_t|s_t)}{\pi_{\theta_{old}}(a_t|s_t)} \tag{2} $$

TD residual (no bootstrap past a termination; at a truncation V(s_{t+1}) is the value of
the final observation):
$$ \delta_t = r_t + \gamma V(s_{t+1})(1 - \text{term}_t) - V(s_t) \tag{3} $$

GAE(λ), the recursion cut at every episode end d_t = term_t or trunc_t:
$$ \hat A_t = \delta_t + \gamma\lambda(1 - d_t)\hat A_{t+1}, \qquad \hat R_t = \hat A_t + V(s_t) \tag{4} $$

Clipped surrogate objective (maximised):
$$ L^{CLIP}(\theta) = \mathbb{E}_t\left[\min\left(r_t(\theta)\hat A_t,\;
   \text{clip}(r_t(\theta), 1-\epsilon, 1+\epsilon)\hat A_t\right)\right] \tag{5} $$

Value loss, optionally clipped around the old prediction V_old:
$$ L^{VF} = \tfrac12\mathbb{E}_t\left[\max\left((V_\phi(s_t) - \hat R_t)^2,\;
   (V_{old}(s_t) + \text{clip}(V_\phi(s_t) - V_{old}(s_t), -\epsilon, \epsilon) - \hat R_t)^2\right)\right] \tag{6} $$

Total loss (minimised), with entropy bonus H from (1):
$$ L = -L^{CLIP} + c_1 L^{VF} - c_2 \mathbb{E}_t[H(\pi_\theta(\cdot|s_t))] \tag{7} $$

Running statistics: mean μ, variance σ² and count n of everything seen so far, updated
with a batch x_1..x_B at once (Welford's update, 1962, for a batch), with n' = n + B:
$$ \mu' = \mu + \frac{1}{n'}\sum_i (x_i - \mu), \qquad
   \sigma'^2 = \frac{1}{n'}\left(n\sigma^2 + \sum_i (x_i - \mu)(x_i - \mu')\right) \tag{8} $$

Observation normalisation, with the running statistics of all observations seen:
$$ \tilde s = \text{clip}\left(\frac{s - \mu_s}{\sqrt{\sigma_s^2 + 10^{-8}}}, -c_s, c_s\right) \tag{9} $$

Reward scaling: divide by the standard deviation of the discounted return G (one
accumulator per env, restarted at every episode end), not centred so the sign is kept:
$$ G_t = \gamma G_{t-1}(1 - d_{t-1}) + r_t, \qquad
   \tilde r_t = \text{clip}\left(\frac{r_t}{\sqrt{\text{Var}[G] + 10^{-8}}}, -c_r, c_r\right) \tag{10} $$

Both statistics live in this script (not in per-env gymnasium wrappers). They are updated
from the vector env's batches: the observations every step, before that step's batch is
normalised; the returns G once per rollout, before the rollout's rewards are scaled. They
are saved with the model and reused, frozen, by --eval-checkpoint; --eval-frequency's
evaluations read the current statistics without updating them. `RecordEpisodeStatistics`
sits inside, so the logged episodic returns are the raw, unscaled ones.

Actions: the sampled, unclipped a_t and its log-probability are stored and learned from;
only the copy handed to `envs.step` is clipped to the action space's bounds.

Environments: gymnasium vector envs in their default NEXT_STEP autoreset mode. After an
episode ends at step t, the next `step` call returns the first observation of a new
episode and ignores its action; so row t+1 of the rollout holds the final observation of
the old episode (normalised like any other). Such a "reset row" is no transition and is
dropped from the loss and from the return statistics, but its value V(s_{t+1}) is
exactly the bootstrap that (3) needs at a truncation.

Run:
    python algos/ppo_continuous.py --env-id Hopper-v4
    python algos/ppo_continuous.py --env-id InvertedPendulum-v4 --total-timesteps 100000
    python algos/ppo_continuous.py --help

Defaults are CleanRL's continuous-control settings: 1 env × 2048 steps, lr 3e-4 annealed,
10 epochs of 32 minibatches, ε = 0.2, no entropy bonus, 64×64 tanh networks.
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
    """save the model and its normalisation statistics to runs/<run>/ppo_continuous.pt at the end (and on Ctrl-C)"""
    eval_checkpoint: Optional[str] = None
    """path of a saved model: evaluate it (mean action, its saved statistics) without learning, then exit"""
    eval_frequency: int = 0
    """evaluate the mean action on a separate env every this many env steps (0: never)"""
    eval_episodes: int = 10
    """episodes per evaluation (during training and for --eval-checkpoint)"""
    torch_threads: int = 1
    """CPU threads for torch (the 64x64 networks gain nothing from more)"""

    env_id: str = "Hopper-v4"
    """the gymnasium environment id (Box actions, vector observations)"""
    total_timesteps: int = 1_000_000
    """total environment steps over all envs"""
    learning_rate: float = 3e-4
    """Adam learning rate"""
    num_envs: int = 1
    """number of parallel environments"""
    num_steps: int = 2048
    """steps per environment per rollout (T)"""
    anneal_lr: bool = True
    """decay the learning rate linearly to 0"""
    gamma: float = 0.99
    """discount factor γ (also of the return G in (10))"""
    gae_lambda: float = 0.95
    """GAE λ in (4)"""
    num_minibatches: int = 32
    """minibatches per epoch (each of at least 2 samples)"""
    update_epochs: int = 10
    """epochs over each rollout"""
    norm_adv: bool = True
    """normalise advantages within each minibatch"""
    clip_coef: float = 0.2
    """surrogate clipping ε in (5) (and (6))"""
    clip_vloss: bool = True
    """clip the value loss as in (6)"""
    ent_coef: float = 0.0
    """entropy coefficient c_2 in (7)"""
    vf_coef: float = 0.5
    """value-loss coefficient c_1 in (7)"""
    max_grad_norm: float = 0.5
    """global gradient-norm clipping"""
    target_kl: Optional[float] = None
    """stop the epochs early once approx_kl exceeds this"""
    norm_obs: bool = True
    """normalise observations by running statistics, (9)"""
    clip_obs: float = 10.0
    """clip normalised observations to ±c_s in (9)"""
    norm_reward: bool = True
    """scale rewards by the running std of the discounted return, (10)"""
    clip_reward: float = 10.0
    """clip scaled rewards to ±c_r in (10)"""


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
    "num_steps": "[1, inf)",
    "gamma": "[0, 1]",
    "gae_lambda": "[0, 1]",
    "num_minibatches": "[1, inf)",
    "update_epochs": "[1, inf)",
    "clip_coef": "(0, inf)",
    "ent_coef": "[0, inf)",
    "vf_coef": "[0, inf)",
    "max_grad_norm": "(0, inf)",
    "target_kl": "(0, inf)",
    "clip_obs": "(0, inf)",
    "clip_reward": "(0, inf)",
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
        return gym.wrappers.RecordEpisodeStatistics(env)  # raw returns: scaling (10) happens outside

    return thunk


def check_env(env_id: str, capture_video: bool = False):
    """Refuse an unknown id, a wrong action/observation space or an env that cannot render
    (with --capture-video) before anything starts."""
    if env_id.startswith("ALE/") or "NoFrameskip" in env_id:
        fail(f"{env_id} is an Atari game (pixel observations); ppo_continuous.py is for vector observations: "
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
        fail(f"cannot make env {env_id!r}: {e} (try --env-id Hopper-v4)")
    act_space, obs_space = env.action_space, env.observation_space
    env.close()
    if isinstance(act_space, gym.spaces.Discrete):
        fail(f"{env_id} has Discrete actions; ppo_continuous.py is for continuous (Box) actions: use algos/ppo.py")
    if not isinstance(act_space, gym.spaces.Box) or len(act_space.shape) != 1:
        fail(f"{env_id} has {act_space} actions; ppo_continuous.py needs a flat Box action space")
    if not isinstance(obs_space, gym.spaces.Box) or len(obs_space.shape) != 1:
        fail(f"{env_id} has observations {obs_space}; ppo_continuous.py needs flat vectors")


def gae(rewards, values, terminations, truncations, gamma, gae_lambda):
    """Advantages by GAE(λ), equations (3) and (4), on a [T, N] rollout.

    values has T + 1 rows: V(s_0) .. V(s_T), the last being V(next_obs) after the rollout.
    Row t + 1 after an episode end holds the final observation (NEXT_STEP autoreset), so
    values[t + 1] is the truncation bootstrap. Rows that are reset steps get meaningless
    entries; the caller drops them.
    """
    dones = np.logical_or(terminations, truncations)
    advantages = np.zeros_like(rewards)
    last = np.zeros_like(rewards[0])
    for t in reversed(range(len(rewards))):
        delta = rewards[t] + gamma * values[t + 1] * (1.0 - terminations[t]) - values[t]  # (3)
        last = delta + gamma * gae_lambda * (1.0 - dones[t]) * last  # (4)
        advantages[t] = last
    return advantages


def discounted_returns(rewards, dones, start, gamma):
    """The running discounted return G of (10) on a [T, N] rollout: G_t = γ G_{t-1}(1 - d_{t-1}) + r_t,
    with start = G_{-1}(1 - d_{-1}) carried over from the previous rollout (0 after an episode end)."""
    returns = np.zeros(rewards.shape)
    last = start
    for t in range(len(rewards)):
        last = returns[t] = gamma * last + rewards[t]  # (10)
        last = last * (1.0 - dones[t])
    return returns


def gaussian_log_prob(actions, mean, log_std):
    """log π(a|s) of a diagonal Gaussian, equation (1), summed over the action dimensions."""
    return (-0.5 * ((actions - mean) / log_std.exp()) ** 2 - log_std - 0.5 * math.log(2 * math.pi)).sum(-1)  # (1)


def update_moments(mean, var, count, batch):
    """Equation (8): the mean, variance (ddof 0) and count of everything summarised by
    (mean, var, count) plus the rows of `batch`."""
    delta = batch - mean
    total = count + len(batch)
    new_mean = mean + delta.sum(0) / total  # (8)
    new_var = (var * count + (delta * (batch - new_mean)).sum(0)) / total  # (8)
    return new_mean, new_var, total


class RunningMeanStd:
    """Running mean and variance of a stream of batches (rows are samples), by (8)."""

    def __init__(self, shape=()):
        self.mean, self.var, self.count = np.zeros(shape), np.ones(shape), 1e-4  # a faint prior N(0, 1)

    def update(self, batch):
        self.mean, self.var, self.count = update_moments(self.mean, self.var, self.count, batch)

    def state_dict(self):
        return {"mean": torch.as_tensor(self.mean), "var": torch.as_tensor(self.var),
                "count": torch.tensor(self.count, dtype=torch.float64)}

    def load_state_dict(self, state):
        self.mean, self.var, self.count = state["mean"].numpy(), state["var"].numpy(), state["count"].item()


def normalize_obs(obs, rms: RunningMeanStd, clip: float):
    """Equation (9), as float32 for the networks."""
    return ((obs - rms.mean) / np.sqrt(rms.var + 1e-8)).clip(-clip, clip).astype(np.float32)  # (9)


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
    def __init__(self, obs_dim: int, act_dim: int):
        super().__init__()
        self.critic = nn.Sequential(
            layer_init(nn.Linear(obs_dim, 64)), nn.Tanh(),
            layer_init(nn.Linear(64, 64)), nn.Tanh(),
            layer_init(nn.Linear(64, 1), std=1.0),
        )
        self.actor_mean = nn.Sequential(
            layer_init(nn.Linear(obs_dim, 64)), nn.Tanh(),
            layer_init(nn.Linear(64, 64)), nn.Tanh(),
            layer_init(nn.Linear(64, act_dim), std=0.01),
        )
        self.actor_logstd = nn.Parameter(torch.zeros(1, act_dim))  # σ of (1), state-independent

    def policy(self, obs, actions):
        """log π(a|s) of (1) for a batch."""
        return gaussian_log_prob(actions, self.actor_mean(obs), self.actor_logstd)

    def entropy(self):
        """H(π(·|s)) of (1): the same for every s, as σ does not depend on the state."""
        return (self.actor_logstd + 0.5 * (1.0 + math.log(2 * math.pi))).sum()  # (1)


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
    """--eval-checkpoint: the mean action of a saved model, observations normalised by its saved statistics
    (frozen), no learning."""
    if not os.path.isfile(args.eval_checkpoint):
        fail(f"no checkpoint at {args.eval_checkpoint}")
    try:
        ckpt = torch.load(args.eval_checkpoint, map_location="cpu", weights_only=True)
    except Exception as e:
        fail(f"cannot read {args.eval_checkpoint} as a checkpoint ({type(e).__name__})")
    saved_by = ckpt.get("algorithm") if isinstance(ckpt, dict) else None
    if saved_by != "ppo_continuous":
        fail(f"{args.eval_checkpoint} was saved by {saved_by or 'another program'}, not ppo_continuous.py: "
             "evaluate it with the script that saved it")
    saved = ckpt["args"]
    args.env_id = saved["env_id"]
    check_env(args.env_id, args.capture_video)
    run_name = f"{args.env_id.replace('/', '-')}__{args.exp_name}-eval__{args.seed}__{int(time.time())}"
    device, run_dir, writer = setup(args, run_name)
    env = make_env(args.env_id, 0, args.capture_video, run_dir)()
    low, high = env.action_space.low, env.action_space.high
    agent = Agent(env.observation_space.shape[0], env.action_space.shape[0]).to(device)
    agent.load_state_dict(ckpt["model"])
    obs_rms = RunningMeanStd(env.observation_space.shape)
    obs_rms.load_state_dict(ckpt["obs_rms"])
    mean_fn = numpy_mlp(agent.actor_mean)

    def act(o):
        o = normalize_obs(o, obs_rms, saved["clip_obs"]) if saved["norm_obs"] else o.astype(np.float32)
        return mean_fn(o).clip(low, high)

    returns = evaluate_policy(act, env, args.eval_episodes, args.seed)
    for i, r in enumerate(returns):
        writer.add_scalar("eval/episodic_return", r, i + 1)
    env.close()
    writer.close()
    summary = dict(env_id=args.env_id, algorithm="ppo_continuous", mode="eval", seed=args.seed,
                   checkpoint=args.eval_checkpoint, episodes=len(returns), mean_return=float(np.mean(returns)),
                   std_return=float(np.std(returns)), stopped=None, versions=versions(), run_dir=run_dir)
    print(f"eval {args.env_id}: mean return {summary['mean_return']:.2f} ± {summary['std_return']:.2f} "
          f"over {len(returns)} episodes")
    return write_summary(run_dir, summary)


def train(args: Args) -> dict:
    check_args(args)
    if args.eval_checkpoint:
        return evaluate(args)
    batch_size = args.num_envs * args.num_steps
    if batch_size // args.num_minibatches < 2:
        fail(f"--num-minibatches {args.num_minibatches} leaves minibatches of fewer than 2 samples (batch of "
             f"{batch_size} = num_envs {args.num_envs} × num_steps {args.num_steps}); use at most {batch_size // 2}")
    num_iterations = args.total_timesteps // batch_size
    if num_iterations == 0:
        fail(f"--total-timesteps {args.total_timesteps} is less than one batch of {batch_size}; "
             "raise it or shrink the batch")
    check_env(args.env_id, args.capture_video)

    run_name = f"{args.env_id.replace('/', '-')}__{args.exp_name}__{args.seed}__{int(time.time())}"
    device, run_dir, writer = setup(args, run_name)
    envs = gym.vector.SyncVectorEnv([make_env(args.env_id, i, args.capture_video, run_dir)
                                     for i in range(args.num_envs)])
    envs.action_space.seed(args.seed)
    eval_env = make_env(args.env_id, -1, False, run_dir)() if args.eval_frequency else None
    obs_dim, act_dim = envs.single_observation_space.shape[0], envs.single_action_space.shape[0]
    low, high = envs.single_action_space.low, envs.single_action_space.high  # the env's bounds, not ±1
    agent = Agent(obs_dim, act_dim).to(device)
    optimizer = torch.optim.Adam(agent.parameters(), lr=args.learning_rate, eps=1e-5,
                                 fused=True if device.type in ("cpu", "cuda") else None)
    rng = np.random.default_rng(args.seed)
    obs_rms, return_rms = RunningMeanStd((obs_dim,)), RunningMeanStd()

    def normalized(raw_obs):
        """(9) by the current statistics, which it leaves as they are (float32 either way)."""
        return normalize_obs(raw_obs, obs_rms, args.clip_obs) if args.norm_obs else raw_obs.astype(np.float32)

    def prepare(raw_obs):
        """(9) for the envs being learned from: update the statistics with this batch, then normalise it."""
        if args.norm_obs:
            obs_rms.update(raw_obs)
        return normalized(raw_obs)

    def snapshot():
        """What --save-model saves and a non-finite stop restores: the model and the statistics it was trained on."""
        return copy.deepcopy({"model": agent.state_dict(), "obs_rms": obs_rms.state_dict(),
                              "return_rms": return_rms.state_dict()})

    # Rollout storage on the host (the envs live there); one copy to `device` per iteration.
    T, N = args.num_steps, args.num_envs
    obs = np.zeros((T, N, obs_dim), dtype=np.float32)  # normalised: exactly what the policy saw
    actions = np.zeros((T, N, act_dim), dtype=np.float32)  # sampled, unclipped
    rewards = np.zeros((T, N), dtype=np.float32)  # raw, then scaled by (10) after the rollout
    terminations = np.zeros((T, N), dtype=np.float32)
    truncations = np.zeros((T, N), dtype=np.float32)
    resets = np.zeros((T, N), dtype=bool)  # row t is the reset step after an episode ended at t - 1
    carried_return = np.zeros(N)  # G of (10) at the end of the last rollout, 0 where an episode ended

    global_step, start_time = 0, time.time()
    next_progress, next_eval = start_time + 1.0, args.eval_frequency
    recent_returns = deque(maxlen=20)
    episodes, last_eval = 0, None
    raw_obs, _ = envs.reset(seed=args.seed)
    next_obs = prepare(raw_obs)
    next_done = np.zeros(N, dtype=bool)
    last_finite = snapshot()  # saved instead of the model if training turns non-finite
    stopped = stop_reason = None
    stop_signals = []  # Ctrl-C and SIGTERM, recorded here and raised at the next env step
    previous_handlers = {s: signal.signal(s, lambda signum, frame: stop_signals.append(signum))
                         for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        for iteration in range(1, num_iterations + 1):
            if args.anneal_lr:
                optimizer.param_groups[0]["lr"] = args.learning_rate * (1.0 - (iteration - 1.0) / num_iterations)

            # a ~ N(μ(s), σ²) as μ(s) + σε, ε ~ N(0, I) from the seeded generator
            mean_fn, std = numpy_mlp(agent.actor_mean), agent.actor_logstd.detach().exp().cpu().numpy()
            noise = rng.standard_normal((T, N, act_dim), dtype=np.float32)
            for step in range(T):
                raise_if_stopped(stop_signals)
                obs[step], resets[step] = next_obs, next_done
                actions[step] = mean_fn(next_obs) + std * noise[step]
                raw_obs, rewards[step], term, trunc, infos = envs.step(actions[step].clip(low, high))
                next_obs = prepare(raw_obs)
                terminations[step], truncations[step] = term, trunc
                next_done = term | trunc
                global_step += N
                if "episode" in infos:
                    for i in np.flatnonzero(infos["_episode"]):
                        r, length = float(infos["episode"]["r"][i]), int(infos["episode"]["l"][i])
                        recent_returns.append(r)
                        episodes += 1
                        writer.add_scalar("charts/episodic_return", r, global_step)
                        writer.add_scalar("charts/episodic_length", length, global_step)

            if args.norm_reward:  # a reset row has reward 0 and G = 0: left out of the statistics
                dones = np.logical_or(terminations, truncations)
                discounted = discounted_returns(rewards, dones, carried_return, args.gamma)
                carried_return = discounted[-1] * (1.0 - dones[-1])
                return_rms.update(discounted[~resets])
                scale = np.sqrt(return_rms.var + 1e-8)
                rewards[:] = np.clip(rewards / scale, -args.clip_reward, args.clip_reward)  # (10)

            # One batched pass for V(s_0..s_T) and log π_old(a|s) of the whole rollout.
            all_obs = torch.as_tensor(np.concatenate([obs, next_obs[None]]), device=device)
            b_obs = all_obs[:-1].reshape(-1, obs_dim)
            b_actions = torch.as_tensor(actions, device=device).reshape(-1, act_dim)
            with torch.inference_mode():
                values = agent.critic(all_obs).squeeze(-1)
                b_logprobs = agent.policy(b_obs, b_actions)
            b_values = values[:-1].reshape(-1)
            values = values.cpu().numpy()
            advantages = gae(rewards, values, terminations, truncations, args.gamma, args.gae_lambda)
            returns = advantages + values[:-1]  # (4)

            valid = np.flatnonzero(~resets.reshape(-1))  # reset rows hold no transition
            b_advantages = torch.as_tensor(advantages.reshape(-1), device=device)
            b_returns = torch.as_tensor(returns.reshape(-1), device=device)

            clipfracs, approx_kls = [], []
            for epoch in range(args.update_epochs):
                epoch_log_ratios = []
                for mb in np.array_split(rng.permutation(valid), args.num_minibatches):
                    if len(mb) == 0:  # only when reset rows leave fewer samples than minibatches
                        continue
                    mb = torch.as_tensor(mb, device=device)
                    new_logprob = agent.policy(b_obs[mb], b_actions[mb])
                    new_value = agent.critic(b_obs[mb]).squeeze(-1)
                    log_ratio = new_logprob - b_logprobs[mb]
                    ratio = log_ratio.exp()  # (2)
                    epoch_log_ratios.append(log_ratio.detach())

                    mb_adv = b_advantages[mb]
                    if args.norm_adv and len(mb) > 1:  # one sample has no spread to normalise by
                        mb_adv = (mb_adv - mb_adv.mean()) / (mb_adv.std() + 1e-8)
                    pg_loss = torch.max(-mb_adv * ratio,
                                        -mb_adv * ratio.clamp(1 - args.clip_coef, 1 + args.clip_coef)).mean()  # (5)

                    v_loss_unclipped = (new_value - b_returns[mb]) ** 2
                    if args.clip_vloss:
                        v_clipped = b_values[mb] + (new_value - b_values[mb]).clamp(-args.clip_coef, args.clip_coef)
                        v_loss = 0.5 * torch.max(v_loss_unclipped, (v_clipped - b_returns[mb]) ** 2).mean()  # (6)
                    else:
                        v_loss = 0.5 * v_loss_unclipped.mean()
                    loss = pg_loss + args.vf_coef * v_loss  # (7)
                    if args.ent_coef:  # H does not depend on s: one term, not a batch mean
                        loss = loss - args.ent_coef * agent.entropy()  # (7)

                    optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                    nn.utils.clip_grad_norm_(agent.parameters(), args.max_grad_norm, foreach=True)
                    optimizer.step()
                log_ratio = torch.cat(epoch_log_ratios)  # this epoch's minibatches only
                approx_kls.append(((log_ratio.exp() - 1) - log_ratio).mean())
                clipfracs.append(((log_ratio.exp() - 1).abs() > args.clip_coef).float().mean())
                if args.target_kl is not None and approx_kls[-1].item() > args.target_kl:
                    break

            losses = {"losses/value_loss": v_loss.item(), "losses/policy_loss": pg_loss.item(),
                      "losses/entropy": agent.entropy().item(),
                      "losses/approx_kl": torch.stack(approx_kls).mean().item(),
                      "losses/clipfrac": torch.stack(clipfracs).mean().item()}
            check_finite(global_step, losses, agent)
            last_finite = snapshot()
            y_pred, y_true = b_values[valid], b_returns[valid]
            var_y = y_true.var()
            explained_var = float("nan") if var_y == 0 else (1 - (y_true - y_pred).var() / var_y).item()
            sps = int(global_step / (time.time() - start_time))
            writer.add_scalar("charts/learning_rate", optimizer.param_groups[0]["lr"], global_step)
            for key, value in losses.items():
                writer.add_scalar(key, value, global_step)
            writer.add_scalar("losses/explained_variance", explained_var, global_step)
            writer.add_scalar("charts/SPS", sps, global_step)

            if args.eval_frequency and global_step >= next_eval:
                eval_mean_fn = numpy_mlp(agent.actor_mean)
                eval_returns = evaluate_policy(lambda o: eval_mean_fn(normalized(o)).clip(low, high), eval_env,
                                               args.eval_episodes, args.seed + EVAL_SEED_OFFSET)
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
        agent.load_state_dict(last_finite["model"])
        obs_rms.load_state_dict(last_finite["obs_rms"])
        return_rms.load_state_dict(last_finite["return_rms"])
    finally:
        for s, handler in previous_handlers.items():
            signal.signal(s, handler)
    if stopped:
        print(f"stopped: {stop_reason}", file=sys.stderr)

    if args.save_model:
        path = os.path.join(run_dir, "ppo_continuous.pt")
        torch.save({"algorithm": "ppo_continuous", "args": asdict(args), "model": agent.state_dict(),
                    "obs_rms": obs_rms.state_dict(), "return_rms": return_rms.state_dict()}, path)
        print(f"model saved to {path}")
    envs.close()
    if eval_env is not None:
        eval_env.close()
    writer.close()
    wall = time.time() - start_time
    eval_step, eval_return = last_eval or (None, None)
    summary = dict(env_id=args.env_id, algorithm="ppo_continuous", exp_name=args.exp_name, seed=args.seed,
                   global_step=global_step, wall_seconds=wall, SPS=global_step / wall,
                   mean_return=float(np.mean(recent_returns)) if recent_returns else None,
                   episodes_in_mean=len(recent_returns), episodes=episodes,
                   eval_step=eval_step, eval_return=eval_return,
                   stopped=stopped, stop_reason=stop_reason, versions=versions(), run_dir=run_dir)
    return write_summary(run_dir, summary)


if __name__ == "__main__":
    sys.exit(EXIT_CODES[train(parse_args())["stopped"]])
