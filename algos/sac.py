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

Actor loss, ã ~ π(·|s) by (1) so the gradient flows through the sample (reparameterisation):
$$ J_\pi = \mathbb E_{s \sim D}\left[\alpha\log\pi(\tilde a|s) - \min_{j=1,2} Q_j(s, \tilde a)\right] \tag{6} $$

Temperature loss (1812.05905, eq. 18), target entropy H̄ = -target_entropy_scale · |A|:
$$ J(\alpha) = \mathbb E_{s \sim D, a \sim \pi}\left[-\alpha\log\pi(a|s) - \alpha\bar H\right] \tag{7} $$

Target networks follow by Polyak averaging:
$$ \bar\theta \leftarrow \tau\theta + (1 - \tau)\bar\theta \tag{8} $$

--eval-checkpoint acts with the deterministic action a = scale ⊙ tanh(μ(s)) + bias.

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
buffer 1e6, τ = 0.005, policy lr 3e-4, Q lr 1e-3, learning starts 5e3, autotuned α.
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
    """save the actor and critics to runs/<run>/sac.pt at the end (and on Ctrl-C)"""
    eval_checkpoint: Optional[str] = None
    """path of a saved model: evaluate it (deterministic action) without learning, then exit"""
    eval_episodes: int = 10
    """number of episodes for --eval-checkpoint"""

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
    """entropy temperature α (the initial value with --autotune)"""
    autotune: bool = True
    """learn α by (7) against the target entropy"""
    target_entropy_scale: float = 1.0
    """target entropy H̄ in (7) is -target_entropy_scale × (action dimensions)"""
    torch_threads: int = 1
    """CPU threads for torch: 2 was ~20% faster on an idle 2-core machine, 1 is far faster when other processes share the cores"""


LOG_STD_MIN, LOG_STD_MAX = -5.0, 2.0  # bounds of log σ in (2)


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
        fail(f"{env_id} has Discrete actions; sac.py is for continuous (Box) actions: use algos/ppo.py")
    if not isinstance(act_space, gym.spaces.Box) or len(act_space.shape) != 1:
        fail(f"{env_id} has {act_space} actions; sac.py needs a flat Box action space")
    if not np.all(np.isfinite(act_space.low)) or not np.all(np.isfinite(act_space.high)):
        fail(f"{env_id} has unbounded actions {act_space}; the tanh policy of sac.py needs finite bounds")
    if not isinstance(obs_space, gym.spaces.Box) or len(obs_space.shape) != 1:
        fail(f"{env_id} has observations {obs_space}; sac.py needs flat vectors")


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
def polyak_update(target, source, tau):
    """Equation (8) in place on two lists of tensors: target ← τ·source + (1 - τ)·target."""
    torch._foreach_lerp_(target, source, tau)  # (8)


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


class TwinQ(nn.Module):
    """Two Q-networks Q_1, Q_2 (256×256 ReLU MLPs on [s, a]) with their weights stacked on a
    leading axis of 2, so one batched matmul per layer evaluates both."""

    def __init__(self, obs_dim: int, act_dim: int, hidden: int = 256):
        super().__init__()
        sizes = [obs_dim + act_dim, hidden, hidden, 1]
        self.weights, self.biases = nn.ParameterList(), nn.ParameterList()
        for fan_in, fan_out in zip(sizes[:-1], sizes[1:]):
            bound = 1.0 / math.sqrt(fan_in)  # nn.Linear's default initialisation
            self.weights.append(nn.Parameter(torch.empty(2, fan_in, fan_out).uniform_(-bound, bound)))
            self.biases.append(nn.Parameter(torch.empty(2, 1, fan_out).uniform_(-bound, bound)))

    def forward(self, obs, actions, detached: bool = False):
        """[2, B]: Q_1(s, a) and Q_2(s, a). detached=True keeps the critic's weights out of the
        graph, for the actor loss (6): the gradient reaches the action, not the critics."""
        x = torch.cat([obs, actions], -1).expand(2, -1, -1)
        n = len(self.weights)
        for i, (w, b) in enumerate(zip(self.weights, self.biases)):
            if detached:
                w, b = w.detach(), b.detach()
            x = torch.baddbmm(b, x, w)
            if i < n - 1:
                x = torch.relu_(x)  # in place: one [2, B, 256] buffer less per layer
        return x.squeeze(-1)


