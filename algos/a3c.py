r"""A3C: asynchronous advantage actor-critic, discrete actions.

Mnih, Badia, Mirza, Graves, Lillicrap, Harley, Silver, Kavukcuoglu (2016), "Asynchronous
Methods for Deep Reinforcement Learning", arXiv:1602.01783. `--num-workers` actor-learner
processes share one policy π_θ and one critic V_ω in shared memory. Each worker keeps its
own copy θ', ω' and its own environments, and repeats: copy the shared parameters, act
`--num-steps` steps with π_θ', compute the gradient of the n-step loss at θ', ω' and apply
it to the shared θ, ω with the shared optimiser, without any lock (Hogwild, Recht et al.
2011, arXiv:1106.5730): workers read parameters that others are writing, and a gradient may
land on parameters a few updates newer than those it was computed at.

The worker's copy, taken at the start of each rollout:
$$ \theta' \leftarrow \theta, \qquad \omega' \leftarrow \omega \tag{1} $$

n-step return, computed backwards over the rollout; it stops at an episode end d_t =
term_t or trunc_t, adds nothing after a termination, the value of the final observation
after a truncation, and V(s_T) after the last step of the rollout:
$$ R_t = r_t + \gamma (1 - \text{term}_t)\begin{cases} V_{\omega'}(s_{t+1}) & d_t \text{ or } t = T-1 \\
   R_{t+1} & \text{otherwise} \end{cases} \tag{2} $$

Advantage, with the critic as the baseline:
$$ A_t = R_t - V_{\omega'}(s_t) \tag{3} $$

Policy-gradient loss (A_t held constant), value loss and entropy bonus, averaged over the
rollout's transitions:
$$ L^{\pi} = -\mathbb{E}_t\left[A_t \log \pi_{\theta'}(a_t|s_t)\right] \tag{4} $$
$$ L^{V} = \tfrac12\mathbb{E}_t\left[(R_t - V_{\omega'}(s_t))^2\right] \tag{5} $$
$$ L = L^{\pi} + c_v L^{V} - c_e \mathbb{E}_t[H(\pi_{\theta'}(\cdot|s_t))] \tag{6} $$

The gradients g_θ = ∇_θ' L of the policy and g_ω = ∇_ω' L of the critic are each clipped to
the norm c, one apart from the other:
$$ g_\theta \leftarrow g_\theta \cdot \min\left(1, \frac{c}{\lVert g_\theta \rVert_2}\right), \qquad
   g_\omega \leftarrow g_\omega \cdot \min\left(1, \frac{c}{\lVert g_\omega \rVert_2}\right) \tag{7} $$

and applied to the shared parameters by Adam whose statistics are shared too, as the
paper shares RMSProp's: one step count k and one pair of moments m, v in shared memory,
made before the workers start and updated by every worker, without a lock:
$$ k \leftarrow k + 1, \quad m \leftarrow \beta_1 m + (1 - \beta_1) g, \quad v \leftarrow \beta_2 v + (1 - \beta_2) g^2,
   \quad \theta \leftarrow \theta - \eta\,\frac{m / (1 - \beta_1^k)}{\sqrt{v / (1 - \beta_2^k)} + \epsilon} \tag{8} $$

Adam rather than the paper's shared RMSProp because it learned CartPole-v1 more reliably
here (2 workers, 500,000 steps, the other defaults, mean of the last 20 episodes, seeds
1, 2, 3): shared Adam ended every run at 500, at η = 1e-3 (seeds 1-6) and at 5e-4; shared
RMSProp (α = 0.99, the same ε) reached 400 in every run but ended one seed in three far
below it, at each η tried: 1e-3 (149, 500, 500), 7e-4 (500, 252, 500), 3e-4 (210, 500, 500).
The default η is 5e-4: at 1e-3 one run in about a dozen (seed 1, in the test suite with other
tests on the same two cores) reached 500 by 110k steps, fell to 180-240 and ended at 192;
at 5e-4 seven runs of seven ended at 500, four of them two at a time on the two cores (all
these with the global clip of then, see "Clipping").

Environments: each worker steps `--num-envs` gymnasium envs (a vector env in its default
NEXT_STEP autoreset mode, as algos/a2c.py): the step after an episode's end returns the
first observation of a new episode and ignores its action, so that row holds the final
observation of the old episode (its V is the truncation bootstrap in (2)) and is no
transition: it is left out of the losses. A shared counter, global_step, counts every
env.step of every worker; each worker reserves its rollout's steps before taking them, so a
run takes exactly the budget (rounded down to whole rollouts).

Processes: torch.multiprocessing, spawn. The main process creates the shared networks and
optimiser, starts the workers (born ignoring Ctrl-C and SIGTERM: it alone handles both),
collects their episodes and losses from a queue, logs them, checks them and the shared
parameters for non-finite numbers, evaluates, and writes summary.json. A worker that raises
reports its error's first line; one that dies or is killed stops the run (stopped:
child-failed, exit code 1). Each worker uses one torch thread. A worker whose main process
has died stops by itself.

Clipping: the policy's and the critic's gradients are clipped each to its own norm c in (7),
not together to one global norm as algos/a2c.py does, because one norm over both lets the
critic decide how much the policy learns. The critic's gradient is the larger by far: seed
1, one worker, the first 150k steps, median norms 1.0-2.6 (policy) against 13-29 (critic) at
rollouts without a termination and, after the first 30k steps, 5.5-19 against 87-241 at
rollouts that end in one (V is near 1/(1 − γ) = 100 where the episode ends). One clip over
both then scaled the policy's gradient by a median 0.017-0.037, and by 0.002-0.006 at the
rollouts holding a termination, the ones that say what failed: learning from failures was
muted. With that global clip (c = 0.5, seed 1, 2 workers, 500k steps, two runs at a time on
the two cores) 4 runs of 21 stalled and ended at 142-286; clipped apart, 20 runs of 20 ended
at 500, 19 of them at ≥ 475 by 300k steps (the 20th dipped to 114 there and recovered). A
global clip at c = 40 (no clip in practice) also kept 12 runs of 12 at ≥ 446 but dipped
mid-run to 254-382 in 5 of them. On Acrobot-v1 (seeds 1 and 2, 500k steps) both ended alike:
−86.1 and −89.5 (global clip), −91.5 and −78.0 (clipped apart). Still, one run in the test
suite (pytest -n 2, other tests beside it) ended at 164: the clip was a cause of stalls, not the
only one (see "Defaults").

Defaults: one worker per CPU core, four environments each stepped t_max = 5 steps per update
(the paper's t_max; 20 transitions per gradient), γ = 0.99, Adam's ε = 1e-5, the learning
rate decayed linearly to 0 as in the paper, and algos/a2c.py's networks (two 64×64 tanh MLPs),
c_v = 0.5 and c = 0.5. The paper's parallel actor-learners decorrelate the data; two workers
on two cores make only two streams of experience with one environment each, and four each
make eight. Measured on CartPole-v1 (seed 1, 2 workers, 500k steps, beside one to three
other busy processes on the two cores; 10 runs of each setting alternating): 4 envs × 5
steps ended 18 runs of 18 at 500; 1 env × 20 steps, the default before, ended 14 of 16 at
500, one at 428 (below 320 until 400k steps) and one at 338. In both of these the policy's
entropy rose after 100k steps from 0.15-0.3 back to about 0.6 (ln 2 = 0.69 is uniform) and
stayed there. Two stalls in 16 against none in 18 is no proof of a lower rate, but it is the
paper's t_max and the paper's reason for many actors. At the same load the two ran at the
same speed (100k steps: 1.03 times the old default's wall time, median of 3 alternating
pairs). Acrobot-v1 (seeds 1 and 2): −81.5 and −79.5, against −91.5 and −78.0 with 1 env ×
20 steps. Also measured with 1 env each: no entropy bonus (with c_e = 0.01 the runs ended
at 482, 430, 409), and 20 steps per update rather than 5 (5-step updates of one env ended at
112, 500, 500, and ran at a third of the speed: an update costs about as much time as the
env steps of a 20-step rollout).

Run:
    python algos/a3c.py                              # CartPole-v1, one worker per CPU core
    python algos/a3c.py --num-workers 2
    python algos/a3c.py --env-id Acrobot-v1
    python algos/a3c.py --help
"""

