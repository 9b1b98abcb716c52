"""Every script reaches its threshold on its learning-test task with a fixed seed.

Budgets are environment steps, so the outcome does not depend on the machine's speed.
The score is the mean episodic return of the last 20 episodes at the end of training.
"""

import pytest

from conftest import run

CASES = {
    # case: (script, overrides, threshold)
    "reinforce": ("reinforce", dict(total_timesteps=300_000), 250.0),
    "reinforce_baseline": ("reinforce", dict(total_timesteps=300_000, baseline=True), 400.0),
    "actor_critic": ("actor_critic", dict(), 250.0),
    "a2c": ("a2c", dict(), 400.0),
    "ppo": ("ppo", dict(), 475.0),
    "ppo_continuous": ("ppo_continuous", dict(env_id="InvertedPendulum-v4", total_timesteps=150_000), 900.0),
}


@pytest.mark.learning
@pytest.mark.parametrize("case", CASES)
def test_learns(case):
    script, overrides, threshold = CASES[case]
    summary = run(script, seed=1, **overrides)
    print(f"{case}: mean return {summary['mean_return']:.1f} over the last {summary['episodes_in_mean']} episodes, "
          f"{summary['global_step']:,} steps, {summary['wall_seconds']:.0f} s")
    assert summary["episodes_in_mean"] == 20
    assert summary["mean_return"] >= threshold
