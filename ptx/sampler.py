"""Sampling: logit filters, a decode loop that knows logits, and `generate`.

`decode` runs one `lax.while_loop` over a `step_fn(state, tokens, step) ->
(logits, state)`, so it is tested with scripted logits; `generate` plugs the
Transformer's KV cache into it after a single prefill forward. Row r's token
at step i is drawn with `fold_in(keys[r], i)`, so a row sampled in a batch
gets the same tokens as the row sampled alone with the same key.
"""
from typing import Any, Callable

import flax.struct
import jax
import jax.numpy as jnp

from ptx.model import ModelConfig, Transformer, init_cache

FINISH_EOS = 0
FINISH_STOP = 1
FINISH_LENGTH = 2


@flax.struct.dataclass
class SampleOutput:
    """What a decode returns.

    tokens: [b, max_new] int32, pad_id after each row's end.
    lengths: [b] int32 tokens kept (eos included; a stop sequence only with
      keep_stop).
    finish_reason: [b] int32, one of FINISH_EOS, FINISH_STOP, FINISH_LENGTH.
    logprobs: [b, max_new] float32 log-prob of each kept token under the
      unmodified distribution (log_softmax of the raw logits), 0 on padding.
    """

    tokens: jax.Array
    lengths: jax.Array
    finish_reason: jax.Array
    logprobs: jax.Array


def filter_logits(logits, *, temperature, top_k, top_p, min_p, rank: bool = True):
    """Temperature, then top-k / top-p / min-p truncation.

    logits: [..., V] any float dtype. Each setting is a scalar or an array
    broadcastable to logits.shape[:-1]:
      temperature: float, 0 = greedy (keep only the argmax, raw logit kept).
      top_k: int, 0 = off. top_p: float, 1.0 = off. min_p: float, 0 = off.
    All three filters are judged on the same temperature-scaled distribution
    and the kept set is their intersection; the most likely token is always
    kept. Ties are ordered by token id (lower id = more likely), which makes
    every cut deterministic.
    rank: static; False skips the sort over the vocabulary, valid only when
      no row uses top-k or top-p (min-p and greedy are cuts on the value).
    Returns [..., V] float32: logits / temperature on kept tokens, -inf elsewhere.
    """
    logits = logits.astype(jnp.float32)
    vocab = logits.shape[-1]
    batch = logits.shape[:-1]
    setting = lambda x, dt: jnp.broadcast_to(jnp.asarray(x, dt), batch)[..., None]
    temperature = setting(temperature, jnp.float32)
    top_k, top_p, min_p = setting(top_k, jnp.int32), setting(top_p, jnp.float32), setting(min_p, jnp.float32)
    greedy = temperature <= 0
    scaled = logits / jnp.where(greedy, 1.0, temperature)
    ids = jnp.broadcast_to(jnp.arange(vocab, dtype=jnp.int32), scaled.shape)
    if not rank:
        probs = jax.nn.softmax(scaled, axis=-1)
        keep = probs >= min_p * jnp.max(probs, axis=-1, keepdims=True)
        keep = jnp.where(greedy, ids == jnp.argmax(scaled, axis=-1)[..., None], keep)
        return jnp.where(keep, scaled, -jnp.inf)
    # One sort by (-logit, id): every filter keeps a prefix of this order, so
    # the kept set is "rank < n" for one per-row count n.
    neg_sorted, sorted_ids = jax.lax.sort((-scaled, ids), dimension=-1, num_keys=2)
    probs = jax.nn.softmax(-neg_sorted, axis=-1)
    mass_before = jnp.cumsum(probs, axis=-1) - probs
    n_k = jnp.where(top_k > 0, jnp.minimum(top_k, vocab), vocab)
    # top_p >= 1 is exactly "off": float error in the cumsum must not drop the tail.
    n_p = jnp.where(top_p >= 1, vocab, jnp.sum(mass_before < top_p, axis=-1, keepdims=True))
    n_m = jnp.sum(probs >= min_p * probs[..., :1], axis=-1, keepdims=True)
    n = jnp.maximum(jnp.where(greedy, 1, jnp.minimum(jnp.minimum(n_k, n_p), n_m)), 1)
    cut_value = -jnp.take_along_axis(neg_sorted, n - 1, axis=-1)
    cut_id = jnp.take_along_axis(sorted_ids, n - 1, axis=-1)
    keep = (scaled > cut_value) | ((scaled == cut_value) & (ids <= cut_id))
    return jnp.where(keep, scaled, -jnp.inf)


