"""One pure step per stage, jitted in exactly one place (`compile_step`).

A stage supplies `loss_fn(params, batch, frozen) -> (loss, metrics)`;
`train_step` turns it into `(state, batch, frozen) -> (state, metrics)` with
gradient accumulation, the optax update and a NaN guard. `frozen` holds what
the step reads but never trains (the DPO reference parameters), so it is
never part of the optimiser state.
"""
import dataclasses
import functools
from typing import Any, Callable

import flax.struct
import jax
import jax.numpy as jnp
import optax

from ptx import logprobs, losses, optim, sampler
from ptx.model import Transformer


@dataclasses.dataclass(frozen=True)
class DPOConfig:
    """The `dpo` config section; hashable, so a loss can close over it inside a jit."""

    beta: float = 0.1  # strength of the implicit KL to the reference
    loss_type: str = "sigmoid"  # sigmoid | ipo | hinge | simpo
    label_smoothing: float = 0.0  # conservative DPO: assumed share of flipped labels
    reference_free: bool = False  # drop the reference terms (simpo is always reference-free)
    gamma: float = 0.0  # SimPO target margin
    soft_labels: bool = False  # the data's prob_chosen as soft targets
    precompute_ref: bool = False  # reference log-probs once over the data
    shared_prefix: bool = False  # one row per pair, [prompt | chosen | rejected] (data.encode_preference)

    def __post_init__(self):
        if self.loss_type not in losses.DPO_LOSS_TYPES:
            raise ValueError(f"dpo.loss_type={self.loss_type!r}; expected one of {losses.DPO_LOSS_TYPES}")
        if self.beta <= 0:
            raise ValueError(f"dpo.beta={self.beta} must be positive")
        if not 0.0 <= self.label_smoothing < 0.5:
            raise ValueError(f"dpo.label_smoothing={self.label_smoothing} must be in [0, 0.5)")
        if self.soft_labels and self.label_smoothing:
            raise ValueError("dpo.soft_labels and dpo.label_smoothing both soften the labels; set one")
        if self.loss_type in ("ipo", "hinge") and (self.soft_labels or self.label_smoothing):
            raise ValueError(f"dpo.loss_type={self.loss_type!r} takes no label_smoothing or soft_labels")
        if self.gamma and self.loss_type != "simpo":
            raise ValueError(f"dpo.gamma={self.gamma} is the SimPO margin; it needs dpo.loss_type='simpo'")
        if self.precompute_ref and self.uses_reference is False:
            raise ValueError(f"dpo.precompute_ref with a reference-free loss ({self.loss_type}, "
                             f"reference_free={self.reference_free}) has no reference to precompute")

    @property
    def uses_reference(self) -> bool:
        return not (self.reference_free or self.loss_type == "simpo")


@dataclasses.dataclass(frozen=True)
class KTOConfig:
    """The `kto` config section (Ethayarajh et al. 2024; TRL's KTOConfig names)."""

    beta: float = 0.1  # strength of the implicit KL to the reference
    desirable_weight: float = 1.0  # λ_D: weight of desirable rows' losses
    undesirable_weight: float = 1.0  # λ_U: weight of undesirable rows' losses

    def __post_init__(self):
        if self.beta <= 0 or self.desirable_weight <= 0 or self.undesirable_weight <= 0:
            raise ValueError(f"kto.beta={self.beta}, kto.desirable_weight={self.desirable_weight} and "
                             f"kto.undesirable_weight={self.undesirable_weight} must be positive")


@dataclasses.dataclass(frozen=True)
class ORPOConfig:
    """The `orpo` config section (Hong et al. 2024): no reference model."""

    lam: float = 0.1  # λ, the weight of the odds-ratio term (TRL's ORPOConfig.beta)
    shared_prefix: bool = False  # one row per pair, [prompt | chosen | rejected] (data.encode_preference)

    def __post_init__(self):
        if self.lam < 0:
            raise ValueError(f"orpo.lam={self.lam} must be >= 0")


@flax.struct.dataclass
class TrainState:
    step: jax.Array  # int32 scalar: updates applied so far
    params: Any
    opt_state: Any


def init_state(params, tx: optax.GradientTransformation) -> TrainState:
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params))


