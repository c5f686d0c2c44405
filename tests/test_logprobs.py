"""The LM head under every loss: unchunked where the logits fit one chunk (bit for bit the plain
forward), chunked over the vocabulary otherwise (equal in values and gradients), and then no
[batch, seq, vocab] buffer in the compiled step."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ptx import evaluate, logprobs, losses, methods, rl_training
from ptx.model import ModelConfig, Transformer, init_params

CFG = ModelConfig(vocab_size=97, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=64)
WHOLE, CHUNKED = 10**6, 5  # loss_chunk: every batch in one chunk; 5 tokens a chunk (a padded last one)


def lm_batch(seed, b=2, t=9, vocab=CFG.vocab_size, prefix=""):
    rng = np.random.default_rng(seed)
    tok = rng.integers(1, vocab, (b, t + 1)).astype(np.int32)
    mask = (rng.uniform(size=(b, t)) < 0.7).astype(np.float32)
    return {prefix + "inputs": tok[:, :-1], prefix + "targets": tok[:, 1:],
            prefix + "positions": np.tile(np.arange(t, dtype=np.int32), (b, 1)),
            prefix + "segment_ids": np.ones((b, t), np.int32), prefix + "loss_mask": mask}


def rl_batch(seed, b=4, width=4, n=6):
    rng = np.random.default_rng(seed)
    tok = rng.integers(1, CFG.vocab_size, (b, width + n)).astype(np.int32)
    f = lambda: rng.normal(size=(b, n)).astype(np.float32)
    return {"tokens": tok, "positions": np.tile(np.arange(width + n, dtype=np.int32), (b, 1)),
            "segment_ids": np.ones((b, width + n), np.int32), "completion": tok[:, width:],
            "mask": (rng.uniform(size=(b, n)) < 0.8).astype(np.float32), "old_logps": -np.abs(f()),
            "ref_logps": -np.abs(f()), "old_values": f(), "advantages": f(), "returns": f(),
            "kl_coef": np.full((b,), 0.05, np.float32)}


def value_and_grad(loss_fn, params, *args):
    return jax.jit(jax.value_and_grad(loss_fn, has_aux=True))(params, *args)


def assert_close(a, b, tol=1e-5):
    jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=tol, atol=tol * max(1.0, np.abs(y).max())),
                 a, b)


def test_auto_chunk_is_a_bounded_number_of_logits_and_a_negative_one_is_an_error():
    assert logprobs.chunk_tokens(CFG.replace(vocab_size=151936)) == 2**26 // 151936 == 441
    assert logprobs.chunk_tokens(CFG.replace(loss_chunk=64)) == 64
    with pytest.raises(ValueError, match="loss_chunk"):
        CFG.replace(loss_chunk=-1)


def test_a_batch_within_one_chunk_is_the_plain_forward_bit_for_bit():
    """The default (auto) path at small shapes: the old SFT loss on the model's full logits."""
    params = init_params(CFG, jax.random.PRNGKey(0))
    batch = lm_batch(1)
    model = Transformer(CFG)

    def old(p, b, frozen=None):
        out = model.apply({"params": p}, b["inputs"], b["positions"], b["segment_ids"])
        return losses.sft_loss(out.logits, b["targets"], b["loss_mask"])

    (loss, metrics), grads = value_and_grad(methods.get("sft").make_loss(model, None), params, batch)
    (ref_loss, ref_metrics), ref_grads = value_and_grad(old, params, batch)
    jax.tree.map(np.testing.assert_array_equal, (loss, metrics, grads), (ref_loss, ref_metrics, ref_grads))


@pytest.mark.parametrize("tie", [True, False])
def test_chunked_sft_and_dpo_losses_equal_the_unchunked_in_values_and_gradients(tie):
    cfg = CFG.replace(tie_embeddings=tie)
    params = init_params(cfg, jax.random.PRNGKey(1))
    ref = init_params(cfg, jax.random.PRNGKey(2))
    sft, pairs = lm_batch(3), {**lm_batch(4, prefix="chosen_"), **lm_batch(5, prefix="rejected_"),
                               "prob_chosen": np.ones((2,), np.float32)}
    dpo = losses.DPOConfig()
    out = {}
    for chunk in (WHOLE, CHUNKED):
        model = Transformer(cfg.replace(loss_chunk=chunk))
        out[chunk] = (value_and_grad(methods.get("sft").make_loss(model, None), params, sft),
                      value_and_grad(methods.get("dpo").make_loss(model, dpo), params, pairs, ref),
                      jax.jit(lambda p, b: logprobs.pair_logps(model, p, b))(ref, pairs))
    assert_close(out[CHUNKED], out[WHOLE])
    # The accuracy metric counts argmax hits chunk by chunk as the full logits do.
    assert float(out[CHUNKED][0][0][1]["accuracy"]) == float(out[WHOLE][0][0][1]["accuracy"])


