"""The transformer: shapes, causality, packing isolation, cached = full forward."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ptx import losses, sharding
from ptx.model import (
    ModelConfig,
    Transformer,
    count_params,
    init_cache,
    init_params,
    lm_head,
    rope_tables,
    unstack_cache,
    unstack_layers,
)

CFG = ModelConfig(vocab_size=97, d_model=32, n_layers=3, n_heads=4, n_kv_heads=2, d_ff=64,
                  qkv_bias=True, tie_embeddings=False, scalar_head=True)


@pytest.fixture(scope="module")
def params():
    return init_params(CFG, jax.random.PRNGKey(0))


@pytest.fixture(scope="module")
def forward():
    return jax.jit(lambda p, t, pos, seg: Transformer(CFG).apply({"params": p}, t, pos, seg))


def tokens(seed, shape):
    return jax.random.randint(jax.random.PRNGKey(seed), shape, 0, CFG.vocab_size)


def default_pos_seg(b, t):
    return jnp.broadcast_to(jnp.arange(t), (b, t)), jnp.ones((b, t), jnp.int32)


def test_output_shapes_and_param_layout(params, forward):
    out = forward(params, tokens(1, (2, 11)), *default_pos_seg(2, 11))
    assert out.logits.shape == (2, 11, CFG.vocab_size)
    assert out.values.shape == (2, 11)
    assert out.hidden.shape == (2, 11, CFG.d_model)
    assert params["layers"]["attn"]["q"]["kernel"].shape == (3, 32, 4, 8)
    assert params["layers"]["attn"]["k"]["kernel"].shape == (3, 32, 2, 8)
    assert params["lm_head"]["kernel"].shape == (32, 97)
    expected = 97 * 32 * 2 + 32 + 32 + 3 * (2 * 32 + 32 * 8 * (4 + 2 + 2) + 8 * (4 + 2 + 2)
                                                 + 4 * 8 * 32 + 3 * 32 * 64)
    assert count_params(params) == expected


def test_changing_a_future_token_leaves_earlier_logits_unchanged(params, forward):
    t = tokens(2, (1, 12))
    changed = t.at[0, 7].set((t[0, 7] + 1) % CFG.vocab_size)
    a = forward(params, t, *default_pos_seg(1, 12)).logits
    b = forward(params, changed, *default_pos_seg(1, 12)).logits
    np.testing.assert_array_equal(a[0, :7], b[0, :7])
    assert not np.allclose(a[0, 7:], b[0, 7:])


def test_packed_documents_equal_each_document_alone(params, forward):
    doc1, doc2 = tokens(3, (1, 5)), tokens(4, (1, 6))
    packed = jnp.concatenate([doc1, doc2, jnp.zeros((1, 3), jnp.int32)], axis=1)
    pos = jnp.array([[0, 1, 2, 3, 4, 0, 1, 2, 3, 4, 5, 0, 0, 0]])
    seg = jnp.array([[1] * 5 + [2] * 6 + [0] * 3])
    out = forward(params, packed, pos, seg).logits
    alone1 = forward(params, doc1, *default_pos_seg(1, 5)).logits
    alone2 = forward(params, doc2, *default_pos_seg(1, 6)).logits
    np.testing.assert_allclose(out[0, :5], alone1[0], atol=1e-5)
    np.testing.assert_allclose(out[0, 5:11], alone2[0], atol=1e-5)


def test_cached_decode_equals_full_forward(params, forward):
    t = tokens(5, (2, 10))
    full = forward(params, t, *default_pos_seg(2, 10))
    model = Transformer(CFG)
    step = jax.jit(lambda p, x, pos, c, i: model.apply({"params": p}, x, pos, jnp.ones_like(x),
                                                        cache=c, cache_index=i))
    out = step(params, t[:, :4], default_pos_seg(2, 4)[0], init_cache(CFG, 2, 16), 0)
    logits, values, cache = [out.logits], [out.values], out.cache
    for i in range(4, 10):
        out = step(params, t[:, i:i + 1], jnp.full((2, 1), i), cache, i)
        logits.append(out.logits)
        values.append(out.values)
        cache = out.cache
    np.testing.assert_allclose(jnp.concatenate(logits, 1), full.logits, atol=1e-5)
    np.testing.assert_allclose(jnp.concatenate(values, 1), full.values, atol=1e-5)


def test_per_layer_modules_on_unstacked_params_and_cache_equal_the_scanned_stack(params, forward):
    """The decode step's layout (scan_layers=False): same function, layer weights and cache split."""
    t = tokens(8, (2, 10))
    full = forward(params, t, *default_pos_seg(2, 10))
    layered = unstack_layers(params)
    assert "layers" not in layered and layered["layers_2"]["attn"]["q"]["kernel"].shape == (32, 4, 8)
    np.testing.assert_array_equal(layered["layers_1"]["up"]["kernel"], params["layers"]["up"]["kernel"][1])
    model = Transformer(CFG, scan_layers=False)
    out = model.apply({"params": layered}, t, *default_pos_seg(2, 10))
    np.testing.assert_allclose(out.logits, full.logits, atol=1e-5)
    # Prefill with the scanned stack, then decode on the per-layer cache, written in place.
    prefill = Transformer(CFG).apply({"params": params}, t[:, :4], default_pos_seg(2, 4)[0],
                                     cache=init_cache(CFG, 2, 16), cache_index=0)
    cache = unstack_cache(prefill.cache)
    assert len(cache["k"]) == CFG.n_layers and cache["k"][0].shape == (2, 2, 16, 8)
    step = jax.jit(lambda p, x, pos, c, i: model.apply({"params": p}, x, pos, jnp.ones_like(x), cache=c,
                                                        cache_index=i), donate_argnums=3)
    logits = [prefill.logits]
    for i in range(4, 10):
        out = step(layered, t[:, i:i + 1], jnp.full((2, 1), i), cache, i)
        logits.append(out.logits)
        cache = out.cache
    np.testing.assert_allclose(jnp.concatenate(logits, 1), full.logits, atol=1e-5)


