"""Supervised losses: SFT cross-entropy, the pairwise reward-model loss, the DPO family."""
import jax
import jax.numpy as jnp

from ptx.losses.tokens import _check, _float, argmax, masked_mean, token_logprobs

DPO_LOSS_TYPES = ("sigmoid", "ipo", "hinge", "simpo")


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
