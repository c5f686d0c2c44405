"""Unpaired losses: rows labelled desirable or undesirable, no pairs (KTO, BCO), and beside each
method its config section (a frozen dataclass, as in `supervised`)."""
import dataclasses

import jax
import jax.numpy as jnp

from ptx.losses.tokens import _float, masked_mean

__all__ = ["BCOConfig", "KTOConfig", "bco_loss", "bco_metrics", "bco_running_mean", "kto_loss", "kto_metrics",
           "unpaired_metrics"]


@dataclasses.dataclass(frozen=True)
class KTOConfig:
    """The `kto` section (Ethayarajh et al. 2024; TRL's KTOConfig names)."""

    beta: float = 0.1  # strength of the implicit KL to the reference
    desirable_weight: float = 1.0  # λ_D: weight of desirable rows (raise it when they are rarer)
    undesirable_weight: float = 1.0  # λ_U: weight of undesirable rows

    def __post_init__(self):
        if self.beta <= 0 or self.desirable_weight <= 0 or self.undesirable_weight <= 0:
            raise ValueError(f"kto.beta={self.beta}, kto.desirable_weight={self.desirable_weight} and "
                             f"kto.undesirable_weight={self.undesirable_weight} must be positive")


def kto_loss(policy_logps, ref_logps, kl_policy_logps, kl_ref_logps, labels, *, beta,
             desirable_weight=1.0, undesirable_weight=1.0):
    """Kahneman-Tversky optimisation (Ethayarajh et al. 2024) on unpaired feedback.

    With r = policy_logps - ref_logps (the implicit reward, summed over the
    completion's tokens) and the reference point
        z0 = max(mean(kl_policy_logps - kl_ref_logps), 0),
    a batch estimate of KL(policy || reference) from mismatched prompt /
    completion pairs, held constant (no gradient flows into it), each row's loss is
        desirable:   desirable_weight   * (1 - σ(β (r - z0)))
        undesirable: undesirable_weight * (1 - σ(β (z0 - r)))
    as in the paper and TRL's KTOTrainer.

    Args:
        policy_logps, ref_logps: [batch] float32 summed completion log-probs of
            each row's own (prompt, completion).
        kl_policy_logps, kl_ref_logps: [batch] float32 the same for mismatched
            pairs (prompt i with another row's completion).
        labels: [batch] bool or {0, 1}: 1 = desirable.
        beta, desirable_weight, undesirable_weight: Python floats.

    Returns:
        (losses [batch] float32, z0 scalar float32).
    """
    policy_logps = _float(policy_logps)
    z0 = jax.lax.stop_gradient(jnp.maximum(jnp.mean(_float(kl_policy_logps) - kl_ref_logps), 0.0))
    r = policy_logps - ref_logps
    good = jnp.asarray(labels).astype(bool)
    losses = jnp.where(good, desirable_weight * (1.0 - jax.nn.sigmoid(beta * (r - z0))),
                       undesirable_weight * (1.0 - jax.nn.sigmoid(beta * (z0 - r))))
    return losses, z0


def unpaired_metrics(losses, policy_logps, ref_logps, labels, *, beta):
    """Batch metrics of an unpaired loss (KTO, BCO) under TRL's names: rewards (β r) and log-probs
    averaged over the desirable ('chosen') and undesirable ('rejected') rows; [batch] inputs."""
    good = jnp.asarray(labels).astype(jnp.float32)
    bad = 1.0 - good
    rewards = jax.lax.stop_gradient(beta * (_float(policy_logps) - ref_logps))
    chosen, rejected = masked_mean(rewards, good), masked_mean(rewards, bad)
    return {
        "loss": jnp.mean(losses),
        "rewards/chosen": chosen,
        "rewards/rejected": rejected,
        "rewards/margins": chosen - rejected,
        "logps/chosen": masked_mean(policy_logps, good),
        "logps/rejected": masked_mean(policy_logps, bad),
        "count/chosen": jnp.sum(good),
        "count/rejected": jnp.sum(bad),
    }


def kto_metrics(losses, policy_logps, ref_logps, labels, z0, *, beta):
    """`unpaired_metrics` of kto_loss, 'kl' the z0 used."""
    return dict(unpaired_metrics(losses, policy_logps, ref_logps, labels, beta=beta), kl=z0)


# Unpaired rows as a binary classifier with a running reward shift (BCO).


@dataclasses.dataclass(frozen=True)
class BCOConfig:
    """The `bco` section (Jung et al. 2024, binary classifier optimisation; TRL's BCOConfig names)."""

    beta: float = 0.1  # scale of the implicit reward β log(π / π_ref), the classifier's logit

    def __post_init__(self):
        if not self.beta > 0:
            raise ValueError(f"bco.beta={self.beta} must be positive")


def bco_loss(policy_logps, ref_logps, labels, delta, *, beta):
    """BCO (Jung et al. 2024; TRL's BCOTrainer without its density-ratio matching) on unpaired rows:
    a binary classifier whose logit is the implicit reward r = β (policy_logps - ref_logps) less
    the reward shift δ (the running mean reward, `bco_running_mean`; no gradient flows into it):
        desirable:   -log σ(r - δ)
        undesirable: -log σ(-(r - δ))

    Args:
        policy_logps, ref_logps: [batch] float32 summed completion log-probs.
        labels: [batch] bool or {0, 1}: 1 = desirable.
        delta: scalar float32.
        beta: Python float.

    Returns:
        losses [batch] float32.
    """
    z = beta * (_float(policy_logps) - ref_logps) - jax.lax.stop_gradient(delta)
    return -jax.nn.log_sigmoid(jnp.where(jnp.asarray(labels).astype(bool), z, -z))


def bco_running_mean(carry, rewards):
    """BCO's reward shift after a batch: TRL's RunningMoments.update with one observation, the
    batch's mean implicit reward (no gradient). carry: {'mean', 'count'} float32 scalars (count 0
    before the first batch); rewards: [batch]. Returns the next carry; its 'mean' is δ."""
    x = jax.lax.stop_gradient(jnp.mean(_float(rewards)))
    count = carry["count"] + 1.0
    return {"mean": carry["mean"] + (x - carry["mean"]) / count, "count": count}


def bco_metrics(losses, policy_logps, ref_logps, labels, delta, *, beta):
    """`unpaired_metrics` of bco_loss, 'delta' the shift used."""
    return dict(unpaired_metrics(losses, policy_logps, ref_logps, labels, beta=beta), delta=delta)