import contextlib
import copy
import importlib.metadata
import io
import json
import math
import os
import platform
import queue
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
import torch.multiprocessing as mp
import torch.nn as nn
import tyro
from torch.utils.tensorboard import SummaryWriter


@dataclass
class Args:
    exp_name: str = os.path.basename(__file__)[: -len(".py")]
    """the name of this experiment (part of the run directory)"""
    seed: int = 1
    """seed of random, numpy, torch and the environments (Hogwild updates are not reproducible)"""
    torch_deterministic: bool = True
    """use deterministic torch algorithms"""
    cuda: bool = True
    """unused: the workers update the shared parameters in CPU memory (kept for the common command line)"""
    track: bool = False
    """log to Weights & Biases (needs `pip install wandb`)"""
    wandb_project_name: str = "pg-reference"
    """the Weights & Biases project"""
    wandb_entity: Optional[str] = None
    """the Weights & Biases entity (team)"""
    capture_video: bool = False
    """record videos of worker 0's environment 0 into the run directory"""
    save_model: bool = False
    """save the model to runs/<run>/a3c.pt at the end (and on Ctrl-C)"""
    eval_checkpoint: Optional[str] = None
    """path of a saved model: evaluate it without learning, then exit"""
    eval_frequency: int = 0
    """evaluate the greedy policy on a separate env every this many env steps (0: never)"""
    eval_episodes: int = 10
    """episodes per evaluation (during training and for --eval-checkpoint)"""
    torch_threads: int = 1
    """CPU threads for torch in the main process (each worker uses one)"""

    env_id: str = "CartPole-v1"
    """the gymnasium environment id (Discrete actions, vector observations)"""
    total_timesteps: int = 500_000
    """total environment steps over all workers"""
    num_workers: int = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    """worker processes (default: one per CPU core this process may use)"""
    learning_rate: float = 5e-4
    """learning rate η of the shared Adam (8)"""
    num_envs: int = 4
    """environments per worker"""
    num_steps: int = 5
    """steps per environment per update (the n of the n-step return, t_max in the paper)"""
    anneal_lr: bool = True
    """decay the learning rate linearly to 0 over the budget"""
    gamma: float = 0.99
    """discount factor γ"""
    ent_coef: float = 0.0
    """entropy coefficient c_e in (6); CartPole needs none, raise it (0.01) where exploration is hard"""
    vf_coef: float = 0.5
    """value-loss coefficient c_v in (6)"""
    max_grad_norm: float = 0.5
    """gradient-norm clipping c in (7), of the policy's and of the critic's gradient each"""
    adam_eps: float = 1e-5
    """Adam's ε in (8)"""


