"""The train step and the one trainer setup every loop and the bench call.

A method supplies `loss_fn(params, batch, frozen) -> (loss, metrics)` (`ptx.methods`);
`train_step` turns it into `(state, batch, frozen) -> (state, metrics)` with
gradient accumulation, the optax update and a NaN guard. `frozen` holds what
the step reads but never trains (the DPO reference parameters), so it is
never part of the optimiser state. `setup` lays the state out on the mesh and
jits the train and eval steps, with explicit shardings, in `compile_step`: the
one place a step is jitted.
"""
import dataclasses
import functools
from typing import Any, Callable

import flax.struct
import jax
import jax.numpy as jnp
import optax

from ptx import fields, optim, sharding


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """The `train` section: the loop's length, batch, logging, evaluation and checkpoints."""

    steps: int = 1000  # optimiser steps (RL and online DPO: iterations)
    batch_size: int = 32  # global batch, split over the data axes (supervised stages)
    log_every: int = 20
    eval_every: int = 200  # 0 = only at the end
    eval_batches: int = 10
    ckpt_every: int = 200  # 0 = only at the end
    keep_ckpts: int = 2

    def __post_init__(self):
        fields.check(self, "train", steps=fields.POSITIVE, batch_size=fields.POSITIVE, log_every=fields.POSITIVE,
                     eval_every=fields.COUNT, eval_batches=fields.POSITIVE, ckpt_every=fields.COUNT,
                     keep_ckpts=fields.POSITIVE)
        if self.eval_every % self.log_every:
            raise ValueError(f"train.eval_every={self.eval_every} is not a multiple of train.log_every="
                             f"{self.log_every}; evaluation runs at logged steps")


@flax.struct.dataclass
class TrainState:
    step: jax.Array  # int32 scalar: updates applied so far
    params: Any
    opt_state: Any
    # What a method carries from step to step besides the parameters (BCO's running reward
    # mean): a dict of float32 scalars, {} for most methods; checkpointed with the rest.
    carry: Any = dataclasses.field(default_factory=dict)


def init_state(params, tx: optax.GradientTransformation, carry: dict | None = None) -> TrainState:
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                      carry={k: jnp.asarray(v, jnp.float32) for k, v in (carry or {}).items()})


def _global_norm(tree) -> jax.Array:
    return optax.tree.norm(tree).astype(jnp.float32)


