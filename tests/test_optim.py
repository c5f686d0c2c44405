"""The optimiser: clipped AdamW in one pass equals optax's chain, skips a non-finite step
without touching anything, and keeps no second copy of the gradients or updates."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from configs import common
from ptx import optim, steps


def tree(seed):
    rng = np.random.default_rng(seed)
    return {"w": jnp.asarray(rng.standard_normal((4, 3)), jnp.float32),
            "b": jnp.asarray(rng.standard_normal((3,)), jnp.float32)}


@pytest.mark.parametrize("max_norm,weight_decay", [(1.0, 0.0), (0.5, 0.1), (0.0, 0.1)])
def test_clipped_adamw_equals_optax_clip_and_adamw(max_norm, weight_decay):
    lr = optax.linear_schedule(1e-2, 1e-3, 5)
    mask = lambda p: jax.tree_util.tree_map(lambda x: x.ndim >= 2, p)
    ours = optim.clipped_adamw(lr, b1=0.9, b2=0.95, eps=1e-8, weight_decay=weight_decay, decay_mask=mask,
                               max_norm=max_norm)
    ref = optax.chain(*([optax.clip_by_global_norm(max_norm)] if max_norm else []),
                      optax.adamw(lr, b1=0.9, b2=0.95, eps=1e-8, weight_decay=weight_decay, mask=mask))
    p_ours = p_ref = tree(0)
    s_ours, s_ref = ours.init(p_ours), ref.init(p_ref)
    for i in range(4):
        g = jax.tree_util.tree_map(lambda x: 3.0 * x, tree(i + 1))  # norms above and below the clip
        u, s_ours = jax.jit(ours.update)(g, s_ours, p_ours)
        p_ours = optax.apply_updates(p_ours, u)
        u, s_ref = jax.jit(ref.update)(g, s_ref, p_ref)
        p_ref = optax.apply_updates(p_ref, u)
        jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7), p_ours, p_ref)
    assert int(s_ours.count) == 4


@pytest.mark.parametrize("first", [True, False])
def test_a_nonfinite_step_changes_nothing_bit_for_bit(first):
    tx, _ = optim.make_optimizer(optim.OptimConfig(**common.base_config("sft").optim), total_steps=10)
    params = tree(0)
    state = tx.init(params)
    if not first:  # a step already taken: the moments and the count are not zero
        u, state = tx.update(tree(1), state, params)
        params = optax.apply_updates(params, u)
    bad = jax.tree_util.tree_map(lambda x: x.at[0].set(jnp.nan), tree(2))
    for grads, finite in ((bad, True), (tree(3), False)):
        u, new = jax.jit(lambda g, s, p, f: tx.update(g, s, p, finite=f))(grads, state, params, finite)
        jax.tree_util.tree_map(np.testing.assert_array_equal, optax.apply_updates(params, u), params)
        jax.tree_util.tree_map(np.testing.assert_array_equal, new, state)
        assert float(optax.tree.norm(u)) == 0.0


def test_skip_nonfinite_wraps_any_optax_transformation():
    tx = optim.skip_nonfinite(optax.adam(0.1))
    assert optim.skip_nonfinite(tx) is tx
    params = tree(0)
    state = tx.init(params)
    u, new = tx.update(tree(1), state, params, finite=jnp.bool_(False))
    assert float(optax.tree.norm(u)) == 0.0
    jax.tree_util.tree_map(np.testing.assert_array_equal, new, state)
    u, new = tx.update(tree(1), state, params, finite=jnp.bool_(True))
    assert float(optax.tree.norm(u)) > 0.0


def test_train_step_keeps_no_second_copy_of_the_gradients():
    """Compiled only: 8 x 1M float32 parameters (32 MiB; gradients 32 MiB). optax's clip
    wrote a clipped copy of every gradient and a conditional around the update kept all
    updates alive at once; the step's temporaries stay under gradients + one leaf."""
    tx, lr = optim.make_optimizer(optim.OptimConfig(**common.base_config("sft").optim), total_steps=10)
    params = {f"w{i}": jax.ShapeDtypeStruct((1024, 1024), jnp.float32) for i in range(8)}
    state = jax.eval_shape(lambda p: steps.init_state(p, tx), params)
    batch = {"x": jax.ShapeDtypeStruct((1024,), jnp.float32)}
    loss_fn = lambda p, b, f: (sum(jnp.sum(jnp.sin(w @ b["x"])) for w in p.values()), {})
    step = jax.jit(lambda s, b: steps.train_step(s, b, None, loss_fn=loss_fn, tx=tx, lr_fn=lr, accum_steps=1),
                   donate_argnums=0)
    temps = step.lower(state, batch).compile().memory_analysis().temp_size_in_bytes
    assert temps < (8 + 2) * 2**22
