"""GSPO (Zheng et al. 2025): GRPO with one importance ratio per sequence (the length-normalised
product of token ratios), clipped as a whole with GSPO's narrow range.

python -m ptx.main --config=configs/gspo.py:tiny --workdir=runs/gspo \
    --config.init.checkpoint=runs/sft --config.reward.checkpoint=runs/rm
"""
from configs import grpo


def get_config(arg=None):
    c = grpo.get_config(arg)
    c.stage = "gspo"
    c.rl.ratio_level = "sequence"
    c.rl.clip_eps = 3e-4  # the paper's range: a sequence ratio moves far less than a token's
    c.rl.clip_eps_high = 4e-4
    c.rl.aggregation = "seq_mean_token_mean"  # with sequence ratios: GSPO's mean over sequences
    return c


def quickstart(tiny: bool) -> dict:
    """Its quickstart row: steps, batch, lr and overrides (configs/quickstart.py)."""
    return dict(steps=20, batch=0, lr=5e-5, **{"rl.max_new_tokens": 24, "rl.num_epochs": 2,
                                          **({"rl.rollout_batch": 2, "rl.minibatch_size": 8} if tiny else {})})
