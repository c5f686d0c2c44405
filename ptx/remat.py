"""What the backward pass of a transformer layer keeps and what it recomputes (`ModelConfig.remat`).

- none: autodiff keeps every intermediate of every layer.
- full: each layer is recomputed in the backward pass; only its input, the
  residual stream [batch, seq, d_model] per layer, is kept.
- dots: as full, but the outputs of the matmuls without batch dimensions (the
  projections and the MLP) are kept too: less recompute, more memory.
- offload: as full, with the per-layer residual stream moved to pinned host
  memory in the forward pass and back for the backward (GPU, TPU); where the
  host is the device (CPU) it equals full.

The model's training and scoring forwards run their layers through `scan`. A layer
marks its input with `checkpoint_name(x, RESIDUAL)`; only offload reads the name.
With any policy but none the layers are scanned, whatever `layer_loop_max`: in a
Python loop XLA schedules every layer's recomputation early, and all of them stay
alive (at 4 layers the loop's remat kept as much as none).
"""
import jax
import jax.numpy as jnp

POLICIES = ("none", "full", "dots", "offload")
RESIDUAL = "residual"  # the checkpoint name of a layer's input


def policy(name: str):
    """The jax.checkpoint policy of `name` (None: save nothing); ValueError for an unknown one."""
    if name not in POLICIES[1:]:
        raise ValueError(f"remat policy {name!r}; expected one of {POLICIES[1:]}")
    if name == "dots":
        return jax.checkpoint_policies.dots_with_no_batch_dims_saveable
    if name == "offload":
        return jax.checkpoint_policies.save_and_offload_only_these_names(
            names_which_can_be_saved=(), names_which_can_be_offloaded=(RESIDUAL,),
            offload_src="device", offload_dst="pinned_host")
    return None


def scan(layer, x, stacked, consts: tuple, name: str, unroll: int = 1):
    """x through layer(x, params_i, *consts) for each slice params_i of `stacked` (leaves
    [n_layers, ...]), in a scan whose backward pass keeps what the policy `name` says.

    full keeps each layer's input as its bits (uint16 for a bfloat16 stream): the backward
    scan slices the stack of them, and XLA:CPU, which has no bfloat16 slicing, copied a
    bfloat16 stack to float32 first (7 GiB at 28 layers, 65,536 tokens of width 1,024).
    """
    if name == "full":
        step = _full(layer)
    else:
        step = layer if name == "none" else jax.checkpoint(layer, policy=policy(name), prevent_cse=False)
    return jax.lax.scan(lambda c, p: (step(c, p, *consts), None), x, stacked, unroll=unroll)[0]


def _bits(x):
    """x as unsigned integers of its width (a 16-bit float as uint16); 32-bit floats stay as they are."""
    return jax.lax.bitcast_convert_type(x, jnp.uint16) if x.dtype.itemsize == 2 else x


def _full(layer):
    """layer(x, params, *consts) rematerialised: the forward keeps x's bits, the backward
    recomputes the layer from them (jax.vjp) for its gradients."""
    @jax.custom_vjp
    def f(x, params, *consts):
        return layer(x, params, *consts)

    def fwd(x, params, *consts):
        return layer(x, params, *consts), (_bits(x), jnp.zeros((0,), x.dtype), params, consts)

    def bwd(res, g):
        bits, empty, params, consts = res
        x = bits if bits.dtype == empty.dtype else jax.lax.bitcast_convert_type(bits, empty.dtype)
        return jax.vjp(layer, x, params, *consts)[1](g)

    f.defvjp(fwd, bwd)
    return f
