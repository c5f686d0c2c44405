"""Token log-probabilities (from logits, or from hidden states and the LM head in token
chunks), entropy and masked reductions: the pieces every loss reads."""
import functools

import jax
import jax.numpy as jnp

__all__ = ["argmax", "chunked_token_logprobs", "masked_mean", "masked_sum", "masked_whiten", "sequence_logps",
           "token_entropy", "token_logprobs"]


def _float(x):
    """Casts to float32, or keeps float64: bf16 logits lose too much in a sum."""
    x = jnp.asarray(x)
    return x.astype(jnp.promote_types(x.dtype, jnp.float32))


def _check(value, allowed, what):
    if value not in allowed:
        raise ValueError(f"Unknown {what} {value!r}; expected one of {allowed}.")


# Token log-probabilities and masked reductions.


def token_logprobs(logits, targets):
    """Log-probability of each target token.

    Args:
        logits: [batch, seq, vocab] any float dtype.
        targets: [batch, seq] int32.

    Returns:
        [batch, seq] float32: log softmax(logits)[target].
    """
    logits = _float(logits)
    # Gather-then-logsumexp avoids writing a full [batch, seq, vocab] log-softmax.
    picked = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    return picked - jax.nn.logsumexp(logits, axis=-1)


def argmax(x):
    """jnp.argmax over the last axis (the lowest index among ties) as a max and a
    min-index reduction, which XLA's CPU backend vectorises, unlike the fused
    (value, index) reduce of jnp.argmax: [..., V] -> [...] int32."""
    hit = x == jnp.max(x, axis=-1, keepdims=True)
    ids = jnp.arange(x.shape[-1], dtype=jnp.int32)
    return jnp.minimum(jnp.min(jnp.where(hit, ids, x.shape[-1]), axis=-1), x.shape[-1] - 1)


def token_entropy(logits):
    """Entropy of the next-token distribution: [batch, seq, vocab] -> [batch, seq] float32."""
    logits = _float(logits)
    probs = jax.nn.softmax(logits, axis=-1)
    return jax.nn.logsumexp(logits, axis=-1) - jnp.sum(probs * logits, axis=-1)


def chunked_token_logprobs(hidden, head, targets, *, vocab_major=False, chunk_size=1024, entropy=False,
                           argmax=False, dtype=None):
    """`token_logprobs` (and `token_entropy`, `argmax`) of the LM head's logits, chunk_size tokens at a time.

    The largest buffers, forward and backward, are one chunk's [chunk_size,
    vocab] logits and their gradient: the [batch, seq, vocab] ones never exist.
    Every product reads the head in its stored layout (no transposed copy of it).

    Args:
        hidden: [batch, seq, d_model] final-norm hidden states, compute dtype
            (the model's `Output.hidden`; `model.lm_head` gives the head).
        head: [d_model, vocab], or [vocab, d_model] with vocab_major (a tied
            embedding table), in the parameter dtype; its gradient is summed over
            chunks in float32 and returned in that dtype.
        targets: [batch, seq] int32.
        chunk_size: tokens per chunk; the last one is padded.
        entropy: also return the entropies.
        argmax: also return the most likely token of each position (no gradient).
        dtype: of the head's products (operands cast to it, logits and their
            gradient in it); None = hidden's, as the model's head computes.

    Returns:
        [batch, seq] float32 log-probabilities; with entropy or argmax a tuple of
        those and then, in this order, what was asked for: [batch, seq] float32
        entropies, [batch, seq] int32 argmax ids (`argmax`: the lowest among ties).
    """
    b, t, d = hidden.shape
    n = b * t
    chunk = min(chunk_size, n)
    pad = -n % chunk
    h = jnp.pad(hidden.reshape(n, d), ((0, pad), (0, 0))).reshape(-1, chunk, d)
    y = jnp.pad(targets.reshape(n), (0, pad)).reshape(-1, chunk)
    dt = jnp.dtype(dtype or hidden.dtype)
    logps, ents, ids = _head_logprobs(h, head, y, vocab_major, entropy, argmax, dt)
    unchunk = lambda x: x.reshape(-1)[:n].reshape(b, t)
    extras = [unchunk(x) for x, asked in ((ents, entropy), (ids, argmax)) if asked]
    return (unchunk(logps), *extras) if extras else unchunk(logps)


# The head's products keep the head where a matmul reads it without a transposed
# copy ([M, K] on the left, [K, N] on the right): XLA's CPU backend copies a whole
# transposed table otherwise, once per product, and a copy of the vocabulary's
# weights is as large as all the chunks' logits were meant to save.
def _head_logits(h, w, vocab_major, dt):
    """h [chunk, d] and the head -> [chunk, vocab] float32 logits, the product in dt."""
    h, w = h.astype(dt), w.astype(dt)
    return _float(jnp.dot(w, h.T).T if vocab_major else jnp.dot(h, w))


