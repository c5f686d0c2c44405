"""ptx.layers: scaled RoPE frequencies and Dense against flax's DenseGeneral."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from ptx.layers import rope_frequencies
from ptx.model import Dense


def test_scaled_rope_frequencies_follow_their_closed_forms():
    base = 10000.0 ** (-np.arange(0, 16, 2) / 16)
    np.testing.assert_allclose(rope_frequencies(16, 1e4, "linear", factor=4.0), base / 4, rtol=1e-6)
    # llama3: short wavelengths kept, long ones divided by the factor, a ramp between.
    freq = np.asarray(rope_frequencies(16, 1e4, "llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                                       original_max_len=64))
    wavelen = 2 * np.pi / base
    np.testing.assert_allclose(freq[wavelen < 16], base[wavelen < 16], rtol=1e-6)
    np.testing.assert_allclose(freq[wavelen > 64], base[wavelen > 64] / 8, rtol=1e-6)
    # dynamic: the base grows only past the original length.
    short, long = (rope_frequencies(16, 1e4, "dynamic", factor=2.0, original_max_len=8,
                                    positions=jnp.arange(n)[None]) for n in (8, 16))
    np.testing.assert_allclose(short, base, rtol=1e-6)
    np.testing.assert_allclose(long, (1e4 * 3 ** (16 / 14)) ** (-np.arange(0, 16, 2) / 16), rtol=1e-5)


def test_dense_has_flax_dense_generals_parameters_and_outputs():
    rng = np.random.default_rng(0)
    for in_axes, features, x_shape in ((1, (4, 8), (3, 5, 16)), (2, (16,), (3, 5, 4, 8))):
        x = jnp.asarray(rng.standard_normal(x_shape), jnp.float32)
        ours = Dense(features, in_axes, True, jnp.float32, jnp.float32)
        ref = nn.DenseGeneral(features, axis=tuple(range(-in_axes, 0)), use_bias=True,
                              kernel_init=nn.initializers.normal(0.02))
        params = ours.init(jax.random.key(3), x)
        jax.tree.map(np.testing.assert_array_equal, params, ref.init(jax.random.key(3), x))
        params = jax.tree.map(lambda p: p + 0.1 * jnp.asarray(rng.standard_normal(p.shape), jnp.float32), params)
        np.testing.assert_allclose(ours.apply(params, x), ref.apply(params, x), rtol=1e-5, atol=1e-6)
