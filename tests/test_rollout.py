"""ptx.rollout: the collector (prompt batches, retries, keys, penalties) that RL and online DPO share, and
DAPO's group refill."""

import jax
import numpy as np
import pytest

from ptx import data, engine, losses, rollout, sampler, sharding
from ptx.model import ModelConfig, init_params


def test_fill_groups_replaces_groups_of_equal_rewards_and_fills_with_them_when_draws_run_out():
    def draw(scores, tag):
        return {"scores": np.asarray(scores, np.float32), "tag": [f"{tag}{i}" for i in range(len(scores))],
                "x": np.arange(len(scores)) + 100 * tag}

    # Group size 2: draw 0 has one group with signal (the second), draw 1 two, draw 2 is never taken.
    draws = iter([draw([1, 1, 0, 1], 0), draw([0, 1, 2, 2, 3, 4], 1), draw([0, 1], 2)])
    out, stats = rollout.fill_groups(draws, 3, 2)
    assert stats == {"draws": 2, "filled_groups": 0}
    np.testing.assert_array_equal(out["x"], [2, 3, 100, 101, 104, 105])
    assert out["tag"] == ["02", "03", "10", "11", "14", "15"] and next(draws)["x"][0] == 200
    # The cap: two draws with one group of signal between them; dropped groups fill in draw order.
    out, stats = rollout.fill_groups([draw([1, 1, 0, 1], 0), draw([5, 5], 1)], 3, 2)
    assert stats == {"draws": 2, "filled_groups": 2}
    np.testing.assert_array_equal(out["x"], [2, 3, 0, 1, 100, 101])


class Tok:
    """Just what the collector reads of a tokenizer."""

    eos_ids, pad_id, vocab_size = (1,), 0, 64

    def decode(self, ids):
        return " ".join(str(int(i)) for i in ids)


def test_the_collector_draws_each_attempts_prompt_batch_and_keys_and_adds_the_penalties():
    cfg = ModelConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=64)
    params = init_params(cfg, jax.random.PRNGKey(0))
    rng = np.random.default_rng(0)
    prompts = {"prompt_tokens": rng.integers(2, 64, (10, 5)).astype(np.int32),
               "prompt_lens": rng.integers(2, 6, 10).astype(np.int32)}
    rows = [{"i": i} for i in range(10)]
    seen = []

    def reward(seq, texts, completions, rows):
        seen.append([r["i"] for r in rows])
        return np.arange(len(texts), dtype=np.float32)

    spec = rollout.Sampling(prompts=4, group_size=2, max_new_tokens=6, temperature=1.0, max_retries=2,
                            no_eos_penalty=-1.0, overlong_buffer=2, overlong_penalty=0.5)
    mesh = sharding.make_mesh(sharding.MeshConfig())
    collect = rollout.Collector(cfg, Tok(), mesh, reward, rows, prompts, spec, seed=3, steps=5)
    batches = data.BatchIterator(prompts, 4, seed=3)
    generate = sampler.make_generate_fn(cfg, max_new_tokens=6, eos_id=(1,), pad_id=0, n_tokens=64)
    sampled = []
    draws = list(collect.draws(params, 1, sampled))
    assert len(draws) == 3 and len(sampled) == 3
    for attempt, draw in enumerate(draws):
        # Retry a of iteration 1 reads prompt batch steps + 1 * max_retries + a - 1, never trained otherwise.
        idx = batches.indices(1 if attempt == 0 else 5 + 2 + attempt - 1)
        assert seen[attempt] == [int(i) for i in idx for _ in range(2)]
        key = jax.random.fold_in(jax.random.PRNGKey(3), 1)
        key = jax.random.fold_in(key, attempt) if attempt else key
        tokens, lens = (np.repeat(prompts[k][idx], 2, axis=0) for k in ("prompt_tokens", "prompt_lens"))
        out = jax.device_get(generate(params, tokens, lens, jax.random.split(key, 8), 1.0, 0, 1.0))
        live = np.arange(6)[None] < out.lengths[:, None]
        np.testing.assert_array_equal(draw["completion"], np.where(live, out.tokens, 0))
        np.testing.assert_array_equal(draw["seq.completion"], draw["completion"])
        penalty = -1.0 * (out.finish_reason != sampler.FINISH_EOS) + np.asarray(
            losses.overlong_penalty(out.lengths, max_len=6, buffer=2, factor=0.5))
        np.testing.assert_allclose(draw["scores"], np.arange(8) + penalty, rtol=1e-6)
        assert sampled[attempt] == float(out.lengths.sum())
        assert draw["completions"][0] == Tok().decode(draw["completion"][0][:out.lengths[0]])
    assert not np.array_equal(draws[0]["completion"], draws[1]["completion"])
    # Attempt 0 alone is the draw without retries, device sequence batch and all.
    seq, host = collect(params, 1)
    np.testing.assert_array_equal(host["completion"], draws[0]["completion"])
    np.testing.assert_array_equal(np.asarray(seq["tokens"]), draws[0]["seq.tokens"])


