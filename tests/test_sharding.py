"""ptx.sharding: every parameter matches one rule, mesh sizes, state shardings on a 2x2x2 mesh, and the
model's activation constraints under a mesh."""
import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from configs import sft as sft_config
from ptx import optim, sharding, steps
from ptx.model import ModelConfig, Transformer, init_cache, init_params

import test_model

# test_model's model and its parameters fixture (pytest finds fixtures by name here).
CFG, params = test_model.CFG, test_model.params


def test_every_parameter_matches_exactly_one_sharding_rule(params):
    mesh = sharding.make_mesh(sharding.MeshConfig(data=2, fsdp=2, tensor=2))
    specs = sharding.tree_specs(params, sharding.param_rules(CFG), mesh, strict=True)
    assert specs["layers"]["attn"]["q"]["kernel"] == jax.sharding.PartitionSpec(None, "fsdp", "tensor", None)
    assert specs["layers"]["down"]["kernel"] == jax.sharding.PartitionSpec(None, "tensor", "fsdp")
    # 97 is not divisible by 2: the axis is dropped instead of failing.
    assert specs["lm_head"]["kernel"] == jax.sharding.PartitionSpec("fsdp", None)


def test_a_rule_without_parameter_or_a_parameter_without_rule_is_an_error(params):
    mesh = sharding.make_mesh(sharding.MeshConfig(data=-1, fsdp=1, tensor=1))
    rules = sharding.param_rules(CFG)
    with pytest.raises(ValueError, match="match no parameter"):
        sharding.tree_specs(params, rules + [(r"nothing/here", jax.sharding.PartitionSpec())], mesh,
                            strict=True)
    with pytest.raises(ValueError, match="final_norm/scale matches 0"):
        sharding.tree_specs(params, [r for r in rules if "final_norm" not in r[0]], mesh, strict=True)


def test_mesh_from_config_fills_the_rest_and_rejects_bad_sizes():
    assert dict(sharding.make_mesh(sharding.MeshConfig(data=-1, fsdp=2, tensor=1)).shape) == {
        "data": 4, "fsdp": 2, "tensor": 1}
    with pytest.raises(ValueError, match="needs 16 devices"):
        sharding.make_mesh(sharding.MeshConfig(data=4, fsdp=4, tensor=1))


def constraints(jaxpr) -> list:
    """(operand shape, PartitionSpec) of every sharding constraint, nested jaxprs included."""
    found = []
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "sharding_constraint":
            found.append((eqn.invars[0].aval.shape, eqn.params["sharding"].spec))
        for value in eqn.params.values():
            inner = getattr(value, "jaxpr", value)
            if hasattr(inner, "eqns"):
                found += constraints(inner)
    return found


def test_the_model_constrains_activations_and_kv_cache_under_a_mesh_and_not_without():
    cfg = ModelConfig(**dict(sft_config.get_config("tiny").model))  # d 64, 2 kv heads of 16, 2 layers
    params = jax.eval_shape(lambda: init_params(cfg, jax.random.PRNGKey(0)))
    tokens = jax.ShapeDtypeStruct((8, 4), np.int32)
    cache = jax.eval_shape(lambda: init_cache(cfg, 8, 6))
    forward = lambda p, t, c: Transformer(cfg).apply({"params": p}, t, cache=c)
    found = lambda: sorted(constraints(jax.make_jaxpr(forward)(params, tokens, cache).jaxpr), key=str)
    assert found() == []
    batch = ("data", "fsdp")
    for mesh, kv_heads in [((2, 2, 2), "tensor"), ((1, 2, 4), None)]:  # 2 kv heads do not split 4 ways
        with jax.set_mesh(sharding.make_mesh(sharding.MeshConfig(*mesh))):
            expected = [((512, 64), P("tensor", None)),  # the embedding table, FSDP-gathered for the lookup
                        ((8, 4, 64), P(batch, None, None)),  # the looked-up rows
                        ((8, 4, 64), P(batch, None, None)),  # the residual stream after each (scanned) block
                        ((2, 8, 2, 6, 16), P(None, batch, kv_heads, None, None)),  # keys
                        ((2, 8, 2, 6, 16), P(None, batch, kv_heads, None, None))]  # values
            assert found() == sorted(expected, key=str), mesh


def test_parameter_and_optimizer_state_shardings_follow_the_rules_on_a_2x2x2_mesh():
    # The lines of supervised.run that build the sharded state.
    c = sft_config.get_config("tiny")
    c.mesh.data, c.mesh.fsdp, c.mesh.tensor = 2, 2, 2
    cfg = ModelConfig(**dict(c.model))
    mesh = sharding.make_mesh(sharding.MeshConfig(**c.mesh))
    rules = sharding.param_rules(cfg)
    abstract_params = jax.eval_shape(lambda: init_params(cfg, jax.random.PRNGKey(0)))
    param_shardings = sharding.named(mesh, sharding.tree_specs(abstract_params, rules, mesh, strict=True))
    tx, _ = optim.make_optimizer(optim.OptimConfig(**c.optim), c.train.steps)
    abstract_state = jax.eval_shape(lambda p: steps.init_state(p, tx), abstract_params)
    state_shardings = sharding.named(mesh, sharding.tree_specs(abstract_state, rules, mesh, strict=False))
    state_shardings = state_shardings.replace(params=param_shardings)
    params = jax.jit(lambda r: init_params(cfg, r), out_shardings=param_shardings)(jax.random.PRNGKey(0))
    state = jax.jit(lambda p: steps.init_state(p, tx), out_shardings=state_shardings)(params)
    leaves = {sharding.path_str(path): leaf for path, leaf in jax.tree_util.tree_leaves_with_path(state)}

    # name -> (spec, shape of one device's shard); tiny: vocab 512, d 64, 4 heads (2 kv) of 16, ff 192, 2 layers.
    expected = {
        "embed/embedding": (P("tensor", "fsdp"), (256, 32)),
        "layers/attn/q/kernel": (P(None, "fsdp", "tensor", None), (2, 32, 2, 16)),
        "layers/attn/k/kernel": (P(None, "fsdp", "tensor", None), (2, 32, 1, 16)),
        "layers/attn/o/kernel": (P(None, "tensor", None, "fsdp"), (2, 2, 16, 32)),
        "layers/gate/kernel": (P(None, "fsdp", "tensor"), (2, 32, 96)),
        "layers/down/kernel": (P(None, "tensor", "fsdp"), (2, 96, 32)),
        "layers/attn_norm/scale": (P(None, None), (2, 64)),
        "final_norm/scale": (P(None), (64,)),
    }
    for name, (spec, shard) in expected.items():
        # The Adam moments of a parameter are laid out like the parameter.
        for owner in ("params", "mu", "nu"):
            [path] = [n for n in leaves if n.endswith(f"{owner}/{name}")]
            assert leaves[path].sharding.spec == spec, (path, leaves[path].sharding.spec)
            assert leaves[path].addressable_shards[0].data.shape == shard, path
    counters = [n for n in leaves if n == "step" or n.endswith("/count")]
    assert len(counters) >= 2  # the step and Adam's count at least
    for name in counters:
        assert leaves[name].sharding.spec == P() and leaves[name].sharding.is_fully_replicated, name
