"""Sampling: logit filters, a decode loop that knows logits, and `generate`.

`decode` runs one `lax.while_loop` over a `step_fn(state, tokens, step) ->
(logits, state)`, so it is tested with scripted logits; `generate` plugs the
Transformer's KV cache into it after a single prefill forward. Row r's token
at step i is drawn with `fold_in(keys[r], i)`, so a row sampled in a batch
gets the same tokens as the row sampled alone with the same key.
"""
import dataclasses
import functools
from typing import Any, Callable

import flax.struct
import jax
import jax.numpy as jnp

from ptx import fields
from ptx.losses import argmax
from ptx.model import ModelConfig, Transformer, init_cache, unstack_cache, unstack_layers

FINISH_EOS = 0
FINISH_STOP = 1
FINISH_LENGTH = 2
# Who decodes: static (this module's `generate`, the reference) | paged (`ptx.engine`: continuous
# batching over a paged KV cache); `engine.generate_fn` picks the maker.
ENGINES = ("static", "paged")


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
    """The `sampling` section of the stages that sample a checkpoint (sample, best-of-N, AI feedback)."""

    temperature: float = 1.0  # 0 = greedy
    top_k: int = 0  # 0 = off
    top_p: float = 1.0  # 1.0 = off
    min_p: float = 0.0  # 0 = off
    max_new_tokens: int = 64
    stop: tuple = ("\n\nHuman:",)  # stop strings (each one or more tokens); a tuple, so flags can set it
    keep_stop: bool = False  # keep the matched stop sequence in the output
    num_samples: int = 1  # completions per prompt
    # decoder: static | paged (ptx/engine.py: one device of one process for now, so static by default)
    engine: str = "static"

    def __post_init__(self):
        fields.check(self, "sampling", temperature=fields.NON_NEGATIVE, top_k=fields.COUNT, top_p=fields.TOP_P,
                     min_p=fields.PROBABILITY, max_new_tokens=fields.POSITIVE, stop=fields.STOPS,
                     keep_stop=fields.BOOL, num_samples=fields.POSITIVE, engine=fields.one_of(*ENGINES))


@flax.struct.dataclass
class SampleOutput:
    """What a decode returns.

    tokens: [b, max_new] int32, pad_id after each row's end.
    lengths: [b] int32 tokens kept (eos included; a stop sequence only with
      keep_stop).
    finish_reason: [b] int32, one of FINISH_EOS, FINISH_STOP, FINISH_LENGTH.
    logprobs: [b, max_new] float32 log-prob of each kept token under the
      unmodified distribution (log_softmax of the model's raw logits over its
      whole vocabulary, at temperature 1: what a teacher-forced forward
      computes), 0 on padding.
    entropy: [b, max_new] float32 entropy of that distribution at each kept
      token, 0 on padding.
    """

    tokens: jax.Array
    lengths: jax.Array
    finish_reason: jax.Array
    logprobs: jax.Array
    entropy: jax.Array


def _order_keys(x):
    """float32 [..., V] -> uint32 keys with the same order (-0.0 counts as +0.0; NaN unsupported)."""
    u = jax.lax.bitcast_convert_type(jnp.where(x == 0, 0.0, x), jnp.uint32)
    return jnp.where(u >> 31 == 1, ~u, u | jnp.uint32(1 << 31))


def _prefix_cut(keys, ids, weights, budget):
    """The longest prefix of the order (-key, id) in which every token's weight before it is < budget.

    keys: [..., 1, V] uint32 (from `_order_keys`); ids: [..., 1, V] int32 token ids;
    weights: [..., n, V] float32 >= 0, one row per cut; budget: [..., n, 1] float32 > 0.
    Two bisections instead of a sort: over keys for the cut value, then over ids
    among the tokens tied at it (no iteration when the cut value is unique).
    Returns (cut_key, cut_id), each [..., n, 1]: the prefix is
    key > cut_key | (key == cut_key & id <= cut_id).
    """
    above = lambda x: jnp.sum(jnp.where(keys > x, weights, 0.0), axis=-1, keepdims=True)
    shape = budget.shape
    unconverged = lambda lh: jnp.any(lh[0] < lh[1])

    def by_key(lh):  # the smallest key whose strictly-higher weight is < budget (above(max) = 0)
        lo, hi = lh
        mid = lo + (hi - lo) // 2
        ok = above(mid) < budget
        return jnp.where(ok, lo, mid + 1), jnp.where(ok, mid, hi)

    lo = jnp.broadcast_to(jnp.min(keys, axis=-1, keepdims=True), shape)
    hi = jnp.broadcast_to(jnp.max(keys, axis=-1, keepdims=True), shape)
    cut_key, _ = jax.lax.while_loop(unconverged, by_key, (lo, hi))
    before = above(cut_key)
    is_tied = keys == cut_key
    tied = jnp.where(is_tied, weights, 0.0)

    def by_id(lh):  # the largest id whose weight before it (ties by id) is < budget
        lo, hi = lh
        mid = hi - (hi - lo) // 2
        ok = before + jnp.sum(jnp.where(ids < mid, tied, 0.0), axis=-1, keepdims=True) < budget
        return jnp.where(ok, mid, lo), jnp.where(ok, hi, mid - 1)

    # The answer lies between the first tied id (nothing before it) and the last.
    lo = jnp.min(jnp.where(is_tied, ids, keys.shape[-1]), axis=-1, keepdims=True)
    hi = jnp.max(jnp.where(is_tied, ids, 0), axis=-1, keepdims=True)
    cut_id, _ = jax.lax.while_loop(unconverged, by_id, (lo, hi))
    return cut_key, cut_id


