"""The method table: one row per training method, and the batch losses the supervised ones train.

A row says everything a stage, the validation and the quickstart need to know of a
method: its config sections (each a frozen dataclass that declares its fields once),
the data kinds it trains on, its loss builder, whether it reads a frozen reference,
a scalar head, extra LoRA targets, what it must start from, its batches, and which
loop trains it (`ptx.stages.loops`). Adding a method is a pure loss
(`ptx.losses`), a row here and a file in `configs/`.

A loss builder takes (model, the method's own section config: its first section's
dataclass, or None) and returns `loss_fn(params, batch, frozen) -> (loss, metrics)`;
a method with a carry (`Method.carry`) gets `carry=` and returns the next one as
`metrics['carry']` (`steps.train_step`).
"""
import dataclasses
import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp

from ptx import logprobs, losses
from ptx.losses import BCOConfig, CPOConfig, DPOConfig, KTOConfig, ORPOConfig, RewardConfig
from ptx.model import Transformer
from ptx.online import OnlineConfig
from ptx.rewards import SourceConfig
from ptx.rl_training import RLConfig

LOOPS = ("supervised", "rl", "online")
QUICKSTART_DATA = ("", "comparisons", "prompts")


def sft_loss_fn(model: Transformer, params, batch, frozen=None):
    """Token cross-entropy; batch: inputs / targets / positions / segment_ids [b, t] int32, loss_mask [b, t] f32."""
    stats = logprobs.batch_token_stats(model, params, batch, argmax=True)
    return losses.sft_loss_of_logprobs(stats.logps, stats.argmax == batch["targets"], batch["loss_mask"])


def reward_loss_fn(model: Transformer, params, batch, frozen=None, *, center_coef=0.0):
    """Pairwise Bradley-Terry loss on the scalar head read at the last prompt+response token, of
    two rows per pair or (with 'branch_ids', `logprobs.pair_logps`) of each response's last column."""
    if "branch_ids" in batch:
        out = model.apply({"params": params}, batch["inputs"], batch["positions"], batch["segment_ids"],
                          branch_ids=batch["branch_ids"], logits=False)
        t = batch["branch_ids"].shape[1]
        # Branch k's last column: where its own row's last real input sits.
        last = (t - 1 - jnp.argmax(batch["branch_ids"][:, ::-1] == k, axis=-1) for k in (1, 2))
        r_chosen, r_rejected = (jnp.take_along_axis(out.values, i[:, None], axis=1)[:, 0] for i in last)
    else:
        pair = logprobs.pair_batch(batch)
        scores = logprobs.sequence_scores(model, params, pair["inputs"], pair["positions"], pair["segment_ids"])
        r_chosen, r_rejected = jnp.split(scores, 2)
    return losses.pairwise_reward_loss(r_chosen, r_rejected, prob_chosen=batch["prob_chosen"],
                                       center_coef=center_coef)


def dpo_loss_fn(model: Transformer, params, batch, frozen, *, dpo_cfg: DPOConfig):
    """DPO family on one pair batch; the reference comes from `frozen` params or
    from precomputed `ref_chosen_logps` / `ref_rejected_logps` batch fields."""
    (pc, pr), (lc, lr) = logprobs.pair_logps(model, params, batch)
    if "ref_chosen_logps" in batch:
        rc, rr = batch["ref_chosen_logps"], batch["ref_rejected_logps"]
    elif frozen is not None:
        (rc, rr), _ = logprobs.pair_logps(model, jax.lax.stop_gradient(frozen), batch)
    else:
        rc = rr = jnp.zeros_like(pc)
    soft = batch["prob_chosen"] if dpo_cfg.soft_labels else None
    per_example, chosen_r, rejected_r = losses.dpo_loss(
        pc, pr, rc, rr, beta=dpo_cfg.beta, loss_type=dpo_cfg.loss_type,
        label_smoothing=dpo_cfg.label_smoothing, reference_free=dpo_cfg.reference_free,
        prob_chosen=soft, chosen_lengths=lc, rejected_lengths=lr, gamma=dpo_cfg.gamma)
    metrics = losses.dpo_metrics(per_example, chosen_r, rejected_r, pc, pr)
    return per_example.mean(), metrics


def orpo_loss_fn(model: Transformer, params, batch, frozen=None, *, orpo_cfg: ORPOConfig):
    """ORPO on one pair batch: the policy's own log-probs only (`frozen` is unused: no reference)."""
    (pc, pr), (lc, lr) = logprobs.pair_logps(model, params, batch)
    per_example, nll, log_odds = losses.orpo_loss(pc, pr, lc, lr, lam=orpo_cfg.lam)
    return per_example.mean(), losses.orpo_metrics(per_example, nll, log_odds, pc, pr, lc, lr, lam=orpo_cfg.lam)