# The valid range of every numeric Arg, checked by check_args before anything is written:
# "[" and "]" include an end, "(" and ")" exclude it. tests/test_args.py tries a value
# outside each range and NaN on every numeric field of Args, so a new field needs a line here.
ARG_RANGES = {
    "seed": "[0, 4294967295]",  # what random, numpy and torch all accept
    "eval_frequency": "[0, inf)",
    "eval_episodes": "[1, inf)",
    "torch_threads": "[1, 1024]",
    "total_timesteps": "[1, inf)",
    "num_workers": "[1, inf)",
    "learning_rate": "(0, inf)",
    "num_envs": "[1, inf)",
    "num_steps": "[1, inf)",
    "gamma": "[0, 1]",
    "ent_coef": "[0, inf)",
    "vf_coef": "[0, inf)",
    "max_grad_norm": "(0, inf)",
    "adam_eps": "(0, inf)",
}
PROGRESS_SECONDS = 10.0  # a progress line after the first second, then every this many seconds
EVAL_SEED_OFFSET = 10_000  # the evaluation env's seed is args.seed + this: other starts than training's
EXIT_CODES = {None: 0, "non-finite": 1, "child-failed": 1, "interrupted": 130, "terminated": 143}  # as shells expect
LOG_UPDATES = 100  # each worker sends its losses every this many updates (and after its last)


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
    training the two signals are only recorded in `stop_signals`, and the main loop calls this at
    each message from the workers: an exception raised wherever the signal happens to land can
    stop a library halfway, inside TensorBoard's writer queue (whose close() then waited up to its
    120-s flush interval) or a multiprocessing queue."""
    if stop_signals:
        raise Terminated() if stop_signals[0] == signal.SIGTERM else KeyboardInterrupt()


class NonFinite(Exception):
    """A loss or parameter turned NaN or infinite: training stops."""


class ChildFailed(Exception):
    """A child process raised an error or died: training stops."""


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
        fail(f"{env_id} is an Atari game (pixel observations); a3c.py is for vector observations: "
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
        fail(f"{env_id} has continuous (Box) actions; a3c.py is for Discrete actions: use algos/ppo_continuous.py")
    if not isinstance(act_space, gym.spaces.Discrete):
        fail(f"{env_id} has {act_space} actions; a3c.py needs a Discrete action space")
    if not isinstance(obs_space, gym.spaces.Box) or len(obs_space.shape) != 1:
        fail(f"{env_id} has observations {obs_space}; a3c.py needs flat vectors")


def nstep_returns(rewards, values, terminations, truncations, gamma):
    """n-step returns R_t of equation (2) on a [T, N] rollout.

    values has T + 1 rows: V(s_0) .. V(s_T), the last being V(next_obs) after the rollout.
    Row t + 1 after an episode end holds the final observation (NEXT_STEP autoreset), so
    values[t + 1] is the truncation bootstrap. Rows that are reset steps get meaningless
    entries; the caller drops them.
    """
    dones = np.logical_or(terminations, truncations)
    returns = np.zeros_like(rewards)
    next_return = values[-1]
    for t in reversed(range(len(rewards))):
        tail = np.where(dones[t], values[t + 1], next_return)
        next_return = rewards[t] + gamma * (1.0 - terminations[t]) * tail  # (2)
        returns[t] = next_return
    return returns


def numpy_mlp(net: nn.Sequential):
    """A NumPy copy of an MLP of Linear and Tanh layers, with its current weights.

    Used to act one step at a time during a rollout: on a handful of observations torch's
    per-call overhead costs more than the arithmetic. A worker takes it once per rollout,
    from its own copy θ' (1), which does not change during the rollout.
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

    def policy(self, obs, actions):
        """log π(a|s) and the entropy H(π(·|s)) for a batch."""
        logp = self.actor(obs).log_softmax(-1)
        return logp.gather(-1, actions.unsqueeze(-1)).squeeze(-1), -(logp.exp() * logp).sum(-1)


