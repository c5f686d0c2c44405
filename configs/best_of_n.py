"""Best-of-N with a reward model: N samples per prompt, the reward model picks.

python -m ptx.main --config=configs/best_of_n.py:tiny --workdir=runs/bon \
    --config.checkpoint=runs/sft --config.reward.checkpoint=runs/rm
"""
from configs import common, ppo, sample


def get_config(arg=None):
    c = common.base_config("best_of_n", arg)
    tiny = "tiny" in common.parse_arg(arg)
    c.checkpoint = ""  # the policy to sample from (an SFT workdir)
    c.prompts = ""  # prompt file; '' = the embedded world's held-out prompts
    c.ns = (1, 2, 4, 8, 16) if not tiny else (1, 2, 4)  # N values, all from the same samples
    c.batch_size = 64 if not tiny else 16  # rows per sampler call
    c.sampling = sample.sampling_config(tiny)
    c.reward = ppo.rl_config(arg).reward  # model (reward.checkpoint) | function
    return c
