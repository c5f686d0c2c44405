"""ptx.engine: the paged, continuously batched decoder samples what the static sampler samples (same
keys, same tokens), its log-probs are the training forward's, a request's tokens do not depend on its
slot or batch-mates, preemption changes nothing, and a group prefills its prompt once; the sample
stage on one device writes with it what it writes with the static sampler."""
import json

import jax
import numpy as np
import pytest
from scipy import stats

from configs import sample as sample_config
from ptx import engine, sampler
from ptx.model import ModelConfig, Transformer, init_params
from ptx.stages import sample as sample_stage

from conftest import write_jsonl
from test_sampler import MIXED, forward_logits, log_softmax, reference_distribution, row_settings

CFG = ModelConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=64)
MAX_NEW = 10
EOS = 5
PAD = 0
PROMPT_LENS = np.array([6, 2, 4, 1], np.int32)
# Small pages and prefill chunks: prompts span pages and prefill in two chunks.
SMALL = dict(slots=4, page_size=4, chunk_steps=4, prefill_chunk=4)
GREEDY = row_settings(np.zeros(4), np.zeros(4), np.ones(4), np.zeros(4))


@pytest.fixture(scope="module")
def params():
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
def static_fn():
    return sampler.make_generate_fn(CFG, max_new_tokens=MAX_NEW, eos_id=EOS, pad_id=PAD)


@pytest.fixture(scope="module")
def paged_fn():
    return engine.make_generate_fn(CFG, max_new_tokens=MAX_NEW, eos_id=EOS, pad_id=PAD, **SMALL)


@pytest.fixture(scope="module")
def forward():
    return jax.jit(lambda p, tok, pos, seg: Transformer(CFG).apply({"params": p}, tok, pos, seg).logits)


def requests(prompts, keys, settings=MIXED, max_new=MAX_NEW, **kw):
    return [engine.Request(tuple(prompts[i, :PROMPT_LENS[i]].tolist()), keys[i], max_new,
                           *(float(settings[k][i]) if k != "top_k" else int(settings[k][i])
                             for k in ("temperature", "top_k", "top_p", "min_p")), **kw)
            for i in range(len(PROMPT_LENS))]