def shared_optimizer(agent: Agent, args: Args) -> torch.optim.Optimizer:
    """The one optimiser of (8) for every worker, over the shared parameters, with its
    statistics (step count k, moments m and v) created now and moved to shared memory: a
    worker that receives it steps the same tensors as every other worker."""
    optimizer = torch.optim.Adam(agent.parameters(), lr=args.learning_rate, eps=args.adam_eps, fused=True)
    for p in agent.parameters():  # torch.optim.Adam's own state names, made eagerly instead of at the first step
        optimizer.state[p] = {"step": torch.zeros((), dtype=torch.float32).share_memory_(),
                              "exp_avg": torch.zeros_like(p).share_memory_(),
                              "exp_avg_sq": torch.zeros_like(p).share_memory_()}
    return optimizer


def worker(rank: int, args: Args, agent: Agent, optimizer: torch.optim.Optimizer, global_step, stop, results,
           errors, run_dir: str):
    """One actor-learner: copies the shared parameters (1), acts num_steps steps in its envs,
    computes the gradient of (6) on its copy, clips it (7) and applies it to the shared
    parameters with the shared optimiser (8); until the budget is taken, `stop` is set or
    the main process has died. Sends ("episodes", ...), ("losses", ...) and ("done", rank)
    on `results`; an error goes on `errors` as (rank, its first line) and exits 1."""
    parent, envs = mp.parent_process(), None
    try:
        torch.set_num_threads(1)
        seed = args.seed + 1000 * (rank + 1)
        torch.manual_seed(seed)
        rng = np.random.default_rng(seed)
        T, N = args.num_steps, args.num_envs
        envs = gym.vector.SyncVectorEnv([make_env(args.env_id, rank * N + i, args.capture_video, run_dir)
                                         for i in range(N)])
        obs_dim, n_actions = envs.single_observation_space.shape[0], envs.single_action_space.n
        local = copy.deepcopy(agent)  # θ', ω': this worker's parameters, in its own memory
        params, shared_params = list(local.parameters()), list(agent.parameters())
        obs = np.zeros((T, N, obs_dim), dtype=np.float32)
        actions = np.zeros((T, N), dtype=np.int64)
        rewards = np.zeros((T, N), dtype=np.float32)
        terminations = np.zeros((T, N), dtype=np.float32)
        truncations = np.zeros((T, N), dtype=np.float32)
        resets = np.zeros((T, N), dtype=bool)  # row t is the reset step after an episode ended at t - 1
        next_obs, _ = envs.reset(seed=[args.seed + rank * N + i for i in range(N)])
        next_done = np.zeros(N, dtype=bool)

        def report(step, v_loss, pg_loss, entropy_loss):
            losses = {"losses/value_loss": v_loss, "losses/policy_loss": pg_loss, "losses/entropy": entropy_loss}
            results.put(("losses", rank, step, {key: value.item() for key, value in losses.items()}))

        updates, unreported = 0, None
        while not stop.value and parent.is_alive():
            with global_step.get_lock():  # reserve this rollout's steps: the run takes exactly its budget
                step = global_step.value
                if step + T * N > args.total_timesteps:
                    break
                global_step.value = step + T * N
            with torch.no_grad():
                for p, shared in zip(params, shared_params):
                    p.copy_(shared)  # (1)

            # a ~ π(·|s) by the Gumbel-max trick, as algos/a2c.py: argmax(logits + g), g ~ Gumbel(0, 1)
            logits_fn = numpy_mlp(local.actor)
            gumbel = rng.gumbel(size=(T, N, n_actions)).astype(np.float32)
            episodes = []
            for t in range(T):
                obs[t], resets[t] = next_obs, next_done
                actions[t] = (logits_fn(next_obs) + gumbel[t]).argmax(-1)
                next_obs, rewards[t], term, trunc, infos = envs.step(actions[t])
                terminations[t], truncations[t] = term, trunc
                next_done = term | trunc
                if "episode" in infos:
                    episodes += [(step + (t + 1) * N, float(infos["episode"]["r"][i]), int(infos["episode"]["l"][i]))
                                 for i in np.flatnonzero(infos["_episode"])]
            if episodes:
                results.put(("episodes", rank, episodes))

            all_obs = torch.as_tensor(np.concatenate([obs, next_obs[None].astype(np.float32)]))
            values = local.critic(all_obs).squeeze(-1)  # V(s_0) .. V(s_T), with gradient
            returns = nstep_returns(rewards, values.detach().numpy(), terminations, truncations, args.gamma)
            valid = torch.as_tensor(~resets.reshape(-1))  # reset rows hold no transition
            if not valid.any():  # num_steps 1: a rollout of one reset step has nothing to learn from
                continue
            b_returns = torch.as_tensor(returns.reshape(-1))[valid]
            b_values = values[:-1].reshape(-1)[valid]
            log_prob, entropy = local.policy(all_obs[:-1].reshape(-1, obs_dim)[valid],
                                             torch.as_tensor(actions.reshape(-1))[valid])
            advantages = (b_returns - b_values).detach()  # (3)
            pg_loss = -(advantages * log_prob).mean()  # (4)
            v_loss = 0.5 * ((b_returns - b_values) ** 2).mean()  # (5)
            entropy_loss = entropy.mean()
            loss = pg_loss + args.vf_coef * v_loss - args.ent_coef * entropy_loss  # (6)

            loss.backward()
            for net in (local.actor, local.critic):  # each its own norm: see "Clipping" above
                nn.utils.clip_grad_norm_(net.parameters(), args.max_grad_norm, foreach=True)  # (7)
            for p, shared in zip(params, shared_params):
                shared.grad, p.grad = p.grad, None  # the gradient at θ' is applied to this process's view of θ
            if args.anneal_lr:
                optimizer.param_groups[0]["lr"] = args.learning_rate * (1.0 - step / args.total_timesteps)
            optimizer.step()  # (8)
            updates += 1
            unreported = (step + T * N, v_loss, pg_loss, entropy_loss)
            if updates % LOG_UPDATES == 0:
                report(*unreported)
                unreported = None
        if not stop.value and parent.is_alive():  # the budget is taken: report the last losses, then done
            if unreported is not None:
                report(*unreported)
            results.put(("done", rank))
            # "done" read means all before it was read: wait for the main process to say so, then exit
            while not stop.value and parent.is_alive():
                time.sleep(0.01)
    except Exception as e:
        errors.put((rank, f"{type(e).__name__}: {(str(e).splitlines() or [''])[0]}"))
        sys.exit(1)
    finally:
        if envs is not None:
            envs.close()
        results.cancel_join_thread()  # what is still unsent is not awaited: never block at exit on a full pipe