def test_padding_left_of_a_row_does_not_change_its_logits(params, forward):
    t = tokens(6, (1, 6))
    padded = jnp.concatenate([jnp.zeros((1, 3), jnp.int32), t], axis=1)
    pos = jnp.array([[0, 0, 0, 0, 1, 2, 3, 4, 5]])
    seg = jnp.array([[0, 0, 0, 1, 1, 1, 1, 1, 1]])
    np.testing.assert_allclose(forward(params, padded, pos, seg).logits[0, 3:],
                               forward(params, t, *default_pos_seg(1, 6)).logits[0], atol=1e-5)


def test_layer_loop_remat_and_unrolled_scan_give_the_scans_logits_and_gradients(params):
    t = tokens(7, (2, 8))
    scan = CFG.replace(layer_loop_max=0)

    def has_scan(cfg):
        return " scan[" in str(jax.make_jaxpr(lambda p: Transformer(cfg).apply({"params": p}, t))(params))

    assert not has_scan(CFG) and has_scan(scan)  # CFG (3 layers) runs the Python layer loop

    def run(cfg):
        def loss(p):
            out = Transformer(cfg).apply({"params": p}, t)
            return jnp.sum(jnp.sin(out.logits)) + jnp.sum(out.values ** 2), out.logits
        return jax.grad(loss, has_aux=True)(params)

    ref_grads, ref = run(scan)
    for variant in (CFG, CFG.replace(remat="full"), CFG.replace(remat="dots"),
                    scan.replace(remat="full"), scan.replace(remat="dots", scan_unroll=3)):
        grads, logits = run(variant)
        np.testing.assert_allclose(logits, ref, atol=1e-5)
        jax.tree.map(lambda g, r: np.testing.assert_allclose(g, r, rtol=1e-4, atol=1e-5 * np.abs(r).max()),
                     grads, ref_grads)


def test_blockwise_attention_gives_the_dense_logits_and_parameter_gradients(params):
    """Packed and left-padded rows; padding queries (no visible key) are don't-care, so
    the loss reads real tokens only."""
    t = tokens(9, (2, 12))
    pos = jnp.array([[0, 1, 2, 3, 4, 0, 1, 2, 3, 4, 5, 6], [0, 0, 0, 0, 1, 2, 3, 4, 5, 6, 7, 8]])
    seg = jnp.array([[1] * 5 + [2] * 7, [0] * 3 + [1] * 9])
    real = (seg > 0)[..., None]

    def run(cfg):
        def loss(p):
            out = Transformer(cfg).apply({"params": p}, t, pos, seg)
            return jnp.sum(jnp.where(real, jnp.sin(out.logits), 0.0)), jnp.where(real, out.logits, 0.0)
        return jax.jit(jax.grad(loss, has_aux=True))(params)

    for window in (0, 4):
        ref_grads, ref = run(CFG.replace(sliding_window=window))
        grads, logits = run(CFG.replace(sliding_window=window, attention="blockwise", attention_block_q=5,
                                        attention_block_k=4))
        np.testing.assert_allclose(logits, ref, atol=1e-5)
        jax.tree.map(lambda g, r: np.testing.assert_allclose(g, r, rtol=1e-4, atol=1e-5 * np.abs(r).max()),
                     grads, ref_grads)


