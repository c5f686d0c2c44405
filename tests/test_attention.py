"""ptx.attention: every implementation against the dense one and a numpy loop; blockwise memory."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ptx import attention, sharding


def inputs(b=2, t=37, heads=4, kv_heads=2, head=8, packed=True, seed=0):
    """q, k, v and mask ids; packed: row 0 holds two documents, row 1 is left-padded."""
    rng = np.random.default_rng(seed)
    q = jnp.asarray(rng.standard_normal((b, t, heads, head)), jnp.float32)
    k, v = (jnp.asarray(rng.standard_normal((b, t, kv_heads, head)), jnp.float32) for _ in range(2))
    if packed:
        cut, pad = t // 2 + 1, 5
        pos = np.stack([np.r_[np.arange(cut), np.arange(t - cut)], np.r_[np.zeros(pad), np.arange(t - pad)]])
        seg = np.stack([np.r_[np.ones(cut), np.full(t - cut, 2)], np.r_[np.zeros(pad), np.ones(t - pad)]])
    else:
        pos, seg = np.broadcast_to(np.arange(t), (b, t)), np.ones((b, t))
    ids = dict(q_positions=jnp.asarray(pos, jnp.int32), k_positions=jnp.asarray(pos, jnp.int32),
               q_segment_ids=jnp.asarray(seg, jnp.int32), k_segment_ids=jnp.asarray(seg, jnp.int32))
    return (q, k, v), ids


def value_and_grads(impl, qkv, ids, **kw):
    """Outputs and d/d(q, k, v) of a loss that ignores padding queries (no visible key: don't-care)."""
    real = (ids["q_segment_ids"] > 0)[..., None, None]

    def loss(q, k, v):
        out = attention.attend(q, k, v, **ids, impl=impl, **kw)
        return jnp.sum(jnp.where(real, jnp.sin(out), 0.0)), jnp.where(real, out, 0.0)

    (_, out), grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))(*qkv)
    return out, grads