def sample_token(key, logits, *, temperature, top_k, top_p, min_p, rank: bool = True):
    """One draw from the filtered distribution.

    key: one PRNG key for the whole call. logits: [..., V]. Settings as in
    `filter_logits`. Returns [...] int32 ids; rows with temperature 0 get the
    exact argmax (lowest id among ties).
    """
    filtered = filter_logits(logits, temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p, rank=rank)
    sampled = jax.random.categorical(key, filtered, axis=-1)
    greedy = jnp.broadcast_to(jnp.asarray(temperature) <= 0, logits.shape[:-1])
    return jnp.where(greedy, jnp.argmax(filtered, axis=-1), sampled).astype(jnp.int32)


@flax.struct.dataclass
class _Carry:
    step: jax.Array  # int32 scalar: index of the next token to sample
    state: Any
    last: jax.Array  # [b] int32 token sampled at step - 1
    tokens: jax.Array  # [b, max_new] int32
    logprobs: jax.Array  # [b, max_new] float32
    recent: jax.Array  # [b, longest stop] int32 last sampled tokens, -1 before the start
    done: jax.Array  # [b] bool
    lengths: jax.Array  # [b] int32
    finish_reason: jax.Array  # [b] int32


def decode(step_fn: Callable, state, first_logits, keys, *, max_new_tokens: int,
           temperature=1.0, top_k=0, top_p=1.0, min_p=0.0, eos_id: int, pad_id: int = 0,
           stop_sequences: tuple = (), keep_stop: bool = False):
    """Sample up to max_new_tokens per row in one `lax.while_loop`.

    step_fn(state, tokens [b] int32, step int32 scalar) -> (logits [b, V], state):
      consumes the token sampled at `step` and returns the logits for step + 1.
      It is called only while a row is still running and a next step exists,
      so it runs (steps taken - 1) times.
    state: any pytree step_fn threads through (e.g. a KV cache).
    first_logits: [b, V] logits for step 0.
    keys: [b] PRNG keys; step i of row r draws with fold_in(keys[r], i).
    Settings: scalars or [b] arrays (see `filter_logits`).
    max_new_tokens, eos_id, pad_id, stop_sequences, keep_stop: static Python
      values. eos_id outside the vocabulary (e.g. -1) never matches.
    stop_sequences: tuple of non-empty token-id tuples, matched against the
      generated tokens only. If several end at the same step the longest one
      counts; an eos at that step takes precedence (FINISH_EOS, eos kept).
    Returns (SampleOutput, final state).
    """
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens={max_new_tokens}; expected >= 1")
    stops = tuple(tuple(int(t) for t in s) for s in stop_sequences)
    if any(not s for s in stops):
        raise ValueError("stop_sequences must not contain an empty sequence")
    b = first_logits.shape[0]
    row = lambda x, dt: jnp.broadcast_to(jnp.asarray(x, dt), (b,))
    settings = (row(temperature, jnp.float32), row(top_k, jnp.int32),
                row(top_p, jnp.float32), row(min_p, jnp.float32))
    draws = [jax.vmap(lambda key, logits, t, k, p, m, rank=rank: sample_token(
        key, logits, temperature=t, top_k=k, top_p=p, min_p=m, rank=rank)) for rank in (False, True)]
    # The vocabulary sort runs only when some row uses top-k or top-p: a batch-level
    # cond, since under vmap a per-row cond would run both branches.
    needs_rank = jnp.any(settings[1] > 0) | jnp.any(settings[2] < 1)
    draw = lambda *a: jax.lax.cond(needs_rank, draws[1], draws[0], *a)
    window = max((len(s) for s in stops), default=0)

    def record(c: _Carry, logits) -> _Carry:
        """Samples token c.step from logits [b, V] and updates the bookkeeping."""
        i = c.step
        tok = draw(jax.vmap(jax.random.fold_in, in_axes=(0, None))(keys, i), logits, *settings)
        logp = jnp.take_along_axis(jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1),
                                   tok[:, None], axis=-1)[:, 0]
        recent = jnp.concatenate([c.recent[:, 1:], tok[:, None]], axis=1)
        stop_len = jnp.zeros((b,), jnp.int32)
        for s in stops:
            hit = jnp.all(recent[:, window - len(s):] == jnp.asarray(s, jnp.int32), axis=1)
            stop_len = jnp.where(hit, jnp.maximum(stop_len, len(s)), stop_len)
        is_eos = tok == eos_id
        ends = ~c.done & (is_eos | (stop_len > 0))
        kept = i + 1 - jnp.where(is_eos | keep_stop, 0, stop_len)
        return c.replace(
            step=i + 1, last=tok,
            tokens=c.tokens.at[:, i].set(tok), logprobs=c.logprobs.at[:, i].set(logp),
            recent=recent, done=c.done | ends,
            lengths=jnp.where(ends, kept, c.lengths),
            finish_reason=jnp.where(ends, jnp.where(is_eos, FINISH_EOS, FINISH_STOP), c.finish_reason))

    def running(c: _Carry):
        return (c.step < max_new_tokens) & ~jnp.all(c.done)

    def body(c: _Carry) -> _Carry:
        logits, state = step_fn(c.state, c.last, c.step - 1)
        return record(c.replace(state=state), logits)

    init = _Carry(
        step=jnp.int32(0), state=state, last=jnp.zeros((b,), jnp.int32),
        tokens=jnp.full((b, max_new_tokens), pad_id, jnp.int32),
        logprobs=jnp.zeros((b, max_new_tokens), jnp.float32),
        recent=jnp.full((b, window), -1, jnp.int32), done=jnp.zeros((b,), bool),
        lengths=jnp.full((b,), max_new_tokens, jnp.int32),
        finish_reason=jnp.full((b,), FINISH_LENGTH, jnp.int32))
    # Step 0 is peeled so the loop never calls step_fn for logits nobody samples.
    c = jax.lax.while_loop(running, body, record(init, first_logits))
    kept = jnp.arange(max_new_tokens)[None, :] < c.lengths[:, None]
    out = SampleOutput(tokens=jnp.where(kept, c.tokens, pad_id), lengths=c.lengths,
                       finish_reason=c.finish_reason, logprobs=jnp.where(kept, c.logprobs, 0.0))
    return out, c.state


