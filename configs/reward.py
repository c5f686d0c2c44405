"""Reward model: the trunk of an SFT checkpoint with a fresh scalar head, trained on
(prompt, chosen, rejected) comparisons with -log sigmoid(r_chosen - r_rejected).

python -m ptx.main --config=configs/reward.py:tiny --workdir=runs/rm --config.init.checkpoint=runs/sft
"""
from configs import common


def get_config(arg=None):
    c = common.base_config("reward", arg)
    c.data.kind = "preference"
    c.reward = common.ml_collections.ConfigDict()
    c.reward.center_coef = 0.0  # coef * (r_chosen + r_rejected)^2 keeps rewards centred
    c.reward.shared_prefix = False  # one row per pair, [prompt | chosen | rejected], as dpo.shared_prefix
    return c
