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
   \nabla_\theta J = \mathbb{E}_s\left[\nabla_a Q_{\phi_1}(s, a)|_{a=\mu_\theta(s)} \nabla_\theta \mu_\theta(s)\right] \tag{6} $$

Target networks, updated with the actor by Polyak averaging:
$$ \theta' \leftarrow \tau\theta + (1 - \tau)\theta', \qquad \phi'_j \leftarrow \tau\phi_j + (1 - \tau)\phi'_j \tag{7} $$

Replay: a ring buffer of (s, a, r, s', term) in preallocated NumPy arrays, sampled
uniformly. Environments: gymnasium vector envs in their default NEXT_STEP autoreset mode.
The step that ends an episode returns its true final observation as s' (stored with its
term flag, so a truncation bootstraps); the next `step` call is a reset step that ignores
the action and returns the first observation of a new episode: that row is no transition
and is not stored.

Run:
    python algos/td3.py --total-timesteps 20000          # Pendulum-v1
    python algos/td3.py --env-id Hopper-v4 --learning-starts 25000
    python algos/td3.py --help

Defaults are CleanRL's td3_continuous_action.py (one lr 3e-4 for both networks, batch 256,
256×256 ReLU networks, τ = 0.005, noise 0.1 / 0.2 / clip 0.5, delay 2, one gradient step
per vector step) except learning_starts: 5,000 instead of 25,000, enough for Pendulum and
still fine for Hopper-v4.
"""

import json
import math
import os
import random
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
    eval_episodes: int = 10
    """number of episodes for --eval-checkpoint"""

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

    torch_threads: int = 1
    """CPU threads for torch: more help on an idle multi-core machine, 1 is fastest while other processes share the cores"""

def fail(message: str):
    """Bad input: one clear line on stderr and exit code 2."""
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


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
                         "without a display, MuJoCo needs MUJOCO_GL=egl or MUJOCO_GL=osmesa")
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
    """Equation (7): target ← τ·source + (1 - τ)·target, parameter by parameter, in place."""
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


class TwinQ(nn.Module):
    """Q_1 and Q_2 (256×256 ReLU MLPs of [s, a]) as one module with stacked weights: each
    layer is one batched matmul for both critics instead of two. Initialised like
    nn.Linear: U(±1/√fan_in), independently per critic."""

    def __init__(self, obs_dim: int, act_dim: int, n: int = 2):
        super().__init__()
        sizes = [obs_dim + act_dim, 256, 256, 1]
        self.weights, self.biases = nn.ParameterList(), nn.ParameterList()
        for fan_in, fan_out in zip(sizes[:-1], sizes[1:]):
            bound = 1.0 / math.sqrt(fan_in)
            self.weights.append(nn.Parameter(torch.empty(n, fan_in, fan_out).uniform_(-bound, bound)))
            self.biases.append(nn.Parameter(torch.empty(n, 1, fan_out).uniform_(-bound, bound)))

    def forward(self, obs, actions, first_only: bool = False):
        """[n, B] values; first_only: [1, B] of Q_1 with its weights detached, for the actor's loss."""
        x = torch.cat([obs, actions], -1)
        last = len(self.weights) - 1
        for i, (w, b) in enumerate(zip(self.weights, self.biases)):
            if first_only:
                w, b = w[:1].detach(), b[:1].detach()
            x = torch.baddbmm(b, x, w) if x.dim() == 3 else torch.matmul(x, w) + b
            if i < last:
                x = x.relu()
        return x.squeeze(-1)