def left_align(prompt_tokens, prompt_lens):
    """Right-padded prompts -> rows that end at column P - 1.

    prompt_tokens: [b, P] int32; prompt_lens: [b] int32 in 1..P. Returns
    (tokens, positions, segment_ids), each [b, P] int32: padding in front has
    segment 0 (never attended) and real tokens keep positions 0..len-1.
    """
    width = prompt_tokens.shape[1]
    slots = jnp.arange(width, dtype=jnp.int32)[None, :]
    shift = (width - prompt_lens.astype(jnp.int32))[:, None]
    tokens = jnp.take_along_axis(prompt_tokens.astype(jnp.int32), (slots - shift) % width, axis=1)
    real = slots >= shift
    return tokens, jnp.where(real, slots - shift, 0), real.astype(jnp.int32)


def prefill(params, cfg: ModelConfig, prompt_tokens, prompt_lens, cache_length: int):
    """One forward over the prompts into a fresh KV cache.

    prompt_tokens: [b, P] int32 right-padded; prompt_lens: [b] int32, each in
    1..P. Rows are rolled right so every prompt ends at slot P - 1 (padding
    in front has segment 0 and is never attended; real tokens keep positions
    0..len-1), so all rows decode into the same cache slot at each step.
    cache_length: static, >= P.
    Returns (logits [b, V] float32 for the first new token, state) where state
    = (cache, prompt_lens) is what `model_step_fn`'s step_fn consumes.
    """
    b = prompt_tokens.shape[0]
    tokens, positions, segment_ids = left_align(prompt_tokens, prompt_lens)
    out = Transformer(cfg).apply(
        {"params": params}, tokens, positions, segment_ids,
        cache=init_cache(cfg, b, cache_length), cache_index=0, logits="last")
    return out.logits[:, -1].astype(jnp.float32), (out.cache, prompt_lens.astype(jnp.int32))


