"""The estimators against slow loops written straight from their equations.

Rollouts are laid out as gymnasium's NEXT_STEP autoreset produces them: row t holds the
observation the agent acted on and what step t returned. After an episode ends at row t
(termination or truncation) row t + 1 is a reset step: its observation is the final
observation of the ended episode (reward 0, no flags, no transition) and the next episode
starts at row t + 2. values has T + 1 rows (the last is V of the observation after the
rollout). The references below split the rows into episodes and sum the series directly.
"""

import numpy as np
import pytest
import torch

from conftest import load

GAMMA, LAM = 0.97, 0.9


def random_rollout(T, N, seed, p_term=0.08, p_trunc=0.08):
    """Rewards/flags/values in the NEXT_STEP layout, and the episodes found in it.

    Each episode: (env, rows, end, bootstrap_row) with end in {"term", "trunc", "cut"};
    bootstrap_row is the row whose value follows the episode's last step (the final
    observation for "trunc", row T for "cut").
    """
    rng = np.random.default_rng(seed)
    rewards = np.zeros((T, N), np.float32)
    term = np.zeros((T, N), np.float32)
    trunc = np.zeros((T, N), np.float32)
    reset = np.zeros((T, N), bool)
    values = rng.normal(size=(T + 1, N)).astype(np.float32)
    episodes = []
    for n in range(N):
        rows, t = [], 0
        if rng.random() < 0.3:  # the rollout may start on a reset row (an episode ended just before)
            reset[0, n] = True
            t = 1
        while t < T:
            rows.append(t)
            rewards[t, n] = rng.normal()
            u = rng.random()
            if u < p_term + p_trunc:
                is_term = u < p_term
                term[t, n], trunc[t, n] = float(is_term), float(not is_term)
                if not is_term and rng.random() < 0.2:
                    term[t, n] = 1.0  # gymnasium allows both flags; termination wins
                episodes.append((n, rows, "term" if term[t, n] else "trunc", t + 1))
                rows = []
                if t + 1 < T:
                    reset[t + 1, n] = True
                t += 2
            else:
                t += 1
        if rows:
            episodes.append((n, rows, "cut", T))
    return rewards, term, trunc, reset, values, episodes


def slow_gae(rewards, values, episodes, gamma, lam):
    out = np.full(rewards.shape, np.nan)
    for n, rows, end, b in episodes:
        bootstrap = 0.0 if end == "term" else values[b, n]
        v_next = [values[r + 1, n] for r in rows[:-1]] + [bootstrap]
        deltas = [rewards[r, n] + gamma * vn - values[r, n] for r, vn in zip(rows, v_next)]
        for j, r in enumerate(rows):
            out[r, n] = sum((gamma * lam) ** (k - j) * deltas[k] for k in range(j, len(rows)))
    return out


def slow_returns(rewards, values, episodes, gamma, tail_at_cut=True, values_known=True):
    """Σ_k γ^{k-j} r_k over the rest of the episode + γ^{rest} · (bootstrap value)."""
    out = np.full(rewards.shape, np.nan)
    for n, rows, end, b in episodes:
        if end == "term" or not values_known or (end == "cut" and not tail_at_cut):
            bootstrap = 0.0
        else:
            bootstrap = values[b, n]
        for j, r in enumerate(rows):
            rest = rows[j:]
            out[r, n] = sum(gamma ** i * rewards[q, n] for i, q in enumerate(rest)) + gamma ** len(rest) * bootstrap
    return out