def check_children(processes: list, errors, role: str):
    """Raise ChildFailed if a child process has stopped: with the first line of its own error if it
    sent one, else its exit code (a negative code is the signal that killed it)."""
    for rank, p in enumerate(processes):
        if not p.is_alive():
            try:
                rank, message = errors.get(timeout=1.0)  # its last words may still be on their way
            except queue.Empty:
                code = p.exitcode
                message = f"killed by {signal.Signals(-code).name}" if code < 0 else f"exit code {code}"
                raise ChildFailed(f"{role} {rank} died ({message})")
            raise ChildFailed(f"{role} {rank} failed: {message}")


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
    if saved_by != "a3c":
        fail(f"{args.eval_checkpoint} was saved by {saved_by or 'another program'}, not a3c.py: "
             "evaluate it with the script that saved it")
    args.env_id = ckpt["args"]["env_id"]
    check_env(args.env_id, args.capture_video)
    run_name = f"{args.env_id.replace('/', '-')}__{args.exp_name}-eval__{args.seed}__{int(time.time())}"
    device, run_dir, writer = setup(args, run_name)
    env = make_env(args.env_id, 0, args.capture_video, run_dir)()
    agent = Agent(env.observation_space.shape[0], env.action_space.n)
    agent.load_state_dict(ckpt["model"])
    logits = numpy_mlp(agent.actor)
    returns = evaluate_policy(lambda o: int(logits(o).argmax()), env, args.eval_episodes, args.seed)
    for i, r in enumerate(returns):
        writer.add_scalar("eval/episodic_return", r, i + 1)
    env.close()
    writer.close()
    summary = dict(env_id=args.env_id, algorithm="a3c", mode="eval", seed=args.seed, checkpoint=args.eval_checkpoint,
                   episodes=len(returns), mean_return=float(np.mean(returns)), std_return=float(np.std(returns)),
                   stopped=None, versions=versions(), run_dir=run_dir)
    print(f"eval {args.env_id}: mean return {summary['mean_return']:.2f} ± {summary['std_return']:.2f} "
          f"over {len(returns)} episodes")
    return write_summary(run_dir, summary)


