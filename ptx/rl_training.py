"""RL training (PPO, GRPO, RLOO, GSPO, DAPO): the `rl` section, the forwards of rollout rows,
`prepare` (reference, values, rewards -> advantages), the clipped loss and the update order.

Layout: every rollout row is `[left-aligned prompt (P) | completion (N)]` (`rollout.build_sequences`),
so completion token j sits at column P + j and is predicted by the logits at
column P - 1 + j. All per-token RL arrays are `[batch, N]`, aligned with the
completion, with `mask` 1 on generated tokens.

With LoRA the trainable 'policy' tree holds adapters (and the value head when
it sits on the policy, trained in full) and the frozen base is the reference
itself: `policy_params` merges them, once per iteration for the rollout and
inside the jitted update for the loss.
"""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from ptx import logprobs, lora, losses, sampler
from ptx.model import Transformer

ADVANTAGES = ("gae",) + losses.GROUP_ADVANTAGE_KINDS
CRITICS = ("reward", "policy", "none")
OLD_LOGPROBS = ("sampler", "forward")
SHARED_PREFIX = ("off", "on", "auto")
# Time of dense attention per query-key pair over its FLOPs (4 x heads x head size), against the
# projections' per FLOP: ~8 measured on the 2-core CPU at the bench size (the mask, the softmax,
# small per-head products), where one row per group of 4 x 256 completions after a 64-token
# prompt ran 1.7x slower than 4 rows and 4 x 64 completions 1.36x faster.
ATTENTION_COST = 8.0


