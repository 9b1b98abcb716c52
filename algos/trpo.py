r"""TRPO for continuous (Box) actions: a Gaussian policy moved by the largest step whose mean KL
divergence from the old policy stays within δ, found by conjugate gradient on Fisher-vector
products and a backtracking line search; GAE advantages, a value function fitted separately,
observation normalisation and reward scaling.

Schulman, Levine, Moritz, Jordan, Abbeel (2015), "Trust Region Policy Optimization",
arXiv:1502.05477 (the single-path variant, with the KL constraint averaged over the states
visited). Advantages by GAE: Schulman, Moritz, Levine, Jordan, Abbeel (2016), "High-Dimensional
Continuous Control Using Generalized Advantage Estimation", arXiv:1506.02438, which also pairs
TRPO with GAE and a separately fitted value function. Conjugate gradient: Hestenes and Stiefel
(1952); Nocedal and Wright, "Numerical Optimization", algorithm 5.2.

Policy: a diagonal Gaussian whose mean is a network and whose log-std is one learned
vector, independent of the state:
$$ \pi_\theta(a|s) = \mathcal N(\mu_\theta(s), \text{diag}(\sigma^2)), \quad
   \log\pi_\theta(a|s) = \sum_j \left[-\frac{(a_j - \mu_j)^2}{2\sigma_j^2} - \log\sigma_j
   - \tfrac12\log 2\pi\right], \quad H = \sum_j \left[\log\sigma_j + \tfrac12(1 + \log 2\pi)\right] \tag{1} $$

Probability ratio against the policy that collected the batch:
$$ r_t(\theta) = \frac{\pi_\theta(a_t|s_t)}{\pi_{\theta_{old}}(a_t|s_t)} \tag{2} $$

TD residual (no bootstrap past a termination; at a truncation V(s_{t+1}) is the value of
the final observation):
$$ \delta_t = r_t + \gamma V(s_{t+1})(1 - \text{term}_t) - V(s_t) \tag{3} $$

GAE(λ), the recursion cut at every episode end d_t = term_t or trunc_t:
$$ \hat A_t = \delta_t + \gamma\lambda(1 - d_t)\hat A_{t+1}, \qquad \hat R_t = \hat A_t + V(s_t) \tag{4} $$

Surrogate objective (its value at θ_old is the mean advantage, its gradient there the policy
gradient g):
$$ L(\theta) = \mathbb{E}_t\left[r_t(\theta)\hat A_t\right], \qquad
   g = \nabla_\theta L(\theta)|_{\theta_{old}} \tag{5} $$

The trust-region problem, with the mean KL divergence over the states of the batch:
$$ \max_\theta L(\theta) \quad \text{s.t.} \quad \bar D_{KL}(\theta_{old}, \theta)
   = \mathbb{E}_t\left[D_{KL}(\pi_{\theta_{old}}(\cdot|s_t) \,\|\, \pi_\theta(\cdot|s_t))\right] \le \delta \tag{6} $$

KL divergence of two diagonal Gaussians (μ_old, σ_old are constants, taken at θ_old):
$$ D_{KL}(\pi_{\theta_{old}} \| \pi_\theta) = \sum_j \left[\log\frac{\sigma_j}{\sigma_{old,j}}
   + \frac{\sigma_{old,j}^2 + (\mu_{old,j} - \mu_j)^2}{2\sigma_j^2} - \tfrac12\right] \tag{7} $$

Near θ_old, L is linear and \bar D_KL quadratic, \bar D_KL ≈ ½ Δθᵀ F Δθ, where F, the Hessian
of \bar D_KL at θ_old, is the Fisher information matrix. F is never formed: its product with a
vector v is the gradient of (∇\bar D_KL)ᵀv (double back-propagation), plus damping λ v:
$$ F_\lambda v = \nabla_\theta\left[(\nabla_\theta \bar D_{KL}(\theta_{old}, \theta))^\top v\right]_{\theta_{old}}
   + \lambda v \tag{8} $$

Conjugate gradient for s ≈ F_λ⁻¹ g: x_0 = 0, r_0 = p_0 = g, then for k = 0 .. K - 1, stopping
early once ‖r_k‖ ≤ ε:
$$ \alpha_k = \frac{r_k^\top r_k}{p_k^\top F_\lambda p_k}, \quad x_{k+1} = x_k + \alpha_k p_k, \quad
   r_{k+1} = r_k - \alpha_k F_\lambda p_k, \quad p_{k+1} = r_{k+1} + \frac{r_{k+1}^\top r_{k+1}}{r_k^\top r_k} p_k
   \tag{9} $$

The full step: the direction s scaled so that the quadratic model of the KL equals δ:
$$ \Delta\theta = \sqrt{\frac{2\delta}{s^\top F_\lambda s}}\; s \tag{10} $$

Backtracking line search: the first of θ_k = θ_old + b^k Δθ, k = 0 .. K_ls - 1, that improves the
surrogate and keeps the measured KL within δ; when none does, θ stays θ_old:
$$ \theta_{new} = \theta_{old} + b^k\Delta\theta, \quad k = \min\{k : L(\theta_k) > L(\theta_{old})
   \text{ and } \bar D_{KL}(\theta_{old}, \theta_k) \le \delta\} \tag{11} $$

Value function V_φ, fitted after the policy step to the GAE returns of (4) by Adam, several
epochs of minibatches, as Stable-Baselines3's TRPO does (the GAE paper fits it by a trust-region
step of its own on the whole batch instead). Minibatch Adam is the value fit of ppo_continuous.py,
so the two scripts differ only in the policy step:
$$ L^{V}(\phi) = \tfrac12\mathbb{E}_t\left[(V_\phi(s_t) - \hat R_t)^2\right] \tag{12} $$

Running statistics: mean μ, variance σ² and count n of everything seen so far, updated
with a batch x_1..x_B at once (Welford's update, 1962, for a batch), with n' = n + B:
$$ \mu' = \mu + \frac{1}{n'}\sum_i (x_i - \mu), \qquad
   \sigma'^2 = \frac{1}{n'}\left(n\sigma^2 + \sum_i (x_i - \mu)(x_i - \mu')\right) \tag{13} $$

Observation normalisation, with the running statistics of all observations seen:
$$ \tilde s = \text{clip}\left(\frac{s - \mu_s}{\sqrt{\sigma_s^2 + 10^{-8}}}, -c_s, c_s\right) \tag{14} $$

Reward scaling: divide by the standard deviation of the discounted return G (one
accumulator per env, restarted at every episode end), not centred so the sign is kept:
$$ G_t = \gamma G_{t-1}(1 - d_{t-1}) + r_t, \qquad
   \tilde r_t = \text{clip}\left(\frac{r_t}{\sqrt{\text{Var}[G] + 10^{-8}}}, -c_r, c_r\right) \tag{15} $$

Both statistics, the actions and the environments are handled exactly as in
ppo_continuous.py: the statistics live in this script, are saved with the model and reused,
frozen, by --eval-checkpoint; the sampled, unclipped a_t is stored and learned from, only the
copy handed to `envs.step` is clipped; vector envs run in their default NEXT_STEP autoreset
mode, and the "reset row" after an episode end is no transition (left out of every loss, the
KL and the statistics) but holds the final observation whose value is the truncation bootstrap
of (3). The advantages are normalised over the batch before (5).

Logged besides the shared keys: `losses/policy_loss` is -L(θ_new) of (5) at the accepted
parameters (minus the mean advantage, 0 after normalisation, when the search fails),
`losses/approx_kl` the measured \bar D_KL of the accepted step (0 when none is accepted),
`charts/line_search_steps` the number of candidates of (11) evaluated, `charts/line_search_failures`
the number of iterations so far in which no candidate was accepted, `charts/step_size` the factor
b^k √(2δ / sᵀF_λs) of the accepted step (0 on a failure), `charts/cg_residual` ‖r‖ at the end of
(9), and the wall time per iteration of the conjugate gradient (`charts/cg_seconds`, including the
gradient of the KL it differentiates), of the line search (`charts/line_search_seconds`) and of the
whole iteration (`charts/iteration_seconds`).

Run:
    python algos/trpo.py --env-id Hopper-v4
    python algos/trpo.py --env-id InvertedPendulum-v4 --total-timesteps 100000
    python algos/trpo.py --help

Defaults: the published TRPO settings for MuJoCo (δ = 0.01, damping 0.1, 10 conjugate-gradient
iterations, a backtracking factor 0.8 over at most 10 candidates, γ = 0.99,
GAE λ = 0.95) and Stable-Baselines3 zoo's batch and value fit for Hopper-v4 (2 envs × 1024 steps;
Adam at 1e-3, 20 epochs of 16 minibatches of 128), with the 64×64 tanh networks and the
normalisations of ppo_continuous.py. The value fit matters most: 5 epochs of 32 minibatches
instead reached 1,348 on Hopper-v4 after 300k steps (seed 1) against 2,145 with these.
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
    """save the model and its normalisation statistics to runs/<run>/trpo.pt at the end (and on Ctrl-C)"""
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
    learning_rate: float = 1e-3
    """Adam learning rate of the value function (the policy moves by the trust-region step, not by Adam)"""
    num_envs: int = 2
    """number of parallel environments"""
    num_steps: int = 1024
    """steps per environment per batch (T)"""
    gamma: float = 0.99
    """discount factor γ (also of the return G in (15))"""
    gae_lambda: float = 0.95
    """GAE λ in (4)"""
    norm_adv: bool = True
    """normalise the advantages over the batch before (5)"""
    max_kl: float = 0.01
    """trust-region size δ of (6): the largest mean KL divergence a step may have"""
    damping: float = 0.1
    """damping λ added to the Fisher matrix in (8)"""
    cg_iterations: int = 10
    """conjugate-gradient iterations K of (9)"""
    cg_tolerance: float = 1e-5
    """stop (9) early once the residual norm ‖r‖ is at most this (0: always K iterations)"""
    backtrack_coef: float = 0.8
    """the factor b by which (11) shrinks the step after each rejected candidate"""
    max_backtracks: int = 10
    """candidates K_ls of (11) before the step is given up and θ_old kept"""
    vf_epochs: int = 20
    """Adam epochs of the value fit (12) per batch"""
    vf_minibatches: int = 16
    """minibatches per epoch of the value fit (each of at least 2 samples)"""
    norm_obs: bool = True
    """normalise observations by running statistics, (14)"""
    clip_obs: float = 10.0
    """clip normalised observations to ±c_s in (14)"""
    norm_reward: bool = True
    """scale rewards by the running std of the discounted return, (15)"""
    clip_reward: float = 10.0
    """clip scaled rewards to ±c_r in (15)"""


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
    "max_kl": "(0, inf)",
    "damping": "[0, inf)",
    "cg_iterations": "[1, inf)",
    "cg_tolerance": "[0, inf)",
    "backtrack_coef": "(0, 1)",
    "max_backtracks": "[1, inf)",
    "vf_epochs": "[1, inf)",
    "vf_minibatches": "[1, inf)",
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
        return gym.wrappers.RecordEpisodeStatistics(env)  # raw returns: scaling (15) happens outside

    return thunk


def check_env(env_id: str, capture_video: bool = False):
    """Refuse an unknown id, a wrong action/observation space or an env that cannot render
    (with --capture-video) before anything starts."""
    if env_id.startswith("ALE/") or "NoFrameskip" in env_id:
        fail(f"{env_id} is an Atari game (pixel observations); trpo.py is for vector observations: "
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
        fail(f"{env_id} has Discrete actions; trpo.py is for continuous (Box) actions: use algos/ppo.py")
    if not isinstance(act_space, gym.spaces.Box) or len(act_space.shape) != 1:
        fail(f"{env_id} has {act_space} actions; trpo.py needs a flat Box action space")
    if not isinstance(obs_space, gym.spaces.Box) or len(obs_space.shape) != 1:
        fail(f"{env_id} has observations {obs_space}; trpo.py needs flat vectors")


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
    """The running discounted return G of (15) on a [T, N] rollout: G_t = γ G_{t-1}(1 - d_{t-1}) + r_t,
    with start = G_{-1}(1 - d_{-1}) carried over from the previous rollout (0 after an episode end)."""
    returns = np.zeros(rewards.shape)
    last = start
    for t in range(len(rewards)):
        last = returns[t] = gamma * last + rewards[t]  # (15)
        last = last * (1.0 - dones[t])
    return returns


def gaussian_log_prob(actions, mean, log_std):
    """log π(a|s) of a diagonal Gaussian, equation (1), summed over the action dimensions."""
    return (-0.5 * ((actions - mean) / log_std.exp()) ** 2 - log_std - 0.5 * math.log(2 * math.pi)).sum(-1)  # (1)


def update_moments(mean, var, count, batch):
    """Equation (13): the mean, variance (ddof 0) and count of everything summarised by
    (mean, var, count) plus the rows of `batch`."""
    delta = batch - mean
    total = count + len(batch)
    new_mean = mean + delta.sum(0) / total  # (13)
    new_var = (var * count + (delta * (batch - new_mean)).sum(0)) / total  # (13)
    return new_mean, new_var, total


class RunningMeanStd:
    """Running mean and variance of a stream of batches (rows are samples), by (13)."""

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
    """Equation (14), as float32 for the networks."""
    return ((obs - rms.mean) / np.sqrt(rms.var + 1e-8)).clip(-clip, clip).astype(np.float32)  # (14)


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


def surrogate(logprob, old_logprob, advantages):
    """L(θ) of (5): the mean of r_t(θ) Â_t, with r_t of (2) from log-probabilities."""
    ratio = (logprob - old_logprob).exp()  # (2)
    return (ratio * advantages).mean()  # (5)


def gaussian_kl(old_mean, old_log_std, mean, log_std):
    """D_KL(π_old ‖ π_θ) of two diagonal Gaussians, equation (7), summed over the action dimensions."""
    var_ratio = ((old_mean - mean) ** 2 + (2 * old_log_std).exp()) / (2 * (2 * log_std).exp())
    return (log_std - old_log_std + var_ratio - 0.5).sum(-1)  # (7)


def fisher_vector_product(kl_grad, params, v, damping):
    """F_λ v of (8): kl_grad is the gradient of the mean KL at θ_old as one vector, built with create_graph=True so
    that it can be differentiated again; its graph is kept for the next product."""
    grads = torch.autograd.grad(kl_grad @ v, params, retain_graph=True)
    return torch.cat([g.reshape(-1) for g in grads]) + damping * v  # (8)


def conjugate_gradient(matrix_vector_product, b, iterations, tolerance):
    """Equation (9): x ≈ A⁻¹ b for a symmetric positive-definite A known only by its products
    A p = matrix_vector_product(p), after at most `iterations` steps or once ‖b - A x‖ ≤ tolerance
    (the residual kept by the recursion). Returns x and the final residual norm."""
    x = torch.zeros_like(b)
    r, p = b.clone(), b.clone()
    rr = r @ r
    for _ in range(iterations):
        if rr.sqrt() <= tolerance:
            break
        Ap = matrix_vector_product(p)
        alpha = rr / (p @ Ap)  # (9)
        x = x + alpha * p  # (9)
        r = r - alpha * Ap  # (9)
        rr_next = r @ r
        p = r + (rr_next / rr) * p  # (9)
        rr = rr_next
    return x, rr.sqrt()


@torch.no_grad()
def line_search(params, full_step, evaluate, max_kl, backtrack_coef, max_backtracks):
    """Equation (11) on the tensors `params` (changed in place): try θ_old + b^k Δθ for
    k = 0 .. max_backtracks - 1, with evaluate() -> (L, mean KL) of the current parameters as floats,
    and keep the first candidate that improves L and whose KL is at most max_kl. When none does,
    θ_old is written back. Returns (accepted, candidates evaluated, factor b^k, L, KL) of the step kept."""
    old = torch.nn.utils.parameters_to_vector(params).clone()
    old_surrogate, _ = evaluate()
    for k in range(max_backtracks):
        fraction = backtrack_coef ** k
        torch.nn.utils.vector_to_parameters(old + fraction * full_step, params)  # (11)
        new_surrogate, kl = evaluate()
        if kl <= max_kl and new_surrogate > old_surrogate:  # (6), (11): NaN fails both tests
            return True, k + 1, fraction, new_surrogate, kl
    torch.nn.utils.vector_to_parameters(old, params)
    return False, max_backtracks, 0.0, old_surrogate, 0.0


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

    def policy_parameters(self) -> list:
        """θ: the parameters that the trust-region step moves (the critic's φ is fitted apart)."""
        return [*self.actor_mean.parameters(), self.actor_logstd]

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
    if saved_by != "trpo":
        fail(f"{args.eval_checkpoint} was saved by {saved_by or 'another program'}, not trpo.py: "
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
    summary = dict(env_id=args.env_id, algorithm="trpo", mode="eval", seed=args.seed,
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
    if batch_size // args.vf_minibatches < 2:
        fail(f"--vf-minibatches {args.vf_minibatches} leaves minibatches of fewer than 2 samples (batch of "
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
    policy_params = agent.policy_parameters()
    vf_optimizer = torch.optim.Adam(agent.critic.parameters(), lr=args.learning_rate, eps=1e-5,
                                    fused=True if device.type in ("cpu", "cuda") else None)
    rng = np.random.default_rng(args.seed)
    obs_rms, return_rms = RunningMeanStd((obs_dim,)), RunningMeanStd()

    def normalized(raw_obs):
        """(14) by the current statistics, which it leaves as they are (float32 either way)."""
        return normalize_obs(raw_obs, obs_rms, args.clip_obs) if args.norm_obs else raw_obs.astype(np.float32)

    def prepare(raw_obs):
        """(14) for the envs being learned from: update the statistics with this batch, then normalise it."""
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
    rewards = np.zeros((T, N), dtype=np.float32)  # raw, then scaled by (15) after the rollout
    terminations = np.zeros((T, N), dtype=np.float32)
    truncations = np.zeros((T, N), dtype=np.float32)
    resets = np.zeros((T, N), dtype=bool)  # row t is the reset step after an episode ended at t - 1
    carried_return = np.zeros(N)  # G of (15) at the end of the last rollout, 0 where an episode ended

    global_step, start_time = 0, time.time()
    next_progress, next_eval = start_time + 1.0, args.eval_frequency
    recent_returns = deque(maxlen=20)
    episodes, last_eval, line_search_failures = 0, None, 0
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
            iteration_start = time.time()
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
                rewards[:] = np.clip(rewards / scale, -args.clip_reward, args.clip_reward)  # (15)

            # One batched pass for V(s_0..s_T); the policy's quantities at θ_old on the valid rows only.
            all_obs = torch.as_tensor(np.concatenate([obs, next_obs[None]]), device=device)
            with torch.inference_mode():
                values = agent.critic(all_obs).squeeze(-1)
            b_values = values[:-1].reshape(-1)
            values = values.cpu().numpy()
            advantages = gae(rewards, values, terminations, truncations, args.gamma, args.gae_lambda)
            returns = advantages + values[:-1]  # (4)

            valid = np.flatnonzero(~resets.reshape(-1))  # reset rows hold no transition
            valid_t = torch.as_tensor(valid, device=device)
            b_obs = all_obs[:-1].reshape(-1, obs_dim)
            b_returns = torch.as_tensor(returns.reshape(-1), device=device)
            p_obs = b_obs[valid_t]
            p_actions = torch.as_tensor(actions, device=device).reshape(-1, act_dim)[valid_t]
            p_advantages = torch.as_tensor(advantages.reshape(-1), device=device)[valid_t]
            if args.norm_adv and len(valid) > 1:  # one sample has no spread to normalise by
                p_advantages = (p_advantages - p_advantages.mean()) / (p_advantages.std() + 1e-8)
            with torch.no_grad():
                old_mean, old_log_std = agent.actor_mean(p_obs), agent.actor_logstd.clone()
                old_logprob = gaussian_log_prob(p_actions, old_mean, old_log_std)

            def mean_kl():
                """The mean KL of (6) at the policy's current parameters."""
                return gaussian_kl(old_mean, old_log_std, agent.actor_mean(p_obs), agent.actor_logstd).mean()  # (6)

            def evaluate_candidate():
                """(L, mean KL) of the current parameters, for the line search (11)."""
                return surrogate(agent.policy(p_obs, p_actions), old_logprob, p_advantages).item(), mean_kl().item()

            # The policy step, (5) and (8)-(11).
            loss_grad = torch.autograd.grad(surrogate(agent.policy(p_obs, p_actions), old_logprob, p_advantages),
                                            policy_params)
            g = torch.cat([x.reshape(-1) for x in loss_grad])  # (5)
            cg_start = time.time()
            kl_grad = torch.cat([x.reshape(-1) for x in torch.autograd.grad(mean_kl(), policy_params,
                                                                            create_graph=True)])

            def fvp(v):
                return fisher_vector_product(kl_grad, policy_params, v, args.damping)

            step_dir, cg_residual = conjugate_gradient(fvp, g, args.cg_iterations, args.cg_tolerance)
            shs = step_dir @ fvp(step_dir)
            full_step_size = torch.sqrt(2 * args.max_kl / shs)  # (10)
            full_step = full_step_size * step_dir  # (10)
            del kl_grad  # frees the graph kept for the products
            cg_seconds = time.time() - cg_start
            search_start = time.time()
            accepted, candidates, fraction, new_surrogate, kl = line_search(
                policy_params, full_step.detach(), evaluate_candidate, args.max_kl, args.backtrack_coef,
                args.max_backtracks)
            line_search_seconds = time.time() - search_start
            line_search_failures += not accepted

            # The value function, (12), fitted after the policy step on the same batch.
            for epoch in range(args.vf_epochs):
                for mb in np.array_split(rng.permutation(valid), args.vf_minibatches):
                    if len(mb) == 0:  # only when reset rows leave fewer samples than minibatches
                        continue
                    mb = torch.as_tensor(mb, device=device)
                    v_loss = 0.5 * ((agent.critic(b_obs[mb]).squeeze(-1) - b_returns[mb]) ** 2).mean()  # (12)
                    vf_optimizer.zero_grad(set_to_none=True)
                    v_loss.backward()
                    vf_optimizer.step()

            losses = {"losses/value_loss": v_loss.item(), "losses/policy_loss": -new_surrogate,
                      "losses/entropy": agent.entropy().item(), "losses/approx_kl": kl}
            check_finite(global_step, losses, agent)
            last_finite = snapshot()
            y_pred, y_true = b_values[valid_t], b_returns[valid_t]
            var_y = y_true.var()
            explained_var = float("nan") if var_y == 0 else (1 - (y_true - y_pred).var() / var_y).item()
            sps = int(global_step / (time.time() - start_time))
            writer.add_scalar("charts/learning_rate", vf_optimizer.param_groups[0]["lr"], global_step)
            for key, value in losses.items():
                writer.add_scalar(key, value, global_step)
            writer.add_scalar("losses/explained_variance", explained_var, global_step)
            writer.add_scalar("charts/line_search_steps", candidates, global_step)
            writer.add_scalar("charts/line_search_failures", line_search_failures, global_step)
            writer.add_scalar("charts/step_size", fraction * full_step_size.item() if accepted else 0.0, global_step)
            writer.add_scalar("charts/cg_residual", cg_residual.item(), global_step)
            writer.add_scalar("charts/cg_seconds", cg_seconds, global_step)
            writer.add_scalar("charts/line_search_seconds", line_search_seconds, global_step)
            writer.add_scalar("charts/iteration_seconds", time.time() - iteration_start, global_step)
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
        path = os.path.join(run_dir, "trpo.pt")
        torch.save({"algorithm": "trpo", "args": asdict(args), "model": agent.state_dict(),
                    "obs_rms": obs_rms.state_dict(), "return_rms": return_rms.state_dict()}, path)
        print(f"model saved to {path}")
    envs.close()
    if eval_env is not None:
        eval_env.close()
    writer.close()
    wall = time.time() - start_time
    eval_step, eval_return = last_eval or (None, None)
    summary = dict(env_id=args.env_id, algorithm="trpo", exp_name=args.exp_name, seed=args.seed,
                   global_step=global_step, wall_seconds=wall, SPS=global_step / wall,
                   mean_return=float(np.mean(recent_returns)) if recent_returns else None,
                   episodes_in_mean=len(recent_returns), episodes=episodes,
                   eval_step=eval_step, eval_return=eval_return,
                   stopped=stopped, stop_reason=stop_reason, versions=versions(), run_dir=run_dir)
    return write_summary(run_dir, summary)


if __name__ == "__main__":
    sys.exit(EXIT_CODES[train(parse_args())["stopped"]])
