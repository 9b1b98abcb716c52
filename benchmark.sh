#!/usr/bin/env bash
# Run scripts x tasks x seeds, then write benchmark/<profile>/results.md and learning curves.
#
#   ./benchmark.sh quick      every script on its learning-test task, 1 seed (under 30 min on 2 cores)
#   ./benchmark.sh full       the standard tasks, 3 seeds, the budgets of the published results (hours)
#   ./benchmark.sh offpolicy  the off-policy scripts on Hopper-v4, 200k steps, 1 seed (a CPU-sized slice of `full`)
#   ./benchmark.sh hopper200k ddpg/td3/sac/d4pg on Hopper-v4 for 200k steps and ppo_continuous/trpo for 1M, 3 seeds,
#                             deterministic evaluation every 10k (50k) steps, beside published figures (hours: JOBS=2)
#   ./benchmark.sh cartpole   ppg and svpg beside ppo and a2c on CartPole-v1, 3 seeds
#   ./benchmark.sh atari      ppo_atari on ALE/Pong-v5 and ALE/Breakout-v5, 2M steps, 1 seed, 2 threads (run alone: hours each)
#   ./benchmark.sh hopper200k-ablations  ablations against hopper200k's defaults (ddpg's every-step
#                             actor update; td3 with the TD3 paper's Hopper settings: 1,000 random steps, lr 1e-3,
#                             batch 100), 3 seeds, reported with hopper200k
#   ./benchmark.sh mpe        maddpg, centralised against --independent, on simple_spread_v3 and simple_adversary_v3, 3 seeds
#   ./benchmark.sh replay     acer and offpac against a2c and ppo on CartPole-v1 at their defaults, 3 seeds (steps to 475)
#   ./benchmark.sh scaling    a3c, impala and es with 1 and then 2 processes, same budget, 3 seeds
#                             (run alone: SPS is the point; budgets of a minute or more, so that the
#                             children's start-up, 2-3 s, does not set the figure)
#   JOBS=2 ./benchmark.sh full   run two at a time (SPS figures then share the CPU)
#   ONLY=Hopper ./benchmark.sh full   only the plan lines that match this regular expression
#   SEEDS="2 3" ./benchmark.sh offpolicy   other seeds than the profile's; the report covers every
#                                         run already in the profile's directory
#
# Runs go to benchmark/runs/<profile>/ (not committed); the report to benchmark/<profile>/.
set -euo pipefail
cd "$(dirname "$0")"
usage="usage: $0 quick|full|offpolicy|hopper200k|hopper200k-ablations|cartpole|atari|mpe|replay|scaling  (quick: every script on its test task, 1 seed, ~30 min on 2 cores;
       full: standard tasks, 3 seeds, hours; offpolicy: ddpg/td3/sac/d4pg on Hopper-v4, 200k steps;
       hopper200k: off-policy at 200k and on-policy at 1M on Hopper-v4, 3 seeds, deterministic evaluation;
       hopper200k-ablations: ablations against hopper200k's defaults, reported with it;
       cartpole: ppg/svpg vs ppo/a2c, 3 seeds; atari: ppo_atari on Pong and Breakout, 2M steps;
       mpe: maddpg vs --independent on simple_spread/simple_adversary, 3 seeds;
       replay: acer/offpac vs a2c/ppo, 3 seeds; scaling: a3c/impala/es with 1 and 2 processes)"
if [ $# -ne 1 ]; then echo "$usage" >&2; exit 2; fi
profile="$1"
jobs="${JOBS:-1}"
root="$PWD"

# one line per run: script  exp-name  arguments
case "$profile" in
quick)
  seeds="1"
  plan=$(cat <<'PLAN'
reinforce.py       reinforce           --env-id CartPole-v1 --total-timesteps 300000
reinforce.py       reinforce_baseline  --env-id CartPole-v1 --total-timesteps 300000 --baseline
actor_critic.py    actor_critic        --env-id CartPole-v1
a2c.py             a2c                 --env-id CartPole-v1
ppo.py             ppo                 --env-id CartPole-v1
ppo.py             ppo_cleanrl_settings --env-id CartPole-v1 --num-envs 4 --num-steps 128 --learning-rate 2.5e-4
ppo_continuous.py  ppo_continuous      --env-id InvertedPendulum-v4 --total-timesteps 150000
a3c.py             a3c                 --env-id CartPole-v1 --num-workers 2
impala.py          impala              --env-id CartPole-v1 --num-actors 2
es.py              es                  --env-id CartPole-v1 --num-workers 2
acer.py            acer                --env-id CartPole-v1
offpac.py          offpac              --env-id CartPole-v1
trpo.py            trpo                --env-id InvertedPendulum-v4 --total-timesteps 100000
acktr.py           acktr               --env-id CartPole-v1
ppg.py             ppg                 --env-id CartPole-v1
svpg.py            svpg                --env-id CartPole-v1
ppo_atari.py       ppo_atari           --env-id ALE/Breakout-v5 --total-timesteps 20000
maddpg.py          maddpg              --env-id simple_spread_v3 --total-timesteps 100000
PLAN
)
  ;;
