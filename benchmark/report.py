"""Read the runs' TensorBoard logs and summaries; write results.md and learning-curve PNGs.

    python benchmark/report.py --runs benchmark/runs/quick --out benchmark/quick

For each (script, task): final return (mean ± std over seeds of the last-20-episode mean
in summary.json), the last evaluation of the deterministic policy where the runs have one
(--eval-frequency), SPS, wall time, and the env steps and seconds at which the 20-episode
moving mean first reached the task's threshold (the TensorBoard event's wall time minus
the run's first event). Under the table: the versions (python, torch, gymnasium, mujoco,
ale-py, numpy) the runs' summary.json files record.
"""

import argparse
import glob
import json
import os
from collections import defaultdict

import numpy as np
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

THRESHOLDS = {
    "CartPole-v1": 475.0,
    "Acrobot-v1": -100.0,
    "LunarLander-v3": 200.0,
    "Pendulum-v1": -200.0,
    "InvertedPendulum-v4": 900.0,
    "InvertedPendulum-v5": 900.0,
    "Hopper-v4": 2500.0,
    "Hopper-v5": 2500.0,
    "ALE/Pong-v5": 0.0,  # the goal for 2M steps: more points won than lost over 20 games
}
WINDOW = 20

# Published figures set beside a row whose script, task family and budget match (within 5% of the steps):
# (script, task prefix, env steps, figure, source). Env versions differ from ours (v4): each source says its own.
TD3_PAPER = "TD3 paper (Fujimoto et al. 2018, authors' curve data), Hopper-v1, 10 seeds, deterministic evaluation"
TIANSHOU = "Tianshou MuJoCo benchmark, Hopper-v3, 10 seeds, test returns"
CLEANRL = "CleanRL (Open RL Benchmark), Hopper-v4, 3 seeds, training returns"
PUBLISHED = [
    ("td3", "Hopper", 200_000, "2,441 ± 746", TD3_PAPER),
    ("td3", "Hopper", 300_000, "2,410 ± 900", TD3_PAPER),
    ("td3", "Hopper", 1_000_000, "3,391 ± 378", TD3_PAPER),
    ("sac", "Hopper", 200_000, "3,234 ± 314", TIANSHOU),
    ("ddpg", "Hopper", 200_000, "1,272 ± 663", TIANSHOU),
    ("td3", "Hopper", 200_000, "887 ± 649", TIANSHOU),
    ("ppo_continuous", "Hopper", 1_000_000, "2,370 ± 696", TIANSHOU),
    ("trpo", "Hopper", 1_000_000, "2,020 ± 1,102", TIANSHOU),
    ("td3", "Hopper", 1_000_000, "3,135 ± 360", CLEANRL),
    ("ddpg", "Hopper", 1_000_000, "1,577 ± 819", CLEANRL),
]
SOURCES = [TD3_PAPER, TIANSHOU, CLEANRL]


def published(algorithm: str, env_id: str, steps: float) -> list:
    """(figure, source) of every published figure at this row's budget."""
    return [(figure, source) for algo, prefix, at, figure, source in PUBLISHED
            if algo == algorithm and env_id.startswith(prefix) and abs(steps - at) <= 0.05 * at]


def episodes(run_dir: str, tag: str = "charts/episodic_return"):
    """(steps, seconds since the run's first event, values) of every logged `tag` event:
    training episodes, or evaluations with tag="eval/episodic_return"."""
    acc = EventAccumulator(run_dir, size_guidance={"scalars": 0})
    acc.Reload()
    tags = acc.Tags()["scalars"]
    if tag not in tags:
        return np.zeros(0), np.zeros(0), np.zeros(0)
    events = acc.Scalars(tag)
    t0 = min(acc.Scalars(t)[0].wall_time for t in tags)
    steps = np.array([e.step for e in events], dtype=np.int64)
    seconds = np.array([e.wall_time - t0 for e in events])
    returns = np.array([e.value for e in events])
    return steps, seconds, returns


def versions_line(runs) -> str:
    """The versions behind the figures, from summary.json (runs made before versions were
    recorded say so)."""
    seen = defaultdict(set)
    missing = 0
    for r in runs:
        if not r.get("versions"):
            missing += 1
            continue
        for k, v in r["versions"].items():
            seen[k].add(str(v))
    parts = [f"{k} {' / '.join(sorted(v))}" for k, v in seen.items()]
    if missing:
        parts.append(f"{missing} of {len(runs)} runs predate version records")
    return "Versions: " + (", ".join(parts) if parts else "not recorded") + "."


def moving_mean(x: np.ndarray, window: int = WINDOW) -> np.ndarray:
    """Mean of the last `window` values (fewer at the start)."""
    c = np.concatenate([[0.0], np.cumsum(x)])
    hi = np.arange(1, len(x) + 1)
    lo = np.maximum(hi - window, 0)
    return (c[hi] - c[lo]) / (hi - lo)


def first_crossing(steps, seconds, returns, threshold):
    """Env steps and seconds at which the 20-episode moving mean first reaches threshold."""
    if len(returns) < WINDOW:
        return None, None
    mm = moving_mean(returns)
    hit = np.flatnonzero(mm[WINDOW - 1:] >= threshold)
    if len(hit) == 0:
        return None, None
    i = hit[0] + WINDOW - 1
    return int(steps[i]), float(seconds[i])


