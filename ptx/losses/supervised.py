"""Supervised losses on pairs: SFT cross-entropy, the pairwise reward-model loss, the DPO family, ORPO, CPO,
and beside each method its config section (a frozen dataclass: hashable, so a loss closes over it
inside a jit; its defaults and comments are the only declaration of the section's fields)."""
import dataclasses
import math

import jax
import jax.numpy as jnp

from ptx.losses.tokens import _check, _float, argmax, masked_mean, token_logprobs

DPO_LOSS_TYPES = ("sigmoid", "ipo", "hinge", "simpo")

__all__ = ["DPO_LOSS_TYPES", "CPOConfig", "DPOConfig", "ORPOConfig", "RewardConfig", "cpo_loss", "cpo_metrics",
           "dpo_loss", "dpo_metrics", "orpo_loss", "orpo_metrics", "pairwise_reward_loss", "sft_loss",
           "sft_loss_of_logprobs"]


@dataclasses.dataclass(frozen=True)
class RewardConfig:
    """The `reward` section of the reward-model stage."""

    center_coef: float = 0.0  # coef * (r_chosen + r_rejected)^2 keeps rewards centred
    shared_prefix: bool = False  # one row per pair, [prompt | chosen | rejected], as dpo.shared_prefix

    def __post_init__(self):
        if not (math.isfinite(self.center_coef) and self.center_coef >= 0):
            raise ValueError(f"reward.center_coef={self.center_coef} must be a finite number >= 0")


@dataclasses.dataclass(frozen=True)
class DPOConfig:
    """The `dpo` section: DPO and its variants (IPO, hinge, SimPO, conservative, soft labels)."""

    beta: float = 0.1  # strength of the implicit KL to the reference
    loss_type: str = "sigmoid"  # sigmoid | ipo | hinge | simpo
    label_smoothing: float = 0.0  # conservative DPO: assumed share of flipped labels
    reference_free: bool = False  # drop the reference terms (simpo is always reference-free)
    gamma: float = 0.0  # SimPO target margin
    soft_labels: bool = False  # use the data's prob_chosen (AI-judge labels) as soft targets
    precompute_ref: bool = False  # reference log-probs once over the data; steps run the policy only
    # One row per pair, [prompt | chosen | rejected]: the prompt's keys and values computed once, each
    # response masked to see the prompt and itself; the same losses and gradients as two rows.
    shared_prefix: bool = False

    def __post_init__(self):
        if self.loss_type not in DPO_LOSS_TYPES:
            raise ValueError(f"dpo.loss_type={self.loss_type!r}; expected one of {DPO_LOSS_TYPES}")
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
class ORPOConfig:
    """The `orpo` section (Hong et al. 2024): no reference model."""

    lam: float = 0.1  # λ, the weight of the odds-ratio term (TRL's ORPOConfig.beta)
    shared_prefix: bool = False  # one row per pair, [prompt | chosen | rejected], as dpo.shared_prefix

    def __post_init__(self):
        if self.lam < 0:
            raise ValueError(f"orpo.lam={self.lam} must be >= 0")


# Supervised fine-tuning and reward modelling.


def sft_loss(logits, targets, mask):
    """Mean token cross-entropy over masked tokens.

    Args:
        logits: [batch, seq, vocab] any float dtype.
        targets: [batch, seq] int32.
        mask: [batch, seq] float, 1 on tokens that are trained on.

    Returns:
        (loss scalar float32, {'loss', 'accuracy', 'num_tokens'}).
    """
    return sft_loss_of_logprobs(token_logprobs(logits, targets), argmax(logits) == targets, mask)


def sft_loss_of_logprobs(token_logps, correct, mask):
    """`sft_loss` from what it reads of the logits (as `chunked_token_logprobs` gives them).

    Args:
        token_logps: [batch, seq] float32 log-probabilities of the targets.
        correct: [batch, seq] bool, True where the target is the argmax.
        mask: [batch, seq] float, 1 on tokens that are trained on.
    """
    loss = masked_mean(-token_logps, mask)
    metrics = {
        "loss": loss,
        "accuracy": masked_mean(correct.astype(jnp.float32), mask),
        "num_tokens": jnp.sum(mask),
    }
    return loss, metrics


