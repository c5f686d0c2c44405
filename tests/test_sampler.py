"""ptx.sampler: filters match an exact reference, cached decoding matches the
full forward, rows are independent of their batch, stops end rows exactly."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec
from scipy import stats

from ptx import sampler, sharding
from ptx.model import ModelConfig, Transformer, init_params

CFG = ModelConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=64)
MAX_NEW = 10
EOS = 5  # with these params and keys, some rows end by EOS and some by length
PAD = 0
# Right-padded prompts of different lengths, as the data module produces.
PROMPT_LENS = np.array([6, 2, 4, 1], np.int32)


# ---------------------------------------------------------------- references

def reference_distribution(logits, temperature, top_k, top_p, min_p):
    """Exact sampling distribution [V] float64, written independently of ptx."""
    logits = np.asarray(logits, np.float64)
    vocab = logits.shape[0]
    if temperature == 0:
        out = np.zeros(vocab)
        out[np.argmax(logits)] = 1.0  # np.argmax returns the lowest id among ties
        return out
    z = logits / temperature
    p = np.exp(z - z.max())
    p /= p.sum()
    order = np.lexsort((np.arange(vocab), -z))  # most likely first, ties by id
    keep = np.ones(vocab, bool)
    if top_k > 0:
        keep[order[top_k:]] = False
    if top_p < 1.0:
        # The smallest most-likely-first prefix whose mass reaches top_p.
        reaching = np.nonzero(np.cumsum(p[order]) >= top_p)[0]
        if reaching.size:
            keep[order[reaching[0] + 1:]] = False
    keep &= p >= min_p * p.max()
    q = np.where(keep, p, 0.0)
    return q / q.sum()


def forward_logits(forward, params, prompts, prompt_lens, new_tokens, new_lens):
    """Full forward (no cache) over each row's prompt + new tokens, right-padded.

    Returns [b, 1 + MAX_NEW, V] float32: entry t is the next-token logits after
    the prompt and the first t new tokens (the distribution token t came from).
    """
    b = prompts.shape[0]
    width = prompts.shape[1] + MAX_NEW
    seq = np.zeros((b, width), np.int32)
    seg = np.zeros((b, width), np.int32)
    for r in range(b):
        row = np.concatenate([prompts[r, :prompt_lens[r]], new_tokens[r, :new_lens[r]]])
        seq[r, :len(row)], seg[r, :len(row)] = row, 1
    positions = np.broadcast_to(np.arange(width, dtype=np.int32), (b, width))
    logits = np.asarray(forward(params, seq, positions, seg))
    idx = prompt_lens[:, None] - 1 + np.arange(1 + MAX_NEW)[None, :]
    return np.take_along_axis(logits, idx[:, :, None], axis=1)


def log_softmax(x):
    x = np.asarray(x, np.float64)
    m = x.max(-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(-1, keepdims=True))


def row_settings(temperature, top_k, top_p, min_p):
    return dict(temperature=jnp.asarray(temperature, jnp.float32), top_k=jnp.asarray(top_k, jnp.int32),
                top_p=jnp.asarray(top_p, jnp.float32), min_p=jnp.asarray(min_p, jnp.float32))


# ---------------------------------------------------------------- fixtures

@pytest.fixture(scope="module")
def params():
    # Scaled up from the 0.02 init so the next-token distributions are peaked
    # and varied (not near-uniform): filters bite and some rows hit EOS.
    return jax.tree.map(lambda x: 4.0 * x, jax.jit(init_params, static_argnums=0)(CFG, jax.random.key(0)))


@pytest.fixture(scope="module")
def prompts():
    rng = np.random.default_rng(0)
    tokens = rng.integers(1, CFG.vocab_size, (len(PROMPT_LENS), PROMPT_LENS.max())).astype(np.int32)
    tokens[np.arange(tokens.shape[1])[None, :] >= PROMPT_LENS[:, None]] = PAD
    return tokens


@pytest.fixture(scope="module")
def keys():
    return jax.random.split(jax.random.key(42), len(PROMPT_LENS))


@pytest.fixture(scope="module")
def generate_fn():
    return sampler.make_generate_fn(CFG, max_new_tokens=MAX_NEW, eos_id=EOS, pad_id=PAD)


@pytest.fixture(scope="module")
def forward():
    return jax.jit(lambda p, tok, pos, seg: Transformer(CFG).apply({"params": p}, tok, pos, seg).logits)


@pytest.fixture(scope="module")
def filt():
    return jax.jit(sampler.filter_logits)


@pytest.fixture(scope="module")
def draw_many():
    """Samples [n_keys, rows] for logits [rows, V] with per-row settings."""
    def draw(keys, logits, settings):
        return jax.vmap(lambda k: sampler.sample_token(k, logits, **settings))(keys)
    return jax.jit(draw)


# ---------------------------------------------------------------- filters

LOGITS = np.array([1.2, 0.3, 2.0, 2.0, -0.5, 0.9, 1.7, -1.0, 0.0, 1.1, -2.0, 0.6], np.float32)
# (temperature, top_k, top_p, min_p): one row each, all in one batch.
SETTINGS = [(1.0, 0, 1.0, 0.0), (0.7, 4, 1.0, 0.0), (1.3, 0, 0.8, 0.0),
            (1.0, 0, 1.0, 0.2), (0.8, 6, 0.9, 0.05), (2.0, 3, 1.0, 0.0)]


def test_sample_token_matches_exact_distribution_with_per_row_settings(draw_many):
    n = 20000
    logits = jnp.broadcast_to(LOGITS, (len(SETTINGS), LOGITS.size))
    draws = np.asarray(draw_many(jax.random.split(jax.random.key(1), n), logits,
                                 row_settings(*zip(*SETTINGS))))
    for r, setting in enumerate(SETTINGS):
        expected = reference_distribution(LOGITS, *setting)
        counts = np.bincount(draws[:, r], minlength=LOGITS.size)
        assert counts[expected == 0].sum() == 0, (setting, counts, expected)
        support = expected > 0
        assert 0.5 * np.abs(counts / n - expected).sum() < 0.02, setting
        assert stats.chisquare(counts[support], n * expected[support]).pvalue > 1e-4, setting


def test_top_k_1_and_temperature_0_are_argmax_with_lowest_id_among_ties(draw_many):
    # Ids 2 and 3 tie for the maximum: the lower id wins every time.
    logits = jnp.broadcast_to(LOGITS, (2, LOGITS.size))
    draws = np.asarray(draw_many(jax.random.split(jax.random.key(2), 500), logits,
                                 row_settings([1.0, 0.0], [1, 0], [1.0, 1.0], [0.0, 0.0])))
    assert (draws == 2).all()


def test_filter_top_p_1_keeps_everything_and_small_top_p_keeps_only_the_top_token(filt):
    full = filt(LOGITS, temperature=1.0, top_k=0, top_p=1.0, min_p=0.0)
    np.testing.assert_allclose(full, LOGITS)
    peaked = np.array([5.0, 1.0, 0.0, 1.0], np.float32)
    top_prob = np.exp(5) / np.exp(peaked).sum()
    only_top = filt(peaked, temperature=1.0, top_k=0, top_p=top_prob - 0.01, min_p=0.0)
    assert np.isfinite(only_top).tolist() == [True, False, False, False]


def test_filter_ties_are_cut_by_token_id(filt):
    tied = np.array([0.0, 3.0, 3.0, 3.0, 1.0], np.float32)
    keep = lambda **kw: np.isfinite(filt(tied, **{
        **dict(temperature=1.0, top_k=0, top_p=1.0, min_p=0.0), **kw})).nonzero()[0].tolist()
    assert keep(temperature=0.0) == [1]
    assert keep(top_k=2) == [1, 2]
    # Each tied token holds ~0.31 of the mass: 0.5 needs two of them.
    assert keep(top_p=0.5) == [1, 2]
    assert keep(min_p=0.5) == [1, 2, 3]


def test_filter_under_vmap_equals_batched_call(filt):
    rng = np.random.default_rng(3)
    logits = rng.normal(size=(len(SETTINGS), 12)).astype(np.float32)
    settings = row_settings(*zip(*SETTINGS))
    batched = filt(logits, **settings)
    mapped = jax.jit(jax.vmap(lambda x, s: sampler.filter_logits(x, **s)))(logits, settings)
    np.testing.assert_array_equal(batched, mapped)
    scaled = logits / np.array([s[0] for s in SETTINGS], np.float32)[:, None]
    np.testing.assert_allclose(np.where(np.isfinite(batched), batched, 0),
                               np.where(np.isfinite(batched), scaled, 0), rtol=1e-6)


def sorted_filter(logits, temperature, top_k, top_p, min_p):
    """The filter written with one sort by (-logit, id): the reference for the sort-free one."""
    logits = jnp.asarray(logits, jnp.float32)
    vocab = logits.shape[-1]
    setting = lambda x, dt: jnp.asarray(x, dt)[..., None]
    temperature, top_k = setting(temperature, jnp.float32), setting(top_k, jnp.int32)
    top_p, min_p = setting(top_p, jnp.float32), setting(min_p, jnp.float32)
    greedy = temperature <= 0
    scaled = logits / jnp.where(greedy, 1.0, temperature)
    ids = jnp.broadcast_to(jnp.arange(vocab, dtype=jnp.int32), scaled.shape)
    neg_sorted, sorted_ids = jax.lax.sort((-scaled, ids), dimension=-1, num_keys=2)
    probs = jax.nn.softmax(-neg_sorted, axis=-1)
    mass_before = jnp.cumsum(probs, axis=-1) - probs
    n_k = jnp.where(top_k > 0, jnp.minimum(top_k, vocab), vocab)
    n_p = jnp.where(top_p >= 1, vocab, jnp.sum(mass_before < top_p, axis=-1, keepdims=True))
    n_m = jnp.sum(probs >= min_p * probs[..., :1], axis=-1, keepdims=True)
    n = jnp.maximum(jnp.where(greedy, 1, jnp.minimum(jnp.minimum(n_k, n_p), n_m)), 1)
    cut_value = -jnp.take_along_axis(neg_sorted, n - 1, axis=-1)
    cut_id = jnp.take_along_axis(sorted_ids, n - 1, axis=-1)
    keep = (scaled > cut_value) | ((scaled == cut_value) & (ids <= cut_id))
    return jnp.where(keep, scaled, -jnp.inf)


def test_sort_free_filter_equals_sorted_reference_on_random_logits_with_ties(filt):
    rng = np.random.default_rng(7)
    rows, vocab = 4096, 97
    # Few distinct values, so most cuts fall inside a run of tied tokens; some
    # rows also hold -inf (masked tokens) and -0.0 next to 0.0.
    logits = (rng.integers(-6, 7, (rows, vocab)) / rng.choice([1.0, 2.0, 4.0], (rows, 1))).astype(np.float32)
    logits[rng.random((rows, vocab)) < 0.05] = -np.inf
    logits[rng.random((rows, vocab)) < 0.02] = -0.0
    logits[: rows // 4] += rng.normal(0, 0.5, (rows // 4, vocab)).astype(np.float32)  # some rows without ties
    temperature = rng.choice([0.0, 0.5, 0.7, 1.0, 1.5], rows).astype(np.float32)
    top_k = np.where(rng.random(rows) < 0.5, rng.integers(0, vocab + 5, rows), 0).astype(np.int32)
    top_p = np.where(rng.random(rows) < 0.7, rng.choice([0.0, 1e-9, 0.3, 0.5, 0.9, 0.99, 1.0, 1.5], rows),
                     rng.random(rows)).astype(np.float32)
    min_p = np.where(rng.random(rows) < 0.3, rng.random(rows), 0.0).astype(np.float32)
    got = np.asarray(filt(logits, temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p))
    want = np.asarray(jax.jit(sorted_filter)(logits, temperature, top_k, top_p, min_p))
    np.testing.assert_array_equal(np.isfinite(got), np.isfinite(want))
    np.testing.assert_array_equal(got, want)
    # The settings exercise every cut: none, down to one token, and cuts through a run of ties.
    kept = np.isfinite(got)
    assert (kept.sum(-1) == 1).any() and (kept.sum(-1) == np.isfinite(logits).sum(-1)).any()
    lowest_kept = np.where(kept, got, np.inf).min(-1, keepdims=True)
    scaled = np.where(np.isfinite(want), want, logits / np.where(temperature > 0, temperature, 1.0)[:, None])
    split_ties = ((scaled == lowest_kept) & ~kept).any(-1)
    assert split_ties.sum() > rows // 10


def test_sort_free_filter_matches_exact_distribution_on_a_large_vocabulary(filt):
    rng = np.random.default_rng(11)
    vocab = 8192
    logits = np.round(rng.normal(0, 3, (8, vocab)), 1).astype(np.float32)  # many ties
    settings = [(1.0, 0, 0.9, 0.0), (0.8, 50, 1.0, 0.0), (1.0, 0, 0.5, 0.0), (1.2, 1000, 0.95, 0.01),
                (1.0, vocab + 1, 1.0, 0.0), (0.0, 0, 1.0, 0.0), (1.0, 1, 0.2, 0.0), (1.0, 3, 0.999, 0.5)]
    got = np.asarray(filt(logits, **row_settings(*zip(*settings))))
    for r, setting in enumerate(settings):
        want = reference_distribution(logits[r], *setting) > 0
        np.testing.assert_array_equal(np.isfinite(got[r]), want, err_msg=str(setting))


# ---------------------------------------------------------------- decode loop (scripted logits)

STOPS = ((5, 6, 7), (6, 7), (9,), (8, 1))
SCRIPT_EOS = 1
# Row streams (the greedy token at each step) and where each should end.
STREAMS = np.array([
    [2, 3, 1, 4, 4, 4, 4, 4, 4, 4],  # eos at step 2
    [2, 5, 6, 7, 3, 3, 3, 3, 3, 3],  # (5, 6, 7) and (6, 7) end at step 3: the longer counts
    [5, 6, 3, 5, 6, 8, 2, 2, 2, 2],  # partial matches only: runs to the length limit
    [9, 2, 2, 2, 2, 2, 2, 2, 2, 2],  # single-token stop at step 0
    [4, 6, 7, 2, 2, 2, 2, 2, 2, 2],  # (6, 7) ends at step 2
    [3, 8, 1, 2, 2, 2, 2, 2, 2, 2],  # eos completes (8, 1): eos takes precedence
], np.int32)
# (length with keep_stop, length without, finish reason) per row.
ENDS = [(3, 3, sampler.FINISH_EOS), (4, 1, sampler.FINISH_STOP), (10, 10, sampler.FINISH_LENGTH),
        (1, 0, sampler.FINISH_STOP), (3, 1, sampler.FINISH_STOP), (3, 3, sampler.FINISH_EOS)]


def scripted_table(streams, vocab=16, seed=0):
    """Logits [b, steps, V] whose argmax at step i is streams[:, i], plus noise."""
    noise = np.random.default_rng(seed).normal(size=streams.shape + (vocab,))
    return (noise + 10.0 * np.eye(vocab)[streams]).astype(np.float32)


def scripted_step(table):
    """step_fn over a fixed table; state = (calls, tokens fed at each step)."""
    def step_fn(state, tokens, step):
        calls, fed = state
        return table[:, step + 1], (calls + 1, fed.at[:, step].set(tokens))
    return step_fn


@pytest.fixture(scope="module")
def scripted_decode():
    """decode with greedy settings over a table; jitted once per keep_stop."""
    def run(table, keep_stop):
        b = table.shape[0]
        state = (jnp.int32(0), jnp.full((b, MAX_NEW), -1, jnp.int32))
        return sampler.decode(scripted_step(table), state, table[:, 0], jax.random.split(jax.random.key(0), b),
                              max_new_tokens=MAX_NEW, temperature=0.0, eos_id=SCRIPT_EOS, pad_id=PAD,
                              stop_sequences=STOPS, keep_stop=keep_stop)
    return {keep: jax.jit(lambda t, keep=keep: run(t, keep)) for keep in (True, False)}


@pytest.mark.parametrize("keep_stop", [True, False])
def test_eos_and_stop_sequences_end_rows_exactly_where_they_occur(scripted_decode, keep_stop):
    table = scripted_table(STREAMS)
    out, (calls, fed) = scripted_decode[keep_stop](table)
    lengths = np.array([e[0] if keep_stop else e[1] for e in ENDS])
    np.testing.assert_array_equal(out.lengths, lengths)
    np.testing.assert_array_equal(out.finish_reason, [e[2] for e in ENDS])
    kept = np.arange(MAX_NEW)[None, :] < lengths[:, None]
    np.testing.assert_array_equal(out.tokens, np.where(kept, STREAMS, PAD))
    np.testing.assert_allclose(
        out.logprobs, np.where(kept, np.take_along_axis(log_softmax(table), STREAMS[..., None], -1)[..., 0], 0),
        rtol=1e-5, atol=1e-5)
    # step_fn was fed each sampled token in order, one call per step after the first.
    assert int(calls) == MAX_NEW - 1
    np.testing.assert_array_equal(np.asarray(fed)[:, :MAX_NEW - 1], STREAMS[:, :MAX_NEW - 1])


def test_decode_loop_stops_calling_step_fn_once_every_row_is_done(scripted_decode):
    streams = STREAMS[[0, 3, 4, 5]]  # the last of these rows ends at step 2
    out, (calls, fed) = scripted_decode[False](scripted_table(streams))
    assert int(calls) == 2
    assert (np.asarray(fed)[:, 2:] == -1).all()
    np.testing.assert_array_equal(out.lengths, [3, 0, 1, 3])


def test_any_of_several_eos_ids_ends_a_row(scripted_decode):
    """A chat model stops on any of its stop ids (Llama 3: <|eot_id|>, <|eom_id|>, <|end_of_text|>)."""
    streams = np.array([[5, 6, 7] + [8] * 7, [5, 11] + [12] * 8, [5] + [6] * 9])  # [3, MAX_NEW]
    table = scripted_table(streams)
    b = len(streams)
    out, _ = jax.jit(lambda t: sampler.decode(
        scripted_step(t), (jnp.int32(0), jnp.full((b, MAX_NEW), -1, jnp.int32)), t[:, 0],
        jax.random.split(jax.random.key(0), b), max_new_tokens=MAX_NEW, temperature=0.0, eos_id=(7, 11),
        pad_id=PAD))(table)
    np.testing.assert_array_equal(out.lengths, [3, 2, MAX_NEW])  # the eos is kept, as a single eos_id is
    np.testing.assert_array_equal(out.finish_reason, [sampler.FINISH_EOS, sampler.FINISH_EOS, sampler.FINISH_LENGTH])


# ---------------------------------------------------------------- generate with the model

@pytest.fixture(scope="module")
def cached_logits():
    """Prefill + model_step_fn teacher-forced over `forced` [b, MAX_NEW]: [b, 1 + MAX_NEW, V]."""
    def run(params, prompts, prompt_lens, forced):
        width = prompts.shape[1]
        first, state = sampler.prefill(params, CFG, prompts, prompt_lens, width + MAX_NEW)
        step_fn = sampler.model_step_fn(params, CFG, width)

        def body(state, step):
            logits, state = step_fn(state, forced[:, step], step)
            return state, logits
        _, rest = jax.lax.scan(body, state, jnp.arange(MAX_NEW))
        return jnp.concatenate([first[:, None], rest.swapaxes(0, 1)], axis=1)
    return jax.jit(run)


def test_cached_decode_equals_full_forward(params, prompts, cached_logits, forward):
    forced = np.random.default_rng(5).integers(0, CFG.vocab_size, (len(PROMPT_LENS), MAX_NEW)).astype(np.int32)
    cached = np.asarray(cached_logits(params, prompts, PROMPT_LENS, forced))
    full = forward_logits(forward, params, prompts, PROMPT_LENS, forced, np.full(len(PROMPT_LENS), MAX_NEW))
    np.testing.assert_allclose(cached, full, rtol=1e-5, atol=1e-5)


def test_greedy_generate_equals_iterated_argmax_of_full_forward(params, prompts, keys, generate_fn, forward):
    b = len(PROMPT_LENS)
    out = generate_fn(params, prompts, PROMPT_LENS, keys, **row_settings(np.zeros(b), np.zeros(b),
                                                                         np.ones(b), np.zeros(b)))
    tokens, lengths = np.asarray(out.tokens), np.asarray(out.lengths)
    full = forward_logits(forward, params, prompts, PROMPT_LENS, tokens, lengths)
    for r in range(b):
        # Token t is the argmax after prompt + tokens[:t]: by induction, iterated argmax.
        np.testing.assert_array_equal(tokens[r, :lengths[r]], full[r, :lengths[r]].argmax(-1))
        ended_by_eos = EOS in tokens[r, :lengths[r]]
        assert out.finish_reason[r] == (sampler.FINISH_EOS if ended_by_eos else sampler.FINISH_LENGTH)
        assert lengths[r] == (list(tokens[r]).index(EOS) + 1 if ended_by_eos else MAX_NEW)
    assert {sampler.FINISH_EOS, sampler.FINISH_LENGTH} <= set(np.asarray(out.finish_reason).tolist())


def test_ids_beyond_the_tokenizer_are_never_sampled_and_greedy_takes_the_best_usable(params, prompts, keys,
                                                                                        forward):
    """A model vocabulary padded beyond the tokenizer's pieces (n_tokens < vocab_size)."""
    n_tokens, b = 40, len(PROMPT_LENS)
    gen = sampler.make_generate_fn(CFG, max_new_tokens=MAX_NEW, eos_id=EOS, pad_id=PAD, n_tokens=n_tokens)
    hot = gen(params, prompts, PROMPT_LENS, keys, **row_settings(np.full(b, 3.0), np.zeros(b), np.ones(b),
                                                                 np.zeros(b)))
    assert np.asarray(hot.tokens).max() < n_tokens
    out = gen(params, prompts, PROMPT_LENS, keys, **row_settings(np.zeros(b), np.zeros(b), np.ones(b),
                                                                 np.zeros(b)))
    tokens, lengths = np.asarray(out.tokens), np.asarray(out.lengths)
    full = forward_logits(forward, params, prompts, PROMPT_LENS, tokens, lengths)
    for r in range(b):
        np.testing.assert_array_equal(tokens[r, :lengths[r]], full[r, :lengths[r], :n_tokens].argmax(-1))
    # Unpadded, a temperature-3 draw does reach the ids the tokenizer lacks.
    free = sampler.make_generate_fn(CFG, max_new_tokens=MAX_NEW, eos_id=EOS, pad_id=PAD)(
        params, prompts, PROMPT_LENS, keys, **row_settings(np.full(b, 3.0), np.zeros(b), np.ones(b), np.zeros(b)))
    assert np.asarray(free.tokens).max() >= n_tokens