@dataclasses.dataclass(frozen=True)
class RLConfig:
    """The `rl` config section (PPO, GRPO, RLOO, GSPO, DAPO); hashable, so the jitted rollout and
    loss close over it. `train.steps` counts RL iterations."""

    rollout_batch: int = 64  # prompts sampled per iteration
    group_size: int = 1  # completions per prompt (GRPO / RLOO use > 1)
    max_new_tokens: int = 48
    temperature: float = 1.0  # rollout sampling settings
    top_k: int = 0
    top_p: float = 1.0
    # rollout decoder: static | paged (ptx/engine.py: one device of one process for now, so static by default)
    engine: str = "static"
    num_epochs: int = 4  # passes over each rollout
    # The update's old log-probs: sampler (the rollout's own, on-policy: no policy forward) | forward
    # (a teacher-forced policy forward, the update's own program: its first ratio is exactly 1)
    old_logprobs: str = "sampler"
    minibatch_size: int = 16  # rows per update
    advantage: str = "gae"  # gae (PPO, needs a critic) | grpo | dr_grpo | rloo
    critic: str = "reward"  # reward: init from the reward model | policy: value head on the policy trunk | none
    critic_checkpoint: str = ""  # '' = reward.checkpoint
    gamma: float = 1.0
    lam: float = 0.95
    clip_eps: float = 0.2
    clip_eps_high: float = 0.0  # 0 = symmetric clipping (DAPO uses 0.28)
    clip_value: float = 0.2
    vf_coef: float = 0.1
    ent_coef: float = 0.0  # entropy bonus
    aggregation: str = "token_mean"  # token_mean | seq_mean_token_mean | seq_mean_token_sum_norm
    kl_coef: float = 0.05  # initial coefficient of the KL penalty
    kl_estimator: str = "k1"  # k1 (log-ratio) | k3 (Schulman's unbiased, non-negative)
    kl_in_loss: bool = False  # GRPO: KL (k3) as a loss term instead of in the reward
    adaptive_kl: bool = False  # Ziegler et al. controller toward kl_target
    kl_target: float = 6.0
    kl_horizon: int = 10000
    whiten_advantages: bool = True
    whiten_rewards: bool = False
    no_eos_penalty: float = 0.0  # added to the score of completions that never emit EOS (e.g. -1)
    ratio_level: str = "token"  # token (PPO, GRPO) | sequence (GSPO: length-normalised sequence ratio)
    dynamic_sampling: bool = False  # DAPO: replace groups of equal rewards with fresh prompts
    dynamic_max_retries: int = 3  # extra prompt batches per iteration; then dropped groups fill the rest
    dynamic_max_idle_iterations: int = 3  # iterations in a row without a group with signal stop the run (0 = never)
    overlong_buffer: int = 0  # DAPO: penalty over the last N tokens before max_new_tokens; 0 = off
    overlong_penalty: float = 1.0  # the penalty at max_new_tokens (falls linearly from 0 over the buffer)
    # group_size > 1: each group's policy / reference forwards are one row that reads its prompt once
    # (branch ids, as DPO's shared prefix): off | on | auto (where it costs less, `shared_prefix_pays`);
    # not off: minibatches hold whole groups
    shared_prefix: str = "off"

    def __post_init__(self):
        for name in ("rollout_batch", "group_size", "max_new_tokens", "num_epochs", "minibatch_size"):
            if getattr(self, name) <= 0:
                raise ValueError(f"rl.{name}={getattr(self, name)} must be positive")
        if (self.rollout_batch * self.group_size) % self.minibatch_size:
            raise ValueError(f"rl.rollout_batch x rl.group_size = {self.rollout_batch * self.group_size} "
                             f"is not a multiple of rl.minibatch_size={self.minibatch_size}")
        for name, allowed in (("advantage", ADVANTAGES), ("critic", CRITICS),
                              ("kl_estimator", losses.KL_KINDS), ("aggregation", losses.AGGREGATIONS),
                              ("ratio_level", losses.RATIO_LEVELS), ("old_logprobs", OLD_LOGPROBS),
                              ("engine", sampler.ENGINES)):
            if getattr(self, name) not in allowed:
                raise ValueError(f"rl.{name}={getattr(self, name)!r}; expected one of {allowed}")
        if self.advantage == "gae" and self.critic == "none":
            raise ValueError("rl.advantage='gae' needs a critic: set rl.critic to 'reward' or 'policy', "
                             "or take a critic-free advantage (grpo, dr_grpo, rloo)")
        if self.advantage != "gae" and self.group_size < 2:
            raise ValueError(f"rl.advantage={self.advantage!r} compares samples of one prompt: "
                             f"rl.group_size={self.group_size} must be at least 2")
        if self.dynamic_max_idle_iterations < 0:
            raise ValueError(f"rl.dynamic_max_idle_iterations={self.dynamic_max_idle_iterations} must be >= 0")
        if self.dynamic_sampling and (self.group_size < 2 or self.dynamic_max_retries < 0):
            raise ValueError(f"rl.dynamic_sampling drops groups of equal rewards: it needs rl.group_size >= 2 "
                             f"(got {self.group_size}) and rl.dynamic_max_retries >= 0")
        if not 0 <= self.overlong_buffer <= self.max_new_tokens:
            raise ValueError(f"rl.overlong_buffer={self.overlong_buffer} must be in [0, rl.max_new_tokens="
                             f"{self.max_new_tokens}]")
        if self.shared_prefix not in SHARED_PREFIX:
            raise ValueError(f"rl.shared_prefix={self.shared_prefix!r}; expected one of {SHARED_PREFIX}")
        if self.shared_prefix != "off" and (self.group_size < 2 or self.minibatch_size % self.group_size):
            raise ValueError(f"rl.shared_prefix reads each group's prompt once: it needs rl.group_size >= 2 "
                             f"(got {self.group_size}) dividing rl.minibatch_size={self.minibatch_size}")
        if self.temperature < 0 or not 0.0 < self.top_p <= 1.0 or self.top_k < 0:
            raise ValueError(f"rl sampling: temperature={self.temperature} must be >= 0, top_p={self.top_p} "
                             f"in (0, 1], top_k={self.top_k} >= 0")

    @property
    def needs_reference(self) -> bool:
        """Whether a KL term (in the reward, in the loss, or the adaptive controller) reads the reference."""
        return self.kl_coef != 0 or self.adaptive_kl

    @property
    def shared_group(self) -> int:
        """Rows a shared-prefix row may hold (`response_forward`): group_size, or 1 (off)."""
        return self.group_size if self.shared_prefix != "off" else 1

    @property
    def critic_kind(self) -> str:
        """reward | policy | none: where this run's value head sits (critic-free advantages need none)."""
        return self.critic if self.advantage == "gae" else "none"


