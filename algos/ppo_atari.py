r"""PPO on Atari: the clipped surrogate and GAE with the Nature CNN on ALE pixels.

Schulman, Wolski, Dhariwal, Radford, Klimov (2017), "Proximal Policy Optimization
Algorithms", arXiv:1707.06347 (its Atari experiments). Advantages by GAE: Schulman, Moritz,
Levine, Jordan, Abbeel (2016), arXiv:1506.02438. Network and preprocessing: Mnih et al.
(2015), "Human-level control through deep reinforcement learning", Nature 518:529-533.
Evaluation protocol and sticky actions: Machado et al. (2018), "Revisiting the Arcade
Learning Environment", arXiv:1709.06009.

The algorithm is algos/ppo.py's; what is new is the environment side and the network.
Collect T steps from N games with the current policy π_θold, then take several epochs of
minibatch gradient steps on the clipped surrogate.

Probability ratio:
$$ r_t(\theta) = \frac{\pi_\theta(a_t|s_t)}{\pi_{\theta_{old}}(a_t|s_t)} \tag{1} $$

TD residual (no bootstrap past a termination, which a lost life is too; at a truncation
V(s_{t+1}) is the value of the final observation):
$$ \delta_t = \tilde r_t + \gamma V(s_{t+1})(1 - \text{term}_t) - V(s_t) \tag{2} $$

GAE(λ), the recursion cut at every episode end d_t = term_t or trunc_t:
$$ \hat A_t = \delta_t + \gamma\lambda(1 - d_t)\hat A_{t+1}, \qquad \hat R_t = \hat A_t + V(s_t) \tag{3} $$

Clipped surrogate objective (maximised):
$$ L^{CLIP}(\theta) = \mathbb{E}_t\left[\min\left(r_t(\theta)\hat A_t,\;
   \text{clip}(r_t(\theta), 1-\epsilon, 1+\epsilon)\hat A_t\right)\right] \tag{4} $$

Value loss, optionally clipped around the old prediction V_old:
$$ L^{VF} = \tfrac12\mathbb{E}_t\left[\max\left((V_\phi(s_t) - \hat R_t)^2,\;
   (V_{old}(s_t) + \text{clip}(V_\phi(s_t) - V_{old}(s_t), -\epsilon, \epsilon) - \hat R_t)^2\right)\right] \tag{5} $$

Total loss (minimised), with entropy bonus H:
$$ L = -L^{CLIP} + c_1 L^{VF} - c_2 \mathbb{E}_t[H(\pi_\theta(\cdot|s_t))] \tag{6} $$

The agent learns from clipped rewards, one scale for every game; the scores it is judged by
(charts/episodic_return, eval/episodic_return) are the raw game scores:
$$ \tilde r_t = \text{sign}(r_t) \in \{-1, 0, 1\} \tag{7} $$

Network (Mnih et al. 2015), one trunk for both heads: 4×84×84 uint8 frames, scaled by 1/255 on
`device` inside the network, → conv 32 8×8 stride 4 → conv 64 4×4 stride 2 → conv 64 3×3
stride 1 → linear 512, ReLU after each; then a linear policy head (logits) and a linear value
head. Orthogonal initialisation, gains √2, 0.01 (policy) and 1 (value).

Environment, per game (all from gymnasium except the two wrappers written below):
- `gym.make(env_id, frameskip=1, repeat_action_probability=p)`: the emulator, every frame;
- `RecordEpisodeStatistics` right on it: the true score (sum of the raw rewards of every frame)
  and length (in emulator frames) of each whole game, all lives, logged as
  charts/episodic_return and charts/episodic_length;
- `AtariPreprocessing`: 1 to 30 no-op actions after each reset, frame skip 4 (the action
  repeated on 4 frames, the rewards summed, the observation the maximum of the last two
  frames), greyscale, resized to 84×84;
- `EpisodicLife` (below): a lost life ends the training episode (terminated: no bootstrap
  past it) without resetting the game; the next reset goes on from there;
- `FireReset` (below), for games whose action meanings include FIRE: FIRE after every reset
  (and so after every lost life), since such games stand still until it is pressed;
- `FrameStackObservation(4)`: the last 4 frames, (4, 84, 84) uint8;
- `TransformReward(np.sign)`: (7), for learning only.
Frame skip 4 and no sticky actions by default: `--repeat-action-probability 0` is the setting of
the PPO paper's Atari runs and of CleanRL's ppo_atari.py defaults (their NoFrameskip-v4 ids:
ALE/Breakout-v5 with frameskip=1 and p = 0 is exactly BreakoutNoFrameskip-v4), the random no-op
starts being the only randomness of the emulator. ALE's v5 ids default to sticky actions
p = 0.25 (Machado et al. 2018: the previous action is repeated with probability p at every
frame, so that a fixed action sequence cannot be memorised); `--repeat-action-probability 0.25`
gives that protocol, whose scores are not comparable with the paper's. Games end after
108,000 frames (27,000 agent steps, ALE's limit: a truncation). global_step and SPS count
agent steps; frames are 4 × steps.

Evaluation (`--eval-frequency`, `--eval-checkpoint`) plays whole games with the greedy policy
on the same stack, lost lives included, and scores them by the raw rewards.

Environments: gymnasium vector envs in their default NEXT_STEP autoreset mode, as in ppo.py:
the row after an episode end is a reset step, dropped from the loss, whose value V(s_{t+1}) is
the bootstrap that (2) needs at a truncation. Log keys are ppo.py's.

Run:
    python algos/ppo_atari.py                                  # ALE/Breakout-v5, 10M steps
    python algos/ppo_atari.py --env-id ALE/Pong-v5 --total-timesteps 2000000
    python algos/ppo_atari.py --help

Defaults: CleanRL's ppo_atari.py (https://docs.cleanrl.dev/rl-algorithms/ppo/#ppo_ataripy),
which are OpenAI baselines' ppo2 Atari settings: 8 envs × 128 steps, 4 epochs × 4 minibatches
of 256, Adam lr 2.5e-4 (eps 1e-5) annealed linearly to 0, ε = 0.1, c_1 = 0.5, c_2 = 0.01,
γ = 0.99, λ = 0.95, gradient norm clipped at 0.5, 10M steps (40M frames). The paper's table of
Atari hyperparameters has the same actors, horizon, minibatch size, learning rate, ε, c_2, γ
and λ, but 3 epochs, c_1 = 1 and ε annealed with the learning rate.
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

import ale_py
import gymnasium as gym
import numpy as np
import torch
import torch.nn as nn
import tyro
from torch.utils.tensorboard import SummaryWriter

gym.register_envs(ale_py)  # the ALE/... ids; ale-py ships the game ROMs


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
    """save the model to runs/<run>/ppo_atari.pt at the end (and on Ctrl-C)"""
    eval_checkpoint: Optional[str] = None
    """path of a saved model: evaluate it without learning, then exit"""
    eval_frequency: int = 0
    """evaluate the greedy policy on a separate env every this many env steps (0: never)"""
    eval_episodes: int = 10
    """episodes (whole games) per evaluation (during training and for --eval-checkpoint)"""
    torch_threads: int = 1
    """CPU threads for torch (intra-op threads of the convolutions)"""

    env_id: str = "ALE/Breakout-v5"
    """the ALE game id (ALE/<Game>-v5; the v0/v4 ids work too, made with frameskip=1)"""
    total_timesteps: int = 10_000_000
    """total agent steps over all envs (each is 4 emulator frames)"""
    repeat_action_probability: float = 0.0
    """sticky actions: the emulator repeats the previous action with this probability at each frame (also for
    --eval-checkpoint; ALE's v5 default and Machado et al.'s protocol is 0.25)"""
    learning_rate: float = 2.5e-4
    """Adam learning rate"""
    num_envs: int = 8
    """number of parallel environments"""
    num_steps: int = 128
    """steps per environment per rollout (T)"""
    anneal_lr: bool = True
    """decay the learning rate linearly to 0"""
    gamma: float = 0.99
    """discount factor γ"""
    gae_lambda: float = 0.95
    """GAE λ in (3)"""
    num_minibatches: int = 4
    """minibatches per epoch (each of at least 2 samples)"""
    update_epochs: int = 4
    """epochs over each rollout"""
    norm_adv: bool = True
    """normalise advantages within each minibatch"""
    clip_coef: float = 0.1
    """surrogate clipping ε in (4) (and (5))"""
    clip_vloss: bool = True
    """clip the value loss as in (5)"""
    ent_coef: float = 0.01
    """entropy coefficient c_2 in (6)"""
    vf_coef: float = 0.5
    """value-loss coefficient c_1 in (6)"""
    max_grad_norm: float = 0.5
    """global gradient-norm clipping"""
    target_kl: Optional[float] = None
    """stop the epochs early once approx_kl exceeds this"""


# The valid range of every numeric Arg, checked by check_args before anything is written:
# "[" and "]" include an end, "(" and ")" exclude it. tests/test_args.py tries a value
# outside each range and NaN on every numeric field of Args, so a new field needs a line here.
ARG_RANGES = {
    "seed": "[0, 4294967295]",  # what random, numpy and torch all accept
    "eval_frequency": "[0, inf)",
    "eval_episodes": "[1, inf)",
    "torch_threads": "[1, 1024]",
    "total_timesteps": "[1, inf)",
    "repeat_action_probability": "[0, 1)",  # at 1 the first action would be repeated forever
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
}
PROGRESS_SECONDS = 10.0  # a progress line after the first second, then every this many seconds
EVAL_SEED_OFFSET = 10_000  # the evaluation env's seed is args.seed + this: other starts than training's
EXIT_CODES = {None: 0, "non-finite": 1, "interrupted": 130, "terminated": 143}  # as shells expect
ALE_ENTRY_POINT = "ale_py.env:AtariEnv"  # what every ALE id is registered with


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


class EpisodicLife(gym.Wrapper):
    """A lost life ends the episode for learning (terminated, so (2) does not bootstrap past it)
    but not the game: reset() then carries on from where the life was lost, and only a game over
    (or a seeded reset) resets the emulator. The game's score goes on across lives."""

    def __init__(self, env: gym.Env):
        super().__init__(env)
        self.lives, self.game_over, self.last_obs = 0, True, None

    def step(self, action):
        obs, reward, terminated, truncated, info = self.env.step(action)
        self.game_over, self.last_obs = terminated or truncated, obs
        lives = self.env.unwrapped.ale.lives()
        # 0 < lives: some games (Q*bert) show 0 lives for a few frames before the game is over,
        # which ends the episode then, once
        if 0 < lives < self.lives:
            terminated = True
        self.lives = lives
        return obs, reward, terminated, truncated, info

    def reset(self, *, seed=None, options=None):
        if self.game_over or seed is not None:
            obs, info = self.env.reset(seed=seed, options=options)
        else:
            obs, info = self.last_obs, {}
        self.lives = self.env.unwrapped.ale.lives()
        return obs, info