def assert_same(a, b):
    np.testing.assert_array_equal(a.tokens, b.tokens)
    np.testing.assert_array_equal(a.lengths, b.lengths)
    np.testing.assert_array_equal(a.finish_reason, b.finish_reason)
    np.testing.assert_allclose(a.logprobs, b.logprobs, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(a.entropy, b.entropy, rtol=1e-5, atol=1e-5)


def test_greedy_equals_static_sampler_and_iterated_argmax_of_full_forward(params, prompts, keys, static_fn,
                                                                          paged_fn, forward):
    out = paged_fn(params, prompts, PROMPT_LENS, keys, **GREEDY)
    assert_same(out, static_fn(params, prompts, PROMPT_LENS, keys, **GREEDY))
    tokens, lengths = np.asarray(out.tokens), np.asarray(out.lengths)
    full = forward_logits(forward, params, prompts, PROMPT_LENS, tokens, lengths)
    for r in range(len(PROMPT_LENS)):
        np.testing.assert_array_equal(tokens[r, :lengths[r]], full[r, :lengths[r]].argmax(-1))
    assert {sampler.FINISH_EOS, sampler.FINISH_LENGTH} <= set(np.asarray(out.finish_reason).tolist())


def test_sampled_tokens_equal_the_static_samplers_bit_for_bit(params, prompts, keys, static_fn, paged_fn):
    """Per-row temperature, top-k, top-p and min-p: the same keys draw the same tokens."""
    out = paged_fn(params, prompts, PROMPT_LENS, keys, **MIXED)
    assert_same(out, static_fn(params, prompts, PROMPT_LENS, keys, **MIXED))


@pytest.mark.parametrize("n_tokens", [None, 40])
def test_logprobs_and_entropy_equal_teacher_forced_full_forward(params, prompts, keys, forward, n_tokens):
    gen = engine.make_generate_fn(CFG, max_new_tokens=MAX_NEW, eos_id=EOS, pad_id=PAD, n_tokens=n_tokens, **SMALL)
    out = gen(params, prompts, PROMPT_LENS, keys, **MIXED)
    tokens, lengths = np.asarray(out.tokens), np.asarray(out.lengths)
    if n_tokens:
        assert tokens.max() < n_tokens
    full = forward_logits(forward, params, prompts, PROMPT_LENS, tokens, lengths)[:, :MAX_NEW]
    log_p = log_softmax(full)
    kept = np.arange(MAX_NEW)[None, :] < lengths[:, None]
    expected = np.take_along_axis(log_p, tokens[..., None], -1)[..., 0]
    np.testing.assert_allclose(out.logprobs, np.where(kept, expected, 0.0), rtol=1e-4, atol=1e-4)
    entropy = -np.sum(np.exp(log_p) * log_p, axis=-1)
    np.testing.assert_allclose(out.entropy, np.where(kept, entropy, 0.0), rtol=1e-4, atol=1e-4)


def test_a_requests_tokens_do_not_depend_on_its_slot_or_batch_mates(params, prompts, keys):
    reqs = requests(prompts, keys)
    base, _ = engine.Engine(CFG, eos_id=EOS, pad_id=PAD, **SMALL).run(params, reqs)
    # Reversed, among extra requests, through two slots: other slots, buckets and neighbours.
    extra = requests(prompts[::-1], jax.random.split(jax.random.key(9), 4))
    mixed, stats = engine.Engine(CFG, eos_id=EOS, pad_id=PAD, **dict(SMALL, slots=2)).run(
        params, extra[:2] + reqs[::-1] + extra[2:])
    for a, b in zip(base, mixed[2:6][::-1]):
        np.testing.assert_array_equal(a.tokens, b.tokens)
        np.testing.assert_allclose(a.logprobs, b.logprobs, rtol=1e-5, atol=1e-5)
        assert a.finish_reason == b.finish_reason
    assert stats["chunks"] > 2  # slots were refilled


def test_stop_sequences_stop_ids_and_per_request_max_new_tokens_match_the_static_sampler(params, prompts, keys):
    keep_stop = False  # the harder case: a stop sequence is cut from the kept tokens
    stops = ((6, 7), (9,), (33,))
    max_new = [MAX_NEW, 3, 7, 1]
    hot = row_settings(np.full(4, 1.5), np.zeros(4), np.ones(4), np.zeros(4))
    reqs = [engine.Request(r.prompt, r.key, m, r.temperature, stop_ids=(12,) if i == 2 else ())
            for i, (r, m) in enumerate(zip(requests(prompts, keys, hot), max_new))]
    got, _ = engine.Engine(CFG, eos_id=EOS, pad_id=PAD, stop_sequences=stops, keep_stop=keep_stop,
                           **SMALL).run(params, reqs)
    for i, (c, m) in enumerate(zip(got, max_new)):
        want = sampler.make_generate_fn(CFG, max_new_tokens=m, eos_id=(EOS, 12) if i == 2 else EOS, pad_id=PAD,
                                        stop_sequences=stops, keep_stop=keep_stop)(
            params, prompts[i:i + 1], PROMPT_LENS[i:i + 1], keys[i:i + 1], temperature=1.5)
        n = int(want.lengths[0])
        np.testing.assert_array_equal(c.tokens, np.asarray(want.tokens[0, :n]))
        assert c.finish_reason == int(want.finish_reason[0]) and len(c.tokens) <= m
        np.testing.assert_allclose(c.logprobs, np.asarray(want.logprobs[0, :n]), rtol=1e-5, atol=1e-5)


def test_a_tiny_pool_preempts_and_recomputes_with_unchanged_results(params, prompts, keys):
    reqs = requests(prompts, keys, max_new=MAX_NEW)
    roomy, roomy_stats = engine.Engine(CFG, eos_id=-1, pad_id=PAD, **SMALL).run(params, reqs)
    # 5 usable pages of 4 tokens: one request alone needs up to 4, all four at once 11.
    tight, stats = engine.Engine(CFG, eos_id=-1, pad_id=PAD, **dict(SMALL, pages=6)).run(params, reqs)
    assert roomy_stats.get("preemptions", 0) == 0 and stats["preemptions"] > 0
    assert stats["peak_pages"] <= 5
    for a, b in zip(roomy, tight):
        np.testing.assert_array_equal(a.tokens, b.tokens)
        np.testing.assert_allclose(a.logprobs, b.logprobs, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="pages"):  # too long for the pool: an error, never a truncation
        engine.Engine(CFG, eos_id=-1, pad_id=PAD, **dict(SMALL, pages=3)).run(params, reqs)


def test_a_group_prefills_its_prompt_once_and_samples_as_prefilling_every_copy(params, prompts):
    g, rows = 3, np.repeat(np.arange(len(PROMPT_LENS)), 3)
    keys = jax.random.split(jax.random.key(3), len(rows))
    settings = {k: v[rows] for k, v in MIXED.items()}
    static = sampler.make_generate_fn(CFG, max_new_tokens=MAX_NEW, eos_id=EOS, pad_id=PAD, group_size=g)(
        params, prompts[rows], PROMPT_LENS[rows], keys, **settings)
    grouped = engine.make_generate_fn(CFG, max_new_tokens=MAX_NEW, eos_id=EOS, pad_id=PAD, group_size=g, **SMALL)
    each = engine.make_generate_fn(CFG, max_new_tokens=MAX_NEW, eos_id=EOS, pad_id=PAD, **SMALL)
    out = grouped(params, prompts[rows], PROMPT_LENS[rows], keys, **settings)
    assert_same(out, static)
    assert_same(out, each(params, prompts[rows], PROMPT_LENS[rows], keys, **settings))
    assert grouped.stats["prefill_tokens"] == PROMPT_LENS.sum()
    assert each.stats["prefill_tokens"] == g * PROMPT_LENS.sum()


def test_a_later_turn_appends_to_the_kept_pages_without_prefilling_again(params, prompts, keys):
    eng = engine.Engine(CFG, eos_id=-1, pad_id=PAD, **SMALL)
    greedy = dict(temperature=0.0)
    first = engine.Request(tuple(prompts[0, :6].tolist()), keys[0], 5, keep=True, **greedy)
    (turn1,), _ = eng.run(params, [first])
    in_use = eng.alloc.in_use
    assert turn1.handle is not None and in_use == 3  # 6 prompt + 4 fed tokens in pages of 4
    user = (11, 12, 13)
    (turn2,), stats = eng.run(params, [engine.Request(user, keys[1], 6, parent=turn1.handle, **greedy)])
    assert stats["prefill_tokens"] == 1 + len(user)  # turn 1's last token, then the new ones
    whole = engine.Request(first.prompt + tuple(turn1.tokens.tolist()) + user, keys[1], 6, **greedy)
    (again,), _ = engine.Engine(CFG, eos_id=-1, pad_id=PAD, **SMALL).run(params, [whole])
    np.testing.assert_array_equal(turn2.tokens, again.tokens)
    np.testing.assert_allclose(turn2.logprobs, again.logprobs, rtol=1e-5, atol=1e-5)
    assert eng.alloc.in_use == in_use  # turn 2's pages freed; turn 1's kept until released
    eng.release(turn1.handle)
    assert eng.alloc.in_use == 0


def test_first_token_distribution_passes_the_total_variation_test(params, prompts, forward):
    """2048 completions of one prompt (one group: one prefill) under two settings."""
    n, settings = 1024, [(0.8, 6, 0.9, 0.05), (1.3, 0, 1.0, 0.1)]
    prompt = tuple(prompts[0, :PROMPT_LENS[0]].tolist())
    keys = jax.random.key_data(jax.random.split(jax.random.key(5), 2 * n))
    reqs = [engine.Request(prompt, keys[i], 1, *settings[i % 2], group=0) for i in range(2 * n)]
    got, st = engine.Engine(CFG, eos_id=EOS, pad_id=PAD, slots=64, page_size=4).run(params, reqs)
    assert st["prefill_tokens"] == len(prompt)
    logits = forward_logits(forward, params, prompts[:1], PROMPT_LENS[:1], np.zeros((1, MAX_NEW), np.int32),
                            np.zeros(1, np.int32))[0, 0]
    draws = np.array([c.tokens[0] for c in got])
    for s, setting in enumerate(settings):
        expected = reference_distribution(logits, *setting)
        counts = np.bincount(draws[s::2], minlength=CFG.vocab_size)
        assert counts[expected == 0].sum() == 0, setting
        assert 0.5 * np.abs(counts / n - expected).sum() < 0.09, setting
        support = expected > 0
        assert stats.chisquare(counts[support], n * expected[support]).pvalue > 1e-4, setting


def test_page_pool_counts_references_and_never_hands_out_the_null_page():
    pool = engine.PagePool(4)
    a = pool.alloc(3)
    assert engine.NULL_PAGE not in a and pool.alloc(1) is None
    pool.share(a[:1])
    pool.release(a)
    assert pool.in_use == 1 and pool.alloc(3) is None
    pool.release(a[:1])
    assert pool.in_use == 0 and sorted(pool.alloc(3)) == [1, 2, 3]


def test_slot_buckets_are_within_one_and_a_half_of_the_need():
    sizes = [engine._size_up(n) for n in range(1, 65)]
    assert sizes[:8] == [1, 2, 3, 4, 6, 6, 8, 8] and sizes[-1] == 64
    assert all(n <= s <= max(2, 1.5 * n) for n, s in zip(range(1, 65), sizes))
    assert [engine._size_down(n) for n in (1, 2, 8, 64)] == [0, 1, 6, 48]


@pytest.mark.stage
def test_the_sample_stage_with_engine_paged_on_one_device_writes_the_static_samplers_samples(sft_dir, tmp_path):
    """configs/sample.py:tiny with sampling.engine=paged and mesh.data=1 on one device: samples.jsonl
    as the static sampler writes it (sampled, 2 per prompt); on all 8 devices paged is refused."""
    prompts = write_jsonl(tmp_path / "prompts.jsonl",
                          [{"prompt": f"What is {a} + {b}?"} for a, b in ((1, 2), (3, 4), (5, 0))])
    out = {}
    for kind in ("static", "paged"):
        c = sample_config.get_config("tiny")
        c.checkpoint, c.prompts, c.mesh.data = sft_dir, prompts, 1
        c.sampling.num_samples, c.sampling.engine = 2, kind
        with open(sample_stage.run(c, str(tmp_path / kind), devices=jax.devices()[:1])) as f:
            out[kind] = f.read()
    assert out["paged"] == out["static"] and len(out["static"].splitlines()) == 6
    rows = [json.loads(line) for line in out["static"].splitlines()]
    assert {r["finish_reason"] for r in rows} == {"eos", "length"}  # sampled: both kinds of end
    c.mesh.data = -1
    with pytest.raises(ValueError, match=r"sampling\.engine='paged' runs on one device"):
        sample_stage.run(c, str(tmp_path / "eight"))