# Greedy rows repeat their first token: EOS 27 ends some at once; sampled, EOS 7 ends some early.
@pytest.mark.parametrize("temperature,eos", [(0.0, 27), (1.0, 7)])
def test_the_collector_draws_the_same_rows_with_the_paged_engine_as_with_the_static_sampler(temperature, eos):
    """One-device mesh, greedy and sampled (the same keys): tokens, lengths, finish reasons and scores
    equal, the sampler's log-probs within 1e-5; the sequence batch lives on the mesh either way."""
    cfg = ModelConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=64)
    params = init_params(cfg, jax.random.PRNGKey(0))
    rng = np.random.default_rng(1)
    prompts = {"prompt_tokens": rng.integers(2, 64, (6, 5)).astype(np.int32),
               "prompt_lens": rng.integers(1, 6, 6).astype(np.int32)}
    rows = [{"i": i} for i in range(6)]
    mesh = sharding.make_mesh(sharding.MeshConfig(), jax.devices()[:1])
    reward = lambda seq, texts, completions, rows: np.asarray(seq["mask"]).sum(1)  # reads the device batch
    draws = {}
    for kind in ("static", "paged"):
        spec = rollout.Sampling(prompts=3, group_size=2, max_new_tokens=8, temperature=temperature, max_retries=1,
                                no_eos_penalty=-1.0, engine=kind)
        tok = type("EosTok", (Tok,), {"eos_ids": (eos,)})()
        collect = rollout.Collector(cfg, tok, mesh, reward, rows, prompts, spec, seed=5, steps=2)
        assert hasattr(collect.generate, "engine") == (kind == "paged")
        draws[kind] = list(collect.draws(params, 1, []))
        seq, _ = collect(params, 0)
        assert seq["tokens"].sharding.mesh == mesh and seq["logprobs"].sharding.mesh == mesh
    for a, b in zip(draws["static"], draws["paged"], strict=True):
        for k in ("completion", "lengths", "finish_reason", "scores", "seq.tokens", "seq.mask"):
            np.testing.assert_array_equal(a[k], b[k], err_msg=k)
        np.testing.assert_allclose(a["seq.logprobs"], b["seq.logprobs"], atol=1e-5)
        np.testing.assert_allclose(a["seq.entropy"], b["seq.entropy"], atol=1e-5)
        assert a["completions"] == b["completions"]
    ends = np.concatenate([d["finish_reason"] for d in draws["static"]])
    assert set(ends.tolist()) == {sampler.FINISH_EOS, sampler.FINISH_LENGTH}


def test_the_paged_engine_on_a_mesh_of_several_devices_is_a_clear_error():
    cfg = ModelConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=64)
    prompts = {"prompt_tokens": np.ones((4, 3), np.int32), "prompt_lens": np.full(4, 3, np.int32)}
    spec = rollout.Sampling(prompts=4, group_size=2, max_new_tokens=4, engine="paged")
    mesh = sharding.make_mesh(sharding.MeshConfig())
    with pytest.raises(ValueError, match=r"engine='paged' runs on one device .* 8 devices"):
        rollout.Collector(cfg, Tok(), mesh, None, [{}] * 4, prompts, spec, seed=0, steps=1)
    with pytest.raises(ValueError, match=r"rl\.engine='paged'"):
        engine.check_mesh("paged", mesh, "rl.engine")
    engine.check_mesh("paged", sharding.make_mesh(sharding.MeshConfig(), jax.devices()[:1]), "rl.engine")
