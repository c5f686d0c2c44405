"""DAPO (Yu et al. 2025) on the GRPO loop: clip-higher, token-mean loss, no KL, dynamic sampling
(groups whose rewards are all equal are replaced by fresh prompts) and overlong reward shaping.
Made for verifiable rewards, where whole groups are often all right or all wrong.

python -m ptx.main --config=configs/dapo.py:tiny --workdir=runs/dapo --config.init.checkpoint=runs/sft \
    --config.reward.source=function --config.reward.function=ptx.rewards:math_reward --config.data.train=...
"""
from configs import grpo


def get_config(arg=None):
    c = grpo.get_config(arg)
    c.stage = "dapo"
    c.rl.clip_eps, c.rl.clip_eps_high = 0.2, 0.28
    c.rl.aggregation = "token_mean"
    c.rl.kl_coef = 0.0
    c.rl.dynamic_sampling = True
    c.rl.overlong_buffer = c.rl.max_new_tokens // 4
    return c
