"""The off-policy updates compute no product they do not need: the FLOPs of a real
gradient step, counted by benchmark/update_cost.py, equal the sum of the passes the
algorithm asks for (so the speed ceilings in the README rest on a checked count)."""

import importlib.util
import os

import pytest

from conftest import ROOT, load

OBS, ACT, HIDDEN, BATCH = 3, 1, 256, 256  # Pendulum-v1, the scripts' networks and batch


def update_cost():
    spec = importlib.util.spec_from_file_location("update_cost", os.path.join(ROOT, "benchmark", "update_cost.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def linear_flops(batch, sizes):
    """Forward FLOPs of a stack of Linear layers: 2·B·fan_in·fan_out each."""
    return sum(2 * batch * i * o for i, o in zip(sizes[:-1], sizes[1:]))


def expected_flops(name):
    """One env step: acting, one critic step, and the actor steps per env step. A backward
    pass costs one forward for the weight gradients plus the input gradients of every
    layer but the first (and of the first too where the gradient must reach the action)."""
    actor = [OBS, HIDDEN, HIDDEN, 2 * ACT if name == "sac" else ACT]  # sac: mean and log σ
    critic = [OBS + ACT, HIDDEN, HIDDEN, 1]
    fwd_actor, fwd_critic = linear_flops(BATCH, actor), linear_flops(BATCH, critic)
    grad_in_actor, grad_in_critic = linear_flops(BATCH, actor[1:]), linear_flops(BATCH, critic[1:])
    critics = 1 if name == "ddpg" else 2
    # critic step: the next action (target actor; sac: the actor), the target critics, the
    # critics forward, their weight and input gradients
    critic_step = fwd_actor + critics * (3 * fwd_critic + grad_in_critic)
    # actor step: π(s), the critics with frozen weights (ddpg, td3: Q_1 only), ∇_a Q down to
    # the action (input gradients of all layers, no weight gradients), the actor's backward
    used = 1 if name in ("ddpg", "td3") else 2
    actor_step = 2 * fwd_actor + 2 * used * fwd_critic + grad_in_actor
    actor_steps = 0.5 if name in ("ddpg", "td3") else 1.0  # policy_frequency 2; sac makes up the skipped ones
    return linear_flops(1, actor) + critic_step + actor_steps * actor_step


@pytest.mark.parametrize("name", ["ddpg", "td3", "sac"])
def test_update_computes_only_the_needed_products(name):
    load(name)  # importable under its own name
    counted = update_cost().flops_per_step(name, updates=50)
    expected = expected_flops(name)
    assert counted == pytest.approx(expected, rel=1e-3), f"{name}: {counted / 1e6:.1f} vs {expected / 1e6:.1f} MFLOP"
