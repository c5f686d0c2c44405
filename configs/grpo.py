"""Critic-free RL: GRPO (group-normalised advantages, KL as a loss term) on the PPO
rollout machinery; RLOO is `--config.rl.advantage=rloo`, Dr. GRPO `dr_grpo`.

python -m ptx.main --config=configs/grpo.py:tiny --workdir=runs/grpo \
    --config.init.checkpoint=runs/sft --config.reward.checkpoint=runs/rm
Verifiable reward: --config.reward.source=function --config.reward.function=ptx.world:oracle_reward
"""
from configs import ppo


def get_config(arg=None):
    c = ppo.rl_config(arg, "grpo")
    c.rl.advantage = "grpo"
    c.rl.critic = "none"
    c.rl.group_size = 4
    c.rl.rollout_batch = c.rl.rollout_batch // 4  # prompts; x group_size completions
    c.rl.kl_in_loss = True
    c.rl.kl_estimator = "k3"
    c.rl.kl_coef = 0.04
    c.rl.aggregation = "seq_mean_token_mean"
    c.rl.whiten_advantages = False  # the group baseline already normalises
    c.rl.shared_prefix = "auto"  # a group's completions share one prompt read where that costs less
    return c