def train(args: Args) -> dict:
    check_args(args)
    if args.eval_checkpoint:
        return evaluate(args)
    rollout = args.num_envs * args.num_steps
    if args.total_timesteps < rollout:
        fail(f"--total-timesteps {args.total_timesteps} is less than one rollout of {rollout} steps "
             "(num-envs x num-steps); raise it or shorten the rollout")
    check_env(args.env_id, args.capture_video)

    run_name = f"{args.env_id.replace('/', '-')}__{args.exp_name}__{args.seed}__{int(time.time())}"
    _, run_dir, writer = setup(args, run_name)  # the shared parameters live in CPU memory
    eval_env = make_env(args.env_id, -1, False, run_dir)() if args.eval_frequency else None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # check_env has refused what is wrong: this reads the sizes only
        probe = gym.make(args.env_id)
    agent = Agent(probe.observation_space.shape[0], probe.action_space.n).share_memory()  # θ, ω
    probe.close()
    optimizer = shared_optimizer(agent, args)

    ctx = mp.get_context("spawn")
    global_step = ctx.Value("q", 0)  # env steps reserved by the workers, under its lock
    # A flag without a lock: the main process must never wait for a lock that a killed worker may hold.
    stop = ctx.Value("b", 0, lock=False)
    results, errors = ctx.Queue(), ctx.Queue()
    processes = [ctx.Process(target=worker, daemon=True,
                             args=(rank, args, agent, optimizer, global_step, stop, results, errors, run_dir))
                 for rank in range(args.num_workers)]

    def steps_taken() -> int:
        return global_step.get_obj().value  # read without the lock, for the same reason as `stop`

    start_time = time.time()
    next_progress, next_eval = start_time + 1.0, args.eval_frequency
    recent_returns = deque(maxlen=20)
    episodes, last_eval, done = 0, None, set()
    last_finite = copy.deepcopy(agent.state_dict())  # saved instead of the model if training turns non-finite
    stopped = stop_reason = None
    stop_signals = []  # Ctrl-C and SIGTERM, recorded here and raised at the next message from the workers
    # the workers are born ignoring Ctrl-C and SIGTERM (an ignored signal stays ignored in a new
    # process, and Python then installs no KeyboardInterrupt): the main process alone stops them
    previous_handlers = {s: signal.signal(s, signal.SIG_IGN) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        try:
            for p in processes:
                p.start()
        finally:
            for s in previous_handlers:
                signal.signal(s, lambda signum, frame: stop_signals.append(signum))
        while len(done) < args.num_workers:
            raise_if_stopped(stop_signals)
            try:
                message = results.get(timeout=1.0)
            except queue.Empty:
                message = None
            check_children(processes, errors, "worker")  # a worker exits only once told to stop
            kind = message[0] if message else None
            if kind == "episodes":
                for step, r, length in message[2]:
                    recent_returns.append(r)
                    episodes += 1
                    writer.add_scalar("charts/episodic_return", r, step)
                    writer.add_scalar("charts/episodic_length", length, step)
            elif kind == "losses":
                _, rank, step, losses = message
                # copied first, then checked: the workers write the shared parameters while this reads
                snapshot = copy.deepcopy(agent)
                check_finite(step, losses, snapshot)
                last_finite = snapshot.state_dict()
                for key, value in losses.items():
                    writer.add_scalar(key, value, step)
                lr = args.learning_rate * (1.0 - step / args.total_timesteps) if args.anneal_lr else args.learning_rate
                writer.add_scalar("charts/learning_rate", lr, step)
                writer.add_scalar("charts/SPS", int(steps_taken() / (time.time() - start_time)), step)
            elif kind == "done":
                done.add(message[1])

            global_step_now = steps_taken()
            if args.eval_frequency and (global_step_now >= next_eval):
                logits = numpy_mlp(agent.actor)
                eval_returns = evaluate_policy(lambda o: int(logits(o).argmax()), eval_env, args.eval_episodes,
                                               args.seed + EVAL_SEED_OFFSET)
                last_eval = (global_step_now, float(np.mean(eval_returns)))
                writer.add_scalar("eval/episodic_return", last_eval[1], global_step_now)
                next_eval = (global_step_now // args.eval_frequency + 1) * args.eval_frequency
            if time.time() >= next_progress:
                sps = int(global_step_now / (time.time() - start_time))
                mean_ret = np.mean(recent_returns) if recent_returns else float("nan")
                print(f"step {global_step_now:>11,}  SPS {sps:>6,}  return(last 20) {mean_ret:8.2f}", flush=True)
                next_progress = time.time() + PROGRESS_SECONDS
    except KeyboardInterrupt as e:
        stopped = "terminated" if isinstance(e, Terminated) else "interrupted"
        stop_reason = f"{'SIGTERM' if stopped == 'terminated' else 'Ctrl-C'} at step {steps_taken():,}"
    except NonFinite as e:
        stopped, stop_reason = "non-finite", str(e)
    except ChildFailed as e:
        stopped, stop_reason = "child-failed", str(e)
    finally:
        for s, handler in previous_handlers.items():
            signal.signal(s, handler)
        # stop the workers in every case, also on an error: each finishes its update and exits
        stop.value = 1
        for p in processes:
            if p.pid is not None:  # started
                p.join(timeout=10)
                if p.is_alive():  # it ignores SIGTERM
                    p.kill()
                    p.join()
    if stopped == "non-finite":
        agent.load_state_dict(last_finite)  # once no worker writes any more
    if stopped:
        print(f"stopped: {stop_reason}", file=sys.stderr)

    global_step = steps_taken()
    if args.save_model:
        path = os.path.join(run_dir, "a3c.pt")
        torch.save({"algorithm": "a3c", "args": asdict(args), "model": agent.state_dict()}, path)
        print(f"model saved to {path}")
    if eval_env is not None:
        eval_env.close()
    writer.close()
    wall = time.time() - start_time
    eval_step, eval_return = last_eval or (None, None)
    summary = dict(env_id=args.env_id, algorithm="a3c", exp_name=args.exp_name, seed=args.seed,
                   num_workers=args.num_workers, global_step=global_step, wall_seconds=wall, SPS=global_step / wall,
                   mean_return=float(np.mean(recent_returns)) if recent_returns else None,
                   episodes_in_mean=len(recent_returns), episodes=episodes,
                   eval_step=eval_step, eval_return=eval_return,
                   stopped=stopped, stop_reason=stop_reason, versions=versions(), run_dir=run_dir)
    return write_summary(run_dir, summary)


if __name__ == "__main__":
    sys.exit(EXIT_CODES[train(parse_args())["stopped"]])