class FireReset(gym.Wrapper):
    """Press FIRE after every reset: games such as Breakout stand still until it is pressed.
    Placed outside EpisodicLife, it presses FIRE after every lost life as well."""

    def __init__(self, env: gym.Env):
        super().__init__(env)
        self.fire = env.unwrapped.get_action_meanings().index("FIRE")

    def reset(self, *, seed=None, options=None):
        self.env.reset(seed=seed, options=options)
        obs, _, terminated, truncated, info = self.env.step(self.fire)
        if terminated or truncated:  # FIRE itself ended the episode: start again
            obs, info = self.env.reset(seed=seed, options=options)
        return obs, info


def make_env(env_id: str, idx: int, capture_video: bool, run_dir: str, repeat_action_probability: float):
    def thunk():
        kwargs = dict(frameskip=1, repeat_action_probability=repeat_action_probability)  # AtariPreprocessing skips
        if capture_video and idx == 0:
            env = gym.make(env_id, render_mode="rgb_array", **kwargs)
            env = gym.wrappers.RecordVideo(env, os.path.join(run_dir, "videos"), disable_logger=True)
        else:
            env = gym.make(env_id, **kwargs)
        env = gym.wrappers.RecordEpisodeStatistics(env)  # below every other wrapper: whole games, raw rewards
        env = gym.wrappers.AtariPreprocessing(env, noop_max=30, frame_skip=4, screen_size=84)
        env = EpisodicLife(env)
        if "FIRE" in env.unwrapped.get_action_meanings():
            env = FireReset(env)
        env = gym.wrappers.FrameStackObservation(env, 4)
        return gym.wrappers.TransformReward(env, np.sign)  # (7)

    return thunk