def _soft_label_loss(z, p):
    """-(p log σ(z) + (1 - p) log σ(-z)): Bradley-Terry NLL with P(chosen wins) = p."""
    # Same value via log σ(-z) = log σ(z) - z, but bit-exact where it matters:
    # the hard loss at p = 1 and log 2 at z = 0 (policy == reference).
    return (1.0 - p) * z - jax.nn.log_sigmoid(z)


def pairwise_reward_loss(r_chosen, r_rejected, margin=None, prob_chosen=None,
                         center_coef=0.0):
    """Bradley-Terry loss of a scalar reward model on preference pairs.

    Args:
        r_chosen, r_rejected: [batch] float32 rewards.
        margin: optional [batch] float32 required gap (Llama 2), subtracted from
            the difference.
        prob_chosen: optional [batch] float32 soft label in [0, 1] (e.g. from an
            AI judge); None is the hard label p = 1.
        center_coef: weight of mean((r_chosen + r_rejected)^2), which pins rewards
            near zero (Eisenstein et al. 2023) without changing their differences.

    Returns:
        (loss scalar, {'loss', 'accuracy', 'margin_mean', 'reward_mean',
        'reward_std'}). accuracy is mean(r_chosen > r_rejected), margin ignored,
        ties count 0; reward_mean / reward_std (population) are over both rewards.
    """
    r_chosen, r_rejected = _float(r_chosen), _float(r_rejected)
    diff = r_chosen - r_rejected
    z = diff if margin is None else diff - margin
    p = 1.0 if prob_chosen is None else prob_chosen
    loss = jnp.mean(_soft_label_loss(z, p))
    loss = loss + center_coef * jnp.mean((r_chosen + r_rejected) ** 2)
    both = jnp.concatenate([r_chosen, r_rejected])
    metrics = {
        "loss": loss,
        "accuracy": jnp.mean((diff > 0).astype(jnp.float32)),
        "margin_mean": jnp.mean(diff),
        "reward_mean": jnp.mean(both),
        "reward_std": jnp.std(both),
    }
    return loss, metrics


# Direct preference optimisation.


def dpo_loss(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps,
             *, beta, loss_type="sigmoid", label_smoothing=0.0, reference_free=False,
             prob_chosen=None, chosen_lengths=None, rejected_lengths=None, gamma=0.0):
    """Per-pair DPO-family losses and implicit rewards.

    Inputs are [batch] float32 sequence log-probs summed over response tokens.
    With c = policy_chosen - ref_chosen and r = policy_rejected - ref_rejected
    (ref terms dropped when reference_free) and logits = c - r:
        'sigmoid': -(1-ls) log σ(β logits) - ls log σ(-β logits)   (DPO, cDPO)
        'ipo':     (logits - 1/(2β))^2          (IPO; TRL feeds it mean log-probs)
        'hinge':   relu(1 - β logits)           (SLiC)
        'simpo':   as 'sigmoid' on β logits - gamma, where c = policy_chosen /
                   chosen_lengths and r = policy_rejected / rejected_lengths
                   (always reference-free; lengths are [batch] token counts).
    prob_chosen ([batch] in [0, 1], a judge's soft label) replaces 1 - ls in
    'sigmoid' / 'simpo'. beta, label_smoothing and gamma are Python floats.
    Reference log-probs may be None when unused.

    Returns:
        (losses [batch], chosen_rewards [batch], rejected_rewards [batch]);
        rewards are β c and β r, stop-gradient'ed.
    """
    _check(loss_type, DPO_LOSS_TYPES, "DPO loss_type")
    if label_smoothing and prob_chosen is not None:
        raise ValueError("Give label_smoothing or prob_chosen, not both.")
    if loss_type in ("ipo", "hinge") and (label_smoothing or prob_chosen is not None):
        raise ValueError(f"{loss_type!r} takes no label_smoothing / prob_chosen.")
    if gamma and loss_type != "simpo":
        raise ValueError("gamma is the SimPO margin; it needs loss_type='simpo'.")

    if loss_type == "simpo":
        if chosen_lengths is None or rejected_lengths is None:
            raise ValueError("simpo needs chosen_lengths and rejected_lengths.")
        # An empty (filler) pair must give a finite loss, not NaN, to be masked.
        chosen = _float(policy_chosen_logps) / jnp.maximum(chosen_lengths, 1.0)
        rejected = _float(policy_rejected_logps) / jnp.maximum(rejected_lengths, 1.0)
    elif reference_free:
        chosen, rejected = _float(policy_chosen_logps), _float(policy_rejected_logps)
    else:
        chosen = _float(policy_chosen_logps) - ref_chosen_logps
        rejected = _float(policy_rejected_logps) - ref_rejected_logps
    logits = chosen - rejected

    if loss_type == "ipo":
        losses = (logits - 1.0 / (2.0 * beta)) ** 2
    elif loss_type == "hinge":
        losses = jax.nn.relu(1.0 - beta * logits)
    else:
        p = 1.0 - label_smoothing if prob_chosen is None else prob_chosen
        losses = _soft_label_loss(beta * logits - gamma, p)

    chosen_rewards = jax.lax.stop_gradient(beta * chosen)
    rejected_rewards = jax.lax.stop_gradient(beta * rejected)
    return losses, chosen_rewards, rejected_rewards