def check(fast, slow, reset):
    mask = ~np.isnan(slow)
    assert not (mask & reset).any()
    assert mask.sum() + reset.sum() == slow.size  # every row is a step or a reset row
    np.testing.assert_allclose(fast[mask], slow[mask], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("algo", ["ppo", "ppo_continuous"])
def test_gae(algo, seed):
    rewards, term, trunc, reset, values, episodes = random_rollout(64, 6, seed)
    assert {e[2] for e in episodes} >= {"term", "trunc", "cut"} and reset.any()
    fast = load(algo).gae(rewards, values, term, trunc, GAMMA, LAM)
    check(fast, slow_gae(rewards, values, episodes, GAMMA, LAM), reset)


@pytest.mark.parametrize("seed", range(5))
def test_nstep_returns(seed):
    rewards, term, trunc, reset, values, episodes = random_rollout(16, 8, seed, 0.1, 0.1)
    fast = load("a2c").nstep_returns(rewards, values, term, trunc, GAMMA)
    check(fast, slow_returns(rewards, values, episodes, GAMMA), reset)


def test_gae_with_lambda_one_is_nstep_advantage():
    rewards, term, trunc, reset, values, _ = random_rollout(32, 4, 11)
    adv = load("ppo").gae(rewards, values, term, trunc, GAMMA, 1.0)
    ret = load("a2c").nstep_returns(rewards, values, term, trunc, GAMMA)
    np.testing.assert_allclose((adv + values[:-1])[~reset], ret[~reset], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("with_values", [False, True])
def test_reward_to_go(seed, with_values):
    rewards, term, trunc, reset, values, episodes = random_rollout(40, 5, seed)
    fast = load("reinforce").reward_to_go(rewards, term, trunc, GAMMA, values if with_values else None)
    # Monte-Carlo: nothing after the last row; a truncation bootstraps only when there is a critic
    check(fast, slow_returns(rewards, values, episodes, GAMMA, tail_at_cut=False, values_known=with_values), reset)


def test_reward_to_go_single_episode_by_hand():
    rewards = np.array([[1.0], [2.0], [3.0]], np.float32)
    zeros = np.zeros_like(rewards)
    term = np.array([[0.0], [0.0], [1.0]], np.float32)
    g = load("reinforce").reward_to_go(rewards, term, zeros, 0.5)
    np.testing.assert_allclose(g[:, 0], [1 + 0.5 * 2 + 0.25 * 3, 2 + 0.5 * 3, 3])


def test_td_error():
    ac = load("actor_critic")
    rng = np.random.default_rng(0)
    r, v, v2 = rng.normal(size=(3, 10))
    term = (rng.random(10) < 0.3).astype(np.float64)
    expected = [r[i] + (0.0 if term[i] else GAMMA * v2[i]) - v[i] for i in range(10)]
    np.testing.assert_allclose(ac.td_error(r, v, v2, term, GAMMA), expected)
    as_t = [torch.as_tensor(x) for x in (r, v, v2, term)]
    np.testing.assert_allclose(ac.td_error(*as_t, GAMMA).numpy(), expected)


ACTORS = {"ppo": lambda m: m.Agent(5, 3).actor, "a2c": lambda m: m.Agent(5, 3).actor,
          "reinforce": lambda m: m.Policy(5, 3).logits, "ppo_continuous": lambda m: m.Agent(5, 3).actor_mean}


@pytest.mark.parametrize("name", ACTORS)
def test_numpy_copy_of_the_actor_matches_torch(name):
    module = load(name)
    torch.manual_seed(0)
    net = ACTORS[name](module)
    for p in net.parameters():  # away from the tiny output init, so a wrong layer shows
        torch.nn.init.normal_(p)
    x = np.random.default_rng(0).normal(size=(7, 5)).astype(np.float32)
    with torch.no_grad():
        expected = net(torch.as_tensor(x)).numpy()
    np.testing.assert_allclose(module.numpy_mlp(net)(x), expected, rtol=1e-5, atol=1e-5)
    with pytest.raises(NotImplementedError):
        module.numpy_mlp(torch.nn.Sequential(torch.nn.Linear(5, 3), torch.nn.ReLU()))


def test_gumbel_max_samples_the_softmax():
    """argmax(logits + Gumbel noise) ~ softmax(logits): frequencies within 5 standard errors."""
    rng = np.random.default_rng(0)
    logits = np.array([1.0, -0.5, 0.3, 2.0])
    n = 200_000
    counts = np.bincount((logits + rng.gumbel(size=(n, 4))).argmax(-1), minlength=4)
    p = np.exp(logits) / np.exp(logits).sum()
    assert np.all(np.abs(counts / n - p) < 5 * np.sqrt(p * (1 - p) / n))