@pytest.mark.parametrize("critic", ["policy", "none"])
def test_chunked_rl_log_probs_entropy_and_kl_equal_the_unchunked(critic):
    """The RL update (entropy bonus, KL in the loss, a value head on the policy), the rollout's
    `prepare` and the evaluation's KL read only the completion's columns, chunked or not."""
    cfg = CFG.replace(scalar_head=critic == "policy")
    rl = rl_training.RLConfig(rollout_batch=4, group_size=2, minibatch_size=4, ent_coef=0.01, kl_in_loss=True,
                          advantage="gae" if critic == "policy" else "grpo", critic=critic,
                          old_logprobs="forward")  # prepare's own policy forward, chunked or not
    params = {"policy": init_params(cfg, jax.random.PRNGKey(3))}
    ref = init_params(CFG, jax.random.PRNGKey(4))
    batch, width = rl_batch(6), 4
    out = {}
    for chunk in (WHOLE, CHUNKED):
        model = Transformer(cfg.replace(loss_chunk=chunk))
        loss_fn = lambda p, b: rl_training.rl_loss_fn(p, b, policy_model=model, critic_model=None, width=width,
                                                  rl_cfg=rl)
        prep = jax.jit(lambda p, r, s: rl_training.prepare(p, r, s, jnp.linspace(0, 1, 4), 0.1, policy_model=model,
                                                       critic_model=None, width=width, rl_cfg=rl))
        seq = dict(batch, finish_reason=np.zeros((4,), np.int32))
        kl = evaluate.make_kl_fn(cfg.replace(loss_chunk=chunk), width)(params["policy"], ref, batch)
        out[chunk] = value_and_grad(loss_fn, params, batch), prep(params, ref, seq), kl
    assert_close(out[CHUNKED], out[WHOLE])
    model = Transformer(cfg.replace(loss_chunk=CHUNKED))
    logps, entropy, values = rl_training.response_forward(model, params["policy"], batch, width)
    full = Transformer(cfg).apply({"params": params["policy"]}, batch["tokens"], batch["positions"],
                                  batch["segment_ids"])
    logits = full.logits[:, width - 1:-1]
    assert_close((logps, entropy), (losses.token_logprobs(logits, batch["completion"]),
                                    losses.token_entropy(logits)))
    assert rl_training.response_forward(model, params["policy"], batch, width, entropy=False)[1] is None


def test_chunked_bfloat16_losses_equal_the_unchunked_within_bfloat16_rounding():
    cfg = CFG.replace(dtype="bfloat16")
    params = init_params(cfg, jax.random.PRNGKey(7))
    batch = lm_batch(8)
    sft = methods.get("sft")
    (whole, _), _ = value_and_grad(sft.make_loss(Transformer(cfg.replace(loss_chunk=WHOLE)), None), params, batch)
    (chunked, _), _ = value_and_grad(sft.make_loss(Transformer(cfg.replace(loss_chunk=CHUNKED)), None),
                                     params, batch)
    assert chunked.dtype == jnp.float32
    np.testing.assert_allclose(chunked, whole, rtol=1e-2)


def test_chunked_sft_step_keeps_no_vocabulary_sized_buffer():
    """Compiled only (abstract inputs): 1,024 tokens over 32,768 words, 128 MiB of float32 logits."""
    cfg = CFG.replace(vocab_size=32768, n_layers=1)
    params = jax.eval_shape(lambda: init_params(cfg, jax.random.PRNGKey(0)))
    batch = {k: jax.ShapeDtypeStruct(v.shape, v.dtype) for k, v in lm_batch(0, b=8, t=128).items()}

    def temp_bytes(chunk):
        fn = jax.grad(lambda p, b: methods.sft_loss_fn(Transformer(cfg.replace(loss_chunk=chunk)), p, b)[0])
        return jax.jit(fn).lower(params, batch).compile().memory_analysis().temp_size_in_bytes

    logits_bytes = 8 * 128 * 32768 * 4
    assert temp_bytes(WHOLE) >= logits_bytes > 3 * temp_bytes(128)


def test_the_lm_head_reads_only_the_completion_columns():
    """Compiled only: rows of 120 prompt and 8 completion columns over 32,768 words. All columns'
    float32 logits would be 128 MiB; the unchunked path holds the completion's 8 MiB."""
    cfg = CFG.replace(vocab_size=32768, n_layers=1, loss_chunk=WHOLE)
    params = jax.eval_shape(lambda: init_params(cfg, jax.random.PRNGKey(0)))
    b, width, n = 8, 120, 8
    ids = lambda t: jax.ShapeDtypeStruct((b, t), jnp.int32)
    seq = {"tokens": ids(width + n), "positions": ids(width + n), "segment_ids": ids(width + n), "completion": ids(n)}
    fn = jax.grad(lambda p, s: rl_training.response_forward(Transformer(cfg), p, s, width)[0].sum())
    temp = jax.jit(fn).lower(params, seq).compile().memory_analysis().temp_size_in_bytes
    all_logits = b * (width + n) * cfg.vocab_size * 4
    assert temp < all_logits / 4