def dpo_metrics(losses, chosen_rewards, rejected_rewards, policy_chosen_logps,
                policy_rejected_logps):
    """Batch means of dpo_loss outputs under TRL's metric names; all inputs [batch]."""
    return {
        "loss": jnp.mean(losses),
        "rewards/chosen": jnp.mean(chosen_rewards),
        "rewards/rejected": jnp.mean(rejected_rewards),
        "rewards/accuracies": jnp.mean(
            (chosen_rewards > rejected_rewards).astype(jnp.float32)),
        "rewards/margins": jnp.mean(chosen_rewards - rejected_rewards),
        "logps/chosen": jnp.mean(policy_chosen_logps),
        "logps/rejected": jnp.mean(policy_rejected_logps),
    }


# Reference-free odds ratios (ORPO).


def _log1mexp(x):
    """log(1 - exp(x)) for x < 0, accurate on both sides of -log 2 (Mächler 2012)."""
    return jnp.where(x > -math.log(2.0), jnp.log(-jnp.expm1(x)), jnp.log1p(-jnp.exp(x)))


# The largest mean log-prob odds are taken of: a response of probability 1 in float32
# (every token's log-prob rounds to 0) has infinite odds.
ORPO_MAX_MEAN_LOGP = -1e-7


def orpo_loss(chosen_logps, rejected_logps, chosen_lengths, rejected_lengths, *, lam):
    """Odds-ratio preference optimisation (Hong et al. 2024): no reference model.

    With length-averaged log-probs c = chosen_logps / chosen_lengths and
    r = rejected_logps / rejected_lengths (each capped at ORPO_MAX_MEAN_LOGP,
    where the odds would be infinite), odds(p) = p / (1 - p) and
        log_odds = log odds(c) - log odds(r) = (c - r) - (log(1 - e^c) - log(1 - e^r)),
    each pair's loss is
        nll - lam * log σ(log_odds),    nll = -c
    (the chosen response's mean token NLL plus λ times the odds-ratio term; TRL's
    ORPOTrainer calls λ `beta` and takes the NLL as a token mean over the batch).

    Args:
        chosen_logps, rejected_logps: [batch] float32 summed response log-probs.
        chosen_lengths, rejected_lengths: [batch] float32 response token counts
            (at least 1 is used).
        lam: Python float, the weight of the odds-ratio term.

    Returns:
        (losses [batch], nll [batch], log_odds [batch]) float32.
    """
    c = jnp.minimum(_float(chosen_logps) / jnp.maximum(chosen_lengths, 1.0), ORPO_MAX_MEAN_LOGP)
    r = jnp.minimum(_float(rejected_logps) / jnp.maximum(rejected_lengths, 1.0), ORPO_MAX_MEAN_LOGP)
    log_odds = (c - r) - (_log1mexp(c) - _log1mexp(r))
    nll = -c
    return nll - lam * jax.nn.log_sigmoid(log_odds), nll, log_odds