def _head_grads(h, w, dz, vocab_major):
    """Gradients of h [chunk, d] and the head from dz [chunk, vocab] (dz's dtype): (dh, float32 dw)."""
    w = w.astype(dz.dtype)
    if vocab_major:
        return jnp.dot(dz, w), _float(jnp.dot(dz.T, h.astype(dz.dtype)))
    return jnp.dot(w, dz.T).T, _float(jnp.dot(h.astype(dz.dtype).T, dz))


# A custom gradient rather than jax.checkpoint around each chunk: the backward
# pass then holds the recomputed logits and their gradient only (the checkpointed
# chunk's autodiff kept about four [chunk, vocab] buffers, this about two).
@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5, 6))
def _head_logprobs(h, w, y, vocab_major, entropy, with_argmax, dt):
    """h: [chunks, chunk, d]; w: the head; y: [chunks, chunk] int32 -> ([chunks, chunk]
    log-probs, [chunks, chunk] entropies or None, [chunks, chunk] int32 argmax or None)."""
    return _head_logprobs_fwd(h, w, y, vocab_major, entropy, with_argmax, dt)[0]


def _head_logprobs_fwd(h, w, y, vocab_major, entropy, with_argmax, dt):
    def one(xs):
        h_c, y_c = xs
        z = _head_logits(h_c, w, vocab_major, dt)
        lse = jax.nn.logsumexp(z, axis=-1)
        logp = jnp.take_along_axis(z, y_c[:, None], axis=-1)[:, 0] - lse
        ent = lse - jnp.sum(jnp.exp(z - lse[:, None]) * z, axis=-1) if entropy else None
        # jnp.argmax (one fused reduction), not `argmax`: its select writes a [chunk, vocab] int32 buffer.
        return logp, ent, jnp.argmax(z, axis=-1).astype(jnp.int32) if with_argmax else None, lse

    logps, ents, ids, lse = jax.lax.map(one, (h, y))
    return (logps, ents, ids), (h, w, y, ents, lse)


def _head_logprobs_bwd(vocab_major, entropy, with_argmax, dt, res, grads):
    h, w, y, ents, lse = res
    g_logp, g_ent, _ = grads  # the argmax ids have no gradient

    def one(dw, xs):
        h_c, y_c, lse_c, g_c, ent_c, g_ent_c = xs
        logq = _head_logits(h_c, w, vocab_major, dt) - lse_c[:, None]  # log-softmax
        p = jnp.exp(logq)
        # d logp[y] / dz = onehot(y) - p;  d entropy / dz = -p (log p + entropy).
        dz = g_c[:, None] * ((jnp.arange(p.shape[-1]) == y_c[:, None]) - p)
        if entropy:
            dz = dz - g_ent_c[:, None] * p * (logq + ent_c[:, None])
        dz = dz.astype(dt)
        dh, dw_c = _head_grads(h_c, w, dz, vocab_major)
        return dw + dw_c, dh.astype(h.dtype)

    dw, dh = jax.lax.scan(one, _float(jnp.zeros(w.shape, w.dtype)), (h, y, lse, g_logp, ents, g_ent))
    return dh, dw.astype(w.dtype), None


_head_logprobs.defvjp(_head_logprobs_fwd, _head_logprobs_bwd)


def masked_sum(x, mask, axis=None):
    """Sum of x * mask over `axis` (all axes if None); x and mask broadcast."""
    # Padding may hold inf or NaN (e.g. -inf log-probs); 0 * inf would be NaN.
    return jnp.sum(jnp.where(mask > 0, x, 0.0) * mask, axis=axis)


def masked_mean(x, mask, axis=None):
    """sum(x * mask) / max(sum(mask), 1) over `axis`: 0, not NaN, when empty."""
    count = jnp.sum(jnp.broadcast_to(mask, jnp.shape(x)), axis=axis)
    return masked_sum(x, mask, axis) / jnp.maximum(count, 1.0)


def masked_whiten(x, mask, shift_mean=True):
    """(x - mean) / sqrt(var + 1e-8) with mean and unbiased var over masked entries.

    With shift_mean=False the mean is added back (only the scale changes).
    Same shape and dtype as x; masked-out entries are 0.
    """
    mean = masked_mean(x, mask)
    count = jnp.sum(jnp.broadcast_to(mask, jnp.shape(x)))
    var = masked_sum((x - mean) ** 2, mask) / jnp.maximum(count - 1.0, 1.0)
    whitened = (x - mean) * jax.lax.rsqrt(var + 1e-8)
    if not shift_mean:
        whitened = whitened + mean
    return jnp.where(mask > 0, whitened, 0.0)


def sequence_logps(token_logps, mask, *, normalize=False):
    """Per-sequence log-probability from per-token ones.

    Args:
        token_logps: [batch, seq] float32.
        mask: [batch, seq] float, 1 on response tokens.
        normalize: divide by the number of masked tokens (SimPO, IPO).

    Returns:
        [batch] float32.
    """
    if normalize:
        return masked_mean(token_logps, mask, axis=-1)
    return masked_sum(token_logps, mask, axis=-1)
