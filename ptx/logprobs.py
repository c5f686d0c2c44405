"""What every loss reads of the LM head: log-probabilities of target tokens (and entropy, argmax),
and the batch layouts' summed log-probs and scalar-head scores built on them.

One forward to the final hidden states, then the head on the columns a loss
reads: in the forward when their [batch, n, vocab] logits fit one chunk of
`chunk_tokens(cfg)` tokens (the plain forward's logits bit for bit when n is
every column), else chunk by chunk with
`losses.chunked_token_logprobs`, whose largest buffers forward and backward are
one chunk's logits and their gradient (equal within float tolerance).
"""
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp

from ptx import losses, sampler
from ptx.model import ModelConfig, Transformer, lm_head

# Logits per chunk under loss_chunk = 0: 256 MiB in float32 (151,936 words: 441 tokens).
AUTO_CHUNK_LOGITS = 2**26


def chunk_tokens(cfg: ModelConfig) -> int:
    """Tokens per chunk of the LM head: `cfg.loss_chunk`, or 0 = AUTO_CHUNK_LOGITS // vocab_size."""
    return cfg.loss_chunk or max(1, AUTO_CHUNK_LOGITS // cfg.vocab_size)


@flax.struct.dataclass
class TokenStats:
    """logps: [b, n] float32 log-probabilities of the targets. entropy: [b, n]
    float32 or None. argmax: [b, n] int32 (the lowest id among ties) or None.
    values: [b, n] float32 from the scalar head, or None."""

    logps: Any
    entropy: Any
    argmax: Any
    values: Any


def token_stats(model: Transformer, params, tokens, positions, segment_ids, targets, *, branch_ids=None,
                start: int = 0, entropy: bool = False, argmax: bool = False) -> TokenStats:
    """The LM head at columns start .. start + n - 1 of one forward, read at `targets`.

    tokens, positions, segment_ids: [b, t] int32, branch_ids: [b, t] int32 or None
    (`Transformer.__call__`).
    targets: [b, n] int32, the tokens those n columns predict. entropy, argmax:
    also compute them (else None). Columns outside the range reach no head.
    """
    cfg = model.cfg
    b = tokens.shape[0]
    n = targets.shape[1]
    chunk = chunk_tokens(cfg)
    whole = b * n <= chunk  # the read columns' logits fit one chunk
    cols = slice(start, start + n)
    out = model.apply({"params": params}, tokens, positions, segment_ids, branch_ids=branch_ids,
                      logits=cols if whole else False)
    values = None if out.values is None else out.values[:, cols]
    if whole:
        logits = out.logits
        return TokenStats(logps=losses.token_logprobs(logits, targets),
                          entropy=losses.token_entropy(logits) if entropy else None,
                          argmax=losses.argmax(logits) if argmax else None, values=values)
    head, vocab_major = lm_head(cfg, params)
    # XLA's CPU backend computes a bfloat16 product in float32 anyway, through float32
    # copies of its operands (here the whole head): take the float32 head as it is.
    dtype = jnp.float32 if jax.default_backend() == "cpu" else None
    res = losses.chunked_token_logprobs(out.hidden[:, cols], head, targets, vocab_major=vocab_major,
                                        chunk_size=chunk, entropy=entropy, argmax=argmax, dtype=dtype)
    res = res if isinstance(res, tuple) else (res,)
    ent = res[1] if entropy else None
    ids = res[-1] if argmax else None
    return TokenStats(logps=res[0], entropy=ent, argmax=ids, values=values)



def batch_token_stats(model: Transformer, params, batch, **kw) -> TokenStats:
    """`token_stats` of a sequence batch's targets (inputs / targets / positions / segment_ids [b, t] int32)."""
    return token_stats(model, params, batch["inputs"], batch["positions"], batch["segment_ids"], batch["targets"],
                       **kw)


def pair_batch(batch):
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
    rows = batch if shared else pair_batch(batch)
    start = rows["inputs"].shape[1] - rows["targets"].shape[1]
    logps = token_stats(model, params, rows["inputs"], rows["positions"], rows["segment_ids"], rows["targets"],
                        branch_ids=rows.get("branch_ids"), start=start).logps
    if shared:
        masks = batch["chosen_loss_mask"], batch["rejected_loss_mask"]
        return (tuple(losses.sequence_logps(logps, m) for m in masks),
                tuple(jnp.maximum(m.sum(-1), 1.0) for m in masks))
    seq = losses.sequence_logps(logps, rows["loss_mask"])
    lengths = jnp.maximum(rows["loss_mask"].sum(-1), 1.0)
    return jnp.split(seq, 2), jnp.split(lengths, 2)


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
    stats = token_stats(model, params, seq["tokens"], seq["positions"], seq["segment_ids"], seq["completion"],
                        start=width - 1)
    return losses.sequence_logps(stats.logps, seq["mask"])