def test_sliding_window_limits_what_a_token_sees_and_cached_decode_honours_it(params):
    cfg = CFG.replace(sliding_window=3)
    model = Transformer(cfg)
    t = tokens(10, (2, 10))
    full = model.apply({"params": params}, t).logits
    # Each layer reaches window - 1 = 2 tokens further back: through 3 layers, token 0
    # reaches positions up to 6 and no further.
    changed = model.apply({"params": params}, t.at[:, 0].set((t[:, 0] + 1) % CFG.vocab_size)).logits
    np.testing.assert_array_equal(changed[:, 7:], full[:, 7:])
    assert not np.allclose(changed[:, 6], full[:, 6])
    step = jax.jit(lambda p, x, pos, c, i: model.apply({"params": p}, x, pos, jnp.ones_like(x), cache=c,
                                                        cache_index=i))
    out = step(params, t[:, :4], default_pos_seg(2, 4)[0], init_cache(cfg, 2, 16), 0)
    logits, cache = [out.logits], out.cache
    for i in range(4, 10):
        out = step(params, t[:, i:i + 1], jnp.full((2, 1), i), cache, i)
        logits.append(out.logits)
        cache = out.cache
    np.testing.assert_allclose(jnp.concatenate(logits, 1), full, atol=1e-5)


GEMMA_LIKE = CFG.replace(qkv_bias=False, sliding_window=3, global_layers=(1,), rope_local_theta=100.0,
                         rope_type="linear", rope_factor=4.0, qk_norm=True, norm_plus_one=True, post_norms=True,
                         scale_embed=True, mlp_act="gelu_tanh", query_pre_attn_scalar=12.0)


def test_mixed_sliding_and_global_layers_agree_in_loop_scan_and_cached_decode():
    cfg = GEMMA_LIKE
    p = jax.tree.map(lambda x: x + 0.1, init_params(cfg, jax.random.PRNGKey(2)))  # norm weights off zero
    assert p["layers"]["attn"]["q_norm"]["scale"].shape == (3, 8)
    assert p["layers"]["mlp_post_norm"]["scale"].shape == (3, 32)
    t = tokens(12, (2, 10))
    fwd = lambda c, q: Transformer(c).apply({"params": q}, t).logits
    loop, scan = fwd(cfg, p), fwd(cfg.replace(layer_loop_max=0), p)
    np.testing.assert_allclose(scan, loop, atol=1e-5)
    per_layer = Transformer(cfg, scan_layers=False).apply({"params": unstack_layers(p)}, t).logits
    np.testing.assert_allclose(per_layer, loop, atol=1e-5)
    grads = [jax.grad(lambda q, c=c: jnp.sum(fwd(c, q) ** 2))(p) for c in (cfg, cfg.replace(layer_loop_max=0))]
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4 * np.abs(b).max()), *grads)
    # The global layer 1 sees the whole context: token 0 reaches every position, where three
    # sliding layers of window 3 would stop at position 6.
    changed = Transformer(cfg).apply({"params": p}, t.at[:, 0].set((t[:, 0] + 1) % CFG.vocab_size)).logits
    assert np.abs(changed[:, 9] - loop[:, 9]).max() > 0
    all_local = cfg.replace(global_layers=())
    changed = Transformer(all_local).apply({"params": p}, t.at[:, 0].set((t[:, 0] + 1) % CFG.vocab_size)).logits
    np.testing.assert_array_equal(changed[:, 7:], fwd(all_local, p)[:, 7:])
    # Prefill through the scan (each layer's window picked by lax.cond), then decode a token a step.
    model = Transformer(cfg)
    step = jax.jit(lambda q, x, pos, c, i: model.apply({"params": q}, x, pos, jnp.ones_like(x), cache=c,
                                                        cache_index=i))
    out = step(p, t[:, :4], default_pos_seg(2, 4)[0], init_cache(cfg, 2, 16), 0)
    logits, cache = [out.logits], out.cache
    for i in range(4, 10):
        out = step(p, t[:, i:i + 1], jnp.full((2, 1), i), cache, i)
        logits.append(out.logits)
        cache = out.cache
    np.testing.assert_allclose(jnp.concatenate(logits, 1), loop, atol=1e-5)
    # Packed documents each see only their own window: as if alone.
    doc1, doc2 = t[:1, :4], t[1:, :6]
    packed = jnp.concatenate([doc1, doc2], axis=1)
    pos, seg = jnp.array([[0, 1, 2, 3, 0, 1, 2, 3, 4, 5]]), jnp.array([[1] * 4 + [2] * 6])
    out = Transformer(cfg).apply({"params": p}, packed, pos, seg).logits
    np.testing.assert_allclose(out[0, :4], Transformer(cfg).apply({"params": p}, doc1).logits[0], atol=1e-5)
    np.testing.assert_allclose(out[0, 4:], Transformer(cfg).apply({"params": p}, doc2).logits[0], atol=1e-5)
    mesh = sharding.make_mesh(sharding.MeshConfig(data=2, fsdp=2, tensor=2))
    sharding.tree_specs(p, sharding.param_rules(cfg), mesh, strict=True)  # one rule per parameter


