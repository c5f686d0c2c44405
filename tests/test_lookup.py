"""The embedding lookup: jnp.take's rows and gradient, bit for bit, with the gradient's zero
table made from the incoming gradient (so XLA allocates it when the backward pass gets there)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.extend import core

from ptx import lookup


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_rows_and_gradient_equal_jnp_take(dtype):
    rng = np.random.default_rng(0)
    table = jnp.asarray(rng.standard_normal((11, 4)), dtype)
    tokens = jnp.asarray([[1, 3, 3, 0], [10, 1, 1, 1]], jnp.int32)  # repeated rows add up
    weights = jnp.asarray(rng.standard_normal((2, 4, 4)), jnp.float32)

    def loss(take, t):
        return jnp.sum(take(t, tokens).astype(jnp.float32) * weights)

    ours = jax.jit(jax.value_and_grad(lambda t: loss(lookup.rows, t)))(table)
    ref = jax.jit(jax.value_and_grad(lambda t: loss(lambda t, i: jnp.take(t, i, axis=0), t)))(table)
    jax.tree_util.tree_map(np.testing.assert_array_equal, ours, ref)
    assert ours[1].dtype == dtype


def test_the_zero_table_of_the_gradient_is_made_from_the_incoming_gradient():
    table = jax.ShapeDtypeStruct((11, 4), jnp.float32)
    tokens = jnp.zeros((2, 3), jnp.int32)
    jaxpr = jax.make_jaxpr(jax.grad(lambda t: jnp.sum(lookup.rows(t, tokens) ** 2)))(table)
    zeros = [e for e in jaxpr.jaxpr.eqns if e.primitive.name == "broadcast_in_dim" and e.params["shape"] == (11, 4)]
    assert zeros and all(isinstance(e.invars[0], core.Var) for e in zeros)  # not a literal 0