def test_xla_impl_is_bit_identical_to_the_models_former_dense_code():
    (q, k, v), ids = inputs()

    def former(q, k, v):  # ptx.model.Attention before ptx.attention existed
        b, t, h, hd = q.shape
        kvh = k.shape[2]
        q = q.reshape(b, t, kvh, h // kvh, hd)
        scores = jnp.einsum("btkgd,bskd->bkgts", q, k.astype(q.dtype)).astype(jnp.float32)
        scores = scores / jnp.sqrt(hd).astype(jnp.float32)
        mask = ((ids["q_segment_ids"][:, :, None] == ids["k_segment_ids"][:, None, :])
                & (ids["k_segment_ids"][:, None, :] > 0)
                & (ids["k_positions"][:, None, :] <= ids["q_positions"][:, :, None]))
        scores = jnp.where(mask[:, None, None], scores, -1e30)
        probs = jax.nn.softmax(scores, axis=-1).astype(q.dtype)
        return jnp.einsum("bkgts,bskd->btkgd", probs, v.astype(q.dtype)).reshape(b, t, h, hd)

    new = jax.jit(lambda q, k, v: attention.attend(q, k, v, **ids))
    np.testing.assert_array_equal(new(q, k, v), jax.jit(former)(q, k, v))


@pytest.mark.parametrize("case", [
    dict(name="causal", packed=False),
    dict(name="packed and padded"),
    dict(name="multi-query", heads=4, kv_heads=1),
    dict(name="sliding window", window=5),
    dict(name="one block", block_q=64, block_k=64),
    dict(name="blocks dividing the sequence", t=32, block_q=8, block_k=16),
], ids=lambda c: c["name"])
def test_blockwise_equals_xla_in_values_and_gradients(case):
    case = dict(case)
    case.pop("name")
    window = case.pop("window", 0)
    blocks = dict(block_q=case.pop("block_q", 8), block_k=case.pop("block_k", 16))  # 37 = 4 * 8 + 5
    qkv, ids = inputs(**case)
    ref, ref_grads = value_and_grads("xla", qkv, ids, window=window)
    out, grads = value_and_grads("blockwise", qkv, ids, window=window, **blocks)
    np.testing.assert_allclose(out, ref, atol=1e-5)
    for g, r in zip(grads, ref_grads):
        np.testing.assert_allclose(g, r, atol=1e-5)


def test_blockwise_output_is_zero_for_queries_without_a_visible_key():
    (q, k, v), ids = inputs()
    out = attention.attend(q, k, v, **ids, impl="blockwise", block_q=8, block_k=8)
    np.testing.assert_array_equal(out[1, :5], 0.0)  # row 1's left padding


def test_sliding_window_matches_a_numpy_loop():
    (q, k, v), ids = inputs(t=20, seed=3)
    window = 4
    qn, kn, vn = (np.asarray(x, np.float64) for x in (q, k, v))
    pos, seg = np.asarray(ids["q_positions"]), np.asarray(ids["q_segment_ids"])
    b, t, h, hd = q.shape
    group = h // k.shape[2]
    expected = np.zeros(q.shape)
    for i in range(b):
        for qi in range(t):
            keys = [j for j in range(t)
                    if seg[i, j] == seg[i, qi] > 0 and pos[i, qi] - window < pos[i, j] <= pos[i, qi]]
            if not keys:
                continue
            assert len(keys) <= window
            for head in range(h):
                s = kn[i, keys, head // group] @ qn[i, qi, head] / np.sqrt(hd)
                p = np.exp(s - s.max())
                expected[i, qi, head] = (p / p.sum()) @ vn[i, keys, head // group]
    real = seg > 0
    for impl in ("xla", "blockwise"):
        out = attention.attend(q, k, v, **ids, window=window, impl=impl, block_q=8, block_k=8)
        np.testing.assert_allclose(np.asarray(out)[real], expected[real], atol=1e-5)


def branched_ids(t=37):
    """Shared-prefix rows: (prompt, chosen, rejected) lengths per segment, then padding."""
    layout = [[(5, 4, 6), (3, 2, 3)], [(1, 7, 3)], [(4, 12, 9)]]
    pos, seg, br = (np.zeros((len(layout), t), np.int32) for _ in range(3))
    for r, docs in enumerate(layout):
        i = 0
        for s, (p, *responses) in enumerate(docs, start=1):
            pos[r, i:i + p], seg[r, i:i + p] = np.arange(p), s
            i += p
            for branch, n in enumerate(responses, start=1):
                pos[r, i:i + n], seg[r, i:i + n], br[r, i:i + n] = p + np.arange(n), s, branch
                i += n
    pos, seg, br = (jnp.asarray(x) for x in (pos, seg, br))
    return dict(q_positions=pos, k_positions=pos, q_segment_ids=seg, k_segment_ids=seg, q_branch_ids=br,
                k_branch_ids=br)


@pytest.mark.parametrize("window", [0, 4])
def test_branch_mask_matches_a_numpy_loop_over_indices(window):
    """Reference by index: a query sees the earlier (or same) tokens of its segment in the
    shared prefix or its own branch; the window keeps the last `window` of those."""
    ids = branched_ids()
    seg, br = np.asarray(ids["q_segment_ids"]), np.asarray(ids["q_branch_ids"])
    b, t = seg.shape
    expected = np.zeros((b, t, t), bool)
    for i in range(b):
        for q in range(t):
            keys = [k for k in range(q + 1) if seg[i, k] == seg[i, q] > 0 and br[i, k] in (0, br[i, q])]
            expected[i, q, keys[-window:] if window else keys] = True
    mask = attention.visible(ids["q_positions"], ids["k_positions"], ids["q_segment_ids"], ids["k_segment_ids"],
                             window, ids["q_branch_ids"], ids["k_branch_ids"])
    np.testing.assert_array_equal(mask, expected)


@pytest.mark.parametrize("window", [0, 4])
def test_blockwise_equals_xla_on_branched_rows(window):
    (qkv, _), ids = inputs(b=3), branched_ids()
    ref, ref_grads = value_and_grads("xla", qkv, ids, window=window)
    out, grads = value_and_grads("blockwise", qkv, ids, window=window, block_q=8, block_k=16)
    np.testing.assert_allclose(out, ref, atol=1e-5)
    for g, r in zip(grads, ref_grads):
        np.testing.assert_allclose(g, r, atol=1e-5)


def test_blockwise_forward_and_backward_memory_grows_linearly_not_quadratically():
    def temp_bytes(impl, t):
        q = jax.ShapeDtypeStruct((1, t, 2, 16), jnp.float32)
        k = jax.ShapeDtypeStruct((1, t, 1, 16), jnp.float32)
        ids = jax.ShapeDtypeStruct((1, t), jnp.int32)

        def loss(q, k, v, pos, seg):
            return jnp.sum(attention.attend(q, k, v, q_positions=pos, k_positions=pos, q_segment_ids=seg,
                                            k_segment_ids=seg, impl=impl, block_q=32, block_k=32) ** 2)

        compiled = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).lower(q, k, k, ids, ids).compile()
        return compiled.memory_analysis().temp_size_in_bytes

    # Compiled only, never run: the sizes cost no time.
    assert temp_bytes("xla", 1024) / temp_bytes("xla", 512) > 3.5  # the [t, t] scores
    assert temp_bytes("blockwise", 1024) / temp_bytes("blockwise", 512) < 2.5
    assert temp_bytes("blockwise", 1024) < temp_bytes("xla", 1024) / 20


def test_blockwise_memory_stays_linear_inside_a_scan_over_layers():
    """Under grad JAX hoists what a scan body computes from the loop's constants alone out of
    the loop; the masks (positions and segments are such constants) must not be hoisted as
    [t / block, t / block, ..., block, block] stacks."""
    def temp_bytes(t, layers=4):
        x = jax.ShapeDtypeStruct((1, t, 32), jnp.float32)
        ws = jax.ShapeDtypeStruct((layers, 32, 32), jnp.float32)
        ids = jax.ShapeDtypeStruct((1, t), jnp.int32)

        def layer(x, w, pos, seg):
            q = (x @ w).reshape(1, t, 2, 16)
            out = attention.attend(q, q[:, :, :1], q[:, :, 1:], q_positions=pos, k_positions=pos,
                                   q_segment_ids=seg, k_segment_ids=seg, impl="blockwise", block_q=32,
                                   block_k=32)
            return x + out.reshape(x.shape)

        def loss(x, ws, pos, seg):
            y, _ = jax.lax.scan(lambda c, w: (layer(c, w, pos, seg), None), x, ws)
            return jnp.sum(y ** 2)

        compiled = jax.jit(jax.grad(loss, argnums=(0, 1))).lower(x, ws, ids, ids).compile()
        return compiled.memory_analysis().temp_size_in_bytes

    assert temp_bytes(1024) / temp_bytes(512) < 2.5
    assert temp_bytes(1024) < 1024 * 1024 * 4  # less than one [t, t] float32 score matrix


@pytest.mark.parametrize("window", [0, 50])
def test_splash_kernel_in_the_pallas_interpreter_equals_xla(window):
    """Splash tiles whole 128-lane blocks, hence 128 tokens. Padding queries attend the
    padding itself there: real rows only."""
    qkv, ids = inputs(t=128, head=16)
    ref, ref_grads = value_and_grads("xla", qkv, ids, window=window)

    def loss(q, k, v):
        out = attention.splash_attention(q, k, v, **ids, window=window, interpret=True)
        real = (ids["q_segment_ids"] > 0)[..., None, None]
        return jnp.sum(jnp.where(real, jnp.sin(out), 0.0)), jnp.where(real, out, 0.0)

    (_, out), grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))(*qkv)
    np.testing.assert_allclose(out, ref, atol=1e-5)
    for g, r in zip(grads, ref_grads):
        np.testing.assert_allclose(g, r, atol=1e-5)