def orpo_metrics(losses, nll, log_odds, chosen_logps, rejected_logps, chosen_lengths, rejected_lengths, *, lam):
    """Batch means of orpo_loss outputs under TRL's names; as in TRL, logps are the
    length-averaged log-probs and rewards λ times them."""
    chosen = jax.lax.stop_gradient(_float(chosen_logps) / jnp.maximum(chosen_lengths, 1.0))
    rejected = jax.lax.stop_gradient(_float(rejected_logps) / jnp.maximum(rejected_lengths, 1.0))
    return {
        "loss": jnp.mean(losses),
        "nll_loss": jnp.mean(nll),
        "log_odds_ratio": jnp.mean(jax.nn.log_sigmoid(log_odds)),
        "log_odds_chosen": jnp.mean(log_odds),
        "rewards/chosen": jnp.mean(lam * chosen),
        "rewards/rejected": jnp.mean(lam * rejected),
        "rewards/accuracies": jnp.mean((chosen > rejected).astype(jnp.float32)),
        "rewards/margins": jnp.mean(lam * (chosen - rejected)),
        "logps/chosen": jnp.mean(chosen),
        "logps/rejected": jnp.mean(rejected),
    }


# Reference-free preference with a likelihood term (CPO).


@dataclasses.dataclass(frozen=True)
class CPOConfig:
    """The `cpo` section (Xu et al. 2024, contrastive preference optimisation; TRL's CPOConfig names)."""

    beta: float = 0.1  # temperature of the preference term on summed log-probs (no reference)
    alpha: float = 1.0  # weight of the NLL on the chosen responses (TRL's cpo_alpha)
    shared_prefix: bool = False  # one row per pair, [prompt | chosen | rejected], as dpo.shared_prefix

    def __post_init__(self):
        if not self.beta > 0:
            raise ValueError(f"cpo.beta={self.beta} must be positive")
        if not self.alpha >= 0:
            raise ValueError(f"cpo.alpha={self.alpha} must be >= 0")


def cpo_loss(chosen_logps, rejected_logps, *, beta):
    """CPO's preference term (Xu et al. 2024, eq. 3; TRL's CPOTrainer with loss_type 'sigmoid'):
        -log σ(β (chosen_logps - rejected_logps))
    on summed response log-probs, with no reference model. The method adds the NLL of the
    chosen responses (`cpo.alpha`).

    Args:
        chosen_logps, rejected_logps: [batch] float32 summed response log-probs.
        beta: Python float.

    Returns:
        losses [batch] float32.
    """
    return -jax.nn.log_sigmoid(beta * (_float(chosen_logps) - rejected_logps))


def cpo_metrics(losses, nll, chosen_logps, rejected_logps, *, beta):
    """Batch metrics of cpo_loss under TRL's names; rewards are β times the summed log-probs."""
    chosen = jax.lax.stop_gradient(beta * _float(chosen_logps))
    rejected = jax.lax.stop_gradient(beta * _float(rejected_logps))
    return {
        "loss": jnp.mean(losses),
        "nll_loss": nll,
        "rewards/chosen": jnp.mean(chosen),
        "rewards/rejected": jnp.mean(rejected),
        "rewards/accuracies": jnp.mean((chosen > rejected).astype(jnp.float32)),
        "rewards/margins": jnp.mean(chosen - rejected),
        "logps/chosen": jnp.mean(chosen_logps),
        "logps/rejected": jnp.mean(rejected_logps),
    }