full)
  seeds="1 2 3"
  plan=$(cat <<'PLAN'
reinforce.py       reinforce           --env-id CartPole-v1 --total-timesteps 500000
reinforce.py       reinforce_baseline  --env-id CartPole-v1 --total-timesteps 500000 --baseline
actor_critic.py    actor_critic        --env-id CartPole-v1 --total-timesteps 500000
a2c.py             a2c                 --env-id CartPole-v1
a2c.py             a2c                 --env-id Acrobot-v1
ppo.py             ppo                 --env-id CartPole-v1
ppo.py             ppo                 --env-id Acrobot-v1
ppo.py             ppo                 --env-id LunarLander-v3 --total-timesteps 1000000
ppo_continuous.py  ppo_continuous      --env-id InvertedPendulum-v4 --total-timesteps 300000
ppo_continuous.py  ppo_continuous      --env-id Hopper-v4 --total-timesteps 1000000
trpo.py            trpo                --env-id Hopper-v4 --total-timesteps 1000000
ddpg.py            ddpg                --env-id Hopper-v4 --total-timesteps 1000000 --learning-starts 25000
td3.py             td3                 --env-id Hopper-v4 --total-timesteps 1000000 --learning-starts 25000
sac.py             sac                 --env-id Hopper-v4 --total-timesteps 1000000
d4pg.py            d4pg                --env-id Hopper-v4 --total-timesteps 1000000 --learning-starts 25000
PLAN
)
  ;;
offpolicy)
  seeds="1"
  plan=$(cat <<'PLAN'
ddpg.py            ddpg                --env-id Hopper-v4 --total-timesteps 200000 --learning-starts 25000
td3.py             td3                 --env-id Hopper-v4 --total-timesteps 200000 --learning-starts 25000
sac.py             sac                 --env-id Hopper-v4 --total-timesteps 200000
d4pg.py            d4pg                --env-id Hopper-v4 --total-timesteps 200000 --learning-starts 25000
PLAN
)
  ;;
hopper200k)
  seeds="1 2 3"  # the papers' way: deterministic evaluations (10 episodes every 10k steps), 3 seeds; JOBS=2 runs two at a time
  plan=$(cat <<'PLAN'
ddpg.py            ddpg                --env-id Hopper-v4 --total-timesteps 200000 --learning-starts 25000 --eval-frequency 10000
td3.py             td3                 --env-id Hopper-v4 --total-timesteps 200000 --learning-starts 25000 --eval-frequency 10000
sac.py             sac                 --env-id Hopper-v4 --total-timesteps 200000 --eval-frequency 10000
d4pg.py            d4pg                --env-id Hopper-v4 --total-timesteps 200000 --learning-starts 25000 --eval-frequency 10000
ppo_continuous.py  ppo_continuous      --env-id Hopper-v4 --total-timesteps 1000000 --eval-frequency 50000
trpo.py            trpo                --env-id Hopper-v4 --total-timesteps 1000000 --eval-frequency 50000
PLAN
)
  ;;
hopper200k-ablations)
  seeds="1 2 3"  # ablations against the hopper200k defaults, same seeds; runs and report go with hopper200k's
  report_as=hopper200k
  plan=$(cat <<'PLAN'
ddpg.py            ddpg_policy_frequency_1  --env-id Hopper-v4 --total-timesteps 200000 --learning-starts 25000 --eval-frequency 10000 --policy-frequency 1
td3.py             td3_paper_hopper    --env-id Hopper-v4 --total-timesteps 200000 --learning-starts 1000 --learning-rate 0.001 --batch-size 100 --eval-frequency 10000
PLAN
)
  ;;
