r"""One-step actor-critic: the TD(0) error as the advantage, discrete actions.

Sutton & Barto, "Reinforcement Learning: An Introduction" (2nd ed., 2018), section 13.5
("One-step Actor-Critic"); the actor-critic architecture goes back to Barto, Sutton and
Anderson (1983), "Neuronlike adaptive elements that can solve difficult learning control
problems", IEEE SMC 13(5).

REINFORCE waits for the end of the episode to know G_t. Actor-critic replaces G_t by the
one-step bootstrapped target r_t + γV(s_{t+1}), and learns after every step: the TD error

$$ \delta_t = r_t + \gamma V_\phi(s_{t+1})(1 - \text{term}_t) - V_\phi(s_t) \tag{1} $$

is an estimate of the advantage A(s_t, a_t) (its expectation given s_t, a_t is
Q(s_t, a_t) - V(s_t) when V is exact). At a termination nothing follows s_{t+1}; at a
truncation (a time limit) s_{t+1} is the final observation and V(s_{t+1}) is bootstrapped.

Actor step along δ·∇log π (δ held constant) and critic step on δ² (semi-gradient: the
target r + γV(s_{t+1}) is held constant), each network with its own optimiser:
$$ \theta \leftarrow \theta + \alpha_\theta\, \delta_t \nabla_\theta \log\pi_\theta(a_t|s_t)
   \quad\Leftrightarrow\quad L^{\pi} = -\mathbb{E}_t[\delta_t \log\pi_\theta(a_t|s_t)] \tag{2} $$
$$ \phi \leftarrow \phi + \alpha_\phi\, \delta_t \nabla_\phi V_\phi(s_t)
   \quad\Leftrightarrow\quad L^{V} = \tfrac12\mathbb{E}_t[\delta_t^2] \tag{3} $$

Sutton & Barto's version also scales the actor step by γ^t; like most implementations this
one does not. Each update uses the N transitions of one step of N vector envs (the
expectation over t in (2) and (3) is a mean over those N).

Environments: gymnasium vector envs in their default NEXT_STEP autoreset mode: the step
that ends an episode returns its final observation (so s_{t+1} in (1) is right at a
truncation), and the next step is a reset step that ignores its action and is left out of
the update.

Run:
    python algos/actor_critic.py                     # CartPole-v1
    python algos/actor_critic.py --help
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
    """save the model to runs/<run>/actor_critic.pt at the end (and on Ctrl-C)"""
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
    total_timesteps: int = 300_000
    """total environment steps over all envs"""
    learning_rate: float = 1e-3
    """Adam learning rate of the actor (α_θ)"""
    critic_learning_rate: float = 1e-3
    """Adam learning rate of the critic (α_φ)"""
    num_envs: int = 8
    """number of parallel environments (transitions per update)"""
    gamma: float = 0.99
    """discount factor γ"""


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
    "critic_learning_rate": "(0, inf)",
    "num_envs": "[1, inf)",
    "gamma": "[0, 1]",
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
        fail(f"{env_id} is an Atari game (pixel observations); actor_critic.py is for vector observations: "
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
        fail(f"{env_id} has continuous (Box) actions; actor_critic.py is for Discrete actions: "
             "use algos/ppo_continuous.py")
    if not isinstance(act_space, gym.spaces.Discrete):
        fail(f"{env_id} has {act_space} actions; actor_critic.py needs a Discrete action space")
    if not isinstance(obs_space, gym.spaces.Box) or len(obs_space.shape) != 1:
        fail(f"{env_id} has observations {obs_space}; actor_critic.py needs flat vectors")


def td_error(rewards, values, next_values, terminations, gamma):
    """One-step TD error δ_t of equation (1); numpy arrays or torch tensors.

    next_values is V(s_{t+1}) of the observation that the step returned: the final
    observation when the episode ended there, so a truncation bootstraps from it.
    """
    return rewards + gamma * next_values * (1.0 - terminations) - values  # (1)


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
        """Sample a ~ π(·|s) by the Gumbel-max trick (argmax(logits + Gumbel noise), with
        -log(E), E ~ Exp(1), a Gumbel(0, 1) sample) and return it with log π(a|s)."""
        logp = self.logits(obs).log_softmax(-1)
        action = (logp.detach() - torch.empty_like(logp).exponential_().log()).argmax(-1)
        return action, logp.gather(-1, action.unsqueeze(-1)).squeeze(-1)

    @torch.inference_mode()
    def greedy(self, obs) -> int:
        """argmax_a π(a|s) for one observation: the greedy policy of evaluate_policy."""
        x = torch.as_tensor(obs, dtype=torch.float32, device=next(self.parameters()).device)
        return int(self.logits(x).argmax())


class Critic(nn.Module):
    """V_φ(s)."""

    def __init__(self, obs_dim: int):
        super().__init__()
        self.v = mlp(obs_dim, 1, out_std=1.0)

    def forward(self, obs):
        return self.v(obs).squeeze(-1)


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
    if saved_by != "actor_critic":
        fail(f"{args.eval_checkpoint} was saved by {saved_by or 'another program'}, not actor_critic.py: "
             "evaluate it with the script that saved it")
    args.env_id = ckpt["args"]["env_id"]
    check_env(args.env_id, args.capture_video)
    run_name = f"{args.env_id.replace('/', '-')}__{args.exp_name}-eval__{args.seed}__{int(time.time())}"
    device, run_dir, writer = setup(args, run_name)
    env = make_env(args.env_id, 0, args.capture_video, run_dir)()
    actor = Actor(env.observation_space.shape[0], env.action_space.n).to(device)
    actor.load_state_dict(ckpt["model"])
    returns = evaluate_policy(actor.greedy, env, args.eval_episodes, args.seed)
    for i, r in enumerate(returns):
        writer.add_scalar("eval/episodic_return", r, i + 1)
    env.close()
    writer.close()
    summary = dict(env_id=args.env_id, algorithm="actor_critic", mode="eval", seed=args.seed,
                   checkpoint=args.eval_checkpoint, episodes=len(returns), mean_return=float(np.mean(returns)),
                   std_return=float(np.std(returns)), stopped=None, versions=versions(), run_dir=run_dir)
    print(f"eval {args.env_id}: mean return {summary['mean_return']:.2f} ± {summary['std_return']:.2f} "
          f"over {len(returns)} episodes")
    return write_summary(run_dir, summary)


def train(args: Args) -> dict:
    check_args(args)
    if args.eval_checkpoint:
        return evaluate(args)
    num_iterations = args.total_timesteps // args.num_envs
    if num_iterations == 0:
        fail(f"--total-timesteps {args.total_timesteps} is less than one step of --num-envs {args.num_envs} envs; "
             "raise it or use fewer envs")
    check_env(args.env_id, args.capture_video)

    run_name = f"{args.env_id.replace('/', '-')}__{args.exp_name}__{args.seed}__{int(time.time())}"
    device, run_dir, writer = setup(args, run_name)
    envs = gym.vector.SyncVectorEnv([make_env(args.env_id, i, args.capture_video, run_dir)
                                     for i in range(args.num_envs)])
    envs.action_space.seed(args.seed)
    eval_env = make_env(args.env_id, -1, False, run_dir)() if args.eval_frequency else None
    obs_dim, N = envs.single_observation_space.shape[0], args.num_envs
    fused = True if device.type in ("cpu", "cuda") else None
    actor = Actor(obs_dim, envs.single_action_space.n).to(device)
    critic = Critic(obs_dim).to(device)
    actor_optimizer = torch.optim.Adam(actor.parameters(), lr=args.learning_rate, fused=fused)
    critic_optimizer = torch.optim.Adam(critic.parameters(), lr=args.critic_learning_rate, fused=fused)

    global_step, start_time = 0, time.time()
    next_progress, next_eval = start_time + 1.0, args.eval_frequency
    recent_returns = deque(maxlen=20)
    episodes, last_eval = 0, None
    # saved instead of the models if training turns non-finite
    last_finite = copy.deepcopy((actor.state_dict(), critic.state_dict()))
    next_obs, _ = envs.reset(seed=args.seed)
    obs = torch.as_tensor(next_obs, dtype=torch.float32, device=device)
    valid = torch.ones(N, device=device)  # 0 for a reset step
    stopped = stop_reason = None
    stop_signals = []  # Ctrl-C and SIGTERM, recorded here and raised at the next env step
    previous_handlers = {s: signal.signal(s, lambda signum, frame: stop_signals.append(signum))
                         for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        for iteration in range(1, num_iterations + 1):
            raise_if_stopped(stop_signals)
            action, log_prob = actor(obs)
            next_obs, reward, term, trunc, infos = envs.step(action.cpu().numpy())
            global_step += N
            if "episode" in infos:
                for i in np.flatnonzero(infos["_episode"]):
                    r, length = float(infos["episode"]["r"][i]), int(infos["episode"]["l"][i])
                    recent_returns.append(r)
                    episodes += 1
                    writer.add_scalar("charts/episodic_return", r, global_step)
                    writer.add_scalar("charts/episodic_length", length, global_step)

            new_obs = torch.as_tensor(next_obs, dtype=torch.float32, device=device)
            values = critic(torch.cat([obs, new_obs]))  # V(s_t), V(s_{t+1}) in one pass
            delta = td_error(torch.as_tensor(reward, dtype=torch.float32, device=device), values[:N],
                             values[N:].detach(), torch.as_tensor(term, dtype=torch.float32, device=device), args.gamma)
            weight = valid / valid.sum().clamp(min=1)  # mean over the real transitions (all N may be reset steps)
            actor_loss = -(weight * delta.detach() * log_prob).sum()  # (2)
            critic_loss = 0.5 * (weight * delta ** 2).sum()  # (3)
            actor_optimizer.zero_grad(set_to_none=True)
            critic_optimizer.zero_grad(set_to_none=True)
            (actor_loss + critic_loss).backward()  # the two losses share no parameters
            actor_optimizer.step()
            critic_optimizer.step()
            obs = new_obs
            valid = torch.as_tensor(~(term | trunc), dtype=torch.float32, device=device)

            if iteration % 100 == 0 or iteration == num_iterations:  # losses every 100 updates: logging is not free
                losses = {"losses/policy_loss": actor_loss.item(), "losses/value_loss": critic_loss.item()}
                check_finite(global_step, losses, actor, critic)
                last_finite = copy.deepcopy((actor.state_dict(), critic.state_dict()))
                for key, value in losses.items():
                    writer.add_scalar(key, value, global_step)
                writer.add_scalar("charts/SPS", int(global_step / (time.time() - start_time)), global_step)
            if args.eval_frequency and global_step >= next_eval:
                eval_returns = evaluate_policy(actor.greedy, eval_env, args.eval_episodes, args.seed + EVAL_SEED_OFFSET)
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
        actor.load_state_dict(last_finite[0])
        critic.load_state_dict(last_finite[1])
    finally:
        for s, handler in previous_handlers.items():
            signal.signal(s, handler)
    if stopped:
        print(f"stopped: {stop_reason}", file=sys.stderr)

    if args.save_model:
        path = os.path.join(run_dir, "actor_critic.pt")
        torch.save({"algorithm": "actor_critic", "args": asdict(args), "model": actor.state_dict(),
                    "critic": critic.state_dict()}, path)
        print(f"model saved to {path}")
    envs.close()
    if eval_env is not None:
        eval_env.close()
    writer.close()
    wall = time.time() - start_time
    eval_step, eval_return = last_eval or (None, None)
    summary = dict(env_id=args.env_id, algorithm="actor_critic", exp_name=args.exp_name, seed=args.seed,
                   global_step=global_step, wall_seconds=wall, SPS=global_step / wall,
                   mean_return=float(np.mean(recent_returns)) if recent_returns else None,
                   episodes_in_mean=len(recent_returns), episodes=episodes,
                   eval_step=eval_step, eval_return=eval_return,
                   stopped=stopped, stop_reason=stop_reason, versions=versions(), run_dir=run_dir)
    return write_summary(run_dir, summary)


if __name__ == "__main__":
    sys.exit(EXIT_CODES[train(parse_args())["stopped"]])
