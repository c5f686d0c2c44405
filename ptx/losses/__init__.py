"""Pure, mask-aware losses for every stage: SFT, reward model, DPO, PPO, GRPO.

Functions take arrays, never models, so each one is tested against a numpy
reference. Masks are explicit float arrays with 1 where a token counts.
String options (`loss_type`, `kind`, `aggregation`) are static Python values:
an unknown one raises ValueError at trace time. Arithmetic runs in at least
float32 whatever the input dtype (float64 inputs stay float64, for grad tests).

One namespace, three files: `tokens` (log-probs, entropy, masked reductions),
`supervised` (SFT, reward model, DPO family, KTO, ORPO), `rl` (KL, GAE, PPO / GSPO, groups, overlong).
"""
from ptx.losses.rl import (AGGREGATIONS, GROUP_ADVANTAGE_KINDS, KL_KINDS, RATIO_LEVELS, adaptive_kl_update, aggregate,
                           gae, group_advantages, kl_penalty, overlong_penalty, ppo_policy_loss, ppo_value_loss)
from ptx.losses.supervised import (DPO_LOSS_TYPES, dpo_loss, dpo_metrics, kto_loss, kto_metrics, orpo_loss,
                                   orpo_metrics, pairwise_reward_loss, sft_loss, sft_loss_of_logprobs)
from ptx.losses.tokens import (argmax, chunked_token_logprobs, masked_mean, masked_sum, masked_whiten,
                               sequence_logps, token_entropy, token_logprobs)

__all__ = ["AGGREGATIONS", "DPO_LOSS_TYPES", "GROUP_ADVANTAGE_KINDS", "KL_KINDS", "RATIO_LEVELS", "adaptive_kl_update",
           "aggregate", "argmax", "chunked_token_logprobs", "dpo_loss", "dpo_metrics", "gae", "group_advantages",
           "kl_penalty", "kto_loss", "kto_metrics", "masked_mean", "masked_sum", "masked_whiten", "orpo_loss",
           "orpo_metrics", "overlong_penalty", "pairwise_reward_loss", "ppo_policy_loss", "ppo_value_loss",
           "sequence_logps", "sft_loss", "sft_loss_of_logprobs", "token_entropy", "token_logprobs"]
