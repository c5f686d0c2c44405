"""Remat policies: every one gives the same logits and gradients; full keeps only the residual
stream, dots the matmul outputs too, offload moves the residual stream to host memory."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ptx import remat
from ptx.model import ModelConfig, Transformer, init_params

CFG = ModelConfig(vocab_size=97, d_model=32, n_layers=3, n_heads=4, n_kv_heads=2, d_ff=64)


def grads_and_logits(cfg, params, tokens):
    def loss(p):
        logits = Transformer(cfg).apply({"params": p}, tokens).logits
        return jnp.sum(jnp.sin(logits)), logits
    return jax.jit(jax.grad(loss, has_aux=True))(params)


# Gemma 3's mix: sliding layers with their own rope base around a global one.
MIXED = dict(sliding_window=3, global_layers=(1,), rope_local_theta=100.0, qk_norm=True, post_norms=True)


@pytest.mark.parametrize("layer_loop_max,mixed", [(8, False), (0, False), (8, True), (0, True)])
def test_every_policy_gives_the_logits_and_gradients_of_none(layer_loop_max, mixed):
    """The Python layer loop or the scan as reference; mixed: each scanned layer picks its window."""
    cfg = CFG.replace(layer_loop_max=layer_loop_max, **(MIXED if mixed else {}))
    params = init_params(cfg, jax.random.PRNGKey(0))
    tokens = jax.random.randint(jax.random.PRNGKey(1), (2, 8), 0, cfg.vocab_size)
    ref_grads, ref = grads_and_logits(cfg, params, tokens)
    has_scan = lambda c: " scan[" in str(jax.make_jaxpr(lambda p: Transformer(c).apply({"params": p}, tokens))(params))
    assert has_scan(cfg) == (layer_loop_max == 0)
    for name in remat.POLICIES[1:]:
        assert has_scan(cfg.replace(remat=name)), name  # remat always scans the layers
        grads, logits = grads_and_logits(cfg.replace(remat=name), params, tokens)
        np.testing.assert_allclose(logits, ref, atol=1e-5, err_msg=name)
        jax.tree.map(lambda g, r: np.testing.assert_allclose(g, r, rtol=1e-4, atol=1e-5 * np.abs(r).max(),
                                                             err_msg=name), grads, ref_grads)


def test_offload_saves_the_residual_stream_of_each_layer_in_host_memory():
    cfg = CFG.replace(remat="offload", layer_loop_max=0)
    params = init_params(cfg, jax.random.PRNGKey(0))
    tokens = jnp.zeros((2, 8), jnp.int32)
    grad = jax.grad(lambda p: jnp.sum(Transformer(cfg).apply({"params": p}, tokens).logits))
    jaxpr = str(jax.make_jaxpr(grad)(params))
    # The scan stacks one [batch, seq, d_model] residual per layer, on the host.
    assert f"f32<host>[{cfg.n_layers},2,8,{cfg.d_model}]" in jaxpr


def test_full_keeps_less_than_dots_and_dots_less_than_none():
    """Compiled only: temporaries of a 4-layer gradient at 2 x 512 tokens. The 4 layers are
    within layer_loop_max, but a rematerialised model scans them: in the Python loop XLA
    scheduled all recomputed layers early and full kept about as much as none."""
    cfg = ModelConfig(vocab_size=256, d_model=128, n_layers=4, n_heads=4, n_kv_heads=2, d_ff=512,
                      attention="blockwise", attention_block_q=128, attention_block_k=128)
    params = jax.eval_shape(lambda: init_params(cfg, jax.random.PRNGKey(0)))
    tokens = jax.ShapeDtypeStruct((2, 512), jnp.int32)

    def temps(name):
        c = cfg.replace(remat=name)
        grad = jax.grad(lambda p, t: jnp.sum(Transformer(c).apply({"params": p}, t).logits))
        return jax.jit(grad).lower(params, tokens).compile().memory_analysis().temp_size_in_bytes

    full, dots, none = temps("full"), temps("dots"), temps("none")
    assert 2 * full < none and full < dots < none


def test_unknown_policy_is_a_clear_error():
    with pytest.raises(ValueError, match="remat"):
        CFG.replace(remat="everything")
    with pytest.raises(ValueError, match="remat policy"):
        remat.policy("none")


def test_full_keeps_a_bfloat16_residual_stream_as_its_bits_and_gives_the_gradients_of_none():
    """XLA:CPU has no bfloat16 slicing: a bfloat16 stack read in the backward scan was copied
    to float32 whole (7 GiB at 28 layers, 65,536 tokens); its uint16 bits are sliced as they are."""
    cfg = CFG.replace(dtype="bfloat16", layer_loop_max=0)
    params = init_params(cfg, jax.random.PRNGKey(0))
    tokens = jax.random.randint(jax.random.PRNGKey(1), (2, 8), 0, cfg.vocab_size)
    ref_grads, ref = grads_and_logits(cfg, params, tokens)
    grads, logits = grads_and_logits(cfg.replace(remat="full"), params, tokens)
    np.testing.assert_array_equal(logits, ref)
    jax.tree.map(lambda g, r: np.testing.assert_allclose(g, r, rtol=2e-2, atol=2e-2 * np.abs(r).max()),
                 grads, ref_grads)
    grad = jax.grad(lambda p: jnp.sum(Transformer(cfg.replace(remat="full")).apply({"params": p}, tokens).logits))
    jaxpr = str(jax.make_jaxpr(grad)(params))
    assert f"u16[{cfg.n_layers},2,8,{cfg.d_model}]" in jaxpr and f"bf16[{cfg.n_layers},2,8,{cfg.d_model}]" not in jaxpr