def cpo_loss_fn(model: Transformer, params, batch, frozen=None, *, cpo_cfg: CPOConfig):
    """CPO on one pair batch: its preference term plus `cpo.alpha` times the NLL of the chosen
    responses, a token mean over the batch (TRL's cross-entropy on the chosen half); no reference."""
    (pc, pr), (lc, _) = logprobs.pair_logps(model, params, batch)
    per_example = losses.cpo_loss(pc, pr, beta=cpo_cfg.beta)
    nll = -jnp.sum(pc) / jnp.sum(lc)
    return per_example.mean() + cpo_cfg.alpha * nll, losses.cpo_metrics(per_example, nll, pc, pr, beta=cpo_cfg.beta)


def unpaired_logps(model: Transformer, params, ref, batch):
    """Summed completion log-probs [b] float32 of an unpaired batch (prompt_tokens, prompt_lens,
    completion, completion_lens) under the policy and the reference (`ref`, no gradient)."""
    seq = logprobs.join_prompt_completion(batch["prompt_tokens"], batch["prompt_lens"], batch["completion"],
                                          batch["completion_lens"])
    return (logprobs.completion_logps(model, params, seq),
            logprobs.completion_logps(model, jax.lax.stop_gradient(ref), seq))


def kto_loss_fn(model: Transformer, params, batch, frozen, *, kto_cfg: KTOConfig):
    """KTO on one unpaired batch (prompt_tokens, prompt_lens, completion, completion_lens, label).

    The reference point's mismatched pairs join prompt i to completion i - 1 of the
    batch, as TRL's KTOTrainer shifts them; they are scored without gradient.
    """
    policy_logps, ref_logps = unpaired_logps(model, params, frozen, batch)
    shifted = dict(batch, completion=jnp.roll(batch["completion"], 1, axis=0),
                   completion_lens=jnp.roll(batch["completion_lens"], 1, axis=0))
    kl_policy, kl_ref = unpaired_logps(model, jax.lax.stop_gradient(params), frozen, shifted)
    per_example, z0 = losses.kto_loss(policy_logps, ref_logps, kl_policy, kl_ref, batch["label"],
                                      beta=kto_cfg.beta, desirable_weight=kto_cfg.desirable_weight,
                                      undesirable_weight=kto_cfg.undesirable_weight)
    return per_example.mean(), losses.kto_metrics(per_example, policy_logps, ref_logps, batch["label"], z0,
                                                  beta=kto_cfg.beta)


def bco_loss_fn(model: Transformer, params, batch, frozen, *, bco_cfg: BCOConfig, carry: dict):
    """BCO on one unpaired batch (prompt_tokens, prompt_lens, completion, completion_lens, label):
    the implicit rewards β (log π - log π_ref) of its rows join the running mean (the carry, as
    TRL's BCOTrainer updates its RunningMoments before the loss) and shift the classifier."""
    policy_logps, ref_logps = unpaired_logps(model, params, frozen, batch)
    shift = losses.bco_running_mean(carry, bco_cfg.beta * (policy_logps - ref_logps))
    per_example = losses.bco_loss(policy_logps, ref_logps, batch["label"], shift["mean"], beta=bco_cfg.beta)
    metrics = losses.bco_metrics(per_example, policy_logps, ref_logps, batch["label"], shift["mean"],
                                 beta=bco_cfg.beta)
    return per_example.mean(), dict(metrics, carry=shift)


def _never(_) -> bool:
    return False


def _always(_) -> bool:
    return True


def _online_dpo_check(sections: dict, lora_rank: int):
    dpo = sections["dpo"]
    if dpo.precompute_ref or dpo.soft_labels:
        field = "dpo.precompute_ref" if dpo.precompute_ref else "dpo.soft_labels"
        raise ValueError(f"{field}: online DPO labels fresh samples with its reward source: there is no data set "
                         "to precompute over or to read soft labels from")
    if dpo.shared_prefix:
        raise ValueError("dpo.shared_prefix: online DPO scores sampled pairs in rollout rows; shared-prefix rows "
                         "are built from a preference data set (stage dpo)")
    if lora_rank:
        raise ValueError("lora.rank: online DPO trains full weights; lora.rank must be 0")


def _rl_check(sections: dict, lora_rank: int):
    rl, reward = sections["rl"], sections["reward"]
    if rl.critic_kind == "reward" and not (rl.critic_checkpoint or reward.checkpoint):
        raise ValueError("rl.critic: 'reward' starts the critic from a reward model: set reward.checkpoint or "
                         "rl.critic_checkpoint")


