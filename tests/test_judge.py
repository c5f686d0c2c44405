"""AI feedback: option-token probabilities, order debiasing, d-RLAIF scores, labelled pairs, the stage."""
import functools
import json
import os
import random
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import ai_feedback as ai_feedback_config
from configs import sft as sft_config
from ptx import data, inference, judge, sharding, world
from ptx.model import ModelConfig, Transformer, abstract_params, init_params
from ptx.stages import ai_feedback, common, supervised
from ptx.tokenizer import train_tokenizer

PRINCIPLES = ("A good answer is correct.", "A good answer is short.")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """The world's files, a tokenizer trained on its text and one response pair per held-out prompt."""
    d = tmp_path_factory.mktemp("judge")
    w = world.World()
    files = w.write(str(d / "world"))
    rows = [json.loads(line) for name in ("pretrain", "sft") for line in open(files[name])]
    tok = train_tokenizer(common.texts_of(rows), vocab_size=512, path=str(d / "tokenizer.model"))
    rng = random.Random(0)
    prompts = [r["prompt"] for r in w.heldout_prompts()[::9]][:7]
    # One prompt in the Human/Assistant template: the judge sees the bare request either way.
    prompts[0] = common.template(sft_config.get_config("tiny")).format_prompt(prompts[0])
    good = [w.good_response(p) for p in prompts]
    bad = [w.bad_response(p, rng, rng.choice(w.bad_styles(p))) for p in prompts]
    return {"dir": d, "files": files, "tok": tok, "world": w, "prompts": prompts, "good": good, "bad": bad}


@pytest.fixture(scope="module")
def policy(setup):
    """A tiny random model, its weights scaled up so that its verdicts are confident and position-biased."""
    cfg = ModelConfig(vocab_size=512, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=64)
    mesh = sharding.make_mesh(sharding.MeshConfig(data=-1, fsdp=1, tensor=1))
    scaled = lambda rng: jax.tree_util.tree_map_with_path(
        lambda path, x: x if sharding.path_str(path).endswith("scale") else x * 25.0, init_params(cfg, rng))
    params = jax.jit(scaled, out_shardings=sharding.param_shardings(abstract_params(cfg), cfg, mesh))(
        jax.random.PRNGKey(0))
    return inference.Policy(cfg, params, setup["tok"], mesh)


_REFERENCE_WIDTH = 160


def last_logits(policy, ids):
    """Logits [vocab] after one sequence alone: a plain forward, default positions and segments.

    Tokens after the last one cannot change its logits (the model is causal),
    so filling every sequence up to one width compiles the forward once.
    """
    assert len(ids) <= _REFERENCE_WIDTH
    tokens = jnp.asarray([ids + [policy.tok.pad_id] * (_REFERENCE_WIDTH - len(ids))], jnp.int32)
    return _plain_forward(policy.cfg)(policy.params, tokens)[0, len(ids) - 1]


@functools.cache
def _plain_forward(cfg):
    return jax.jit(lambda params, tokens: Transformer(cfg).apply({"params": params}, tokens).logits)


class ContentJudge(judge.Judge):
    """Logits that depend on what the answers say, never on where they stand: no position bias."""

    def option_logits(self, texts, prefix, option_ids):
        answers = [re.search(r"\nAnswer A: (.*)\nAnswer B: (.*)\n", t).groups() for t in texts]
        return np.asarray([[len(a) / 10, len(b) / 10] for a, b in answers], np.float32)


def test_judge_probability_is_the_softmax_of_the_option_logits_of_a_plain_forward(setup, policy):
    tok, prompts, good, bad = setup["tok"], setup["prompts"], setup["good"], setup["bad"]
    j = judge.Judge(policy, principles=PRINCIPLES, batch_size=8)  # 14 prompts: two chunks, one padded
    out = j.compare(prompts, good, bad)
    options = [tok.id_of("▁A"), tok.id_of("▁B")]
    head = "".join(f"{p}\n" for p in PRINCIPLES)
    for i, p in enumerate(prompts):
        for key, (a, b) in (("p_a_given_ab", (good[i], bad[i])), ("p_a_given_ba", (bad[i], good[i]))):
            ids = [tok.bos_id] + tok.encode(head + world.judge_prompt(p, a, b))
            expected = jax.nn.softmax(last_logits(policy, ids)[jnp.asarray(options)])[0]
            np.testing.assert_allclose(out[key][i], expected, rtol=0, atol=2e-5)
    assert out["prob_first"].dtype == np.float32 and out["prob_first"].shape == (len(prompts),)


