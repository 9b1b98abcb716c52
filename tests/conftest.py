import importlib.util
import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ALGOS_DIR = os.path.join(ROOT, "algos")
ALGOS = sorted(f[:-3] for f in os.listdir(ALGOS_DIR) if f.endswith(".py"))
_cache = {}

# The smallest budget each script runs with in the tests that cover every script
# (tests/test_args.py, tests/test_contract.py). A new script adds its line here.
TINY = {
    "reinforce": dict(total_timesteps=1500),
    "actor_critic": dict(total_timesteps=1600),
    "a2c": dict(total_timesteps=2000),
    "ppo": dict(total_timesteps=2048, num_envs=4, num_steps=64),
    "ppo_continuous": dict(env_id="InvertedPendulum-v4", total_timesteps=1024, num_steps=256, num_minibatches=4,
                           update_epochs=2),
    "ddpg": dict(total_timesteps=600, learning_starts=200),
    "td3": dict(total_timesteps=600, learning_starts=200),
    "sac": dict(total_timesteps=600, learning_starts=200),
    "d4pg": dict(total_timesteps=600, learning_starts=200, rollout_steps=20),
    "a3c": dict(total_timesteps=2000, num_workers=2),
    "impala": dict(total_timesteps=2000, num_actors=2),
    "es": dict(total_timesteps=5000),
    "acer": dict(total_timesteps=2000),
    "offpac": dict(total_timesteps=2000, learning_starts=500),
    "acktr": dict(total_timesteps=2000),
    "trpo": dict(env_id="InvertedPendulum-v4", total_timesteps=1024, num_steps=256, vf_epochs=2, vf_minibatches=4),
    "ppg": dict(total_timesteps=2048, num_envs=4, num_steps=64, n_pi=4),
    "svpg": dict(total_timesteps=2000),
    "ppo_atari": dict(total_timesteps=128, num_envs=2, num_steps=32),
    "maddpg": dict(total_timesteps=500, learning_starts=200),
}


# algos/ on the path, so that the processes a script spawns (d4pg's actors) can import it
# by name: multiprocessing's spawn hands sys.path to the child.
sys.path.insert(0, ALGOS_DIR)


def load(name: str):
    """Import algos/<name>.py as the module `name` (the scripts are files, not a package)."""
    if name not in _cache:
        spec = importlib.util.spec_from_file_location(name, os.path.join(ALGOS_DIR, f"{name}.py"))
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module
        spec.loader.exec_module(module)
        _cache[name] = module
    return _cache[name]


def run(name: str, **overrides) -> dict:
    """train() of a script with its default Args plus overrides (on CPU)."""
    module = load(name)
    args = module.Args(cuda=False, **overrides)
    return module.train(args)


@pytest.fixture(autouse=True)
def in_tmp_dir(tmp_path, monkeypatch):
    """Every test runs in its own directory, so runs/ lands there."""
    monkeypatch.chdir(tmp_path)
    yield tmp_path
