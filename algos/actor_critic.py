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

import json
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
    """save the model to runs/<run>/actor_critic.pt at the end (and on Ctrl-C)"""
    eval_checkpoint: Optional[str] = None
    """path of a saved model: evaluate it without learning, then exit"""
    eval_episodes: int = 10
    """number of episodes for --eval-checkpoint"""

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
        fail(f"cannot make env {env_id!r}: {e} (try --env-id CartPole-v1)")
    act_space, obs_space = env.action_space, env.observation_space
    env.close()
    if isinstance(act_space, gym.spaces.Box):
        fail(f"{env_id} has continuous (Box) actions; actor_critic.py is for Discrete actions: use algos/ppo_continuous.py")
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


class Critic(nn.Module):
    """V_φ(s)."""

    def __init__(self, obs_dim: int):
        super().__init__()
        self.v = mlp(obs_dim, 1, out_std=1.0)

    def forward(self, obs):
        return self.v(obs).squeeze(-1)


def setup(args: Args, run_name: str):
    """Seeding, device and logging shared by training and evaluation."""
    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)
    torch.backends.cudnn.deterministic = args.torch_deterministic
    device = torch.device("cuda" if torch.cuda.is_available() and args.cuda else "cpu")
    if device.type == "cpu":
        torch.set_num_threads(1)  # tiny networks: threads cost more than they give
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
    """--eval-checkpoint: act greedily with a saved model, no learning."""
    if not os.path.isfile(args.eval_checkpoint):
        fail(f"no checkpoint at {args.eval_checkpoint}")
    try:
        ckpt = torch.load(args.eval_checkpoint, map_location="cpu", weights_only=True)
    except Exception as e:
        fail(f"cannot read {args.eval_checkpoint} as a checkpoint ({type(e).__name__})")
    saved_by = ckpt.get("algorithm") if isinstance(ckpt, dict) else None
    if saved_by != "actor_critic":
        fail(f"{args.eval_checkpoint} was saved by {saved_by or 'another program'}, not actor_critic.py: evaluate it with the script that saved it")
    args.env_id = ckpt["args"]["env_id"]
    check_env(args.env_id, args.capture_video)
    if args.eval_episodes <= 0:
        fail(f"--eval-episodes must be positive, got {args.eval_episodes}")
    run_name = f"{args.env_id}__{args.exp_name}-eval__{args.seed}__{int(time.time())}"
    device, run_dir, writer = setup(args, run_name)
    env = make_env(args.env_id, 0, args.capture_video, run_dir)()
    actor = Actor(env.observation_space.shape[0], env.action_space.n).to(device)
    actor.load_state_dict(ckpt["model"])
    returns = []
    obs, _ = env.reset(seed=args.seed)
    while len(returns) < args.eval_episodes:
        with torch.inference_mode():
            action = actor.logits(torch.as_tensor(obs, dtype=torch.float32, device=device)).argmax().item()
        obs, _, terminated, truncated, info = env.step(action)
        if terminated or truncated:
            returns.append(float(info["episode"]["r"]))
            writer.add_scalar("eval/episodic_return", returns[-1], len(returns))
            obs, _ = env.reset()
    env.close()
    writer.close()
    summary = dict(env_id=args.env_id, algorithm="actor_critic", mode="eval", seed=args.seed, checkpoint=args.eval_checkpoint,
                   episodes=len(returns), mean_return=float(np.mean(returns)), std_return=float(np.std(returns)))
    with open(os.path.join(run_dir, "summary.json"), "w") as f:
        json.dump(summary, f, indent=2)
    print(f"eval {args.env_id}: mean return {summary['mean_return']:.2f} ± {summary['std_return']:.2f} over {len(returns)} episodes")
    return summary


def train(args: Args) -> dict:
    if args.eval_checkpoint:
        return evaluate(args)
    if min(args.total_timesteps, args.num_envs) <= 0:
        fail("--total-timesteps and --num-envs must be positive")
    num_iterations = args.total_timesteps // args.num_envs
    if num_iterations == 0:
        fail(f"--total-timesteps {args.total_timesteps} is less than one step of {args.num_envs} envs")
    check_env(args.env_id, args.capture_video)

    run_name = f"{args.env_id}__{args.exp_name}__{args.seed}__{int(time.time())}"
    device, run_dir, writer = setup(args, run_name)
    envs = gym.vector.SyncVectorEnv([make_env(args.env_id, i, args.capture_video, run_dir) for i in range(args.num_envs)])
    envs.action_space.seed(args.seed)
    obs_dim, N = envs.single_observation_space.shape[0], args.num_envs
    actor = Actor(obs_dim, envs.single_action_space.n).to(device)
    critic = Critic(obs_dim).to(device)
    actor_optimizer = torch.optim.Adam(actor.parameters(), lr=args.learning_rate)
    critic_optimizer = torch.optim.Adam(critic.parameters(), lr=args.critic_learning_rate)

    global_step, start_time = 0, time.time()
    recent_returns = deque(maxlen=20)
    episodes = 0
    next_obs, _ = envs.reset(seed=args.seed)
    obs = torch.as_tensor(next_obs, dtype=torch.float32, device=device)
    valid = torch.ones(N, device=device)  # 0 for a reset step
    log_every = max(1, num_iterations // 20)
    interrupted = False
    try:
        for iteration in range(1, num_iterations + 1):
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
                writer.add_scalar("losses/policy_loss", actor_loss.item(), global_step)
                writer.add_scalar("losses/value_loss", critic_loss.item(), global_step)
                writer.add_scalar("charts/SPS", int(global_step / (time.time() - start_time)), global_step)
            if iteration % log_every == 0 or iteration == num_iterations:
                sps = int(global_step / (time.time() - start_time))
                mean_ret = np.mean(recent_returns) if recent_returns else float("nan")
                print(f"step {global_step:>9,}  SPS {sps:>6,}  return(last 20) {mean_ret:8.2f}", flush=True)
    except KeyboardInterrupt:
        interrupted = True
        print(f"interrupted at step {global_step:,}; closing logs", file=sys.stderr)

    if args.save_model:
        path = os.path.join(run_dir, "actor_critic.pt")
        torch.save({"algorithm": "actor_critic", "args": asdict(args), "model": actor.state_dict(),
                    "critic": critic.state_dict()}, path)
        print(f"model saved to {path}")
    envs.close()
    writer.close()
    wall = time.time() - start_time
    summary = dict(env_id=args.env_id, algorithm="actor_critic", exp_name=args.exp_name, seed=args.seed,
                   global_step=global_step, wall_seconds=wall, SPS=global_step / wall,
                   mean_return=float(np.mean(recent_returns)) if recent_returns else None,
                   episodes_in_mean=len(recent_returns), episodes=episodes, interrupted=interrupted, run_dir=run_dir)
    with open(os.path.join(run_dir, "summary.json"), "w") as f:
        json.dump(summary, f, indent=2)
    return summary


if __name__ == "__main__":
    train(tyro.cli(Args))
