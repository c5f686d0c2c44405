"""Online (iterative) DPO: each iteration samples completions from the current policy, a reward
source (reward model, Python function or judge, as in RL) picks the best and the worst of
each prompt's group, and DPO steps on those fresh pairs against the fixed SFT reference.

python -m ptx.main --config=configs/online_dpo.py:tiny --workdir=runs/odpo \
    --config.init.checkpoint=runs/sft --config.reward.checkpoint=runs/rm
"""
from configs import common, dpo, ppo


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
    c.dpo = dpo.get_config(arg).dpo  # the DPO loss (precompute_ref, soft_labels and shared_prefix do not apply)
    c.reward = ppo.rl_config(arg).reward  # the reward source, as RL reads it
    c.online = common.ml_collections.ConfigDict()
    c.online.rollout_batch = 64 if not tiny else 8  # prompts sampled per iteration
    c.online.group_size = 2  # completions per prompt; the best and the worst form its pair
    c.online.max_new_tokens = 48 if not tiny else 16
    c.online.temperature = 1.0  # sampling settings
    c.online.top_k = 0
    c.online.top_p = 1.0
    c.online.num_epochs = 1  # passes over each iteration's pairs
    c.online.minibatch_size = 16 if not tiny else 8  # pairs per update
    c.online.missing_eos_penalty = 0.0  # subtracted from the score of a completion without EOS
    c.online.max_retries = 3  # extra prompt batches drawn to replace groups whose scores all tie
    c.online.max_idle_iterations = 3  # iterations in a row without a pair that stop the run (0 = never)
    return c