def policy_params(params, frozen, lora_cfg=None):
    """The policy's full parameter tree from the trainable tree {'policy': ..., 'critic'?: ...}.

    Full finetuning (lora_cfg None or rank 0): params['policy'] itself. LoRA:
    the frozen base `frozen` (the reference) with params['policy'] merged in;
    adapted kernels and full leaves float32, the rest as the base stores them.
    """
    if lora_cfg is None or not lora_cfg.enabled:
        return params["policy"]
    return lora.apply(frozen, params["policy"], lora_cfg, dtype=jnp.float32)


def group_rows(seq: dict, width: int, group_size: int) -> dict:
    """Rollout rows as one shared-prefix row per group (`ptx.attention`'s branch ids).

    seq: tokens / positions / segment_ids [b, P + N] int32 in the rollout layout
    (prompts end at column P - 1), `group_size` (g) consecutive rows per prompt.
    Returns tokens / positions / segment_ids / branch_ids [b / g, P - 1 + g N]
    int32: the prompt less its last id (branch 0, seen by all), then each
    completion's N inputs (branch k = 1..g: that last prompt id, which predicts
    the completion's first token, and its first N - 1 tokens) with the positions
    of its own row. Column P - 1 + k N + j predicts row k's completion token j.
    """
    b, t = seq["tokens"].shape
    n = t - width
    rows = b // group_size

    def fold(x):
        prefix = x[::group_size, :width - 1]
        branches = x[:, width - 1:t - 1].reshape(rows, group_size * n)
        return jnp.concatenate([prefix, branches], axis=1)

    out = {k: fold(seq[k]) for k in ("tokens", "positions", "segment_ids")}
    branch = jnp.repeat(jnp.arange(1, group_size + 1, dtype=jnp.int32), n)
    out["branch_ids"] = jnp.broadcast_to(jnp.concatenate([jnp.zeros((width - 1,), jnp.int32), branch]),
                                         out["tokens"].shape)
    return out


def shared_prefix_pays(cfg, width: int, n: int, group_size: int) -> bool:
    """Whether one row per group (`group_rows`) costs less than its group_size rows: the
    projections read g - 1 fewer copies of the prompt, but the row's attention spans every
    completion (masked, not skipped), g (P + N)^2 query-key pairs against (P - 1 + g N)^2.
    Costed per layer in FLOPs, attention weighted by ATTENTION_COST."""
    d, hd = cfg.d_model, cfg.head_size
    per_token = 2 * (d * hd * (2 * cfg.n_heads + 2 * cfg.n_kv_heads) + 3 * d * cfg.d_ff)
    per_pair = ATTENTION_COST * 4 * cfg.n_heads * hd
    rows, shared = group_size * (width + n), width - 1 + group_size * n
    return shared * per_token + shared ** 2 * per_pair < rows * per_token + group_size * (width + n) ** 2 * per_pair