def check_env(env_id: str, capture_video: bool = False):
    """Refuse an id that is unknown or not an ALE game, or a game that cannot render (with
    --capture-video), before anything starts."""
    try:
        entry_point = gym.spec(env_id).entry_point
    except gym.error.Error as e:
        fail(f"cannot make env {env_id!r}: {e} (try --env-id ALE/Breakout-v5)")
    if entry_point != ALE_ENTRY_POINT:
        fail(f"{env_id} is not an Atari game; ppo_atari.py is for ALE ids such as ALE/Breakout-v5: use algos/ppo.py "
             "(Discrete actions) or algos/ppo_continuous.py (Box actions)")
    if capture_video:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # only a probe: the run itself shows gymnasium's warnings
                probe = gym.make(env_id, render_mode="rgb_array")
                probe.reset(seed=0)
                probe.render()
                probe.close()
        except Exception as e:
            first_line = (str(e).splitlines() or [""])[0]
            fail(f"--capture-video cannot render {env_id} ({type(e).__name__}: {first_line})")


def gae(rewards, values, terminations, truncations, gamma, gae_lambda):
    """Advantages by GAE(λ), equations (2) and (3), on a [T, N] rollout.

    values has T + 1 rows: V(s_0) .. V(s_T), the last being V(next_obs) after the rollout.
    Row t + 1 after an episode end holds the final observation (NEXT_STEP autoreset), so
    values[t + 1] is the truncation bootstrap. Rows that are reset steps get meaningless
    entries; the caller drops them.
    """
    dones = np.logical_or(terminations, truncations)
    advantages = np.zeros_like(rewards)
    last = np.zeros_like(rewards[0])
    for t in reversed(range(len(rewards))):
        delta = rewards[t] + gamma * values[t + 1] * (1.0 - terminations[t]) - values[t]  # (2)
        last = delta + gamma * gae_lambda * (1.0 - dones[t]) * last  # (3)
        advantages[t] = last
    return advantages