def model_step_fn(params, cfg: ModelConfig, prompt_width: int) -> Callable:
    """The Transformer's cached step for `decode`, after `prefill` of width P.

    step_fn((cache, prompt_lens), tokens [b] int32, step) writes token `step`
    at cache slot P + step with position prompt_len + step and returns its
    next-token logits [b, V] float32.
    """
    def step_fn(state, tokens, step):
        cache, prompt_lens = state
        out = Transformer(cfg).apply(
            {"params": params}, tokens[:, None], (prompt_lens + step)[:, None],
            jnp.ones_like(tokens)[:, None], cache=cache, cache_index=prompt_width + step)
        return out.logits[:, 0].astype(jnp.float32), (out.cache, prompt_lens)

    return step_fn


def generate(params, cfg: ModelConfig, prompt_tokens, prompt_lens, keys, *, max_new_tokens: int,
             temperature=1.0, top_k=0, top_p=1.0, min_p=0.0, eos_id: int, pad_id: int = 0,
             stop_sequences: tuple = (), keep_stop: bool = False) -> SampleOutput:
    """Sample continuations of right-padded prompts with the KV cache.

    prompt_tokens: [b, P] int32 right-padded; prompt_lens: [b] int32 in 1..P;
    keys: [b] PRNG keys (one per row). Settings: scalars or [b] arrays.
    max_new_tokens, eos_id, pad_id, stop_sequences, keep_stop are static (see
    `decode`). Traceable; `make_generate_fn` is the place it is jitted.
    """
    width = prompt_tokens.shape[1]
    # The last sampled token is never fed back, so max_new - 1 decode slots suffice.
    first_logits, state = prefill(params, cfg, prompt_tokens, prompt_lens, width + max_new_tokens - 1)
    out, _ = decode(model_step_fn(params, cfg, width), state, first_logits, keys,
                    max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k,
                    top_p=top_p, min_p=min_p, eos_id=eos_id, pad_id=pad_id,
                    stop_sequences=stop_sequences, keep_stop=keep_stop)
    return out


def make_generate_fn(cfg: ModelConfig, *, max_new_tokens: int, eos_id: int, pad_id: int = 0,
                     stop_sequences: tuple = (), keep_stop: bool = False) -> Callable:
    """`generate` jitted with its static arguments bound.

    Returns fn(params, prompt_tokens, prompt_lens, keys, temperature=1.0,
    top_k=0, top_p=1.0, min_p=0.0) -> SampleOutput; the settings are traced
    (scalars or [b] arrays), so changing them does not recompile. Inputs keep
    the shardings they arrive with (e.g. a batch-sharded mesh).
    """
    def fn(params, prompt_tokens, prompt_lens, keys, temperature=1.0, top_k=0, top_p=1.0, min_p=0.0):
        return generate(params, cfg, prompt_tokens, prompt_lens, keys, max_new_tokens=max_new_tokens,
                        temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p,
                        eos_id=eos_id, pad_id=pad_id, stop_sequences=stop_sequences,
                        keep_stop=keep_stop)

    return jax.jit(fn)
