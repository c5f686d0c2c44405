"""ptx.steps: train_step's finite / non-finite updates and carry, the trainer setup (shardings, transfer guard),
TrainConfig."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import PartitionSpec as P

from ptx import sharding, steps


def test_train_step_applies_a_finite_update_and_skips_a_nonfinite_one():
    w = jnp.array([1.0, -2.0, 3.0])
    tx = optax.sgd(0.1)
    step = jax.jit(functools.partial(
        steps.train_step, loss_fn=lambda p, batch, _: (batch["scale"] * jnp.sum(p["w"] ** 2), {}),
        tx=tx, lr_fn=lambda _: 0.1, accum_steps=1))
    good, m = step(steps.init_state({"w": w}, tx), {"scale": jnp.float32(1.0)}, None)
    np.testing.assert_allclose(good.params["w"], w - 0.1 * 2 * w, rtol=1e-6)
    np.testing.assert_allclose([m["grad_norm"], m["update_norm"]],
                               [np.linalg.norm(2 * w), np.linalg.norm(0.2 * w)], rtol=1e-6)
    assert int(good.step) == 1 and float(m["nonfinite"]) == 0
    bad, m = step(good, {"scale": jnp.float32(np.nan)}, None)
    np.testing.assert_array_equal(bad.params["w"], good.params["w"])
    assert int(bad.step) == 1 and float(m["nonfinite"]) == 1 and float(m["update_norm"]) == 0


def quadratic_loss(params, batch, frozen=None, carry=None):
    """sum((w - target)^2) per row; with a carry, the running mean of the batch's mean target."""
    loss = jnp.mean(jnp.sum((params["w"][None] - batch["target"]) ** 2, axis=-1))
    metrics = {}
    if carry is not None:
        x = jnp.mean(batch["target"])
        metrics["carry"] = {"mean": carry["mean"] + (x - carry["mean"]) / (carry["count"] + 1),
                            "count": carry["count"] + 1}
    return loss, metrics


def test_setup_lays_the_state_out_by_the_rules_and_its_step_equals_train_step():
    mesh = sharding.make_mesh(sharding.MeshConfig(data=2, fsdp=4))
    rules = [(r"w", P("fsdp"))]
    tx = optax.sgd(0.1)
    trainer = steps.setup(quadratic_loss, tx, lambda _: 0.1, {"w": jnp.zeros(8)}, rules, mesh)
    state = trainer.init({"w": jnp.arange(8.0)})
    assert state.params["w"].sharding.spec == P("fsdp") and trainer.state_shardings.params["w"].spec == P("fsdp")
    assert trainer.abstract_state.params["w"].shape == (8,) and state.carry == {}
    batch = {"target": np.linspace(0, 1, 64, dtype=np.float32).reshape(8, 8)}
    new, m = trainer.train_step(state, sharding.put_global(batch, mesh), None)
    plain = functools.partial(steps.train_step, loss_fn=quadratic_loss, tx=tx, lr_fn=lambda _: 0.1, accum_steps=1)
    want, want_m = jax.jit(plain)(steps.init_state({"w": jnp.arange(8.0)}, tx), batch, None)
    np.testing.assert_allclose(new.params["w"], want.params["w"], rtol=1e-6)
    np.testing.assert_allclose(m["loss"], want_m["loss"], rtol=1e-6)
    ev = trainer.eval_step(new, sharding.put_global(batch, mesh), None)
    np.testing.assert_allclose(ev["loss"], quadratic_loss(jax.device_get(new.params), batch)[0], rtol=1e-6)


def test_a_step_refuses_a_batch_that_was_not_placed_on_the_devices():
    mesh = sharding.make_mesh(sharding.MeshConfig())
    trainer = steps.setup(quadratic_loss, optax.sgd(0.1), lambda _: 0.1, {"w": jnp.zeros(4)}, [(r"w", P())], mesh)
    state = trainer.init({"w": jnp.zeros(4)})
    batch = {"target": np.ones((8, 4), np.float32)}
    with pytest.raises(Exception, match="Disallowed host-to-device transfer"):
        trainer.train_step(state, batch, None)  # a numpy batch: an implicit transfer inside the step
    state, _ = trainer.train_step(state, sharding.put_global(batch, mesh), None)
    assert int(jax.device_get(state.step)) == 1


def test_a_carry_is_updated_by_the_loss_kept_on_a_nonfinite_step_and_averaged_over_micro_batches():
    mesh = sharding.make_mesh(sharding.MeshConfig())
    batch = {"target": np.arange(32, dtype=np.float32).reshape(8, 4)}
    carry = {"mean": 0.5, "count": 1.0}
    out = {}
    for accum in (1, 2):
        trainer = steps.setup(quadratic_loss, optax.sgd(0.1), lambda _: 0.1, {"w": jnp.zeros(4)}, [(r"w", P())],
                              mesh, accum_steps=accum, carry=carry)
        state = trainer.init({"w": jnp.zeros(4)})
        assert set(state.carry) == {"mean", "count"} and state.carry["mean"].dtype == jnp.float32
        state, m = trainer.train_step(state, sharding.put_global(batch, mesh), None)
        assert "carry" not in m
        out[accum] = jax.device_get(state.carry)
        # A non-finite step keeps the carry as it was, like the parameters.
        bad = {"target": np.full((8, 4), np.nan, np.float32)}
        kept, m = trainer.train_step(state, sharding.put_global(bad, mesh), None)
        assert float(m["nonfinite"]) == 1 and jax.device_get(kept.carry) == out[accum]
    # Mean of the batch means 15.5 joined to a running mean of 0.5 over one batch: (0.5 + 15.5) / 2.
    np.testing.assert_allclose([out[1]["mean"], out[1]["count"]], [8.0, 2.0], rtol=1e-6)
    np.testing.assert_allclose([out[2]["mean"], out[2]["count"]], [8.0, 2.0], rtol=1e-6)


@pytest.mark.parametrize("overrides,match", [
    ({"steps": 0}, "train.steps: needs a positive integer, got 0"),
    ({"eval_every": 7, "log_every": 5}, "not a multiple of train.log_every"),
    ({"ckpt_every": -1}, "train.ckpt_every: needs an integer >= 0, got -1"),
])
def test_bad_train_configs_are_errors(overrides, match):
    with pytest.raises(ValueError, match=match):
        steps.TrainConfig(**overrides)