def layer_init(layer, std=np.sqrt(2), bias_const=0.0):
    nn.init.orthogonal_(layer.weight, std)
    nn.init.constant_(layer.bias, bias_const)
    return layer


class Agent(nn.Module):
    def __init__(self, n_actions: int):
        super().__init__()
        self.network = nn.Sequential(
            layer_init(nn.Conv2d(4, 32, 8, stride=4)), nn.ReLU(),
            layer_init(nn.Conv2d(32, 64, 4, stride=2)), nn.ReLU(),
            layer_init(nn.Conv2d(64, 64, 3, stride=1)), nn.ReLU(),
            nn.Flatten(),
            layer_init(nn.Linear(64 * 7 * 7, 512)), nn.ReLU(),
        )
        self.actor = layer_init(nn.Linear(512, n_actions), std=0.01)
        self.critic = layer_init(nn.Linear(512, 1), std=1.0)
        # Channels-last weights and inputs: the convolutions' backward pass, most of an update's time on
        # CPU, ran a third faster (8 minibatches of 256, one thread: 5.7 s -> 3.8 s) and training at the
        # defaults on Breakout went from 63-67 to 83-89 SPS (2 cores shared with other jobs, alternating runs).
        self.to(memory_format=torch.channels_last)

    def forward(self, obs):
        """The logits of π(·|s) and V(s) from one pass of the shared trunk; obs are uint8 frames."""
        hidden = self.network((obs.float() / 255.0).contiguous(memory_format=torch.channels_last))
        return self.actor(hidden), self.critic(hidden).squeeze(-1)

    def policy(self, obs, actions):
        """log π(a|s), the entropy H(π(·|s)) and V(s) for a batch."""
        logits, value = self(obs)
        logp = logits.log_softmax(-1)
        return logp.gather(-1, actions.unsqueeze(-1)).squeeze(-1), -(logp.exp() * logp).sum(-1), value