def _token_stats(model: Transformer, params, batch, **kw) -> logprobs.TokenStats:
    """`logprobs.token_stats` of batch['targets'] (chunked over the vocabulary when large)."""
    return logprobs.token_stats(model, params, batch["inputs"], batch["positions"], batch["segment_ids"],
                                batch["targets"], **kw)


def sft_loss_fn(model: Transformer, params, batch, frozen=None):
    """Token cross-entropy; batch: inputs / targets / positions / segment_ids [b, t] int32, loss_mask [b, t] f32."""
    stats = _token_stats(model, params, batch, argmax=True)
    return losses.sft_loss_of_logprobs(stats.logps, stats.argmax == batch["targets"], batch["loss_mask"])


def _pair_batch(batch):
    """Chosen and rejected stacked on the batch axis so both go through one forward."""
    keys = ("inputs", "targets", "positions", "segment_ids", "loss_mask")
    return {k: jnp.concatenate([batch["chosen_" + k], batch["rejected_" + k]]) for k in keys}


def last_token_index(segment_ids: jax.Array) -> jax.Array:
    """Index of the last real (segment > 0) token of each right-padded row. [b, t] -> [b] int32."""
    return jnp.maximum(jnp.sum(segment_ids > 0, axis=-1) - 1, 0).astype(jnp.int32)


def sequence_scores(model: Transformer, params, inputs, positions, segment_ids) -> jax.Array:
    """Scalar-head value at the last real token of each row: [b] float32."""
    out = model.apply({"params": params}, inputs, positions, segment_ids, logits=False)
    idx = last_token_index(segment_ids)
    return jnp.take_along_axis(out.values, idx[:, None], axis=1)[:, 0]


def reward_loss_fn(model: Transformer, params, batch, frozen=None, *, center_coef=0.0):
    """Pairwise Bradley-Terry loss on the scalar head read at the last prompt+response token, of
    two rows per pair or (with 'branch_ids', `pair_logps`) of each response's last column."""
    if "branch_ids" in batch:
        out = model.apply({"params": params}, batch["inputs"], batch["positions"], batch["segment_ids"],
                          branch_ids=batch["branch_ids"], logits=False)
        t = batch["branch_ids"].shape[1]
        # Branch k's last column: where its own row's last real input sits.
        last = (t - 1 - jnp.argmax(batch["branch_ids"][:, ::-1] == k, axis=-1) for k in (1, 2))
        r_chosen, r_rejected = (jnp.take_along_axis(out.values, i[:, None], axis=1)[:, 0] for i in last)
    else:
        pair = _pair_batch(batch)
        scores = sequence_scores(model, params, pair["inputs"], pair["positions"], pair["segment_ids"])
        r_chosen, r_rejected = jnp.split(scores, 2)
    return losses.pairwise_reward_loss(r_chosen, r_rejected, prob_chosen=batch["prob_chosen"],
                                       center_coef=center_coef)


def pair_logps(model: Transformer, params, batch):
    """Summed response log-probs of chosen and rejected ([b] f32 each) and response lengths.

    batch (`data.pair_arrays`): two rows per pair, chosen_* and rejected_* sequence
    arrays (inputs / positions / segment_ids [b, t] int32, targets [b, n] int32 and
    loss_mask [b, n] float32), or with 'branch_ids' one shared-prefix row per pair
    (inputs / positions / segment_ids / branch_ids [b, t] int32, targets [b, n] int32,
    chosen_loss_mask / rejected_loss_mask [b, n] float32). Targets and masks are those
    of the last n columns, the only ones the LM head reads.
    """
    shared = "branch_ids" in batch
    rows = batch if shared else _pair_batch(batch)
    start = rows["inputs"].shape[1] - rows["targets"].shape[1]
    logps = logprobs.token_stats(model, params, rows["inputs"], rows["positions"], rows["segment_ids"], rows["targets"],
                                 branch_ids=rows.get("branch_ids"), start=start).logps
    if shared:
        masks = batch["chosen_loss_mask"], batch["rejected_loss_mask"]
        return (tuple(losses.sequence_logps(logps, m) for m in masks),
                tuple(jnp.maximum(m.sum(-1), 1.0) for m in masks))
    seq = losses.sequence_logps(logps, rows["loss_mask"])
    lengths = jnp.maximum(rows["loss_mask"].sum(-1), 1.0)
    return jnp.split(seq, 2), jnp.split(lengths, 2)


