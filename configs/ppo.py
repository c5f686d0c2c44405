"""RLHF with clipped PPO: the SFT policy against a reward model, per-token KL to the
frozen SFT reference, GAE with a critic initialised from the reward model.

python -m ptx.main --config=configs/ppo.py:tiny --workdir=runs/ppo \
    --config.init.checkpoint=runs/sft --config.reward.checkpoint=runs/rm
"""
from configs import common
from ptx.rewards import SourceConfig
from ptx.rl_training import RLConfig


def rl_config(arg=None, stage="ppo"):
    """The fields PPO, GRPO and RLOO share; `train.steps` counts RL iterations."""
    c = common.base_config(stage, arg)
    tiny = "tiny" in common.parse_arg(arg)
    c.data.kind = "prompt"
    c.optim.lr = 1e-5 if not tiny else 3e-4
    c.optim.warmup_steps = 0
    c.optim.schedule = "constant"
    c.train.steps = 100 if not tiny else 4
    c.train.log_every = 1
    c.train.ckpt_every = 20 if not tiny else 2
    c.reward = common.section(SourceConfig)
    c.rl = common.section(RLConfig, **(dict(rollout_batch=16, max_new_tokens=16, num_epochs=2, minibatch_size=8)
                                       if tiny else {}))
    return c


def get_config(arg=None):
    return rl_config(arg, "ppo")
