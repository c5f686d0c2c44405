"""RLHF with clipped PPO: the SFT policy against a reward model, per-token KL to the
frozen SFT reference, GAE with a critic initialised from the reward model.

python -m ptx.main --config=configs/ppo.py:tiny --workdir=runs/ppo \
    --config.init.checkpoint=runs/sft --config.reward.checkpoint=runs/rm
"""
from configs import common


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

    c.reward = common.ml_collections.ConfigDict()
    c.reward.source = "model"  # model (reward.checkpoint) | function (reward.function) | judge (d-RLAIF)
    c.reward.checkpoint = ""  # a reward-stage workdir; for judge, any language-model workdir
    c.reward.principles = ()  # judge: plain lines above the rating prompt
    c.reward.judge_batch_size = 16  # judge: prompts per forward (a multiple of the data-parallel devices)
    # 'module:fn' with fn(prompt, completion, **fields of the data row it names) -> float; verifiers:
    # ptx.rewards:math_reward (the row's answer / solution), format_reward, length_penalty
    c.reward.function = "ptx.world:oracle_reward"

    c.rl = common.ml_collections.ConfigDict()
    c.rl.rollout_batch = 64 if not tiny else 16  # prompts sampled per iteration
    c.rl.group_size = 1  # completions per prompt (GRPO / RLOO use > 1)
    c.rl.max_new_tokens = 48 if not tiny else 16
    c.rl.temperature = 1.0  # rollout sampling settings
    c.rl.top_k = 0
    c.rl.top_p = 1.0
    c.rl.num_epochs = 4 if not tiny else 2  # passes over each rollout
    # The update's old log-probs: sampler (the rollout's own, on-policy: no policy forward) | forward
    # (a teacher-forced policy forward, the update's own program: its first ratio is exactly 1)
    c.rl.old_logprobs = "sampler"
    c.rl.minibatch_size = 16 if not tiny else 8
    c.rl.advantage = "gae"  # gae (PPO, needs a critic) | grpo | dr_grpo | rloo
    c.rl.critic = "reward"  # reward: init from the reward model | policy: value head on the policy trunk
    c.rl.critic_checkpoint = ""  # '' = reward.checkpoint
    c.rl.gamma = 1.0
    c.rl.lam = 0.95
    c.rl.clip_eps = 0.2
    c.rl.clip_eps_high = 0.0  # 0 = symmetric clipping (DAPO uses 0.28)
    c.rl.clip_value = 0.2
    c.rl.vf_coef = 0.1
    c.rl.ent_coef = 0.0  # entropy bonus
    c.rl.aggregation = "token_mean"  # token_mean | seq_mean_token_mean | seq_mean_token_sum_norm
    c.rl.kl_coef = 0.05  # initial coefficient of the KL penalty
    c.rl.kl_estimator = "k1"  # k1 (log-ratio) | k3 (Schulman's unbiased, non-negative)
    c.rl.kl_in_loss = False  # GRPO: KL (k3) as a loss term instead of in the reward
    c.rl.adaptive_kl = False  # Ziegler et al. controller toward kl_target
    c.rl.kl_target = 6.0
    c.rl.kl_horizon = 10000
    c.rl.whiten_advantages = True
    c.rl.whiten_rewards = False
    c.rl.no_eos_penalty = 0.0  # added to the score of completions that never emit EOS (e.g. -1)
    c.rl.ratio_level = "token"  # token (PPO, GRPO) | sequence (GSPO: length-normalised sequence ratio)
    c.rl.dynamic_sampling = False  # DAPO: replace groups of equal rewards with fresh prompts
    c.rl.dynamic_max_retries = 3  # extra prompt batches per iteration; then dropped groups fill the rest
    c.rl.dynamic_max_idle_iterations = 3  # iterations in a row without a group with signal stop the run (0 = never)
    c.rl.overlong_buffer = 0  # DAPO: penalty over the last N tokens before max_new_tokens; 0 = off
    c.rl.overlong_penalty = 1.0  # the penalty at max_new_tokens (falls linearly from 0 over the buffer)
    # group_size > 1: each group's policy / reference forwards are one row that reads its prompt once
    # (branch ids, as DPO's shared prefix): off | on | auto (where it costs less, rollout.shared_prefix_pays);
    # not off: minibatches hold whole groups
    c.rl.shared_prefix = "off"
    return c


def get_config(arg=None):
    return rl_config(arg, "ppo")