def dpo_loss_fn(model: Transformer, params, batch, frozen, *, dpo_cfg: DPOConfig):
    """DPO family on one pair batch; the reference comes from `frozen` params or
    from precomputed `ref_chosen_logps` / `ref_rejected_logps` batch fields."""
    (pc, pr), (lc, lr) = pair_logps(model, params, batch)
    if "ref_chosen_logps" in batch:
        rc, rr = batch["ref_chosen_logps"], batch["ref_rejected_logps"]
    elif frozen is not None:
        (rc, rr), _ = pair_logps(model, jax.lax.stop_gradient(frozen), batch)
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
    (pc, pr), (lc, lr) = pair_logps(model, params, batch)
    per_example, nll, log_odds = losses.orpo_loss(pc, pr, lc, lr, lam=orpo_cfg.lam)
    return per_example.mean(), losses.orpo_metrics(per_example, nll, log_odds, pc, pr, lc, lr, lam=orpo_cfg.lam)


def join_prompt_completion(prompt_tokens, prompt_lens, completion, completion_lens) -> dict:
    """Prompts and completions as rollout rows `[left-aligned prompt (P) | completion (C)]`, so
    that any prompt joins any completion (see `data.encode_unpaired`).

    prompt_tokens: [b, P] int32 right-padded; prompt_lens, completion_lens: [b]
    int32; completion: [b, C] int32. Returns tokens / positions / segment_ids
    [b, P + C] int32, completion [b, C] int32 and mask [b, C] float32.
    """
    tokens_p, pos_p, seg_p = sampler.left_align(prompt_tokens, prompt_lens)
    j = jnp.arange(completion.shape[1], dtype=jnp.int32)[None, :]
    live = j < completion_lens[:, None]
    return {"tokens": jnp.concatenate([tokens_p, completion], axis=1),
            "positions": jnp.concatenate([pos_p, prompt_lens[:, None].astype(jnp.int32) + j], axis=1),
            "segment_ids": jnp.concatenate([seg_p, live.astype(jnp.int32)], axis=1),
            "completion": completion, "mask": live.astype(jnp.float32)}


def completion_logps(model: Transformer, params, seq: dict) -> jax.Array:
    """Summed log-probs [b] float32 of the completion columns of rollout-layout rows."""
    width = seq["tokens"].shape[1] - seq["completion"].shape[1]
    stats = logprobs.token_stats(model, params, seq["tokens"], seq["positions"], seq["segment_ids"],
                                 seq["completion"], start=width - 1)
    return losses.sequence_logps(stats.logps, seq["mask"])


def kto_loss_fn(model: Transformer, params, batch, frozen, *, kto_cfg: KTOConfig):
    """KTO on one unpaired batch (prompt_tokens, prompt_lens, completion, completion_lens, label).

    The reference point's mismatched pairs join prompt i to completion i - 1 of the
    batch, as TRL's KTOTrainer shifts them; they are scored without gradient.
    """
    p, n = batch["prompt_tokens"], batch["prompt_lens"]
    seq = join_prompt_completion(p, n, batch["completion"], batch["completion_lens"])
    kl_seq = join_prompt_completion(p, n, jnp.roll(batch["completion"], 1, axis=0),
                                    jnp.roll(batch["completion_lens"], 1, axis=0))
    ref = jax.lax.stop_gradient(frozen)
    policy_logps = completion_logps(model, params, seq)
    kl_policy = completion_logps(model, jax.lax.stop_gradient(params), kl_seq)
    ref_logps, kl_ref = completion_logps(model, ref, seq), completion_logps(model, ref, kl_seq)
    per_example, z0 = losses.kto_loss(policy_logps, ref_logps, kl_policy, kl_ref, batch["label"],
                                      beta=kto_cfg.beta, desirable_weight=kto_cfg.desirable_weight,
                                      undesirable_weight=kto_cfg.undesirable_weight)
    return per_example.mean(), losses.kto_metrics(per_example, policy_logps, ref_logps, batch["label"], z0,
                                                  beta=kto_cfg.beta)


def _global_norm(tree) -> jax.Array:
    return optax.tree.norm(tree).astype(jnp.float32)