cartpole)
  seeds="1 2 3"  # ppg and svpg beside ppo and a2c, the methods they build on, same seeds, default budgets
  plan=$(cat <<'PLAN'
ppg.py             ppg                 --env-id CartPole-v1
svpg.py            svpg                --env-id CartPole-v1
ppo.py             ppo                 --env-id CartPole-v1
a2c.py             a2c                 --env-id CartPole-v1
PLAN
)
  ;;
mpe)
  seeds="1 2 3"  # centralised critics against --independent (independent DDPG) on the same seeds; deterministic evaluation
  plan=$(cat <<'PLAN'
maddpg.py          maddpg              --env-id simple_spread_v3 --total-timesteps 200000 --eval-frequency 10000 --eval-episodes 100
maddpg.py          maddpg_independent  --env-id simple_spread_v3 --total-timesteps 200000 --eval-frequency 10000 --eval-episodes 100 --independent
maddpg.py          maddpg              --env-id simple_adversary_v3 --total-timesteps 200000 --eval-frequency 10000 --eval-episodes 100
maddpg.py          maddpg_independent  --env-id simple_adversary_v3 --total-timesteps 200000 --eval-frequency 10000 --eval-episodes 100 --independent
PLAN
)
  ;;
atari)
  seeds="1"  # 2M steps each: 1.6 h or more per game on a 2-core CPU. Run it alone (JOBS=1): with two torch
  # threads ppo_atari.py made 346 SPS on the idle machine against 248 with one (README, "ppo_atari.py runs ...")
  plan=$(cat <<'PLAN'
ppo_atari.py       ppo_atari           --env-id ALE/Pong-v5 --total-timesteps 2000000 --torch-threads 2
ppo_atari.py       ppo_atari           --env-id ALE/Breakout-v5 --total-timesteps 2000000 --torch-threads 2
PLAN
)
  ;;
replay)
  seeds="1 2 3"  # the sample efficiency replay buys: steps to 475 with and without it, same seeds, default budgets
  plan=$(cat <<'PLAN'
acer.py            acer                --env-id CartPole-v1
offpac.py          offpac              --env-id CartPole-v1
a2c.py             a2c                 --env-id CartPole-v1
ppo.py             ppo                 --env-id CartPole-v1
PLAN
)
  ;;
scaling)
  seeds="1 2 3"  # runs alternate by seed: three pairs of 1 and 2 processes
  plan=$(cat <<'PLAN'
a3c.py             a3c_1_worker        --env-id CartPole-v1 --total-timesteps 500000 --num-workers 1
a3c.py             a3c_2_workers       --env-id CartPole-v1 --total-timesteps 500000 --num-workers 2
impala.py          impala_1_actor      --env-id CartPole-v1 --total-timesteps 2000000 --num-actors 1
impala.py          impala_2_actors     --env-id CartPole-v1 --total-timesteps 2000000 --num-actors 2
es.py              es_1_worker         --env-id CartPole-v1 --total-timesteps 3000000 --num-workers 1
es.py              es_2_workers        --env-id CartPole-v1 --total-timesteps 3000000 --num-workers 2
PLAN
)
  ;;
*) echo "$usage" >&2; exit 2 ;;
esac
seeds="${SEEDS:-$seeds}"
profile="${report_as:-$profile}"
runs="$root/benchmark/runs/$profile"
mkdir -p "$runs"

commands=()
for seed in $seeds; do  # seeds outermost: runs to be compared alternate, so a drift of the machine's speed hits all alike
  while read -r script name rest; do
    [ -n "$script" ] || continue
    [[ "$script $name $rest" =~ ${ONLY:-.} ]] || continue
    commands+=("cd '$runs' && python '$root/algos/$script' --exp-name $name --seed $seed $rest > '$runs/$name-$seed-$(echo "$rest" | tr -dc 'A-Za-z0-9' | head -c 40).log' 2>&1")
  done <<< "$plan"
done

echo "$profile: ${#commands[@]} runs, $jobs at a time; logs and runs in $runs"
printf '%s\n' "${commands[@]}" | xargs -P "$jobs" -I{} bash -c '{} || echo "failed: {}"'
python benchmark/report.py --runs "$runs" --out "benchmark/$profile" --title "Benchmark: $profile profile ($(nproc) CPU cores, $(date -u +%Y-%m-%d))"