def test_swapping_the_answers_gives_one_minus_p_without_position_bias_and_after_debiasing(setup, policy):
    prompts, good, bad = setup["prompts"], setup["good"], setup["bad"]
    fair = ContentJudge(policy, batch_size=8)
    out = fair.compare(prompts, good, bad)
    np.testing.assert_allclose(out["p_a_given_ab"], 1 - out["p_a_given_ba"], rtol=0, atol=1e-6)
    np.testing.assert_allclose(out["prob_first"], out["p_a_given_ab"], rtol=0, atol=1e-6)
    assert not out["flipped"].any()

    biased = judge.Judge(policy, batch_size=8)
    out, back = biased.compare(prompts, good, bad), biased.compare(prompts, bad, good)
    # The raw verdicts depend on the order, so the debiasing has work to do ...
    assert np.abs(out["p_a_given_ab"] + out["p_a_given_ba"] - 1).max() > 1e-2
    # ... and its output is exactly antisymmetric.
    np.testing.assert_array_equal(out["prob_first"], 1 - back["prob_first"])
    np.testing.assert_array_equal(out["flipped"], back["flipped"])
    np.testing.assert_array_equal(biased.prob_first(prompts, good, bad), out["prob_first"])


def test_d_rlaif_reward_is_the_expected_score_under_the_score_token_probabilities(setup, policy):
    tok, prompts, responses = setup["tok"], setup["prompts"], setup["good"][:3] + setup["bad"][3:]
    j = judge.Judge(policy, principles=PRINCIPLES, batch_size=8)
    scores = j.score(prompts, responses)
    # Split digits: " 7" is "▁", "7" and "10" is two tokens, so the scale is 1..9.
    digits = jnp.asarray([tok.id_of(str(k)) for k in range(1, 10)])
    np.testing.assert_array_equal(j.score_values, np.arange(1, 10))
    head = "".join(f"{p}\n" for p in PRINCIPLES)
    for i, (p, r) in enumerate(zip(prompts, responses)):
        text = f"{head}Request: {world.request_text(p)}\nAnswer: {r}\nScore (1-10): "
        ids = [tok.bos_id] + tok.encode(text)
        assert ids[-1] == tok.id_of("▁")
        probs = jax.nn.softmax(last_logits(policy, ids)[digits])
        np.testing.assert_allclose(scores[i], jnp.sum(probs * jnp.arange(1, 10)), rtol=1e-5)
    reward = judge.JudgeReward(j)(None, prompts, responses)
    assert reward.dtype == np.float32 and reward.shape == (len(prompts),)
    np.testing.assert_array_equal(reward, scores)


def test_a_verdict_of_several_tokens_is_a_clear_error(setup):
    tok = setup["tok"]
    assert judge.verdict_tokens(tok, [" A", " B"]) == ([], [tok.id_of("▁A"), tok.id_of("▁B")])
    assert judge.verdict_tokens(tok, [" 1", " 2"]) == ([tok.id_of("▁")], [tok.id_of("1"), tok.id_of("2")])
    with pytest.raises(ValueError, match=r"verdict ' Zqxj' is the tokens .* one token"):
        judge.verdict_tokens(tok, [" A", " Zqxj"])