def train_step(state: TrainState, batch, frozen, *, loss_fn: Callable, tx, lr_fn, accum_steps: int):
    """One optimiser update from `accum_steps` micro-batches of `batch`.

    A non-finite loss or gradient leaves the state untouched (the last good
    parameters) and raises `metrics['nonfinite']`, which the loop turns into
    a clear error before any checkpoint is written.
    """
    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
    if accum_steps == 1:
        (loss, metrics), grads = grad_fn(state.params, batch, frozen)
    else:
        # Micro-batch i takes rows i, i + accum, ...: every device keeps a share of each.
        micro = jax.tree_util.tree_map(
            lambda x: x.reshape((x.shape[0] // accum_steps, accum_steps) + x.shape[1:]).swapaxes(0, 1),
            batch)

        def body(carry, mb):
            (loss, metrics), grads = grad_fn(state.params, mb, frozen)
            # Token-mean losses weigh each micro-batch by its tokens, so the sum equals
            # the mean over the whole batch; other losses weigh micro-batches equally.
            w = metrics.get("num_tokens", jnp.ones((), jnp.float32))
            scaled = jax.tree_util.tree_map(lambda x: x * w, (loss, metrics, grads))
            return jax.tree_util.tree_map(jnp.add, carry, scaled + (w,)), None

        first = jax.tree_util.tree_map(lambda x: x[0], micro)
        (loss0, metrics0), grads0 = jax.eval_shape(grad_fn, state.params, first, frozen)
        zeros = jax.tree_util.tree_map(lambda s: jnp.zeros(s.shape, s.dtype),
                                       (loss0, metrics0, grads0, jax.ShapeDtypeStruct((), jnp.float32)))
        (loss, metrics, grads, total), _ = jax.lax.scan(body, zeros, micro)
        loss, metrics, grads = jax.tree_util.tree_map(lambda x: x / total, (loss, metrics, grads))
        if "num_tokens" in metrics:
            metrics["num_tokens"] = total
    grad_norm = _global_norm(grads)
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    # The optimiser skips a non-finite step itself: ptx's AdamW by scalars inside its
    # one pass, where a conditional around the update kept all parameters' updates
    # alive at once (optim.clipped_adamw); any other transformation by a conditional.
    updates, opt_state = optim.skip_nonfinite(tx).update(grads, state.opt_state, state.params, finite=finite)
    new = TrainState(step=state.step + finite.astype(jnp.int32), params=optax.apply_updates(state.params, updates),
                     opt_state=opt_state)
    update_norm = _global_norm(updates)
    metrics = dict(metrics, loss=loss, grad_norm=grad_norm, update_norm=update_norm,
                   lr=jnp.asarray(lr_fn(state.step), jnp.float32),
                   nonfinite=(~finite).astype(jnp.float32))
    return new, metrics


def eval_step(params, batch, frozen, *, loss_fn: Callable):
    loss, metrics = loss_fn(params, batch, frozen)
    return dict(metrics, loss=loss)


def compile_step(fn, *, in_shardings, out_shardings, donate_state: bool):
    """The one place ptx jits a step: explicit shardings, the train state donated."""
    return jax.jit(fn, in_shardings=in_shardings, out_shardings=out_shardings,
                   donate_argnums=(0,) if donate_state else ())


def make_loss_fn(stage: str, model: Transformer, *, dpo: DPOConfig = None, center_coef: float = 0.0,
                 kto: KTOConfig = None, orpo: ORPOConfig = None) -> Callable:
    """The loss of a supervised stage: sft, reward (with `center_coef`), dpo (with `dpo`), kto
    (with `kto`) or orpo (with `orpo`)."""
    if stage == "sft":
        return functools.partial(sft_loss_fn, model)
    if stage == "reward":
        return functools.partial(reward_loss_fn, model, center_coef=center_coef)
    if stage == "dpo":
        return functools.partial(dpo_loss_fn, model, dpo_cfg=dpo)
    if stage == "kto":
        return functools.partial(kto_loss_fn, model, kto_cfg=kto)
    if stage == "orpo":
        return functools.partial(orpo_loss_fn, model, orpo_cfg=orpo)
    raise ValueError(f"no supervised loss for stage {stage!r}")