def setup(args: Args, run_name: str):
    """Seeding, device and logging shared by training and evaluation."""
    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)
    torch.backends.cudnn.deterministic = args.torch_deterministic
    device = torch.device("cuda" if torch.cuda.is_available() and args.cuda else "cpu")
    if device.type == "cpu":
        torch.set_num_threads(args.torch_threads)
        torch.set_flush_denormal(True)  # tiny gradients and Adam moments turn denormal and slow every op
    run_dir = os.path.join("runs", run_name)
    if args.track:
        try:
            import wandb
        except ImportError:
            fail("--track needs Weights & Biases: pip install wandb")
        wandb.init(project=args.wandb_project_name, entity=args.wandb_entity, sync_tensorboard=True,
                   config=asdict(args), name=run_name, save_code=True)
    writer = SummaryWriter(run_dir)
    writer.add_text("hyperparameters", "|param|value|\n|-|-|\n" + "\n".join(f"|{k}|{v}|" for k, v in asdict(args).items()))
    return device, run_dir, writer


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
        fail(f"{args.eval_checkpoint} was saved by {saved_by or 'another program'}, not td3.py: evaluate it with the script that saved it")
    args.env_id = ckpt["args"]["env_id"]
    check_env(args.env_id, args.capture_video)
    if args.eval_episodes <= 0 or args.torch_threads <= 0:
        fail(f"--eval-episodes and --torch-threads must be positive, got {args.eval_episodes} and {args.torch_threads}")
    run_name = f"{args.env_id}__{args.exp_name}-eval__{args.seed}__{int(time.time())}"
    device, run_dir, writer = setup(args, run_name)
    env = make_env(args.env_id, 0, args.capture_video, run_dir)()
    low, high = env.action_space.low, env.action_space.high
    actor = Actor(env.observation_space.shape[0], env.action_space.shape[0], low, high).to(device)
    actor.load_state_dict(ckpt["actor"])
    returns = []
    obs, _ = env.reset(seed=args.seed)
    while len(returns) < args.eval_episodes:
        with torch.inference_mode():
            action = actor(torch.as_tensor(obs, dtype=torch.float32, device=device)).cpu().numpy()
        obs, _, terminated, truncated, info = env.step(np.clip(action, low, high))
        if terminated or truncated:
            returns.append(float(info["episode"]["r"]))
            writer.add_scalar("eval/episodic_return", returns[-1], len(returns))
            obs, _ = env.reset()
    env.close()
    writer.close()
    summary = dict(env_id=args.env_id, algorithm="td3", mode="eval", seed=args.seed, checkpoint=args.eval_checkpoint,
                   episodes=len(returns), mean_return=float(np.mean(returns)), std_return=float(np.std(returns)))
    with open(os.path.join(run_dir, "summary.json"), "w") as f:
        json.dump(summary, f, indent=2)
    print(f"eval {args.env_id}: mean return {summary['mean_return']:.2f} ± {summary['std_return']:.2f} over {len(returns)} episodes")
    return summary