class ReplayBuffer:
    """Uniform replay of (s, a, r, s', term) rows in one preallocated float32 array, so a
    batch is one NumPy gather and one copy to the device."""

    def __init__(self, capacity: int, obs_dim: int, act_dim: int, rng: np.random.Generator):
        self.data = np.zeros((capacity, 2 * obs_dim + act_dim + 2), dtype=np.float32)
        self.splits = np.cumsum([obs_dim, act_dim, 1, obs_dim])  # obs | action | reward | next_obs | term
        self.capacity, self.pos, self.size, self.rng = capacity, 0, 0, rng

    def add(self, obs, actions, rewards, next_obs, terminations):
        rows = np.concatenate([obs, actions, rewards[:, None], next_obs, terminations[:, None]], 1)
        idx = (self.pos + np.arange(len(rows))) % self.capacity
        self.data[idx] = rows
        self.pos = (self.pos + len(rows)) % self.capacity
        self.size = min(self.size + len(rows), self.capacity)

    def sample(self, batch_size: int, device):
        batch = torch.from_numpy(self.data[self.rng.integers(0, self.size, batch_size)]).to(device)
        obs, actions, rewards, next_obs, terms = batch.tensor_split(self.splits.tolist(), 1)
        return obs, actions, rewards.squeeze(1), next_obs, terms.squeeze(1)


def setup(args: Args, run_name: str):
    """Seeding, device and logging shared by training and evaluation."""
    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)
    torch.backends.cudnn.deterministic = args.torch_deterministic
    device = torch.device("cuda" if torch.cuda.is_available() and args.cuda else "cpu")
    if device.type == "cpu":
        torch.set_num_threads(args.torch_threads)
        torch.set_flush_denormal(True)  # tiny gradients and Adam moments turn denormal: ~20% slower without
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
    """--eval-checkpoint: act with the deterministic action scale·tanh(μ(s)) + bias, no learning."""
    if not os.path.isfile(args.eval_checkpoint):
        fail(f"no checkpoint at {args.eval_checkpoint}")
    try:
        ckpt = torch.load(args.eval_checkpoint, map_location="cpu", weights_only=True)
    except Exception as e:
        fail(f"cannot read {args.eval_checkpoint} as a checkpoint ({type(e).__name__})")
    saved_by = ckpt.get("algorithm") if isinstance(ckpt, dict) else None
    if saved_by != "sac":
        fail(f"{args.eval_checkpoint} was saved by {saved_by or 'another program'}, not sac.py: evaluate it with the script that saved it")
    args.env_id = ckpt["args"]["env_id"]
    check_env(args.env_id, args.capture_video)
    if args.eval_episodes <= 0 or args.torch_threads <= 0:
        fail(f"--eval-episodes and --torch-threads must be positive, got {args.eval_episodes} and {args.torch_threads}")
    run_name = f"{args.env_id}__{args.exp_name}-eval__{args.seed}__{int(time.time())}"
    device, run_dir, writer = setup(args, run_name)
    env = make_env(args.env_id, 0, args.capture_video, run_dir)()
    space = env.action_space
    actor = Actor(env.observation_space.shape[0], space.shape[0], space.low, space.high).to(device)
    actor.load_state_dict(ckpt["actor"])
    returns = []
    obs, _ = env.reset(seed=args.seed)
    while len(returns) < args.eval_episodes:
        with torch.inference_mode():
            action = actor.deterministic(torch.as_tensor(obs, dtype=torch.float32, device=device)).cpu().numpy()
        obs, _, terminated, truncated, info = env.step(action)
        if terminated or truncated:
            returns.append(float(info["episode"]["r"]))
            writer.add_scalar("eval/episodic_return", returns[-1], len(returns))
            obs, _ = env.reset()
    env.close()
    writer.close()
    summary = dict(env_id=args.env_id, algorithm="sac", mode="eval", seed=args.seed, checkpoint=args.eval_checkpoint,
                   episodes=len(returns), mean_return=float(np.mean(returns)), std_return=float(np.std(returns)))
    with open(os.path.join(run_dir, "summary.json"), "w") as f:
        json.dump(summary, f, indent=2)
    print(f"eval {args.env_id}: mean return {summary['mean_return']:.2f} ± {summary['std_return']:.2f} over {len(returns)} episodes")
    return summary