def train_step(state: TrainState, batch, frozen, *, loss_fn: Callable, tx, lr_fn, accum_steps: int):
    """One optimiser update from `accum_steps` micro-batches of `batch`.

    A non-finite loss or gradient leaves the state untouched (the last good
    parameters) and raises `metrics['nonfinite']`, which the loop turns into
    a clear error before any checkpoint is written. A method with a carry
    (`state.carry` not empty) gets it as `loss_fn(..., carry=)` and returns the
    next one as `metrics['carry']` (averaged over micro-batches).
    """
    if state.carry:
        loss_fn = functools.partial(loss_fn, carry=state.carry)
    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
    if accum_steps == 1:
        (loss, metrics), grads = grad_fn(state.params, batch, frozen)
    else:
        # Micro-batch i takes rows i, i + accum, ...: every device keeps a share of each.
        micro = jax.tree_util.tree_map(
            lambda x: x.reshape((x.shape[0] // accum_steps, accum_steps) + x.shape[1:]).swapaxes(0, 1),
            batch)

        def body(carry, mb):
            (loss, metrics), grads = grad_fn(state.params, mb, frozen)
            # Token-mean losses weigh each micro-batch by its tokens, so the sum equals
            # the mean over the whole batch; other losses weigh micro-batches equally.
            w = metrics.get("num_tokens", jnp.ones((), jnp.float32))
            scaled = jax.tree_util.tree_map(lambda x: x * w, (loss, metrics, grads))
            return jax.tree_util.tree_map(jnp.add, carry, scaled + (w,)), None

        first = jax.tree_util.tree_map(lambda x: x[0], micro)
        (loss0, metrics0), grads0 = jax.eval_shape(grad_fn, state.params, first, frozen)
        zeros = jax.tree_util.tree_map(lambda s: jnp.zeros(s.shape, s.dtype),
                                       (loss0, metrics0, grads0, jax.ShapeDtypeStruct((), jnp.float32)))
        (loss, metrics, grads, total), _ = jax.lax.scan(body, zeros, micro)
        loss, metrics, grads = jax.tree_util.tree_map(lambda x: x / total, (loss, metrics, grads))
        if "num_tokens" in metrics:
            metrics["num_tokens"] = total
    grad_norm = _global_norm(grads)
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    # The optimiser skips a non-finite step itself: ptx's AdamW by scalars inside its
    # one pass, where a conditional around the update kept all parameters' updates
    # alive at once (optim.clipped_adamw); any other transformation by a conditional.
    updates, opt_state = optim.skip_nonfinite(tx).update(grads, state.opt_state, state.params, finite=finite)
    carry = metrics.pop("carry", state.carry)
    carry = jax.tree_util.tree_map(lambda new, old: jnp.where(finite, new, old), carry, state.carry)
    new = TrainState(step=state.step + finite.astype(jnp.int32), params=optax.apply_updates(state.params, updates),
                     opt_state=opt_state, carry=carry)
    update_norm = _global_norm(updates)
    metrics = dict(metrics, loss=loss, grad_norm=grad_norm, update_norm=update_norm,
                   lr=jnp.asarray(lr_fn(state.step), jnp.float32),
                   nonfinite=(~finite).astype(jnp.float32))
    return new, metrics


def eval_step(params, batch, frozen, *, loss_fn: Callable, carry: dict | None = None):
    """The loss and metrics of `params` on a batch; a method's carry is read, not advanced."""
    loss, metrics = loss_fn(params, batch, frozen, carry=carry) if carry else loss_fn(params, batch, frozen)
    metrics.pop("carry", None)
    return dict(metrics, loss=loss)


def compile_step(fn, *, in_shardings, out_shardings, donate_state: bool):
    """The one place ptx jits a step: explicit shardings, the train state donated, and every
    call under `no_implicit_transfers`."""
    return no_implicit_transfers(jax.jit(fn, in_shardings=in_shardings, out_shardings=out_shardings,
                                         donate_argnums=(0,) if donate_state else ()))


def no_implicit_transfers(jitted):
    """`jitted` called under `jax.transfer_guard("disallow")`, as big_vision runs its steps: an
    input that is not already on the devices (a numpy batch, a Python scalar) or a host read
    inside is an error instead of a silent sync; loops place batches with `jax.device_put`
    (`sharding.put_global`) and read metrics with `jax.device_get`. Keeps `.lower`."""

    @functools.wraps(jitted)
    def call(*args, **kwargs):
        with jax.transfer_guard("disallow"):
            return jitted(*args, **kwargs)

    call.lower = jitted.lower
    return call


@dataclasses.dataclass(frozen=True)
class Trainer:
    """A loss's state and steps on a mesh (`setup`)."""

    abstract_state: TrainState  # ShapeDtypeStructs of the state
    state_shardings: TrainState  # NamedShardings of the state
    init: Callable  # trainable params -> TrainState laid out as state_shardings (new buffers)
    train_step: Callable  # (state, batch, frozen) -> (state, metrics); the state is donated
    eval_step: Callable  # (state, batch, frozen) -> metrics


def setup(loss_fn: Callable, tx, lr_fn, trainable, rules, mesh, frozen_shardings=None, *, accum_steps: int = 1,
          carry: dict | None = None, strict_params: bool = True) -> Trainer:
    """The one trainer setup: abstract state, its shardings, a jitted init and the compiled steps.

    loss_fn: (params, batch, frozen) -> (loss, metrics). tx, lr_fn: the optimiser
    and its schedule (`optim.make_optimizer`). trainable: the trained parameter
    tree (abstract or concrete); rules: its sharding rules, each parameter matching
    exactly one (optimiser leaves take the rules leniently). frozen_shardings: of
    what the steps read but never train (None for nothing). carry: the method's
    initial carry (`TrainState.carry`). strict_params: each parameter must match exactly
    one rule (False: the first that matches, else replicated; the bench's synthetic trees).
    Batches are split over the data axes.
    """
    abstract = jax.eval_shape(lambda p: init_state(p, tx, carry), trainable)
    shardings = sharding.named(mesh, sharding.tree_specs(abstract, rules, mesh, strict=False))
    shardings = shardings.replace(params=sharding.named(mesh, sharding.tree_specs(trainable, rules, mesh,
                                                                                  strict=strict_params)))
    batch, replicated = sharding.batch_sharding(mesh), sharding.replicated(mesh)
    train = compile_step(functools.partial(train_step, loss_fn=loss_fn, tx=tx, lr_fn=lr_fn, accum_steps=accum_steps),
                         in_shardings=(shardings, batch, frozen_shardings), out_shardings=(shardings, replicated),
                         donate_state=True)
    evaluate = compile_step(lambda s, b, f: eval_step(s.params, b, f, loss_fn=loss_fn, carry=s.carry),
                            in_shardings=(shardings, batch, frozen_shardings), out_shardings=replicated,
                            donate_state=False)
    init = jax.jit(lambda p: init_state(p, tx, carry), out_shardings=shardings)
    return Trainer(abstract_state=abstract, state_shardings=shardings, init=init, train_step=train,
                   eval_step=evaluate)