def test_splash_kernel_under_a_mesh_runs_on_each_devices_rows():
    qkv, ids = inputs(t=128, head=16)
    q, k, v = (jnp.concatenate([x, -x]) for x in qkv)  # 4 rows over data x fsdp = 4
    ids = {n: jnp.concatenate([x, x]) for n, x in ids.items()}
    ref = attention.attend(q, k, v, **ids)
    with jax.set_mesh(sharding.make_mesh(sharding.MeshConfig(data=2, fsdp=2, tensor=2))):
        run = jax.jit(lambda q, k, v, ids: attention.splash_attention(q, k, v, **ids, interpret=True))
        assert "shard_map" in str(jax.make_jaxpr(run)(q, k, v, ids))
        out = run(q, k, v, ids)
    real = np.asarray(ids["q_segment_ids"] > 0)
    np.testing.assert_allclose(np.asarray(out)[real], np.asarray(ref)[real], atol=1e-5)


def test_backend_kernels_elsewhere_and_unknown_impls_are_clear_errors():
    (q, k, v), ids = inputs(t=8)
    if jax.default_backend() != "gpu":
        with pytest.raises(ValueError, match="cudnn.*needs a GPU"):
            attention.attend(q, k, v, **ids, impl="cudnn")
    if jax.default_backend() != "tpu":
        with pytest.raises(ValueError, match="splash.*needs a TPU"):
            attention.attend(q, k, v, **ids, impl="splash")
    with pytest.raises(ValueError, match="multiple of 128"):
        attention.splash_attention(q, k, v, **ids, interpret=True)
    with pytest.raises(ValueError, match="expected one of"):
        attention.attend(q, k, v, **ids, impl="flash")


def test_auto_on_cpu_is_xla_for_short_keys_and_blockwise_for_long_ones():
    if jax.default_backend() != "cpu":
        pytest.skip("auto picks per backend")
    short = jax.ShapeDtypeStruct((1, 8, 2, 8), jnp.float32)
    long = jax.ShapeDtypeStruct((1, attention.AUTO_BLOCKWISE_MIN_KEYS, 2, 8), jnp.float32)
    assert attention.auto_impl(short, short) == "xla"
    assert attention.auto_impl(long, long) == "blockwise"