def filter_logits(logits, *, temperature, top_k, top_p, min_p, use_top_k: bool = True,
                  use_top_p: bool = True):
    """Temperature, then top-k / top-p / min-p truncation.

    logits: [..., V] any float dtype. Each setting is a scalar or an array
    broadcastable to logits.shape[:-1]:
      temperature: float, 0 = greedy (keep only the argmax, raw logit kept).
      top_k: int, 0 = off. top_p: float, 1.0 = off. min_p: float, 0 = off.
    All three filters are judged on the same temperature-scaled distribution
    and the kept set is their intersection; the most likely token is always
    kept. Ties are ordered by token id (lower id = more likely), which makes
    every cut deterministic: top-k keeps the first k tokens of the order
    (-logit, id), top-p every token whose probability mass before it in that
    order is < top_p. No sort: the cuts are found by bisection (`_prefix_cut`).
    use_top_k, use_top_p: static; False skips that cut, valid only when no row
      uses it (min-p and greedy are cheap cuts on the value).
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
    probs = jax.nn.softmax(scaled, axis=-1)
    top = ids == argmax(scaled)[..., None]  # the lowest id among ties
    keep = probs >= min_p * jnp.max(probs, axis=-1, keepdims=True)
    # One pair of bisections for both cuts: top-k weighs each token 1 with budget k,
    # top-p weighs it by its probability with budget top_p. An off row gets any
    # valid budget (> 0) and its cut is ignored.
    cuts = []
    if use_top_k:
        on = top_k > 0
        cuts.append((on, jnp.ones_like(probs), jnp.where(on, top_k, vocab).astype(jnp.float32)))
    if use_top_p:
        on = top_p < 1
        cuts.append((on, probs, jnp.where(on, jnp.maximum(top_p, jnp.finfo(jnp.float32).tiny), 1.0)))
    if cuts:
        on, weights, budget = (jnp.stack(x, axis=-2) for x in zip(*cuts))
        keys, ids_ = _order_keys(scaled)[..., None, :], ids[..., None, :]
        cut_key, cut_id = _prefix_cut(keys, ids_, weights, budget)
        prefix = (keys > cut_key) | ((keys == cut_key) & (ids_ <= cut_id))
        keep &= jnp.all(prefix | ~on, axis=-2)
    keep = jnp.where(greedy, top, keep | top)
    return jnp.where(keep, scaled, -jnp.inf)


def sample_token(key, logits, *, temperature, top_k, top_p, min_p, use_top_k: bool = True,
                 use_top_p: bool = True):
    """One draw from the filtered distribution.

    key: one PRNG key for the whole call. logits: [..., V]. Settings as in
    `filter_logits`. Returns [...] int32 ids; rows with temperature 0 get the
    exact argmax (lowest id among ties).
    """
    filtered = filter_logits(logits, temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p,
                             use_top_k=use_top_k, use_top_p=use_top_p)
    # jax.random.categorical's Gumbel-max draw, bit for bit, with the cheaper argmax. The
    # noise is finite, so a greedy row (one finite logit left) draws exactly its argmax.
    return argmax(filtered + jax.random.gumbel(key, filtered.shape, filtered.dtype))


@flax.struct.dataclass
class _Carry:
    step: jax.Array  # int32 scalar: index of the next token to sample
    state: Any
    last: jax.Array  # [b] int32 token sampled at step - 1
    tokens: jax.Array  # [b, max_new] int32
    logprobs: jax.Array  # [b, max_new] float32
    entropy: jax.Array  # [b, max_new] float32
    recent: jax.Array  # [b, longest stop] int32 last sampled tokens, -1 before the start
    done: jax.Array  # [b] bool
    lengths: jax.Array  # [b] int32
    finish_reason: jax.Array  # [b] int32


def decode(step_fn: Callable, state, first_logits, keys, *, max_new_tokens: int,
           temperature=1.0, top_k=0, top_p=1.0, min_p=0.0, eos_id: int | tuple, pad_id: int = 0,
           stop_sequences: tuple = (), keep_stop: bool = False, n_tokens: int | None = None):
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
      values. eos_id: an id or a tuple of ids, any of which ends a row (a chat
      model's stop ids); one outside the vocabulary (e.g. -1) never matches.
    stop_sequences: tuple of non-empty token-id tuples, matched against the
      generated tokens only. If several end at the same step the longest one
      counts; an eos at that step takes precedence (FINISH_EOS, eos kept).
    n_tokens: static; ids from n_tokens on are never sampled (a vocabulary
      padded beyond the tokenizer's), while log-probs and entropy stay those
      of the whole vocabulary, as a teacher-forced forward computes them.
    Returns (SampleOutput, final state).
    """
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens={max_new_tokens}; expected >= 1")
    stops = tuple(tuple(int(t) for t in s) for s in stop_sequences)
    eos_ids = (eos_id,) if isinstance(eos_id, int) else tuple(eos_id) or (-1,)
    if any(not s for s in stops):
        raise ValueError("stop_sequences must not contain an empty sequence")
    b = first_logits.shape[0]
    row = lambda x, dt: jnp.broadcast_to(jnp.asarray(x, dt), (b,))
    settings = (row(temperature, jnp.float32), row(top_k, jnp.int32),
                row(top_p, jnp.float32), row(min_p, jnp.float32))
    # The top-k / top-p cuts run only when some row uses them: a batch-level switch,
    # since under vmap a per-row cond would run every branch.
    draws = [jax.vmap(lambda key, logits, t, k, p, m, use_k=use_k, use_p=use_p: sample_token(
        key, logits, temperature=t, top_k=k, top_p=p, min_p=m, use_top_k=use_k, use_top_p=use_p))
        for use_k in (False, True) for use_p in (False, True)]
    branch = 2 * jnp.any(settings[1] > 0).astype(jnp.int32) + jnp.any(settings[2] < 1).astype(jnp.int32)
    draw = lambda *a: jax.lax.switch(branch, draws, *a)
    window = max((len(s) for s in stops), default=0)

    usable = None if n_tokens is None else jnp.arange(first_logits.shape[-1]) < n_tokens

    def record(c: _Carry, logits) -> _Carry:
        """Samples token c.step from logits [b, V] and updates the bookkeeping."""
        i = c.step
        drawable = logits if usable is None else jnp.where(usable, logits, -jnp.inf)
        tok = draw(jax.vmap(jax.random.fold_in, in_axes=(0, None))(keys, i), drawable, *settings)
        log_p = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
        logp = jnp.take_along_axis(log_p, tok[:, None], axis=-1)[:, 0]
        # p log p -> 0 as p -> 0; a -inf logit (scripted ones) would give 0 * -inf = NaN.
        ent = -jnp.sum(jnp.where(log_p > -jnp.inf, jnp.exp(log_p) * log_p, 0.0), axis=-1)
        recent = jnp.concatenate([c.recent[:, 1:], tok[:, None]], axis=1)
        stop_len = jnp.zeros((b,), jnp.int32)
        for s in stops:
            hit = jnp.all(recent[:, window - len(s):] == jnp.asarray(s, jnp.int32), axis=1)
            stop_len = jnp.where(hit, jnp.maximum(stop_len, len(s)), stop_len)
        is_eos = functools.reduce(jnp.logical_or, [tok == e for e in eos_ids])
        ends = ~c.done & (is_eos | (stop_len > 0))
        kept = i + 1 - jnp.where(is_eos | keep_stop, 0, stop_len)
        return c.replace(
            step=i + 1, last=tok,
            tokens=c.tokens.at[:, i].set(tok), logprobs=c.logprobs.at[:, i].set(logp),
            entropy=c.entropy.at[:, i].set(ent), recent=recent, done=c.done | ends,
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
        entropy=jnp.zeros((b, max_new_tokens), jnp.float32), recent=jnp.full((b, window), -1, jnp.int32),
        done=jnp.zeros((b,), bool),
        lengths=jnp.full((b,), max_new_tokens, jnp.int32),
        finish_reason=jnp.full((b,), FINISH_LENGTH, jnp.int32))
    # Step 0 is peeled so the loop never calls step_fn for logits nobody samples.
    c = jax.lax.while_loop(running, body, record(init, first_logits))
    kept = jnp.arange(max_new_tokens)[None, :] < c.lengths[:, None]
    out = SampleOutput(tokens=jnp.where(kept, c.tokens, pad_id), lengths=c.lengths,
                       finish_reason=c.finish_reason, logprobs=jnp.where(kept, c.logprobs, 0.0),
                       entropy=jnp.where(kept, c.entropy, 0.0))
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
    = (cache, prompt_lens) is what `model_step_fn`'s step_fn consumes (the
    cache one array per layer: `unstack_cache`).
    """
    b = prompt_tokens.shape[0]
    tokens, positions, segment_ids = left_align(prompt_tokens, prompt_lens)
    out = Transformer(cfg).apply(
        {"params": params}, tokens, positions, segment_ids,
        cache=init_cache(cfg, b, cache_length), cache_index=0, logits="last")
    return out.logits[:, -1].astype(jnp.float32), (unstack_cache(out.cache), prompt_lens.astype(jnp.int32))


def model_step_fn(params, cfg: ModelConfig, prompt_width: int) -> Callable:
    """The Transformer's cached step for `decode`, after `prefill` of width P.

    step_fn((cache, prompt_lens), tokens [b] int32, step) writes token `step`
    at cache slot P + step with position prompt_len + step and returns its
    next-token logits [b, V] float32. The layers run unrolled on their own
    weights, split from the stacks here, once (a copy of the layer weights for
    the whole decode loop): slicing them inside the loop would copy every
    layer's weights at every token.
    """
    return layered_step_fn(unstack_layers(params), cfg, prompt_width)


def layered_step_fn(layered, cfg: ModelConfig, prompt_width: int) -> Callable:
    """`model_step_fn` on weights already split per layer (`ptx.model.unstack_layers`)."""
    def step_fn(state, tokens, step):
        cache, prompt_lens = state
        out = Transformer(cfg, scan_layers=False).apply(
            {"params": layered}, tokens[:, None], (prompt_lens + step)[:, None],
            jnp.ones_like(tokens)[:, None], cache=cache, cache_index=prompt_width + step)
        return out.logits[:, 0].astype(jnp.float32), (out.cache, prompt_lens)

    return step_fn


def generate(params, cfg: ModelConfig, prompt_tokens, prompt_lens, keys, *, max_new_tokens: int,
             temperature=1.0, top_k=0, top_p=1.0, min_p=0.0, eos_id: int | tuple, pad_id: int = 0,
             stop_sequences: tuple = (), keep_stop: bool = False, n_tokens: int | None = None,
             group_size: int = 1) -> SampleOutput:
    """Sample continuations of right-padded prompts with the KV cache.

    prompt_tokens: [b, P] int32 right-padded; prompt_lens: [b] int32 in 1..P;
    keys: [b] PRNG keys (one per row). Settings: scalars or [b] arrays.
    max_new_tokens, eos_id, pad_id, stop_sequences, keep_stop are static (see
    `decode`). n_tokens: the tokenizer's size when the model's vocabulary is
    larger (padded): ids from n_tokens on are never sampled. group_size:
    static; rows come in groups of group_size consecutive copies of one prompt
    (b a multiple of it, as RL samples several completions per prompt): only
    each group's first row is prefilled and its KV cache is repeated over the
    group. Traceable; `make_generate_fn` is the place it is jitted.
    """
    b, width = prompt_tokens.shape
    if b % group_size:
        raise ValueError(f"{b} rows are not whole groups of group_size={group_size}")
    # The last sampled token is never fed back, so max_new - 1 decode slots suffice.
    first_logits, state = prefill(params, cfg, prompt_tokens[::group_size], prompt_lens[::group_size],
                                  width + max_new_tokens - 1)
    if group_size > 1:  # every leaf (logits, cache, prompt lengths) leads with the row axis
        first_logits, state = jax.tree.map(lambda x: jnp.repeat(x, group_size, axis=0), (first_logits, state))
    out, _ = decode(model_step_fn(params, cfg, width), state, first_logits, keys,
                    max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k,
                    top_p=top_p, min_p=min_p, eos_id=eos_id, pad_id=pad_id,
                    stop_sequences=stop_sequences, keep_stop=keep_stop,
                    n_tokens=n_tokens if n_tokens is not None and n_tokens < cfg.vocab_size else None)
    return out


def make_generate_fn(cfg: ModelConfig, *, max_new_tokens: int, eos_id: int | tuple, pad_id: int = 0,
                     stop_sequences: tuple = (), keep_stop: bool = False, n_tokens: int | None = None,
                     group_size: int = 1) -> Callable:
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
                        keep_stop=keep_stop, n_tokens=n_tokens, group_size=group_size)

    return jax.jit(fn)