MIXED = row_settings([1.0, 0.7, 1.5, 1.0], [0, 5, 0, 0], [1.0, 1.0, 0.9, 1.0], [0.0, 0.0, 0.0, 0.1])


def test_batched_rows_equal_rows_sampled_alone(params, prompts, keys, generate_fn):
    batch = generate_fn(params, prompts, PROMPT_LENS, keys, **MIXED)
    # Alone, each row also gets a different amount of right padding (one compile).
    wider = np.pad(prompts, ((0, 0), (0, 3)), constant_values=PAD)
    for r in range(len(PROMPT_LENS)):
        alone = generate_fn(params, wider[r:r + 1], PROMPT_LENS[r:r + 1], keys[r:r + 1],
                            **{k: v[r:r + 1] for k, v in MIXED.items()})
        np.testing.assert_array_equal(alone.tokens[0], batch.tokens[r])
        assert alone.lengths[0] == batch.lengths[r] and alone.finish_reason[0] == batch.finish_reason[r]
        np.testing.assert_allclose(alone.logprobs[0], batch.logprobs[r], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("n_tokens", [None, 40])
def test_logprobs_and_entropy_equal_teacher_forced_full_forward(params, prompts, keys, generate_fn, forward,
                                                               n_tokens):
    # With a padded vocabulary (n_tokens < vocab) the draw skips the padding ids but the log-probs
    # stay those of the whole vocabulary: the distribution the RL loss recomputes.
    gen = generate_fn if n_tokens is None else sampler.make_generate_fn(
        CFG, max_new_tokens=MAX_NEW, eos_id=EOS, pad_id=PAD, n_tokens=n_tokens)
    out = gen(params, prompts, PROMPT_LENS, keys, **MIXED)
    tokens, lengths = np.asarray(out.tokens), np.asarray(out.lengths)
    full = forward_logits(forward, params, prompts, PROMPT_LENS, tokens, lengths)[:, :MAX_NEW]
    log_p = log_softmax(full)
    expected = np.take_along_axis(log_p, tokens[..., None], -1)[..., 0]
    kept = np.arange(MAX_NEW)[None, :] < lengths[:, None]
    np.testing.assert_allclose(out.logprobs, np.where(kept, expected, 0.0), rtol=1e-5, atol=1e-5)
    entropy = -np.sum(np.exp(log_p) * log_p, axis=-1)
    np.testing.assert_allclose(out.entropy, np.where(kept, entropy, 0.0), rtol=1e-5, atol=1e-5)
    assert (tokens[~kept] == PAD).all()
    assert {sampler.FINISH_EOS, sampler.FINISH_LENGTH} <= set(np.asarray(out.finish_reason).tolist())


def test_generate_on_batch_sharded_mesh_equals_unsharded(params, prompts, keys, generate_fn):
    mesh = Mesh(np.array(jax.devices()[:len(PROMPT_LENS)]), ("data",))
    shard = lambda x: jax.device_put(x, NamedSharding(mesh, PartitionSpec("data")))
    sharded = generate_fn(params, shard(prompts), shard(PROMPT_LENS), shard(keys),
                          **{k: shard(v) for k, v in MIXED.items()})
    plain = generate_fn(params, prompts, PROMPT_LENS, keys, **MIXED)
    np.testing.assert_array_equal(sharded.tokens, plain.tokens)
    np.testing.assert_array_equal(sharded.lengths, plain.lengths)


@pytest.mark.parametrize("shape", [(1, 2, 4), (2, 2, 2), (1, 8, 1)])
def test_generate_under_a_tensor_parallel_mesh_equals_unsharded(params, prompts, generate_fn, shape):
    # As the run loops sample: parameters laid out by the rules, rows split over the data
    # axes, and the mesh set so the model constrains its activations and KV cache.
    mesh = sharding.make_mesh(sharding.MeshConfig(*shape))
    rows = np.arange(8) % len(PROMPT_LENS)
    batch = {"t": prompts[rows], "n": PROMPT_LENS[rows], "k": jax.random.split(jax.random.key(7), 8),
             **{k: v[rows] for k, v in MIXED.items()}}
    plain = generate_fn(params, batch["t"], batch["n"], batch["k"], **{k: batch[k] for k in MIXED})
    with jax.set_mesh(mesh):
        placed = sharding.put_global(batch, mesh)
        out = generate_fn(jax.device_put(params, sharding.param_shardings(params, CFG, mesh)), placed["t"], placed["n"],
                          placed["k"], **{k: placed[k] for k in MIXED})
    np.testing.assert_array_equal(out.tokens, plain.tokens)
    np.testing.assert_array_equal(out.lengths, plain.lengths)
    np.testing.assert_allclose(out.logprobs, plain.logprobs, rtol=1e-5, atol=1e-5)
    assert {sampler.FINISH_EOS, sampler.FINISH_LENGTH} <= set(np.asarray(out.finish_reason).tolist())


@pytest.mark.parametrize("shape", [None, (8, 1, 1), (1, 2, 4)])
def test_group_prefill_samples_as_prefilling_every_copy(params, prompts, shape):
    # Two completions per prompt, as RL samples them: prefilled once per group and the cache
    # repeated, the rows draw the same tokens as when every copy is prefilled. On the (8, 1, 1)
    # mesh the 4 prefilled rows do not divide the 8 data-parallel devices.
    g, rows = 2, np.repeat(np.arange(len(PROMPT_LENS)), 2)
    batch = {"t": prompts[rows], "n": PROMPT_LENS[rows], "k": jax.random.split(jax.random.key(3), len(rows)),
             **{k: v[rows] for k, v in MIXED.items()}}
    settings = lambda b: {k: b[k] for k in MIXED}
    each = sampler.make_generate_fn(CFG, max_new_tokens=MAX_NEW, eos_id=EOS, pad_id=PAD)(
        params, batch["t"], batch["n"], batch["k"], **settings(batch))
    grouped = sampler.make_generate_fn(CFG, max_new_tokens=MAX_NEW, eos_id=EOS, pad_id=PAD, group_size=g)
    if shape is None:
        out = grouped(params, batch["t"], batch["n"], batch["k"], **settings(batch))
    else:
        mesh = sharding.make_mesh(sharding.MeshConfig(*shape))
        with jax.set_mesh(mesh):
            placed = sharding.put_global(batch, mesh)
            out = grouped(jax.device_put(params, sharding.param_shardings(params, CFG, mesh)), placed["t"],
                          placed["n"], placed["k"], **settings(placed))
    np.testing.assert_array_equal(out.tokens, each.tokens)
    np.testing.assert_array_equal(out.lengths, each.lengths)
    np.testing.assert_array_equal(out.finish_reason, each.finish_reason)
    np.testing.assert_allclose(out.logprobs, each.logprobs, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(out.entropy, each.entropy, rtol=1e-5, atol=1e-5)
    # Copies of one prompt drew with their own keys: a group's rows differ.
    assert any((out.tokens[i] != out.tokens[i + 1]).any() for i in range(0, len(rows), g))