def fmt(values, digits=0):
    values = [v for v in values if v is not None]
    if not values:
        return "—"
    if len(values) == 1:
        return f"{values[0]:,.{digits}f}"
    return f"{np.mean(values):,.{digits}f} ± {np.std(values):,.{digits}f}"


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", default="benchmark/runs", help="directory holding the run directories")
    parser.add_argument("--out", default="benchmark", help="where results.md and the PNGs go")
    parser.add_argument("--title", default="Benchmark results")
    args = parser.parse_args()

    groups = defaultdict(list)
    for path in sorted(glob.glob(os.path.join(args.runs, "**", "summary.json"), recursive=True)):
        with open(path) as f:
            summary = json.load(f)
        if summary.get("mode") == "eval":
            continue
        run_dir = os.path.dirname(path)
        summary["curve"] = episodes(run_dir)
        summary["eval_curve"] = episodes(run_dir, "eval/episodic_return")
        groups[(summary["env_id"], summary.get("exp_name", summary["algorithm"]))].append(summary)
    if not groups:
        raise SystemExit(f"no runs with summary.json under {args.runs}")

    os.makedirs(args.out, exist_ok=True)
    lines = [f"# {args.title}", "",
             "Final return: mean of the last 20 episodes at the end of each run (mean ± std over seeds). "
             "Steps / seconds to threshold: when the 20-episode moving mean first reached the threshold "
             "(seconds from the run's first logged event; — if never). Evaluation: mean return of the "
             "deterministic policy at the run's last evaluation (--eval-frequency; — where the runs have none).", "",
             "| task | run (--exp-name) | seeds | env steps | final return | evaluation | published at these steps "
             "| SPS | wall s | threshold | steps to threshold | seconds to threshold |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    cited = set()
    for (env_id, algo), runs in sorted(groups.items()):
        figures = published(runs[0]["algorithm"], env_id, np.mean([r["global_step"] for r in runs]))
        cited.update(source for _, source in figures)
        threshold = THRESHOLDS.get(env_id)
        crossings = [first_crossing(*r["curve"], threshold) if threshold is not None else (None, None) for r in runs]
        reached = sum(c[0] is not None for c in crossings)
        lines.append(
            f"| {env_id} | {runs[0]['algorithm']}.py ({algo}) | {len(runs)} | {fmt([r['global_step'] for r in runs])} "
            f"| {fmt([r['mean_return'] for r in runs], 1)} | {fmt([r.get('eval_return') for r in runs], 1)} "
            f"| {'; '.join(f'{figure} [{SOURCES.index(source) + 1}]' for figure, source in figures) or '—'} "
            f"| {fmt([r['SPS'] for r in runs])} "
            f"| {fmt([r['wall_seconds'] for r in runs])} | {threshold if threshold is not None else '—'} "
            f"| {fmt([c[0] for c in crossings])} ({reached}/{len(runs)}) | {fmt([c[1] for c in crossings], 1)} |")
    lines += [""]
    if cited:
        lines += ["Published: " + "; ".join(f"[{i + 1}] {c}" for i, c in enumerate(SOURCES) if c in cited)
                  + ". Mean ± std over seeds at the same env steps; their env versions differ from ours.", ""]
    lines += [versions_line([r for runs in groups.values() for r in runs]), ""]

    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    by_env = defaultdict(list)  # one plot per task, or per task and budget where budgets differ 2x or more
    budgets = defaultdict(set)
    for (env_id, algo), runs in groups.items():
        budgets[env_id].add(max(r["global_step"] for r in runs))
    for (env_id, algo), runs in groups.items():
        budget = max(r["global_step"] for r in runs)
        split = max(budgets[env_id]) >= 2 * min(budgets[env_id])
        by_env[(env_id, f"{budget / 1e6:g}M" if budget >= 1e6 else f"{budget / 1e3:g}k") if split else (env_id, "")].append(
            (algo, runs))
    for (env_id, budget), entries in sorted(by_env.items()):
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for k, (algo, runs) in enumerate(sorted(entries)):
            color = f"C{k}"
            for j, r in enumerate(runs):
                steps, _, returns = r["curve"]
                if len(returns):
                    ax.plot(steps, moving_mean(returns), color=color, alpha=0.8, lw=1.2,
                            label=f"{algo} ({len(runs)} seed{'s' * (len(runs) > 1)})" if j == 0 else None)
                eval_steps, _, eval_returns = r["eval_curve"]
                if len(eval_returns):
                    ax.plot(eval_steps, eval_returns, color=color, alpha=0.8, lw=1.0, ls="--", marker=".",
                            label=f"{algo}, evaluation" if j == 0 else None)
        if env_id in THRESHOLDS:
            ax.axhline(THRESHOLDS[env_id], color="gray", ls="--", lw=0.8)
        ax.set_title(f"{env_id}: 20-episode moving mean of the training return (dashed: evaluation)", fontsize=10)
        ax.set_xlabel("environment steps")
        ax.set_ylabel("return")
        ax.legend(loc="lower right", fontsize=8)
        ax.grid(alpha=0.3)
        png = f"{env_id.replace('/', '_')}{'_' + budget if budget else ''}.png"
        fig.tight_layout()
        fig.savefig(os.path.join(args.out, png), dpi=110)
        plt.close(fig)
        lines.append(f"![{env_id}{' ' + budget if budget else ''}]({png})")
        lines.append("")
    with open(os.path.join(args.out, "results.md"), "w") as f:
        f.write("\n".join(lines))
    print(f"wrote {os.path.join(args.out, 'results.md')}")


if __name__ == "__main__":
    main()