@dataclasses.dataclass(frozen=True)
class Method:
    """One training method: what its stage reads, trains and runs."""

    name: str  # config.stage
    loop: str  # supervised | rl | online: the loop that trains it (ptx.stages.loops)
    data_kinds: tuple  # the data kinds it trains on (data.kind); its config file sets the first
    sections: tuple = ()  # (section, frozen dataclass) it reads beyond the common ones; its own first
    loss: Callable | None = None  # (model, own section config) -> loss_fn; the supervised loop's
    reference: Callable = _never  # (own section config) -> whether the loss reads a frozen reference
    scalar_head: bool = False  # the trained model carries a scalar head (the reward model)
    lora_targets: tuple = ()  # kernels adapted beyond lora.targets (a fresh head)
    needs_init: bool = False  # must start from init.checkpoint or init.hf_dir
    batches: tuple = ("train.batch_size",)  # fields (a*b: a product) each split over the data devices
    carry: Callable | None = None  # (own section config) -> the initial TrainState.carry
    check: Callable | None = None  # (typed sections by name, lora.rank) -> ValueError("field: problem")
    quickstart: str = ""  # an extra quickstart row trained from SFT on: comparisons | prompts; '' = none

    def __post_init__(self):
        if self.loop not in LOOPS:
            raise ValueError(f"method {self.name!r}: loop {self.loop!r} is not one of {LOOPS}")
        if self.quickstart not in QUICKSTART_DATA:
            raise ValueError(f"method {self.name!r}: quickstart {self.quickstart!r} is not one of {QUICKSTART_DATA}")
        if (self.loop == "supervised") != (self.loss is not None):
            raise ValueError(f"method {self.name!r}: the supervised loop, and only it, takes a loss builder")

    def section_configs(self, values: Callable[[str], dict]) -> dict:
        """{section: its dataclass built from values(section)} for each of the method's sections."""
        return {name: cls(**values(name)) for name, cls in self.sections}

    def own_config(self, sections: dict):
        """The method's own section config (its first), or None."""
        return sections[self.sections[0][0]] if self.sections else None

    def make_loss(self, model: Transformer, own) -> Callable:
        return self.loss(model, own)

    @property
    def reads_reward_source(self) -> bool:
        """Whether it scores samples with a reward source (its `reward` section is `SourceConfig`)."""
        return any(cls is SourceConfig for _, cls in self.sections)

    def uses_reference(self, own) -> bool:
        return bool(self.reference(own))

    def initial_carry(self, own) -> dict:
        return self.carry(own) if self.carry else {}


_RL = dict(loop="rl", data_kinds=("prompt",), sections=(("rl", RLConfig), ("reward", SourceConfig)),
           needs_init=True, batches=("rl.rollout_batch*rl.group_size", "rl.minibatch_size"), check=_rl_check)

METHODS = (
    Method("sft", "supervised", ("sft", "text"), loss=lambda m, c: functools.partial(sft_loss_fn, m)),
    Method("reward", "supervised", ("preference",), (("reward", RewardConfig),),
           loss=lambda m, c: functools.partial(reward_loss_fn, m, center_coef=c.center_coef),
           scalar_head=True, lora_targets=(r"scalar_head/kernel",)),
    Method("dpo", "supervised", ("preference",), (("dpo", DPOConfig),),
           loss=lambda m, c: functools.partial(dpo_loss_fn, m, dpo_cfg=c), reference=lambda c: c.uses_reference),
    Method("kto", "supervised", ("unpaired", "preference"), (("kto", KTOConfig),),
           loss=lambda m, c: functools.partial(kto_loss_fn, m, kto_cfg=c), reference=_always,
           quickstart="comparisons"),
    Method("orpo", "supervised", ("preference",), (("orpo", ORPOConfig),),
           loss=lambda m, c: functools.partial(orpo_loss_fn, m, orpo_cfg=c), quickstart="comparisons"),
    Method("cpo", "supervised", ("preference",), (("cpo", CPOConfig),),
           loss=lambda m, c: functools.partial(cpo_loss_fn, m, cpo_cfg=c), quickstart="comparisons"),
    Method("bco", "supervised", ("unpaired",), (("bco", BCOConfig),),
           loss=lambda m, c: functools.partial(bco_loss_fn, m, bco_cfg=c), reference=_always,
           carry=lambda c: {"mean": 0.0, "count": 0.0}, quickstart="comparisons"),
    Method("ppo", **_RL),
    Method("grpo", **_RL),
    Method("gspo", **_RL, quickstart="prompts"),
    Method("dapo", **_RL),
    Method("online_dpo", "online", ("prompt",),
           (("dpo", DPOConfig), ("online", OnlineConfig), ("reward", SourceConfig)),
           needs_init=True, batches=("online.rollout_batch*online.group_size", "online.minibatch_size"),
           check=_online_dpo_check, quickstart="prompts"),
)
BY_NAME = {m.name: m for m in METHODS}


def get(name: str) -> Method | None:
    """The row of method `name`, or None for a stage that trains nothing (sample, export, ...)."""
    return BY_NAME.get(name)
