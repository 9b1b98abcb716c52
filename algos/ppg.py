r"""PPG: Phasic Policy Gradient, discrete actions.

Cobbe, Hilton, Klimov, Schulman (2020), "Phasic Policy Gradient", arXiv:2009.04416. Built on
PPO (Schulman et al. 2017, arXiv:1707.06347) with GAE (Schulman et al. 2016, arXiv:1506.02438).

PPO with one network for π and V must weigh the two objectives against each other, and its
value target interferes with the policy's features; with two networks the policy loses what
value learning would teach its features. PPG keeps two networks, a policy network π_θ with an
extra auxiliary value head V^aux_θ and a value network V_φ, and trains in two phases:

- policy phase, N_π iterations: collect a rollout, run PPO-clip on π_θ (E_π epochs) and fit
  V_φ to the value targets (E_V epochs; here E_π = E_V, in the same minibatches), store every
  state s_t with its target \hat V^{targ}_t in a buffer B;
- auxiliary phase, after every N_π iterations: record π_old(·|s) = π_θ(·|s) on every state of B,
  then take E_aux epochs over B minimising L^joint for θ (value distillation into the auxiliary
  head, which shapes the policy's features, while the KL term keeps the policy where it was)
  and L^value for φ (more value training on the same targets). B is then emptied.

Probability ratio:
$$ r_t(\theta) = \frac{\pi_\theta(a_t|s_t)}{\pi_{\theta_{old}}(a_t|s_t)} \tag{1} $$

TD residual (no bootstrap past a termination; at a truncation V(s_{t+1}) is the value of
the final observation), with V = V_φ:
$$ \delta_t = r_t + \gamma V(s_{t+1})(1 - \text{term}_t) - V(s_t) \tag{2} $$

GAE(λ), the recursion cut at every episode end d_t = term_t or trunc_t; the value target:
$$ \hat A_t = \delta_t + \gamma\lambda(1 - d_t)\hat A_{t+1}, \qquad \hat V^{targ}_t = \hat A_t + V(s_t) \tag{3} $$

Clipped surrogate objective (maximised):
$$ L^{CLIP}(\theta) = \mathbb{E}_t\left[\min\left(r_t(\theta)\hat A_t,\;
   \text{clip}(r_t(\theta), 1-\epsilon, 1+\epsilon)\hat A_t\right)\right] \tag{4} $$

Policy-phase loss of the policy network (minimised), with entropy bonus H:
$$ L^{\pi}(\theta) = -L^{CLIP}(\theta) - c_e\,\mathbb{E}_t[H(\pi_\theta(\cdot|s_t))] \tag{5} $$

Value loss of the value network, in both phases (not clipped, as in the paper):
$$ L^{value}(\phi) = \tfrac12\,\mathbb{E}_t\left[(V_\phi(s_t) - \hat V^{targ}_t)^2\right] \tag{6} $$

Auxiliary value loss of the policy network's auxiliary head:
$$ L^{aux}(\theta) = \tfrac12\,\mathbb{E}_t\left[(V^{aux}_\theta(s_t) - \hat V^{targ}_t)^2\right] \tag{7} $$

KL divergence of the current policy from π_old, the policy recorded at the start of the
auxiliary phase:
$$ KL(\pi_{old} \| \pi_\theta)(s) = \sum_a \pi_{old}(a|s)\,
   \left(\log\pi_{old}(a|s) - \log\pi_\theta(a|s)\right) \tag{8} $$

Joint loss of the auxiliary phase (minimised over θ; L^value (6) over φ alongside):
$$ L^{joint}(\theta) = L^{aux}(\theta)
   + \beta_{clone}\,\mathbb{E}_t\left[KL(\pi_{old} \| \pi_\theta)(s_t)\right] \tag{9} $$

Logged besides PPO's keys: `losses/aux_value` (L^aux (7) of the last auxiliary minibatch),
`losses/kl_clone` (the mean KL (8) of that minibatch: how far distillation pulled the policy),
`losses/aux_phase_value_loss` (L^value (6) of V_φ in that minibatch) and
`charts/aux_learning_rate`, each once per auxiliary phase; `losses/value_loss` is L^value of the
policy phase.

Environments: gymnasium vector envs in their default NEXT_STEP autoreset mode. After an
episode ends at step t, the next `step` call returns the first observation of a new
episode and ignores its action; so row t+1 of the rollout holds the final observation of
the old episode. Such a "reset row" is no transition and is dropped from the loss (and from
B), but its value V(s_{t+1}) is exactly the bootstrap that (2) needs at a truncation.

Run:
    python algos/ppg.py                              # CartPole-v1
    python algos/ppg.py --env-id Acrobot-v1
    python algos/ppg.py --help

Defaults. The policy phase is ppo.py's at its defaults (8 envs × 64 steps, lr 1e-3 annealed,
4 minibatches, ε = 0.2, c_e = 0.01, 64×64 tanh networks, 500k steps), without value clipping
and with E_π = E_V = 4 epochs. The auxiliary phase is the paper's E_aux = 6 and β_clone = 1, with
its own Adam (as in the authors' code) at lr 1e-3, annealed alike, and minibatches as large as the
policy phase's. The paper's Procgen settings, N_π = 32 and E_π = E_V = 1, go with rollouts of
64 envs × 256 steps: 16,384 samples per iteration and 524k states per auxiliary phase. CartPole's
rollouts are 512 steps, so the policy phase keeps PPO's 4 epochs, and N_π = 8 runs the auxiliary
phase every 4,096 steps (over about 4,000 states): 14-23 times before CartPole is solved at
57k-96k steps, where N_π = 32 would run it 3-5 times. These are choices for CartPole, not a
search: with them seeds 1-3 pass a 20-episode mean of 475 after 57k-96k steps and end at 500.
Each network's gradient is clipped to norm 0.5 on its own, so that V_φ's loss does not shrink
π_θ's step.
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
    """save the model to runs/<run>/ppg.pt at the end (and on Ctrl-C)"""
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
    total_timesteps: int = 500_000
    """total environment steps over all envs"""
    learning_rate: float = 1e-3
    """Adam learning rate of the policy phase"""
    num_envs: int = 8
    """number of parallel environments"""
    num_steps: int = 64
    """steps per environment per rollout (T)"""
    anneal_lr: bool = True
    """decay both learning rates linearly to 0"""
    gamma: float = 0.99
    """discount factor γ"""
    gae_lambda: float = 0.95
    """GAE λ in (3)"""
    num_minibatches: int = 4
    """minibatches per policy-phase epoch (each of at least 2 samples)"""
    update_epochs: int = 4
    """E_π = E_V: policy-phase epochs over each rollout, for the policy and the value network alike"""
    norm_adv: bool = True
    """normalise advantages within each minibatch"""
    clip_coef: float = 0.2
    """surrogate clipping ε in (4)"""
    ent_coef: float = 0.01
    """entropy coefficient c_e in (5)"""
    max_grad_norm: float = 0.5
    """gradient-norm clipping, of each network on its own"""
    n_pi: int = 8
    """N_π: policy-phase iterations between two auxiliary phases"""
    aux_epochs: int = 6
    """E_aux: epochs of the auxiliary phase over the states of the last N_π rollouts"""
    aux_learning_rate: float = 1e-3
    """learning rate of the auxiliary phase's own Adam"""
    aux_num_minibatches: int = 4
    """auxiliary-phase minibatches per epoch for each of the N_π stored rollouts"""
    beta_clone: float = 1.0
    """β_clone in (9): weight of the KL that keeps the policy in place during distillation"""


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
    "max_grad_norm": "(0, inf)",
    "n_pi": "[1, inf)",
    "aux_epochs": "[1, inf)",
    "aux_learning_rate": "(0, inf)",
    "aux_num_minibatches": "[1, inf)",
    "beta_clone": "[0, inf)",
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
        fail(f"{env_id} is an Atari game (pixel observations); ppg.py is for vector observations: "
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
        fail(f"{env_id} has continuous (Box) actions; ppg.py is for Discrete actions: use algos/ppo_continuous.py")
    if not isinstance(act_space, gym.spaces.Discrete):
        fail(f"{env_id} has {act_space} actions; ppg.py needs a Discrete action space")
    if not isinstance(obs_space, gym.spaces.Box) or len(obs_space.shape) != 1:
        fail(f"{env_id} has observations {obs_space}; ppg.py needs flat vectors")


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


def categorical_kl(old_logits, new_logits):
    """Equation (8): KL(π_old ‖ π_θ) per state, from the logits of the two categorical policies
    (any leading batch shape; the actions on the last axis)."""
    old_logp, new_logp = old_logits.log_softmax(-1), new_logits.log_softmax(-1)
    return (old_logp.exp() * (old_logp - new_logp)).sum(-1)  # (8)


def value_loss(values, targets):
    """Equations (6) and (7): ½ E[(V(s_t) − V̂_targ)²], of the value network and of the auxiliary head."""
    return 0.5 * ((values - targets) ** 2).mean()  # (6), (7)


def joint_loss(aux_values, targets, old_logits, new_logits, beta_clone: float):
    """Equation (9): L^joint = L^aux + β_clone E[KL(π_old ‖ π_θ)], returned with its two terms."""
    aux = value_loss(aux_values, targets)
    kl = categorical_kl(old_logits, new_logits).mean()
    return aux + beta_clone * kl, aux, kl  # (9)


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
    """The policy network π_θ (actor, plus the auxiliary value head on its last hidden layer)
    and the separate value network V_φ (critic)."""

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
        self.aux_value = layer_init(nn.Linear(64, 1), std=1.0)

    def policy(self, obs, actions):
        """log π(a|s) and the entropy H(π(·|s)) for a batch."""
        logp = self.actor(obs).log_softmax(-1)
        return logp.gather(-1, actions.unsqueeze(-1)).squeeze(-1), -(logp.exp() * logp).sum(-1)

    def logits_and_aux_value(self, obs):
        """The policy's logits and V^aux_θ(s), both from the policy network's last hidden layer."""
        hidden = self.actor[:-1](obs)
        return self.actor[-1](hidden), self.aux_value(hidden).squeeze(-1)


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
    if saved_by != "ppg":
        fail(f"{args.eval_checkpoint} was saved by {saved_by or 'another program'}, not ppg.py: "
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
    summary = dict(env_id=args.env_id, algorithm="ppg", mode="eval", seed=args.seed, checkpoint=args.eval_checkpoint,
                   episodes=len(returns), mean_return=float(np.mean(returns)), std_return=float(np.std(returns)),
                   stopped=None, versions=versions(), run_dir=run_dir)
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
    if batch_size // args.aux_num_minibatches < 2:
        fail(f"--aux-num-minibatches {args.aux_num_minibatches} leaves minibatches of fewer than 2 samples (a "
             f"rollout of {batch_size} = num_envs {args.num_envs} × num_steps {args.num_steps}); "
             f"use at most {batch_size // 2}")
    num_iterations = args.total_timesteps // batch_size
    if num_iterations == 0:
        fail(f"--total-timesteps {args.total_timesteps} is less than one batch of {batch_size}; "
             "raise it or shrink the batch")
    if num_iterations < args.n_pi:
        fail(f"--total-timesteps {args.total_timesteps} makes {num_iterations} iterations of {batch_size} steps, "
             f"fewer than --n-pi {args.n_pi}: the auxiliary phase would never run; raise --total-timesteps to at "
             f"least {args.n_pi * batch_size} or lower --n-pi to at most {num_iterations}")
    check_env(args.env_id, args.capture_video)

    run_name = f"{args.env_id.replace('/', '-')}__{args.exp_name}__{args.seed}__{int(time.time())}"
    device, run_dir, writer = setup(args, run_name)
    envs = gym.vector.SyncVectorEnv([make_env(args.env_id, i, args.capture_video, run_dir)
                                     for i in range(args.num_envs)])
    envs.action_space.seed(args.seed)
    eval_env = make_env(args.env_id, -1, False, run_dir)() if args.eval_frequency else None
    obs_dim, n_actions = envs.single_observation_space.shape[0], envs.single_action_space.n
    agent = Agent(obs_dim, n_actions).to(device)
    fused = True if device.type in ("cpu", "cuda") else None
    optimizer = torch.optim.Adam(agent.parameters(), lr=args.learning_rate, eps=1e-5, fused=fused)
    aux_optimizer = torch.optim.Adam(agent.parameters(), lr=args.aux_learning_rate, eps=1e-5, fused=fused)
    # Each network's gradient clipped on its own: V_φ's loss (targets near 1 / (1 - γ) = 100 on CartPole)
    # would otherwise set the joint norm and shrink the policy's step.
    networks = ([*agent.actor.parameters(), *agent.aux_value.parameters()], [*agent.critic.parameters()])
    rng = np.random.default_rng(args.seed)

    # Rollout storage on the host (the envs live there); one copy to `device` per iteration.
    T, N = args.num_steps, args.num_envs
    obs = np.zeros((T, N, obs_dim), dtype=np.float32)
    actions = np.zeros((T, N), dtype=np.int64)
    rewards = np.zeros((T, N), dtype=np.float32)
    terminations = np.zeros((T, N), dtype=np.float32)
    truncations = np.zeros((T, N), dtype=np.float32)
    resets = np.zeros((T, N), dtype=bool)  # row t is the reset step after an episode ended at t - 1
    buffer_obs, buffer_targets = [], []  # B: the states of the last N_π rollouts and their V̂_targ, on `device`

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
                frac = 1.0 - (iteration - 1.0) / num_iterations
                optimizer.param_groups[0]["lr"] = args.learning_rate * frac
                aux_optimizer.param_groups[0]["lr"] = args.aux_learning_rate * frac

            # a ~ π(·|s) by the Gumbel-max trick: argmax(logits + g), g ~ Gumbel(0, 1), is a
            # sample of the softmax distribution; noise from the seeded generator.
            logits_fn = numpy_mlp(agent.actor)
            gumbel = rng.gumbel(size=(T, N, n_actions)).astype(np.float32)
            for step in range(T):
                raise_if_stopped(stop_signals)
                obs[step], resets[step] = next_obs, next_done
                actions[step] = (logits_fn(next_obs) + gumbel[step]).argmax(-1)
                next_obs, rewards[step], term, trunc, infos = envs.step(actions[step])
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

            # One batched pass for V_φ(s_0..s_T) and log π_old(a|s) of the whole rollout.
            all_obs = torch.as_tensor(np.concatenate([obs, next_obs[None].astype(np.float32)]), device=device)
            b_obs = all_obs[:-1].reshape(-1, obs_dim)
            b_actions = torch.as_tensor(actions, device=device).reshape(-1)
            with torch.inference_mode():
                values = agent.critic(all_obs).squeeze(-1)
                b_logprobs = agent.policy(b_obs, b_actions)[0]
            b_values = values[:-1].reshape(-1)
            values = values.cpu().numpy()
            advantages = gae(rewards, values, terminations, truncations, args.gamma, args.gae_lambda)
            returns = advantages + values[:-1]  # (3)

            valid = np.flatnonzero(~resets.reshape(-1))  # reset rows hold no transition
            b_advantages = torch.as_tensor(advantages.reshape(-1), device=device)
            b_returns = torch.as_tensor(returns.reshape(-1), device=device)

            # Policy phase: PPO-clip on π_θ and L^value on V_φ, E_π = E_V epochs over the same minibatches.
            clipfracs, approx_kls = [], []
            for epoch in range(args.update_epochs):
                epoch_log_ratios = []
                for mb in np.array_split(rng.permutation(valid), args.num_minibatches):
                    if len(mb) == 0:  # only when reset rows leave fewer samples than minibatches
                        continue
                    mb = torch.as_tensor(mb, device=device)
                    new_logprob, entropy = agent.policy(b_obs[mb], b_actions[mb])
                    new_value = agent.critic(b_obs[mb]).squeeze(-1)
                    log_ratio = new_logprob - b_logprobs[mb]
                    ratio = log_ratio.exp()  # (1)
                    epoch_log_ratios.append(log_ratio.detach())

                    mb_adv = b_advantages[mb]
                    if args.norm_adv and len(mb) > 1:  # one sample has no spread to normalise by
                        mb_adv = (mb_adv - mb_adv.mean()) / (mb_adv.std() + 1e-8)
                    pg_loss = torch.max(-mb_adv * ratio,
                                        -mb_adv * ratio.clamp(1 - args.clip_coef, 1 + args.clip_coef)).mean()  # (4)
                    entropy_loss = entropy.mean()
                    v_loss = value_loss(new_value, b_returns[mb])  # (6)
                    loss = pg_loss - args.ent_coef * entropy_loss + v_loss  # (5) for θ, (6) for φ: no shared weight

                    optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                    for params in networks:
                        nn.utils.clip_grad_norm_(params, args.max_grad_norm, foreach=True)
                    optimizer.step()
                log_ratio = torch.cat(epoch_log_ratios)  # this epoch's minibatches only
                approx_kls.append(((log_ratio.exp() - 1) - log_ratio).mean())
                clipfracs.append(((log_ratio.exp() - 1).abs() > args.clip_coef).float().mean())
            buffer_obs.append(b_obs[valid])
            buffer_targets.append(b_returns[valid])

            losses = {"losses/value_loss": v_loss.item(), "losses/policy_loss": pg_loss.item(),
                      "losses/entropy": entropy_loss.item(), "losses/approx_kl": torch.stack(approx_kls).mean().item(),
                      "losses/clipfrac": torch.stack(clipfracs).mean().item()}

            # Auxiliary phase, every N_π iterations, over all states of B.
            if iteration % args.n_pi == 0:
                aux_obs, aux_targets = torch.cat(buffer_obs), torch.cat(buffer_targets)
                buffer_obs, buffer_targets = [], []
                with torch.inference_mode():
                    old_logits = agent.actor(aux_obs)  # π_old of (8), fixed for the whole phase
                for epoch in range(args.aux_epochs):
                    for mb in np.array_split(rng.permutation(len(aux_obs)), args.n_pi * args.aux_num_minibatches):
                        if len(mb) == 0:
                            continue
                        mb = torch.as_tensor(mb, device=device)
                        new_logits, aux_value = agent.logits_and_aux_value(aux_obs[mb])
                        joint, aux_loss, kl_clone = joint_loss(aux_value, aux_targets[mb], old_logits[mb], new_logits,
                                                               args.beta_clone)
                        aux_v_loss = value_loss(agent.critic(aux_obs[mb]).squeeze(-1), aux_targets[mb])  # (6)
                        loss = joint + aux_v_loss  # (9) for θ, (6) for φ

                        aux_optimizer.zero_grad(set_to_none=True)
                        loss.backward()
                        for params in networks:
                            nn.utils.clip_grad_norm_(params, args.max_grad_norm, foreach=True)
                        aux_optimizer.step()
                losses.update({"losses/aux_value": aux_loss.item(), "losses/kl_clone": kl_clone.item(),
                               "losses/aux_phase_value_loss": aux_v_loss.item()})
                writer.add_scalar("charts/aux_learning_rate", aux_optimizer.param_groups[0]["lr"], global_step)

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
                logits = numpy_mlp(agent.actor)
                eval_returns = evaluate_policy(lambda o: int(logits(o).argmax()), eval_env, args.eval_episodes,
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
        path = os.path.join(run_dir, "ppg.pt")
        torch.save({"algorithm": "ppg", "args": asdict(args), "model": agent.state_dict()}, path)
        print(f"model saved to {path}")
    envs.close()
    if eval_env is not None:
        eval_env.close()
    writer.close()
    wall = time.time() - start_time
    eval_step, eval_return = last_eval or (None, None)
    summary = dict(env_id=args.env_id, algorithm="ppg", exp_name=args.exp_name, seed=args.seed, global_step=global_step,
                   wall_seconds=wall, SPS=global_step / wall,
                   mean_return=float(np.mean(recent_returns)) if recent_returns else None,
                   episodes_in_mean=len(recent_returns), episodes=episodes,
                   eval_step=eval_step, eval_return=eval_return,
                   stopped=stopped, stop_reason=stop_reason, versions=versions(), run_dir=run_dir)
    return write_summary(run_dir, summary)


if __name__ == "__main__":
    sys.exit(EXIT_CODES[train(parse_args())["stopped"]])