def test_label_pairs_drops_unsure_pairs_picks_the_preferred_side_and_round_trips(setup, policy, tmp_path):
    w, prompts, good, bad = setup["world"], setup["prompts"], setup["good"], setup["bad"]
    fair = ContentJudge(policy, batch_size=8)  # prefers the longer answer: P = sigmoid(len diff / 10)
    a, b = good, bad[:4] + good[4:5] + bad[5:]  # pair 4: equal answers, p = 0.5
    p = 1 / (1 + np.exp(-np.array([len(" ".join(x.split())) - len(" ".join(y.split()))
                                   for x, y in zip(a, b)]) / 10))
    confidence = np.maximum(p, 1 - p)
    levels = np.unique(confidence)
    threshold = float(levels[len(levels) // 2 - 1:len(levels) // 2 + 1].mean())  # between two levels
    rows, stats = judge.label_pairs(fair, prompts, a, b, threshold=threshold, grade=w.score)
    kept = np.flatnonzero(confidence >= threshold)
    assert 0 < len(kept) < len(prompts)
    assert stats["n_pairs"] == len(prompts) and stats["n_dropped"] == len(prompts) - len(kept)
    assert stats["n_kept"] == len(rows) == len(kept) and stats["position_flip_rate"] == 0.0
    for row, i in zip(rows, kept):
        assert row["prompt"] == prompts[i]
        assert (row["chosen"], row["rejected"]) == ((a[i], b[i]) if p[i] >= 0.5 else (b[i], a[i]))
        np.testing.assert_allclose(row["prob_chosen"], confidence[i], atol=1e-6)
    margins = [w.score(prompts[i], r["chosen"]) - w.score(prompts[i], r["rejected"]) for r, i in zip(rows, kept)]
    decided = [m > 0 for m in margins if m]
    assert stats["oracle_pairs"] == len(decided) and stats["agreement_with_oracle"] == np.mean(decided)

    path = str(tmp_path / "preferences.jsonl")
    common.write_jsonl(path, rows)
    loaded, load_stats = data.load_rows(path, "preference")
    assert load_stats["rows"] == len(rows)
    assert [r["prob_chosen"] for r in loaded] == [r["prob_chosen"] for r in rows]
    assert [r["chosen"] for r in loaded] == [" " + r["chosen"].strip() for r in rows]

    bad_path = str(tmp_path / "bad.jsonl")
    common.write_jsonl(bad_path, rows[:1] + [dict(rows[0], prob_chosen=1.5)])
    with pytest.raises(data.DataError, match=r"bad\.jsonl: row 1: field 'prob_chosen': 1\.5 outside"):
        data.load_rows(bad_path, "preference")
    with pytest.raises(ValueError, match="threshold"):
        judge.label_pairs(fair, prompts, a, b, threshold=0.4)


@pytest.mark.stage
def test_ai_feedback_stage_labels_samples_of_a_tiny_sft_checkpoint(setup, tmp_path):
    c = sft_config.get_config("tiny")
    c.data.train = setup["files"]["sft"]
    c.tokenizer.path = setup["tok"].path
    c.train.steps, c.train.eval_every = 10, 0
    sft_dir = str(tmp_path / "sft")
    supervised.run(c, sft_dir)

    a = ai_feedback_config.get_config("tiny")
    a.policy_checkpoint = a.judge_checkpoint = sft_dir
    a.num_prompts, a.batch_size, a.sampling.max_new_tokens = 8, 8, 12
    a.judge.threshold, a.judge.batch_size = 0.5, 8  # keep every judged pair
    out_dir = str(tmp_path / "aif")
    stats = ai_feedback.run(a, out_dir)
    with open(os.path.join(out_dir, "stats.json")) as f:
        assert json.load(f) == stats
    assert stats["n_prompts"] == 8 and stats["n_pairs"] + stats["n_degenerate"] == 8
    assert stats["n_kept"] == stats["n_pairs"] and stats["n_dropped"] == 0
    assert 0.0 <= stats["position_flip_rate"] <= 1.0
    assert stats["agreement_with_oracle"] is None or 0.0 <= stats["agreement_with_oracle"] <= 1.0
    written = [json.loads(line) for line in open(os.path.join(out_dir, "preferences.jsonl"))]
    rows, _ = data.load_rows(os.path.join(out_dir, "preferences.jsonl"), "preference")
    assert len(rows) == len(written) == stats["n_kept"]
    assert all(0.5 <= r["prob_chosen"] <= 1.0 for r in rows)
    assert [r["prob_chosen"] for r in rows] == [r["prob_chosen"] for r in written]