def response_forward(model, params, seq: dict, width: int, *, entropy: bool = True, group_size: int = 1,
                     shared: str = "on"):
    """Log-probs and entropy of the completion tokens, and values if the model has a scalar head.

    Returns (logps [b, N] f32, entropy [b, N] f32 (None without `entropy`),
    values [b, N] f32 or None); values[j] is the estimate before token j is
    emitted. The LM head reads only the completion's columns, chunked over the
    vocabulary when they are many (`logprobs.token_stats`). group_size > 1
    dividing b and shared "on" (or "auto" where `shared_prefix_pays`): one
    forward row per group of consecutive rows (`group_rows`), each prompt read
    once; the same values within float tolerance.
    """
    b, n = seq["completion"].shape
    if (group_size == 1 or b % group_size or shared == "off"
            or (shared == "auto" and not shared_prefix_pays(model.cfg, width, n, group_size))):
        stats = logprobs.token_stats(model, params, seq["tokens"], seq["positions"], seq["segment_ids"],
                                     seq["completion"], start=width - 1, entropy=entropy)
        return stats.logps, stats.entropy, stats.values
    rows = group_rows(seq, width, group_size)
    stats = logprobs.token_stats(model, params, rows["tokens"], rows["positions"], rows["segment_ids"],
                                 seq["completion"].reshape(b // group_size, group_size * n),
                                 branch_ids=rows["branch_ids"], start=width - 1, entropy=entropy)
    unfold = lambda x: None if x is None else x.reshape(b, n)
    return unfold(stats.logps), unfold(stats.entropy), unfold(stats.values)


def response_values(model, params, seq: dict, width: int):
    """Critic values [b, N] float32 before each completion token (no LM head computed)."""
    out = model.apply({"params": params}, seq["tokens"], seq["positions"], seq["segment_ids"], logits=False)
    return out.values[:, width - 1:-1]


def last_token_rewards(scores, mask):
    """Sequence scores placed on the last response token: [b] -> [b, N] float32."""
    n = mask.shape[1]
    last = jnp.maximum(jnp.sum(mask, axis=1).astype(jnp.int32) - 1, 0)
    return jax.nn.one_hot(last, n, dtype=jnp.float32) * scores[:, None] * (jnp.sum(mask, 1) > 0)[:, None]


def prepare(params, ref_params, seq: dict, scores, kl_coef, *, policy_model, critic_model,
            width: int, rl_cfg: RLConfig) -> tuple[dict, dict]:
    """Everything the update needs from one rollout, in one jitted pass.

    params: {'policy': full policy params (with LoRA the merged tree of
    `policy_params`), 'critic': ...} ('critic' absent when the value head sits
    on the policy or there is no critic). ref_params: the reference (with
    LoRA: the frozen base, adapters off), read only if rl_cfg.needs_reference
    (else the batch has no 'ref_logps' and the metrics no 'objective/kl').
    scores: [b] float32 from the reward source (any no-EOS penalty included).
    Returns (batch for the update, metrics).
    """
    mask = seq["mask"]
    if rl_cfg.old_logprobs == "sampler":
        # The rollout was sampled by these weights (on-policy), and the sampler's log-probs and
        # entropy are those of the raw logits at temperature 1, as the loss computes its own: no
        # second policy forward, only the trunk for a value head on the policy.
        logps, entropy = seq["logprobs"], seq["entropy"]
        values = (response_values(policy_model, params["policy"], seq, width)
                  if policy_model.cfg.scalar_head and "critic" not in params else None)
    else:
        logps, entropy, values = response_forward(policy_model, params["policy"], seq, width,
                                                  group_size=rl_cfg.shared_group, shared=rl_cfg.shared_prefix)
    if "critic" in params:
        values = response_values(critic_model, params["critic"], seq, width)
    ref = {}
    if rl_cfg.needs_reference:
        # The reference is the SFT trunk: no value head even when the policy carries one.
        ref_model = Transformer(policy_model.cfg.replace(scalar_head=False))
        ref["ref_logps"], _, _ = response_forward(ref_model, ref_params, seq, width, entropy=False,
                                                  group_size=rl_cfg.shared_group, shared=rl_cfg.shared_prefix)
        kl = losses.kl_penalty(logps, ref["ref_logps"], rl_cfg.kl_estimator) * mask
    else:
        kl = jnp.zeros_like(mask)  # no KL term: the reference forward is skipped
    kl_seq = jnp.sum(kl, axis=1)
    if rl_cfg.advantage == "gae":
        rewards = -kl_coef * kl + last_token_rewards(scores, mask)
        if rl_cfg.whiten_rewards:
            rewards = losses.masked_whiten(rewards, mask, shift_mean=False) * mask
        advantages, returns = losses.gae(rewards, values * mask, mask, gamma=rl_cfg.gamma, lam=rl_cfg.lam)
    else:
        # Critic-free: one advantage per sequence, broadcast over its tokens. RLOO
        # folds the KL into the reward; GRPO keeps it as a loss term.
        seq_reward = scores if rl_cfg.kl_in_loss else scores - kl_coef * kl_seq
        adv = losses.group_advantages(seq_reward, rl_cfg.group_size, kind=rl_cfg.advantage)
        advantages = adv[:, None] * mask
        returns = values = jnp.zeros_like(mask)
    if rl_cfg.whiten_advantages:
        advantages = losses.masked_whiten(advantages, mask) * mask
    batch = {k: seq[k] for k in ("tokens", "positions", "segment_ids", "completion", "mask")}
    batch.update(ref, old_logps=logps, old_values=values * mask,
                 advantages=advantages, returns=returns,
                 kl_coef=jnp.full(mask.shape[:1], kl_coef, jnp.float32))
    lengths = jnp.sum(mask, axis=1)
    metrics = {
        **({"objective/kl": jnp.mean(kl_seq)} if ref else {}),
        "objective/entropy": jnp.mean(jnp.sum(entropy * mask, axis=1)),
        "objective/scores": jnp.mean(scores),
        "objective/rlhf_reward": jnp.mean(scores - kl_coef * kl_seq),
        "objective/kl_coef": jnp.asarray(kl_coef, jnp.float32),
        "response_length": jnp.mean(lengths),
        "eos_rate": jnp.mean((seq["finish_reason"] == sampler.FINISH_EOS).astype(jnp.float32)),
    }
    if rl_cfg.group_size > 1:
        groups = scores.reshape(-1, rl_cfg.group_size)
        metrics["group/reward_std"] = jnp.mean(jnp.std(groups, axis=1))
        metrics["group/zero_advantage_share"] = jnp.mean(
            (jnp.max(groups, axis=1) == jnp.min(groups, axis=1)).astype(jnp.float32))
    return batch, metrics


def rl_loss_fn(params, batch, frozen=None, *, policy_model, critic_model, width: int, rl_cfg: RLConfig, lora_cfg=None):
    """Clipped surrogate (+ value loss, + KL term for GRPO, - entropy bonus) on a minibatch.

    frozen: the reference parameters when `lora_cfg` is on (the base the
    adapters merge into), else unused.
    """
    mask = batch["mask"]
    policy = policy_params(params, frozen, lora_cfg)
    logps, entropy, values = response_forward(policy_model, policy, batch, width, entropy=bool(rl_cfg.ent_coef),
                                              group_size=rl_cfg.shared_group, shared=rl_cfg.shared_prefix)
    loss, metrics = losses.ppo_policy_loss(
        logps, batch["old_logps"], batch["advantages"], mask, clip_eps=rl_cfg.clip_eps,
        clip_eps_high=rl_cfg.clip_eps_high or None, aggregation=rl_cfg.aggregation, ratio_level=rl_cfg.ratio_level)
    metrics["loss/policy"] = loss
    if rl_cfg.kl_in_loss and rl_cfg.needs_reference:
        kl = losses.aggregate(losses.kl_penalty(logps, batch["ref_logps"], "k3"), mask, rl_cfg.aggregation)
        loss = loss + jnp.mean(batch["kl_coef"]) * kl
        metrics["loss/kl"] = kl
    if rl_cfg.ent_coef:
        loss = loss - rl_cfg.ent_coef * losses.masked_mean(entropy, mask)
    if rl_cfg.advantage == "gae":
        if "critic" in params:
            values = response_values(critic_model, params["critic"], batch, width)
        v_loss, v_metrics = losses.ppo_value_loss(values, batch["old_values"], batch["returns"], mask,
                                                  clip_value=rl_cfg.clip_value)
        loss = loss + rl_cfg.vf_coef * v_loss
        metrics.update(v_metrics)
    return loss, metrics


def update_order(rows: int, rl_cfg: RLConfig, rng: np.random.Generator) -> np.ndarray:
    """[rows] int: one epoch's order of the rollout's rows, cut into minibatches in turn. A
    permutation of rows, or with rl.shared_prefix of whole groups (each minibatch then holds
    whole groups, their rows consecutive, as `group_rows` reads them)."""
    g = rl_cfg.shared_group
    return (rng.permutation(rows // g)[:, None] * g + np.arange(g)).reshape(-1) if g > 1 else rng.permutation(rows)
