r"""ACKTR: actor-critic using Kronecker-factored trust region, discrete actions.

Wu, Mansimov, Liao, Grosse, Ba (2017), "Scalable trust-region method for deep reinforcement
learning using Kronecker-factored approximation", arXiv:1708.05144. The curvature
approximation is K-FAC: Martens, Grosse (2015), "Optimizing Neural Networks with
Kronecker-factored Approximate Curvature", arXiv:1503.05671.

ACKTR is A2C (algos/a2c.py: N envs in lockstep, one update per rollout of T steps, n-step
returns) whose gradient step is replaced by a natural-gradient step of bounded KL.

n-step return (as in a2c.py: it stops at an episode end, adds nothing after a termination and
the value of the final observation after a truncation or after the rollout's last step) and
the advantage with the critic V_φ as baseline:
$$ R_t = r_t + \gamma (1 - \text{term}_t)\begin{cases} V(s_{t+1}) & d_t \text{ or } t = T-1 \\
   R_{t+1} & \text{otherwise} \end{cases} \tag{1} $$
$$ A_t = R_t - V_\phi(s_t) \tag{2} $$

Losses of the policy π_θ (A_t held constant, c_e the entropy bonus) and of the critic:
$$ L^{\pi} = -\mathbb{E}_t\left[A_t \log \pi_\theta(a_t|s_t)\right]
   - c_e \mathbb{E}_t[H(\pi_\theta(\cdot|s_t))] \tag{3} $$
$$ L^{V} = \tfrac12\mathbb{E}_t\left[(R_t - V_\phi(s_t))^2\right] \tag{4} $$

The Fisher of the model's own predictive distribution. The critic's output is read as a
Gaussian p(v|s) = N(v; V_φ(s), 1) (Gauss-Newton, as in the paper). For each sample, a target is
drawn from the model, ã ~ π_θ(·|s) and ṽ ~ N(V_φ(s), 1), not taken from the data (that would be
the empirical Fisher), and back-propagated to the pre-activations s = W ā of every layer:
$$ g = \nabla_{s} \left[\log \pi_\theta(\tilde a|s) + \log \mathcal{N}(\tilde v; V_\phi(s), 1)\right] \tag{5} $$

K-FAC: for a Linear layer with input a (ā = (a, 1): the bias is the last column of W) the
layer's block of the Fisher is approximated by a Kronecker product of two small matrices,
measured on each batch of B samples and averaged over updates with decay ρ:
$$ \hat A = \tfrac1B \textstyle\sum_i \bar a_i \bar a_i^\top, \quad \hat G = \tfrac1B \sum_i g_i g_i^\top \tag{6} $$
$$ A \leftarrow \rho A + (1 - \rho) \hat A, \quad G \leftarrow \rho G + (1 - \rho) \hat G \tag{7} $$

Damping λ is split between the factors with K-FAC's π (section 6.3 of Martens and Grosse), so
that it does not depend on the factors' scales; the damped inverses are recomputed every
`inverse_every` updates:
$$ \pi = \sqrt{\frac{\mathrm{tr}(A) / \dim A}{\mathrm{tr}(G) / \dim G}}, \quad
   A_\lambda = A + \pi \sqrt{\lambda}\, I, \quad G_\lambda = G + \frac{\sqrt{\lambda}}{\pi} I \tag{8} $$

The layer's Fisher block F_W = E[vec(g āᵀ) vec(g āᵀ)ᵀ] (vec stacking the rows) is taken to be
F̂_W = G_λ ⊗ A_λ, whose inverse applied to the gradient is two small matrix products:
$$ \hat g_W = (G_\lambda \otimes A_\lambda)^{-1} \mathrm{vec}(\nabla_W L)
   = \mathrm{vec}\left(G_\lambda^{-1} \nabla_W L\, A_\lambda^{-1}\right) \tag{9} $$

Trust region. The KL of a step -ε ĝ is ½ ε² ĝᵀFĝ to second order; with F̂ the damped block-diagonal
K-FAC matrix that defines ĝ in (9) (the factors of the last refresh of the inverses), F̂ĝ = ∇L exactly,
so the quadratic form costs one dot product of the preconditioned and the raw gradients over all layers:
$$ \hat g^\top \hat F \hat g = \textstyle\sum_W \langle \hat g_W, \nabla_W L \rangle \tag{10} $$
$$ \epsilon = \min\left(\eta, \sqrt{2\delta / \hat g^\top \hat F \hat g}\right), \quad
   \theta \leftarrow \theta - \epsilon \hat g \tag{11} $$

The bound holds for the model, not for the policy: the measured KL of the step (losses/approx_kl)
exceeds the prediction. On CartPole-v1 (seed 1, updates where the bound binds) the median ratio was
7 (at most 69) with the defaults, 2.6 (at most 4.9) with ρ = 0.9 and inverses every update: the
averaged factors still describe older, less certain policies. Both settings reach 500 on seed 1.

Actor and critic are two networks with two trust regions, as in the paper's code for its separate
value network (baselines/acktr: a K-FAC value function with its own KL bound, clip_kl = 0.3): (10) and (11)
run over the actor's layers with L = L^π and bound δ, and over the critic's with L = L^V and bound
δ_V. The critic's KL, that of N(V, 1), is ½ E[ΔV²] in units of the returns: on CartPole (rewards
of 1, returns up to 100, no reward clipping as on Atari) a joint bound of δ = 0.001 would hold V
to moves of about 0.04 per update, and an unbounded Gauss-Newton step diverges within a few updates.

What this keeps of K-FAC and ACKTR: the Kronecker factors of every Linear layer with the bias as an
extra input (6); the Fisher of the model's predictive distribution, sampled (5); running averages
(7); factored Tikhonov damping with π (8); inverses refreshed every few updates; the KL-bounded
step size (11) with η and δ from the paper. What it omits: the eigen-decomposition of the factors
and its damping of the eigenvalue products (it inverts the damped factors), adaptation of λ by
the Levenberg-Marquardt rule, the re-scaling and momentum of K-FAC section 7 and the paper's
momentum of 0.9, the block-tridiagonal inverse, asynchronous inverse computation, Conv2d layers
(this script takes vector observations, so its networks are Linear and Tanh only).

Defaults: η = 0.25, δ = 0.001, λ = 0.01 and ρ = 0.99 are those of the paper's code (baselines/acktr,
whose KL bound omits the factor 2 of (11)); δ_V = 0.3 is its value function's bound; the inverses are
recomputed every 10 updates; T = 20 steps per update as there, from 8 envs; η decays linearly to 0
(as a2c.py's rate); no entropy bonus, as in a2c.py on CartPole. On CartPole-v1, seeds 1-5 end at a
mean return of 493 to 500 after the default 100,000 steps.

Logged besides the shared keys: `losses/policy_loss` (3, without the entropy term),
`losses/value_loss` (4), `losses/entropy`, `losses/approx_kl` (the measured KL(π_old‖π_new) of
the update's batch after the step), `charts/step_size` (the actor's ε of (11)), `charts/vf_step_size`
(the critic's), `charts/kl_estimate` (the actor's ½ ε² ĝᵀF̂ĝ, the KL the quadratic model predicts:
δ when the trust region binds).

Environments: gymnasium vector envs in their default NEXT_STEP autoreset mode, as in a2c.py: the
row after an episode end holds the old episode's final observation (its V is the truncation
bootstrap in (1)) and is no transition, so it is left out of the losses and of the factors.

Run:
    python algos/acktr.py                              # CartPole-v1
    python algos/acktr.py --env-id Acrobot-v1
    python algos/acktr.py --help
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
    """save the model to runs/<run>/acktr.pt at the end (and on Ctrl-C)"""
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
    total_timesteps: int = 100_000
    """total environment steps over all envs"""
    learning_rate: float = 0.25
    """η: the largest step size of (11), and the critic's step size"""
    num_envs: int = 8
    """number of parallel environments"""
    num_steps: int = 20
    """steps per environment per update (the n of the n-step return)"""
    anneal_lr: bool = True
    """decay η linearly to 0"""
    gamma: float = 0.99
    """discount factor γ"""
    ent_coef: float = 0.0
    """entropy coefficient c_e in (3)"""
    delta: float = 0.001
    """δ: the trust region's bound on the policy's KL per update (11)"""
    vf_delta: float = 0.3
    """δ_V: the critic's bound, on the KL ½ E[ΔV²] of its Gaussian N(V, 1) per update (11)"""
    damping: float = 0.01
    """λ: Tikhonov damping of the Fisher blocks (8)"""
    stats_decay: float = 0.99
    """ρ: decay of the running averages of the Kronecker factors (7)"""
    inverse_every: int = 10
    """recompute the damped inverses of the factors every this many updates"""


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
    "ent_coef": "[0, inf)",
    "delta": "(0, inf)",
    "vf_delta": "(0, inf)",
    "damping": "[0, inf)",  # 0 is plain K-FAC; the inverse then needs full-rank factors
    "stats_decay": "[0, 1)",  # at 1 the averages would never leave their first batch
    "inverse_every": "[1, inf)",
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
        fail(f"{env_id} is an Atari game (pixel observations); acktr.py is for vector observations: "
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
        fail(f"{env_id} has continuous (Box) actions; acktr.py is for Discrete actions: use algos/ppo_continuous.py")
    if not isinstance(act_space, gym.spaces.Discrete):
        fail(f"{env_id} has {act_space} actions; acktr.py needs a Discrete action space")
    if not isinstance(obs_space, gym.spaces.Box) or len(obs_space.shape) != 1:
        fail(f"{env_id} has observations {obs_space}; acktr.py needs flat vectors")




def nstep_returns(rewards, values, terminations, truncations, gamma):
    """n-step returns R_t of equation (1) on a [T, N] rollout (a2c.py's function).

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
        next_return = rewards[t] + gamma * (1.0 - terminations[t]) * tail  # (1)
        returns[t] = next_return
    return returns


def sampled_log_likelihood(logits, values, generator):
    """Σ_i log π(ã_i|s_i) + log N(ṽ_i; V(s_i), 1), the log-likelihood of targets drawn from the model
    itself (ã ~ π, ṽ ~ N(V, 1), held constant): its gradient at each layer's output is g of (5).

    The sum (not the mean) makes row i of that gradient sample i's own g.
    """
    log_probs = logits.log_softmax(-1)
    with torch.no_grad():  # ã by the Gumbel-max trick, as when acting: quiet on a NaN, which check_finite names
        uniform = torch.rand(logits.shape, generator=generator, device=logits.device, dtype=logits.dtype)
        sampled = (logits - torch.log(-torch.log(uniform))).argmax(-1, keepdim=True)
        v_sampled = values + torch.randn(values.shape, generator=generator, device=values.device, dtype=values.dtype)
    return log_probs.gather(-1, sampled).sum() - 0.5 * ((v_sampled - values) ** 2).sum()  # (5)


def kfac_factors(a, g):
    """Â and Ĝ of equation (6) for one Linear layer: a [B, in] its inputs, g [B, out] the per-sample
    gradients at its outputs. Â is (in + 1) x (in + 1): a column of ones stands for the bias."""
    a_bar = torch.cat([a, torch.ones_like(a[:, :1])], 1)
    return a_bar.T @ a_bar / len(a), g.T @ g / len(g)  # (6)


def damped_inverses(A, G, damping):
    """A_λ⁻¹ and G_λ⁻¹ of equation (8): λ split between the factors by π (floored traces keep π
    finite for a factor that is still 0)."""
    mean_a = torch.clamp(torch.trace(A) / len(A), min=1e-12)
    mean_g = torch.clamp(torch.trace(G) / len(G), min=1e-12)
    pi = torch.sqrt(mean_a / mean_g)
    eye_a, eye_g = torch.eye(len(A), dtype=A.dtype, device=A.device), torch.eye(len(G), dtype=G.dtype, device=G.device)
    A_damped, G_damped = A + pi * math.sqrt(damping) * eye_a, G + math.sqrt(damping) / pi * eye_g  # (8)
    # inv_ex does not raise on a singular factor (--damping 0): the inf or NaN it returns reaches the
    # weights, and check_finite stops the run with one line.
    return torch.linalg.inv_ex(A_damped)[0], torch.linalg.inv_ex(G_damped)[0]


def kfac_precondition(grad, A_inv, G_inv):
    """ĝ_W = G_λ⁻¹ ∇_W L A_λ⁻¹ of equation (9); grad [out, in + 1] holds the weight gradient with
    the bias gradient as its last column."""
    return G_inv @ grad @ A_inv  # (9)


def trust_region_step_size(grads, natural_grads, eta, delta):
    """ε of equation (11) from the raw and preconditioned gradients of every layer (lists of tensors);
    ĝᵀF̂ĝ of (10) is their dot product. Returns (ε, ĝᵀF̂ĝ) as tensors."""
    quadratic = sum((n * g).sum() for g, n in zip(grads, natural_grads))  # (10)
    return torch.clamp(torch.sqrt(2.0 * delta / quadratic), max=eta), quadratic  # (11)


class KFAC:
    """The running factors (7) and damped inverses (8) of a network's Linear layers, and its
    preconditioned gradient (9)."""

    def __init__(self, net: nn.Sequential, decay: float, damping: float):
        self.layers = [m for m in net if isinstance(m, nn.Linear)]
        self.decay, self.damping = decay, damping
        self.A = self.G = self.A_inv = self.G_inv = None

    def update_factors(self, inputs, output_grads):
        """Average in one batch's factors; the first batch starts the averages."""
        batch = [kfac_factors(a.detach(), g) for a, g in zip(inputs, output_grads)]
        if self.A is None:
            self.A, self.G = [A for A, _ in batch], [G for _, G in batch]
            return
        for i, (A_hat, G_hat) in enumerate(batch):
            self.A[i] = self.decay * self.A[i] + (1.0 - self.decay) * A_hat  # (7)
            self.G[i] = self.decay * self.G[i] + (1.0 - self.decay) * G_hat  # (7)

    def update_inverses(self):
        inverses = [damped_inverses(A, G, self.damping) for A, G in zip(self.A, self.G)]
        self.A_inv, self.G_inv = [a for a, _ in inverses], [g for _, g in inverses]

    def precondition(self):
        """(raw, preconditioned) gradients of every layer as [out, in + 1] matrices."""
        raw = [torch.cat([m.weight.grad, m.bias.grad[:, None]], 1) for m in self.layers]
        return raw, [kfac_precondition(g, a_inv, g_inv) for g, a_inv, g_inv in zip(raw, self.A_inv, self.G_inv)]

    def set_grads(self, natural, scale=1.0):
        """Write scale * ĝ into the layers' .grad for the optimiser's step."""
        for m, n in zip(self.layers, natural):
            m.weight.grad.copy_(n[:, :-1] * scale)
            m.bias.grad.copy_(n[:, -1] * scale)


def forward_with_layers(net: nn.Sequential, x):
    """net(x), and the input and output (pre-activation) of each of its Linear layers."""
    inputs, outputs = [], []
    for m in net:
        if isinstance(m, nn.Linear):
            inputs.append(x)
            x = m(x)
            outputs.append(x)
        else:
            x = m(x)
    return x, inputs, outputs
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
    if saved_by != "acktr":
        fail(f"{args.eval_checkpoint} was saved by {saved_by or 'another program'}, not acktr.py: "
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
    summary = dict(env_id=args.env_id, algorithm="acktr", mode="eval", seed=args.seed, checkpoint=args.eval_checkpoint,
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
    obs_dim, n_actions = envs.single_observation_space.shape[0], envs.single_action_space.n
    agent = Agent(obs_dim, n_actions).to(device)
    for p in agent.parameters():  # .grad exists from the start: KFAC.set_grads writes into it
        p.grad = torch.zeros_like(p)
    kfac_actor = KFAC(agent.actor, args.stats_decay, args.damping)
    kfac_critic = KFAC(agent.critic, args.stats_decay, args.damping)
    # Plain SGD applies θ ← θ - η · grad; the K-FAC direction and the trust region's scale ε/η are
    # written into .grad, so the step is -ε ĝ of (11).
    optimizer = torch.optim.SGD(agent.parameters(), lr=args.learning_rate, foreach=True)
    rng = np.random.default_rng(args.seed)
    generator = torch.Generator(device=device).manual_seed(args.seed)  # the targets of (5)

    # Rollout storage on the host (the envs live there); one copy to `device` per update.
    T, N = args.num_steps, args.num_envs
    obs = np.zeros((T, N, obs_dim), dtype=np.float32)
    actions = np.zeros((T, N), dtype=np.int64)
    rewards = np.zeros((T, N), dtype=np.float32)
    terminations = np.zeros((T, N), dtype=np.float32)
    truncations = np.zeros((T, N), dtype=np.float32)
    resets = np.zeros((T, N), dtype=bool)  # row t is the reset step after an episode ended at t - 1

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
            eta = args.learning_rate * (1.0 - (iteration - 1.0) / num_iterations) if args.anneal_lr \
                else args.learning_rate
            optimizer.param_groups[0]["lr"] = eta

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

            all_obs = torch.as_tensor(np.concatenate([obs, next_obs[None].astype(np.float32)]), device=device)
            with torch.no_grad():
                all_values = agent.critic(all_obs).squeeze(-1)  # V(s_0) .. V(s_T)
            returns = nstep_returns(rewards, all_values.cpu().numpy(), terminations, truncations, args.gamma)
            valid = torch.as_tensor(~resets.reshape(-1), device=device)  # reset rows hold no transition
            b_obs = all_obs[:-1].reshape(-1, obs_dim)[valid]
            b_actions = torch.as_tensor(actions.reshape(-1), device=device)[valid]
            b_returns = torch.as_tensor(returns.reshape(-1), device=device)[valid]
            logits, actor_in, actor_out = forward_with_layers(agent.actor, b_obs)
            values, critic_in, critic_out = forward_with_layers(agent.critic, b_obs)
            values = values.squeeze(-1)

            # The Fisher's factors: per-sample g of (5) at every layer's output, from targets drawn from the model.
            fisher_grads = torch.autograd.grad(sampled_log_likelihood(logits, values, generator),
                                               actor_out + critic_out, retain_graph=True)
            kfac_actor.update_factors(actor_in, fisher_grads[:len(actor_out)])
            kfac_critic.update_factors(critic_in, fisher_grads[len(actor_out):])
            if (iteration - 1) % args.inverse_every == 0:
                kfac_actor.update_inverses()
                kfac_critic.update_inverses()

            log_probs = logits.log_softmax(-1)
            log_prob = log_probs.gather(-1, b_actions[:, None]).squeeze(-1)
            entropy = -(log_probs.exp() * log_probs).sum(-1)
            advantages = (b_returns - values).detach()  # (2)
            pg_loss = -(advantages * log_prob).mean()
            entropy_loss = entropy.mean()
            actor_loss = pg_loss - args.ent_coef * entropy_loss  # (3)
            v_loss = 0.5 * ((b_returns - values) ** 2).mean()  # (4)
            optimizer.zero_grad(set_to_none=False)
            (actor_loss + v_loss).backward()  # the two networks share no weight: each gets its own loss's gradient

            raw, natural = kfac_actor.precondition()
            step_size, quadratic = trust_region_step_size(raw, natural, eta, args.delta)
            kfac_actor.set_grads(natural, step_size / eta)  # the step -ε ĝ of (11): SGD multiplies by η
            raw, natural = kfac_critic.precondition()
            vf_step_size, _ = trust_region_step_size(raw, natural, eta, args.vf_delta)
            kfac_critic.set_grads(natural, vf_step_size / eta)
            log_now = iteration % 25 == 0 or iteration == num_iterations
            if log_now:
                old_log_probs = log_probs.detach()
            optimizer.step()

            sps = int(global_step / (time.time() - start_time))
            # Read, checked and logged every 25 updates as in a2c.py (each .item() is a device sync).
            if log_now:
                with torch.no_grad():
                    new_log_probs = agent.actor(b_obs).log_softmax(-1)
                    approx_kl = (old_log_probs.exp() * (old_log_probs - new_log_probs)).sum(-1).mean()
                losses = {"losses/value_loss": v_loss.item(), "losses/policy_loss": pg_loss.item(),
                          "losses/entropy": entropy_loss.item(), "losses/approx_kl": approx_kl.item(),
                          "charts/step_size": step_size.item(), "charts/vf_step_size": vf_step_size.item(),
                          "charts/kl_estimate": (0.5 * step_size ** 2 * quadratic).item()}
                check_finite(global_step, losses, agent)
                last_finite = copy.deepcopy(agent.state_dict())
                writer.add_scalar("charts/learning_rate", eta, global_step)
                for key, value in losses.items():
                    writer.add_scalar(key, value, global_step)
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
        path = os.path.join(run_dir, "acktr.pt")
        torch.save({"algorithm": "acktr", "args": asdict(args), "model": agent.state_dict()}, path)
        print(f"model saved to {path}")
    envs.close()
    if eval_env is not None:
        eval_env.close()
    writer.close()
    wall = time.time() - start_time
    eval_step, eval_return = last_eval or (None, None)
    summary = dict(env_id=args.env_id, algorithm="acktr", exp_name=args.exp_name, seed=args.seed,
                   global_step=global_step, wall_seconds=wall, SPS=global_step / wall,
                   mean_return=float(np.mean(recent_returns)) if recent_returns else None,
                   episodes_in_mean=len(recent_returns), episodes=episodes,
                   eval_step=eval_step, eval_return=eval_return,
                   stopped=stopped, stop_reason=stop_reason, versions=versions(), run_dir=run_dir)
    return write_summary(run_dir, summary)


if __name__ == "__main__":
    sys.exit(EXIT_CODES[train(parse_args())["stopped"]])