@pytest.mark.parametrize("tie", [False, True])
def test_hidden_states_and_lm_head_give_the_logits_log_probs_in_chunks(params, tie):
    cfg = CFG.replace(tie_embeddings=tie)
    p = init_params(cfg, jax.random.PRNGKey(1)) if tie else params
    t = tokens(11, (2, 9))
    targets = jnp.roll(t, -1, axis=1)
    full = Transformer(cfg).apply({"params": p}, t)
    hidden = Transformer(cfg).apply({"params": p}, t, logits=False)
    assert hidden.logits is None
    kernel, vocab_major = lm_head(cfg, p)
    assert vocab_major == tie and kernel.shape == ((cfg.vocab_size, cfg.d_model) if tie
                                                   else (cfg.d_model, cfg.vocab_size))
    chunked = losses.chunked_token_logprobs(hidden.hidden, kernel, targets, vocab_major=vocab_major,
                                            chunk_size=5)
    np.testing.assert_allclose(chunked, losses.token_logprobs(full.logits, targets), atol=1e-5)


def test_rotary_tables_match_the_closed_form_and_are_evaluated_once_per_step(params):
    pos = jnp.array([[0, 1, 5, 127, 1000, 4096]], jnp.int32)
    sin, cos = rope_tables(pos, 8, 10000.0)
    angle = np.asarray(pos, np.float64)[..., None] * 10000.0 ** (-np.arange(0, 8, 2) / 8)
    np.testing.assert_allclose(sin[:, :, 0], np.sin(angle), atol=2e-4)
    np.testing.assert_allclose(cos[:, :, 0], np.cos(angle), atol=2e-4)
    # Every layer's q and k, forward and backward, read the same two tables: XLA must
    # not copy sin / cos into each rotary fusion.
    t = tokens(8, (2, 8))
    grad = jax.grad(lambda p: jnp.sum(Transformer(CFG).apply({"params": p}, t).logits ** 2))
    hlo = jax.jit(grad).lower(params).compile().as_text()
    assert hlo.count(" sine(") == 1 and hlo.count(" cosine(") == 1


def test_bad_model_config_is_a_clear_error():
    with pytest.raises(ValueError, match="n_kv_heads"):
        ModelConfig(n_heads=4, n_kv_heads=3)
    with pytest.raises(ValueError, match="dtype"):
        ModelConfig(dtype="float64")
    with pytest.raises(ValueError, match="layer_loop_max"):
        ModelConfig(layer_loop_max=-1)
    with pytest.raises(ValueError, match="model.attention"):
        ModelConfig(attention="flash")
    with pytest.raises(ValueError, match="sliding_window"):
        ModelConfig(sliding_window=-1)
    with pytest.raises(ValueError, match="rope_type='yarn'"):
        ModelConfig(rope_type="yarn")
    with pytest.raises(ValueError, match="rope_original_max_len"):
        ModelConfig(rope_type="llama3")
    with pytest.raises(ValueError, match=r"global_layers=\(2,\)"):
        ModelConfig(n_layers=2, global_layers=(2,))
    with pytest.raises(ValueError, match="mlp_act"):
        ModelConfig(mlp_act="relu")
    # A config read back from JSON holds lists: it stays hashable (a static jit argument).
    assert hash(ModelConfig(n_layers=4, global_layers=[1, 3])) == hash(ModelConfig(n_layers=4, global_layers=(1, 3)))
