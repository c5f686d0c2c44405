"""What every loss reads of the LM head: log-probabilities of target tokens (and entropy, argmax).

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

from ptx import losses
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

