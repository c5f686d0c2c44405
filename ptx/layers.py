"""The transformer's building blocks: rotary embedding (plain and scaled), RMSNorm, Dense,
and the split of stacked layer weights into per-layer trees.

RoPE scaling follows Hugging Face's `rope_type`s: linear (positions divided by
`factor`), dynamic (NTK: the base grows with the longest position past the
original length) and llama3 (Llama 3.1 / 3.2: long wavelengths divided by
`factor`, short ones kept, a smooth ramp between).
"""
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

ROPE_TYPES = ("default", "linear", "dynamic", "llama3")


def rope_frequencies(head_size: int, theta: float, rope_type: str = "default", *, factor: float = 1.0,
                     low_freq_factor: float = 1.0, high_freq_factor: float = 4.0, original_max_len: int = 0,
                     positions=None) -> jax.Array:
    """Inverse frequencies [head_size / 2] float32 of a rotary embedding with base theta.

    positions: [b, t] int32, read by "dynamic" only (its length is the largest position + 1).
    """
    exponent = jnp.arange(0, head_size, 2, dtype=jnp.float32) / head_size
    if rope_type == "dynamic":
        length = jnp.maximum(jnp.max(positions) + 1, original_max_len).astype(jnp.float32)
        theta = theta * (factor * length / original_max_len - (factor - 1)) ** (head_size / (head_size - 2))
    freq = theta ** -exponent
    if rope_type == "linear":
        return freq / factor
    if rope_type == "llama3":
        wavelen = 2 * math.pi / freq
        low_wavelen, high_wavelen = original_max_len / low_freq_factor, original_max_len / high_freq_factor
        scaled = jnp.where(wavelen > low_wavelen, freq / factor, freq)
        smooth = (original_max_len / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
        return jnp.where(medium, smoothed, scaled)
    return freq


def rope_tables(positions: jax.Array, head_size: int, theta: float, rope_type: str = "default",
                **scaling) -> tuple:
    """Rotary sin and cos for positions [b, t] int32: each [b, t, 1, head_size / 2] float32.

    Made once per forward and shared by every layer's q and k. rope_type and
    scaling: see `rope_frequencies`.
    """
    if rope_type == "default":
        # Written out as it always was: the default tables stay bit-identical.
        freq = theta ** (-jnp.arange(0, head_size, 2, dtype=jnp.float32) / head_size)
    else:
        freq = rope_frequencies(head_size, theta, rope_type, positions=positions, **scaling)
    angle = positions[..., None].astype(jnp.float32) * freq
    # Through a product with the identity: XLA's fusion copies an elementwise producer
    # into each consumer when that adds no memory traffic, so without a matmul (whose
    # output is always a buffer) sin and cos were evaluated per element inside every
    # layer's rotary fusions, per head and again in the backward pass (~250 ms of
    # thread time per SFT step on CPU at the bench size). HIGHEST keeps them exact on TPU.
    eye = jnp.eye(angle.shape[-1], dtype=jnp.float32)
    return tuple(jnp.einsum("btf,fg->btg", fn(angle), eye, precision=jax.lax.Precision.HIGHEST)[:, :, None, :]
                 for fn in (jnp.sin, jnp.cos))


def rope(x: jax.Array, tables: tuple) -> jax.Array:
    """Rotary embedding, Llama's half-split layout. x: [b, t, heads, d]; tables: `rope_tables`."""
    sin, cos = tables
    x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
    out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return out.astype(x.dtype)


class RMSNorm(nn.Module):
    """RMS normalisation over the last axis. plus_one: the scale is 1 + weight (Gemma), the
    weight starting at 0; else the weight itself, starting at 1."""
    eps: float
    dtype: Any
    param_dtype: Any
    plus_one: bool = False

    @nn.compact
    def __call__(self, x):
        init = nn.initializers.zeros if self.plus_one else nn.initializers.ones
        scale = self.param("scale", init, (x.shape[-1],), self.param_dtype).astype(jnp.float32)
        x32 = x.astype(jnp.float32)
        x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return (x32 * (1.0 + scale if self.plus_one else scale)).astype(self.dtype)


class Dense(nn.Module):
    """A linear layer over the last `in_axes` axes of x, with the parameters of
    `nn.DenseGeneral` (kernel [*in, *features], bias [*features], the same init),
    computed as one 2-D matmul on the kernel flattened to [prod(in), prod(features)].

    DenseGeneral contracts the multi-axis attention kernels ([d, heads, hd],
    [heads, hd, d]) as they are, and XLA's CPU backend then copies a transposed
    kernel for the backward pass, per layer and step; the flattened kernel is a
    free reshape and its gradients are plain matmuls, as the MLP's are.
    """
    features: tuple
    in_axes: int
    use_bias: bool
    dtype: Any
    param_dtype: Any

    @nn.compact
    def __call__(self, x):
        lead, in_shape = x.shape[:-self.in_axes], x.shape[-self.in_axes:]
        n_in, n_out = math.prod(in_shape), math.prod(self.features)
        normal = nn.initializers.normal(0.02)
        kernel = self.param("kernel", lambda rng, shape, dt: normal(rng, (n_in, n_out), dt).reshape(shape),
                            in_shape + self.features, self.param_dtype)
        y = x.reshape(lead + (n_in,)).astype(self.dtype) @ kernel.reshape(n_in, n_out).astype(self.dtype)
        if self.use_bias:
            y = y + self.param("bias", nn.initializers.zeros, self.features,
                               self.param_dtype).reshape(n_out).astype(self.dtype)
        return y.reshape(lead + self.features)


@jax.custom_vjp
def split_layers(stacked):
    """Stacked layer parameters (leaves [n_layers, ...]) -> a tuple of per-layer trees.

    The gradient is one stack of the per-layer gradients; plain slicing would
    transpose to a zero-padded [n_layers, ...] copy per layer, all added up.
    """
    n = jax.tree_util.tree_leaves(stacked)[0].shape[0]
    return tuple(jax.tree.map(lambda w, i=i: w[i], stacked) for i in range(n))


def _split_layers_fwd(stacked):
    return split_layers(stacked), None


def _split_layers_bwd(_, grads):
    return (jax.tree.map(lambda *g: jnp.stack(g), *grads),)


split_layers.defvjp(_split_layers_fwd, _split_layers_bwd)


ACTIVATIONS = {"silu": nn.silu, "gelu_tanh": lambda x: nn.gelu(x, approximate=True)}