def greedy(agent: Agent, device: torch.device):
    """The deterministic policy for evaluation: one observation to argmax_a π(a|s)."""
    @torch.inference_mode()
    def act(obs):
        return int(agent(torch.as_tensor(obs[None], device=device))[0].argmax())

    return act


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
    """Scores of `episodes` whole games of the deterministic policy `act` (one observation to one
    action), the env reset with `seed` first so that every evaluation starts from the same states.
    A lost life ends an episode of the env (EpisodicLife) but not the game, whose score
    RecordEpisodeStatistics reports once it is over."""
    returns = []
    obs, _ = env.reset(seed=seed)
    while len(returns) < episodes:
        obs, _, terminated, truncated, info = env.step(act(obs))
        if terminated or truncated:
            if "episode" in info:  # the game is over, not only a life
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
    if saved_by != "ppo_atari":
        fail(f"{args.eval_checkpoint} was saved by {saved_by or 'another program'}, not ppo_atari.py: "
             "evaluate it with the script that saved it")
    args.env_id = ckpt["args"]["env_id"]
    check_env(args.env_id, args.capture_video)
    run_name = f"{args.env_id.replace('/', '-')}__{args.exp_name}-eval__{args.seed}__{int(time.time())}"
    device, run_dir, writer = setup(args, run_name)
    env = make_env(args.env_id, 0, args.capture_video, run_dir, args.repeat_action_probability)()
    agent = Agent(env.action_space.n).to(device)
    agent.load_state_dict(ckpt["model"])
    returns = evaluate_policy(greedy(agent, device), env, args.eval_episodes, args.seed)
    for i, r in enumerate(returns):
        writer.add_scalar("eval/episodic_return", r, i + 1)
    env.close()
    writer.close()
    summary = dict(env_id=args.env_id, algorithm="ppo_atari", mode="eval", seed=args.seed,
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
    # SyncVectorEnv: at 8 envs on 2 cores, AsyncVectorEnv (shared memory) was no faster: training at the defaults
    # on Breakout 76 and 96 SPS against Sync's 116 and 89 (alternating runs), env steps alone 326-359 against
    # 494-520 per second: the update of the network takes most of an iteration, and 8 worker processes on
    # 2 cores compete with it.
    envs = gym.vector.SyncVectorEnv([make_env(args.env_id, i, args.capture_video, run_dir,
                                              args.repeat_action_probability) for i in range(args.num_envs)])
    envs.action_space.seed(args.seed)
    eval_env = make_env(args.env_id, -1, False, run_dir, args.repeat_action_probability)() \
        if args.eval_frequency else None
    obs_shape, n_actions = envs.single_observation_space.shape, envs.single_action_space.n
    agent = Agent(n_actions).to(device)
    optimizer = torch.optim.Adam(agent.parameters(), lr=args.learning_rate, eps=1e-5,
                                 fused=True if device.type in ("cpu", "cuda") else None)
    rng = np.random.default_rng(args.seed)

    # Rollout storage: the frames stay uint8 on the host (the envs live there), one copy to
    # `device` per iteration. V(s_t) and log π_old(a_t|s_t) come from the pass that picks the
    # action (the trunk is shared), so they are kept on `device` as they come.
    T, N = args.num_steps, args.num_envs
    obs = np.zeros((T, N, *obs_shape), dtype=np.uint8)
    actions = np.zeros((T, N), dtype=np.int64)
    rewards = np.zeros((T, N), dtype=np.float32)
    terminations = np.zeros((T, N), dtype=np.float32)
    truncations = np.zeros((T, N), dtype=np.float32)
    resets = np.zeros((T, N), dtype=bool)  # row t is the reset step after an episode ended at t - 1
    logprobs = torch.zeros((T, N), device=device)
    values = torch.zeros((T + 1, N), device=device)

    global_step, start_time = 0, time.time()
    next_progress, next_eval = start_time + 1.0, args.eval_frequency
    recent_returns = deque(maxlen=20)
    episodes, last_eval = 0, None
    last_finite = copy.deepcopy(agent.state_dict())  # saved instead of the model if training turns non-finite
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

            # a ~ π(·|s) by the Gumbel-max trick: argmax(logits + g), g ~ Gumbel(0, 1), is a
            # sample of the softmax distribution; noise from the seeded generator.
            gumbel = torch.as_tensor(rng.gumbel(size=(T, N, n_actions)).astype(np.float32), device=device)
            for step in range(T):
                raise_if_stopped(stop_signals)
                obs[step], resets[step] = next_obs, next_done
                with torch.inference_mode():
                    logits, values[step] = agent(torch.as_tensor(next_obs, device=device))
                    action = (logits + gumbel[step]).argmax(-1)
                    logprobs[step] = logits.log_softmax(-1).gather(-1, action.unsqueeze(-1)).squeeze(-1)
                actions[step] = action.cpu().numpy()
                next_obs, rewards[step], term, trunc, infos = envs.step(actions[step])
                terminations[step], truncations[step] = term, trunc
                next_done = term | trunc
                global_step += N
                if "episode" in infos:  # a whole game ended (RecordEpisodeStatistics sees games, not lives)
                    for i in np.flatnonzero(infos["_episode"]):
                        r, length = float(infos["episode"]["r"][i]), int(infos["episode"]["l"][i])
                        recent_returns.append(r)
                        episodes += 1
                        writer.add_scalar("charts/episodic_return", r, global_step)
                        writer.add_scalar("charts/episodic_length", length, global_step)

            with torch.inference_mode():
                values[T] = agent(torch.as_tensor(next_obs, device=device))[1]
            b_obs = torch.as_tensor(obs, device=device).reshape(-1, *obs_shape)
            b_actions = torch.as_tensor(actions, device=device).reshape(-1)
            b_logprobs, b_values = logprobs.reshape(-1), values[:-1].reshape(-1)
            values_host = values.cpu().numpy()
            advantages = gae(rewards, values_host, terminations, truncations, args.gamma, args.gae_lambda)
            returns = advantages + values_host[:-1]  # (3)

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
                    new_logprob, entropy, new_value = agent.policy(b_obs[mb], b_actions[mb])
                    log_ratio = new_logprob - b_logprobs[mb]
                    ratio = log_ratio.exp()  # (1)
                    epoch_log_ratios.append(log_ratio.detach())

                    mb_adv = b_advantages[mb]
                    if args.norm_adv and len(mb) > 1:  # one sample has no spread to normalise by
                        mb_adv = (mb_adv - mb_adv.mean()) / (mb_adv.std() + 1e-8)
                    pg_loss = torch.max(-mb_adv * ratio,
                                        -mb_adv * ratio.clamp(1 - args.clip_coef, 1 + args.clip_coef)).mean()  # (4)

                    v_loss_unclipped = (new_value - b_returns[mb]) ** 2
                    if args.clip_vloss:
                        v_clipped = b_values[mb] + (new_value - b_values[mb]).clamp(-args.clip_coef, args.clip_coef)
                        v_loss = 0.5 * torch.max(v_loss_unclipped, (v_clipped - b_returns[mb]) ** 2).mean()  # (5)
                    else:
                        v_loss = 0.5 * v_loss_unclipped.mean()
                    entropy_loss = entropy.mean()
                    loss = pg_loss + args.vf_coef * v_loss - args.ent_coef * entropy_loss  # (6)

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
                      "losses/entropy": entropy_loss.item(), "losses/approx_kl": torch.stack(approx_kls).mean().item(),
                      "losses/clipfrac": torch.stack(clipfracs).mean().item()}
            check_finite(global_step, losses, agent)
            last_finite = copy.deepcopy(agent.state_dict())
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
                eval_returns = evaluate_policy(greedy(agent, device), eval_env, args.eval_episodes,
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
    finally:
        for s, handler in previous_handlers.items():
            signal.signal(s, handler)
    if stopped:
        print(f"stopped: {stop_reason}", file=sys.stderr)

    if args.save_model:
        path = os.path.join(run_dir, "ppo_atari.pt")
        torch.save({"algorithm": "ppo_atari", "args": asdict(args), "model": agent.state_dict()}, path)
        print(f"model saved to {path}")
    envs.close()
    if eval_env is not None:
        eval_env.close()
    writer.close()
    wall = time.time() - start_time
    eval_step, eval_return = last_eval or (None, None)
    summary = dict(env_id=args.env_id, algorithm="ppo_atari", exp_name=args.exp_name, seed=args.seed,
                   global_step=global_step, wall_seconds=wall, SPS=global_step / wall,
                   mean_return=float(np.mean(recent_returns)) if recent_returns else None,
                   episodes_in_mean=len(recent_returns), episodes=episodes,
                   eval_step=eval_step, eval_return=eval_return,
                   stopped=stopped, stop_reason=stop_reason, versions=versions(), run_dir=run_dir)
    return write_summary(run_dir, summary)


if __name__ == "__main__":
    sys.exit(EXIT_CODES[train(parse_args())["stopped"]])
