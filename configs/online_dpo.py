"""Online (iterative) DPO: each iteration samples completions from the current policy, a reward
source (reward model, Python function or judge, as in RL) picks the best and the worst of
each prompt's group, and DPO steps on those fresh pairs against the fixed SFT reference.

python -m ptx.main --config=configs/online_dpo.py:tiny --workdir=runs/odpo \
    --config.init.checkpoint=runs/sft --config.reward.checkpoint=runs/rm
"""
from configs import common
from ptx.losses import DPOConfig
from ptx.online import OnlineConfig
from ptx.rewards import SourceConfig


def get_config(arg=None):
    tiny = "tiny" in common.parse_arg(arg)
    c = common.base_config("online_dpo", arg)
    c.data.kind = "prompt"
    c.optim.lr = 5e-5 if not tiny else 5e-4
    c.optim.warmup_steps = 0
    c.optim.schedule = "constant"
    c.train.steps = 100 if not tiny else 4  # iterations: sample, label, then DPO steps
    c.train.log_every = 1
    c.train.ckpt_every = 20 if not tiny else 2
    c.dpo = common.section(DPOConfig)  # the DPO loss (precompute_ref, soft_labels and shared_prefix do not apply)
    c.reward = common.section(SourceConfig)  # the reward source, as RL reads it
    c.online = common.section(OnlineConfig, **(dict(rollout_batch=8, max_new_tokens=16, minibatch_size=8)
                                               if tiny else {}))
    return c


def quickstart(tiny: bool) -> dict:
    """Its quickstart row: steps, batch, lr and overrides (configs/quickstart.py)."""
    return dict(steps=30, batch=0, lr=5e-5, **{
        "dpo.beta": 0.3, "online.max_new_tokens": 24, "online.num_epochs": 2,
        **({"online.rollout_batch": 8, "online.minibatch_size": 8} if tiny else
           {"online.rollout_batch": 32, "online.group_size": 4, "online.minibatch_size": 16})})
