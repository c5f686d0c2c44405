"""Reward model: the trunk of an SFT checkpoint with a fresh scalar head, trained on
(prompt, chosen, rejected) comparisons with -log sigmoid(r_chosen - r_rejected).

python -m ptx.main --config=configs/reward.py:tiny --workdir=runs/rm --config.init.checkpoint=runs/sft
"""
from configs import common
from ptx.losses import RewardConfig


def get_config(arg=None):
    c = common.base_config("reward", arg)
    c.data.kind = "preference"
    c.reward = common.section(RewardConfig)
    return c