def train(args: Args) -> dict:
    if args.eval_checkpoint:
        return evaluate(args)
    if min(args.total_timesteps, args.num_envs, args.buffer_size, args.batch_size,
           args.policy_frequency, args.target_network_frequency, args.torch_threads) <= 0:
        fail("--total-timesteps, --num-envs, --buffer-size, --batch-size, --policy-frequency, "
             "--target-network-frequency and --torch-threads must be positive")
    if args.batch_size > args.buffer_size:
        fail(f"--batch-size {args.batch_size} is larger than --buffer-size {args.buffer_size}; raise the buffer or shrink the batch")
    if args.learning_starts < 0 or args.learning_starts >= args.total_timesteps:
        fail(f"--learning-starts {args.learning_starts} must be in [0, --total-timesteps {args.total_timesteps}): "
             "otherwise nothing is learned")
    if min(args.policy_lr, args.q_lr) <= 0 or not 0 < args.tau <= 1 or not 0 <= args.gamma <= 1 or args.alpha < 0:
        fail("need --policy-lr, --q-lr > 0, 0 < --tau <= 1, 0 <= --gamma <= 1 and --alpha >= 0")
    if args.autotune and args.alpha <= 0:
        fail("--autotune learns log α and needs a positive initial --alpha")
    check_env(args.env_id, args.capture_video)

    run_name = f"{args.env_id}__{args.exp_name}__{args.seed}__{int(time.time())}"
    device, run_dir, writer = setup(args, run_name)
    envs = gym.vector.SyncVectorEnv([make_env(args.env_id, i, args.capture_video, run_dir) for i in range(args.num_envs)])
    envs.action_space.seed(args.seed)
    space = envs.single_action_space
    obs_dim, act_dim = envs.single_observation_space.shape[0], space.shape[0]
    actor = Actor(obs_dim, act_dim, space.low, space.high).to(device)
    qf = TwinQ(obs_dim, act_dim).to(device)
    qf_target = TwinQ(obs_dim, act_dim).to(device).requires_grad_(False)  # moved only by (8)
    qf_target.load_state_dict(qf.state_dict())
    qf_params, qf_target_params = list(qf.parameters()), list(qf_target.parameters())
    fused = True if device.type in ("cpu", "cuda") else None
    q_optimizer = torch.optim.Adam(qf_params, lr=args.q_lr, fused=fused)
    actor_optimizer = torch.optim.Adam(actor.parameters(), lr=args.policy_lr, fused=fused)
    # α = exp(log α): we optimise log α (as CleanRL), which keeps α positive; (7) is unchanged.
    log_alpha = torch.tensor(math.log(args.alpha) if args.autotune else 0.0, device=device, requires_grad=args.autotune)
    alpha = log_alpha.detach().exp() if args.autotune else torch.tensor(args.alpha, device=device)
    target_entropy = -args.target_entropy_scale * act_dim  # H̄ of (7)
    if args.autotune:
        a_optimizer = torch.optim.Adam([log_alpha], lr=args.policy_lr, fused=fused)
    rng = np.random.default_rng(args.seed)
    rb = ReplayBuffer(args.buffer_size, obs_dim, act_dim, rng)

    N = args.num_envs
    num_steps = args.total_timesteps // N
    global_step, start_time = 0, time.time()
    recent_returns = deque(maxlen=20)
    episodes = 0
    obs, _ = envs.reset(seed=args.seed)
    obs = obs.astype(np.float32)
    reset_step = np.zeros(N, dtype=bool)  # this step of env i is the reset step after an episode end
    log_every = max(1, num_steps // 20)
    actor_loss = alpha_loss = None
    interrupted = False
    try:
        for step in range(1, num_steps + 1):
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
                    next_q1, next_q2 = qf_target(b_next_obs, next_actions)
                    y = soft_q_target(b_rewards, b_terms, next_q1, next_q2, next_log_prob, alpha, args.gamma)  # (4)
                q_values = qf(b_obs, b_actions)
                qf_losses = ((q_values - y) ** 2).mean(1)
                qf_loss = qf_losses.sum()  # (5)
                q_optimizer.zero_grad(set_to_none=True)
                qf_loss.backward()
                q_optimizer.step()

                if step % args.policy_frequency == 0:
                    for _ in range(args.policy_frequency):  # delayed, compensated: as many actor steps as skipped
                        pi, log_prob = actor.sample(b_obs)
                        min_q = qf(b_obs, pi, detached=True).min(0).values
                        actor_loss = (alpha * log_prob - min_q).mean()  # (6)
                        actor_optimizer.zero_grad(set_to_none=True)
                        actor_loss.backward()
                        actor_optimizer.step()
                        if args.autotune:  # log π of the sample just drawn, no second actor pass
                            alpha_loss = (-log_alpha.exp() * (log_prob.detach() + target_entropy)).mean()  # (7)
                            a_optimizer.zero_grad(set_to_none=True)
                            alpha_loss.backward()
                            a_optimizer.step()
                            alpha = log_alpha.detach().exp()

                if step % args.target_network_frequency == 0:
                    polyak_update(qf_target_params, qf_params, args.tau)  # (8)

                if step % 100 == 0:  # reading losses syncs with the device: not every step
                    writer.add_scalar("losses/qf1_values", q_values[0].mean().item(), global_step)
                    writer.add_scalar("losses/qf2_values", q_values[1].mean().item(), global_step)
                    writer.add_scalar("losses/qf1_loss", qf_losses[0].item(), global_step)
                    writer.add_scalar("losses/qf2_loss", qf_losses[1].item(), global_step)
                    writer.add_scalar("losses/qf_loss", qf_loss.item() / 2.0, global_step)
                    if actor_loss is not None:
                        writer.add_scalar("losses/actor_loss", actor_loss.item(), global_step)
                    writer.add_scalar("losses/alpha", alpha.item(), global_step)
                    if args.autotune and actor_loss is not None:
                        writer.add_scalar("losses/alpha_loss", alpha_loss.item(), global_step)
                    writer.add_scalar("charts/SPS", int(global_step / (time.time() - start_time)), global_step)
            if step % log_every == 0 or step == num_steps:
                sps = int(global_step / (time.time() - start_time))
                mean_ret = np.mean(recent_returns) if recent_returns else float("nan")
                print(f"step {global_step:>9,}  SPS {sps:>6,}  return(last 20) {mean_ret:8.2f}", flush=True)
    except KeyboardInterrupt:
        interrupted = True
        print(f"interrupted at step {global_step:,}; closing logs", file=sys.stderr)

    if args.save_model:
        path = os.path.join(run_dir, "sac.pt")
        torch.save({"algorithm": "sac", "args": asdict(args), "actor": actor.state_dict(), "qf": qf.state_dict(),
                    "qf_target": qf_target.state_dict(), "log_alpha": log_alpha.detach().cpu()}, path)
        print(f"model saved to {path}")
    envs.close()
    writer.close()
    wall = time.time() - start_time
    summary = dict(env_id=args.env_id, algorithm="sac", exp_name=args.exp_name, seed=args.seed, global_step=global_step,
                   wall_seconds=wall, SPS=global_step / wall,
                   mean_return=float(np.mean(recent_returns)) if recent_returns else None,
                   episodes_in_mean=len(recent_returns), episodes=episodes, interrupted=interrupted, run_dir=run_dir)
    with open(os.path.join(run_dir, "summary.json"), "w") as f:
        json.dump(summary, f, indent=2)
    return summary


if __name__ == "__main__":
    train(tyro.cli(Args))