def train(args: Args) -> dict:
    if args.eval_checkpoint:
        return evaluate(args)
    if min(args.total_timesteps, args.num_envs, args.buffer_size, args.batch_size, args.policy_frequency,
           args.torch_threads) <= 0:
        fail("--total-timesteps, --num-envs, --buffer-size, --batch-size, --policy-frequency and --torch-threads "
             "must be positive")
    if args.batch_size > args.buffer_size:
        fail(f"--batch-size {args.batch_size} is larger than --buffer-size {args.buffer_size}; shrink the batch or grow the buffer")
    if not 0 <= args.learning_starts < args.total_timesteps:
        fail(f"--learning-starts {args.learning_starts} must be in [0, --total-timesteps {args.total_timesteps}): "
             "nothing would be learned; raise the budget or start learning earlier")
    if not 0 < args.tau <= 1:
        fail(f"--tau must be in (0, 1], got {args.tau}")
    if min(args.exploration_noise, args.policy_noise, args.noise_clip) < 0:
        fail("--exploration-noise, --policy-noise and --noise-clip must be non-negative")
    num_iterations = args.total_timesteps // args.num_envs
    if num_iterations == 0:
        fail(f"--total-timesteps {args.total_timesteps} is less than one step of {args.num_envs} envs; raise it")
    check_env(args.env_id, args.capture_video)

    run_name = f"{args.env_id}__{args.exp_name}__{args.seed}__{int(time.time())}"
    device, run_dir, writer = setup(args, run_name)
    envs = gym.vector.SyncVectorEnv([make_env(args.env_id, i, args.capture_video, run_dir) for i in range(args.num_envs)])
    envs.action_space.seed(args.seed)
    obs_dim, act_dim = envs.single_observation_space.shape[0], envs.single_action_space.shape[0]
    low, high = envs.single_action_space.low, envs.single_action_space.high  # the env's bounds, not ±1
    actor = Actor(obs_dim, act_dim, low, high).to(device)
    critic = TwinQ(obs_dim, act_dim).to(device)
    actor_target = Actor(obs_dim, act_dim, low, high).to(device)
    critic_target = TwinQ(obs_dim, act_dim).to(device)
    actor_target.load_state_dict(actor.state_dict())
    critic_target.load_state_dict(critic.state_dict())
    fused = True if device.type in ("cpu", "cuda") else None
    actor_optimizer = torch.optim.Adam(actor.parameters(), lr=args.learning_rate, fused=fused)
    critic_optimizer = torch.optim.Adam(critic.parameters(), lr=args.learning_rate, fused=fused)
    rng = np.random.default_rng(args.seed)
    rb = ReplayBuffer(min(args.buffer_size, args.total_timesteps), obs_dim, act_dim, rng)
    t_low, t_high = torch.as_tensor(low, device=device), torch.as_tensor(high, device=device)
    action_scale = actor.action_scale
    explore_std = args.exploration_noise * (high - low) / 2.0
    policy_std = args.policy_noise * action_scale

    global_step, start_time = 0, time.time()
    recent_returns = deque(maxlen=20)
    episodes = 0
    obs, _ = envs.reset(seed=args.seed)
    reset_step = np.zeros(args.num_envs, dtype=bool)  # this step of env i only resets it (NEXT_STEP)
    log_every = max(1, num_iterations // 20)
    interrupted, actor_loss = False, None
    try:
        for iteration in range(1, num_iterations + 1):
            if global_step < args.learning_starts:
                actions = rng.uniform(low, high, (args.num_envs, act_dim)).astype(np.float32)
            else:
                with torch.inference_mode():
                    mu = actor(torch.as_tensor(obs, dtype=torch.float32, device=device)).cpu().numpy()
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
                                                          action_scale, t_low, t_high)  # (3)
                    next_q = critic_target(b_next_obs, next_actions)
                    y = td3_target(b_rewards, b_terminations, next_q[0], next_q[1], args.gamma)  # (4)
                q = critic(b_obs, b_actions)
                qf_losses = ((q - y) ** 2).mean(1)  # (5), one per critic
                critic_optimizer.zero_grad(set_to_none=True)
                qf_losses.sum().backward()
                critic_optimizer.step()

                if iteration % args.policy_frequency == 0:
                    # the critic's weights are detached: only ∇_a Q_1 flows back into θ
                    actor_loss = -critic(b_obs, actor(b_obs), first_only=True).mean()  # (6)
                    actor_optimizer.zero_grad(set_to_none=True)
                    actor_loss.backward()
                    actor_optimizer.step()
                    polyak_update(actor_target, actor, args.tau)  # (7)
                    polyak_update(critic_target, critic, args.tau)  # (7)

                if iteration % 100 == 0:  # .item() waits for the device: only now and then
                    sps = int(global_step / (time.time() - start_time))
                    writer.add_scalar("losses/qf1_values", q[0].mean().item(), global_step)
                    writer.add_scalar("losses/qf2_values", q[1].mean().item(), global_step)
                    writer.add_scalar("losses/qf1_loss", qf_losses[0].item(), global_step)
                    writer.add_scalar("losses/qf2_loss", qf_losses[1].item(), global_step)
                    writer.add_scalar("losses/qf_loss", qf_losses.sum().item() / 2.0, global_step)
                    if actor_loss is not None:
                        writer.add_scalar("losses/actor_loss", actor_loss.item(), global_step)
                    writer.add_scalar("charts/SPS", sps, global_step)
            if iteration % log_every == 0 or iteration == num_iterations:
                sps = int(global_step / (time.time() - start_time))
                mean_ret = np.mean(recent_returns) if recent_returns else float("nan")
                print(f"step {global_step:>9,}  SPS {sps:>6,}  return(last 20) {mean_ret:8.2f}", flush=True)
    except KeyboardInterrupt:
        interrupted = True
        print(f"interrupted at step {global_step:,}; closing logs", file=sys.stderr)

    if args.save_model:
        path = os.path.join(run_dir, "td3.pt")
        torch.save({"algorithm": "td3", "args": asdict(args), "actor": actor.state_dict(), "critic": critic.state_dict(),
                    "actor_target": actor_target.state_dict(), "critic_target": critic_target.state_dict()}, path)
        print(f"model saved to {path}")
    envs.close()
    writer.close()
    wall = time.time() - start_time
    summary = dict(env_id=args.env_id, algorithm="td3", exp_name=args.exp_name, seed=args.seed, global_step=global_step,
                   wall_seconds=wall, SPS=global_step / wall,
                   mean_return=float(np.mean(recent_returns)) if recent_returns else None,
                   episodes_in_mean=len(recent_returns), episodes=episodes, interrupted=interrupted, run_dir=run_dir)
    with open(os.path.join(run_dir, "summary.json"), "w") as f:
        json.dump(summary, f, indent=2)
    return summary


if __name__ == "__main__":
    train(tyro.cli(Args))
