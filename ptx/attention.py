"""Attention implementations behind one call, `attend`.

Every implementation computes softmax(q k^T / sqrt(head) + mask) v for
grouped-query heads (query head i reads kv head i // (heads / kv_heads)) under
one mask: a key is visible to a query iff both are in the same segment, the
segment is not 0 (padding), k_pos <= q_pos, and, with a sliding window w > 0,
q_pos - w < k_pos (w visible tokens, the query's own included: Mistral's and
Gemma's convention).
Shared prefixes add per-token branch ids (None = all 0): a key with branch id
0 is visible to the queries of its segment under the rules above, one with
branch id k > 0 only to queries of branch k. A row [prompt | chosen |
rejected] with branch ids 0 / 1 / 2 and the positions of both responses
starting where the prompt ends computes each response as if it followed the
prompt alone (DPO with prefix sharing, Wang et al. 2024): causality and the
window go by position, which counts up along each branch, so the window
measures distance within the branch as in the response's own row.

- xla: the dense [b, heads, t, s] scores; the reference, and the KV-cache path.
- blockwise: online softmax over key blocks inside a loop over query blocks
  (Rabe & Staats, FlashAttention 2), with its own backward pass that recomputes
  each block from the saved log-sum-exp: memory linear in the sequence length.
  Blocks that no query of the batch may see are skipped.
- cudnn: `jax.nn.dot_product_attention(implementation="cudnn")`, GPU only.
- splash: the Pallas splash-attention kernel, TPU only.
- auto: cudnn on GPU where it applies, splash on TPU, else blockwise for long
  keys and xla for short ones.

cudnn and splash take causality and the window by index, not position, and
segments by equality alone: they equal the others when positions count up by
one along each segment (padded and packed batches) and t == s. cudnn adds the
branch ids to its boolean mask, which with index causality is the positional
rule when each branch follows the prefix and the branches before it in the
row; with branch ids and a window (index distance would count the other
branches' tokens), and in splash (its mask is fixed per shape; segment ids
compare by equality alone), attend runs blockwise instead. Rows with no
visible key (padding queries) are don't-care: xla returns the mean of all
values there, blockwise zeros, cudnn and splash attend the padding itself.
"""
import functools
import math

import jax
import jax.numpy as jnp
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as splash_kernel
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as splash_mask
from jax.sharding import PartitionSpec as P

from ptx import sharding

IMPLS = ("xla", "blockwise", "cudnn", "splash", "auto")
# auto on CPU (or an unsupported GPU case): from this many keys on, the dense
# [b, heads, t, s] float32 scores (and their gradient) are the largest buffers
# of a layer at any model width, so blockwise takes over.
AUTO_BLOCKWISE_MIN_KEYS = 2048
# Large but finite, so a fully masked row (padding queries) gives a uniform
# softmax instead of NaN.
_MASK_VALUE = -1e30
# Splash tiles the sequence in blocks of whole TPU lanes.
_SPLASH_LANES = 128


def visible(q_positions, k_positions, q_segment_ids, k_segment_ids, window=0, q_branch_ids=None,
            k_branch_ids=None):
    """The attention mask: [b, t] and [b, s] int32 ids (branch ids None or both given)
    -> [b, t, s] bool, True = attended."""
    mask = ((q_segment_ids[:, :, None] == k_segment_ids[:, None, :]) & (k_segment_ids[:, None, :] > 0)
            & (k_positions[:, None, :] <= q_positions[:, :, None]))
    if window:
        mask = mask & (k_positions[:, None, :] > q_positions[:, :, None] - window)
    if k_branch_ids is not None:
        mask = mask & _branch_visible(q_branch_ids, k_branch_ids)
    return mask


def _branch_visible(q_branch_ids, k_branch_ids):
    """[b, t] and [b, s] branch ids -> [b, t, s] bool: the key is the prefix's or the query's branch."""
    return (k_branch_ids[:, None, :] == 0) | (k_branch_ids[:, None, :] == q_branch_ids[:, :, None])


def attend(q, k, v, *, q_positions, k_positions, q_segment_ids, k_segment_ids, window=0, q_branch_ids=None,
           k_branch_ids=None, impl="xla", block_q=512, block_k=512):
    """Multi-head attention with grouped-query heads, by the implementation `impl`.

    Args:
        q: [b, t, heads, head] float (compute dtype).
        k, v: [b, s, kv_heads, head], q's dtype; heads is a multiple of kv_heads.
        q_positions, q_segment_ids: [b, t] int32. k_positions, k_segment_ids: [b, s] int32.
        window: sliding window in tokens (the query's own included); 0 = none.
        q_branch_ids: [b, t] int32, k_branch_ids: [b, s] int32, or both None: shared-prefix
            branches (module docstring).
        impl: one of IMPLS.
        block_q, block_k: query and key block sizes of blockwise and splash
            (clipped to the sequence); the sequence need not be a multiple.

    Returns:
        [b, t, heads, head] in q's dtype.
    """
    if impl not in IMPLS:
        raise ValueError(f"attention impl {impl!r}; expected one of {IMPLS}")
    if impl == "auto":
        impl = auto_impl(q, k)
    if k_branch_ids is not None and (impl == "splash" or (impl == "cudnn" and window)):
        impl = "blockwise"  # no branch mask there (module docstring)
    masks = dict(q_positions=q_positions, k_positions=k_positions, q_segment_ids=q_segment_ids,
                 k_segment_ids=k_segment_ids, window=window)
    branches = dict(q_branch_ids=q_branch_ids, k_branch_ids=k_branch_ids)
    if impl == "xla":
        return xla_attention(q, k, v, **masks, **branches)
    if impl == "blockwise":
        return blockwise_attention(q, k, v, **masks, **branches, block_q=block_q, block_k=block_k)
    if impl == "cudnn":
        return cudnn_attention(q, k, v, **masks, **branches)
    return splash_attention(q, k, v, **masks, block_q=block_q, block_k=block_k)


def auto_impl(q, k) -> str:
    """What impl="auto" runs for q [b, t, heads, head] and k [b, s, kv_heads, head] on this backend."""
    backend = jax.default_backend()
    head = q.shape[-1]
    # cuDNN's flash attention: half precision, head sizes in multiples of 8 up to 128.
    if (backend == "gpu" and q.shape[1] == k.shape[1] and q.dtype in (jnp.bfloat16, jnp.float16)
            and head % 8 == 0 and head <= 128):
        return "cudnn"
    if backend == "tpu" and q.shape[1] == k.shape[1] and q.shape[1] % _SPLASH_LANES == 0:
        return "splash"
    return "blockwise" if k.shape[1] >= AUTO_BLOCKWISE_MIN_KEYS else "xla"


def xla_attention(q, k, v, *, q_positions, k_positions, q_segment_ids, k_segment_ids, window=0,
                  q_branch_ids=None, k_branch_ids=None, kv_heads_first=False):
    """Dense attention: `attend`'s arguments; kv_heads_first: k, v are [b, kv_heads, s, head]
    (the KV cache's layout, read without a transposed copy). Returns [b, t, heads, head]."""
    b, t, h, hd = q.shape
    spec = "bksd" if kv_heads_first else "bskd"
    kvh = k.shape[1 if kv_heads_first else 2]
    q = q.reshape(b, t, kvh, h // kvh, hd)
    scores = jnp.einsum(f"btkgd,{spec}->bkgts", q, k.astype(q.dtype)).astype(jnp.float32)
    scores = scores / jnp.sqrt(hd).astype(jnp.float32)
    mask = visible(q_positions, k_positions, q_segment_ids, k_segment_ids, window, q_branch_ids, k_branch_ids)
    scores = jnp.where(mask[:, None, None], scores, _MASK_VALUE)
    probs = jax.nn.softmax(scores, axis=-1).astype(q.dtype)
    return jnp.einsum(f"bkgts,{spec}->btkgd", probs, v.astype(q.dtype)).reshape(b, t, h, hd)


def blockwise_attention(q, k, v, *, q_positions, k_positions, q_segment_ids, k_segment_ids, window=0,
                        q_branch_ids=None, k_branch_ids=None, block_q=512, block_k=512):
    """Flash-style attention: `attend`'s arguments. Forward and backward hold one
    [b, heads, block_q, block_k] block of scores at a time, and the backward pass
    keeps only q, k, v, the output and a [b, heads, t] log-sum-exp."""
    b, t, h, hd = q.shape
    s, kvh = k.shape[1], k.shape[2]
    bq, bk = min(block_q, t), min(block_k, s)
    # Pad to whole blocks: padded queries are segment 0 (no key, output 0, cut off
    # below); padded keys are segment 0, so no query sees them.
    pad_t, pad_s = -t % bq, -s % bk
    pad = lambda x, n: None if x is None else jnp.pad(x, [(0, 0), (0, n)] + [(0, 0)] * (x.ndim - 2))
    out = _flash(pad(q, pad_t).reshape(b, t + pad_t, kvh, h // kvh, hd), pad(k, pad_s), pad(v, pad_s),
                 pad(q_positions, pad_t), pad(k_positions, pad_s), pad(q_segment_ids, pad_t),
                 pad(k_segment_ids, pad_s), pad(q_branch_ids, pad_t), pad(k_branch_ids, pad_s), window, bq, bk)
    return out[:, :t].reshape(b, t, h, hd)


def _block(x, i, size):
    """Block i of `size` rows along axis 1 (None stays None: no branch ids)."""
    return None if x is None else jax.lax.dynamic_slice_in_dim(x, i * size, size, axis=1)


@functools.partial(jax.custom_vjp, nondiff_argnums=(9, 10, 11))
def _flash(q, k, v, q_pos, k_pos, q_seg, k_seg, q_br, k_br, window, bq, bk):
    """q: [b, t, kvh, g, hd]; k, v: [b, s, kvh, hd]; t, s whole blocks; q_br, k_br: branch ids or None.
    -> [b, t, kvh, g, hd] q.dtype."""
    return _flash_fwd(q, k, v, q_pos, k_pos, q_seg, k_seg, q_br, k_br, window, bq, bk)[0]


def _flash_fwd(q, k, v, q_pos, k_pos, q_seg, k_seg, q_br, k_br, window, bq, bk):
    b, t, kvh, g, hd = q.shape
    # Inside a scan over layers under grad, JAX hoists what depends only on the loop's
    # constants out of the loop: here the masks, which the skip conditional would split
    # into [t / bq, s / bk, b, heads, bq, bk] stacks, quadratic in length. Tied to q, the
    # positions and segments vary per layer, so nothing of the mask is hoisted.
    q, q_pos, k_pos, q_seg, k_seg, q_br, k_br = jax.lax.optimization_barrier(
        (q, q_pos, k_pos, q_seg, k_seg, q_br, k_br))
    scale = 1.0 / math.sqrt(hd)

    def q_block(i):
        qi, qp, qs, qb = _block(q, i, bq), _block(q_pos, i, bq), _block(q_seg, i, bq), _block(q_br, i, bq)

        def k_step(carry, j):
            kj, vj = _block(k, j, bk), _block(v, j, bk)
            mask = visible(qp, _block(k_pos, j, bk), qs, _block(k_seg, j, bk), window, qb, _block(k_br, j, bk))

            def update(carry):
                m, total, acc = carry  # running max, sum of exp, output sum: [b, kvh, g, bq(, hd)] f32
                scores = jnp.einsum("bqkgd,bskd->bkgqs", qi, kj, preferred_element_type=jnp.float32) * scale
                m_new = jnp.maximum(m, jnp.max(jnp.where(mask[:, None, None], scores, -jnp.inf), axis=-1))
                # A row with no visible key so far keeps m = -inf: shift it by 0 instead.
                m_safe = jnp.where(jnp.isfinite(m_new), m_new, 0.0)
                p = jnp.where(mask[:, None, None], jnp.exp(scores - m_safe[..., None]), 0.0)
                alpha = jnp.exp(m - m_safe)
                acc = alpha[..., None] * acc + jnp.einsum("bkgqs,bskd->bkgqd", p.astype(v.dtype), vj,
                                                          preferred_element_type=jnp.float32)
                return m_new, alpha * total + jnp.sum(p, axis=-1), acc

            return jax.lax.cond(jnp.any(mask), update, lambda c: c, carry), None

        init = (jnp.full((b, kvh, g, bq), -jnp.inf, jnp.float32), jnp.zeros((b, kvh, g, bq), jnp.float32),
                jnp.zeros((b, kvh, g, bq, hd), jnp.float32))
        (m, total, acc), _ = jax.lax.scan(k_step, init, jnp.arange(k.shape[1] // bk))
        seen = total > 0
        out = acc / jnp.where(seen, total, 1.0)[..., None]
        lse = jnp.where(seen, m + jnp.log(jnp.where(seen, total, 1.0)), 0.0)
        return out.transpose(0, 3, 1, 2, 4).astype(q.dtype), lse

    outs, lses = jax.lax.map(q_block, jnp.arange(t // bq))  # [nq, b, bq, kvh, g, hd], [nq, b, kvh, g, bq]
    out = jnp.moveaxis(outs, 0, 1).reshape(q.shape)
    lse = jnp.moveaxis(lses, 0, 3).reshape(b, kvh, g, t)
    return out, (q, k, v, q_pos, k_pos, q_seg, k_seg, q_br, k_br, out, lse)


def _flash_bwd(window, bq, bk, res, d_out):
    q, k, v, q_pos, k_pos, q_seg, k_seg, q_br, k_br, out, lse = res
    b, t, kvh, g, hd = q.shape
    scale = 1.0 / math.sqrt(hd)
    # FlashAttention 2's D = rowsum(dO * O): d_scores = p * (dp - D).
    delta = jnp.einsum("bqkgd,bqkgd->bkgq", d_out.astype(jnp.float32), out.astype(jnp.float32))

    def k_block(dq, j):
        kj, vj, kp, ks = _block(k, j, bk), _block(v, j, bk), _block(k_pos, j, bk), _block(k_seg, j, bk)
        kb = _block(k_br, j, bk)

        def q_step(carry, i):
            mask = visible(_block(q_pos, i, bq), kp, _block(q_seg, i, bq), ks, window, _block(q_br, i, bq), kb)

            def update(carry):
                dq, dk, dv = carry
                qi, doi = _block(q, i, bq), _block(d_out, i, bq)
                lse_i, delta_i = (jax.lax.dynamic_slice_in_dim(x, i * bq, bq, axis=3) for x in (lse, delta))
                scores = jnp.einsum("bqkgd,bskd->bkgqs", qi, kj, preferred_element_type=jnp.float32) * scale
                p = jnp.where(mask[:, None, None], jnp.exp(scores - lse_i[..., None]), 0.0)
                dv = dv + jnp.einsum("bkgqs,bqkgd->bskd", p.astype(doi.dtype), doi,
                                     preferred_element_type=jnp.float32)
                dp = jnp.einsum("bqkgd,bskd->bkgqs", doi, vj, preferred_element_type=jnp.float32)
                ds = (p * (dp - delta_i[..., None]) * scale).astype(q.dtype)
                dq_i = jnp.einsum("bkgqs,bskd->bqkgd", ds, kj, preferred_element_type=jnp.float32)
                dq = jax.lax.dynamic_update_slice_in_dim(dq, _block(dq, i, bq) + dq_i, i * bq, axis=1)
                dk = dk + jnp.einsum("bkgqs,bqkgd->bskd", ds, qi, preferred_element_type=jnp.float32)
                return dq, dk, dv

            return jax.lax.cond(jnp.any(mask), update, lambda c: c, carry), None

        zeros = jnp.zeros(kj.shape, jnp.float32)
        (dq, dk, dv), _ = jax.lax.scan(q_step, (dq, zeros, zeros), jnp.arange(t // bq))
        return dq, (dk, dv)

    dq, (dks, dvs) = jax.lax.scan(k_block, jnp.zeros(q.shape, jnp.float32), jnp.arange(k.shape[1] // bk))
    dk, dv = (jnp.moveaxis(x, 0, 1).reshape(k.shape).astype(k.dtype) for x in (dks, dvs))
    return dq.astype(q.dtype), dk, dv, None, None, None, None, None, None


_flash.defvjp(_flash_fwd, _flash_bwd)


def cudnn_attention(q, k, v, *, q_positions, k_positions, q_segment_ids, k_segment_ids, window=0,
                    q_branch_ids=None, k_branch_ids=None):
    """cuDNN flash attention: `attend`'s arguments, t == s; bfloat16 or float16.

    Causality and the window go by index (see the module docstring), segments
    and branches as a boolean mask, which `jax.nn.dot_product_attention` turns into a
    [b, 1, t, s] bias: smaller than the scores by the number of heads, but
    still quadratic in length.
    """
    del q_positions, k_positions  # causal by index
    if jax.default_backend() != "gpu":
        raise ValueError(f"attention impl 'cudnn' needs a GPU; the backend is {jax.default_backend()!r}")
    _check_self_attention(q, k, "cudnn")
    if k_branch_ids is not None and window:
        raise ValueError("attention impl 'cudnn' windows by index: it cannot window branched rows")
    mask = q_segment_ids[:, :, None] == k_segment_ids[:, None, :]
    if k_branch_ids is not None:
        mask = mask & _branch_visible(q_branch_ids, k_branch_ids)
    return jax.nn.dot_product_attention(q, k, v, mask=mask[:, None], is_causal=True,
                                        local_window_size=(window - 1, 0) if window else None,
                                        implementation="cudnn")


def splash_attention(q, k, v, *, q_positions, k_positions, q_segment_ids, k_segment_ids, window=0,
                     block_q=512, block_k=512, interpret=False):
    """The Pallas splash-attention kernel: `attend`'s arguments, t == s a multiple of 128.

    Causality and the window go by index (see the module docstring); segments
    are the kernel's own segment ids. interpret: run the kernel in the Pallas
    interpreter, on any backend (tests).
    """
    del q_positions, k_positions  # causal by index
    if not interpret and jax.default_backend() != "tpu":
        raise ValueError(f"attention impl 'splash' needs a TPU; the backend is {jax.default_backend()!r}")
    _check_self_attention(q, k, "splash")
    b, t, h, hd = q.shape
    if t % _SPLASH_LANES:
        raise ValueError(f"attention impl 'splash' needs a sequence length that is a multiple of "
                         f"{_SPLASH_LANES}; got {t}")
    kernel = _splash(t, h, window, _splash_block(block_q, t), _splash_block(block_k, t), interpret)
    heads_major = lambda x: x.transpose(0, 2, 1, 3)  # the kernel's [heads, seq, head] per example
    run = jax.vmap(lambda q, k, v, qs, ks: kernel(q, k, v, segment_ids=splash_kernel.SegmentIds(qs, ks)))
    # The kernel does not scale the scores: scale q instead.
    out = _per_batch_shard(run, heads_major(q * jnp.asarray(1.0 / math.sqrt(hd), q.dtype)), heads_major(k),
                           heads_major(v), q_segment_ids, k_segment_ids)
    return heads_major(out)


def _per_batch_shard(fn, *args):
    """fn(*args), batch-major arrays, run on each device's rows of the mesh of `jax.set_mesh`.

    XLA does not partition a Pallas kernel: on a sharded batch it would gather
    the whole batch onto every device and compute all of it there.
    """
    mesh = jax.sharding.get_abstract_mesh()
    axes = () if mesh.empty else tuple(a for a in sharding.BATCH if a in mesh.axis_names)
    shards = math.prod(mesh.shape[a] for a in axes)
    if shards == 1 or args[0].shape[0] % shards:
        return fn(*args)
    return jax.shard_map(fn, in_specs=P(axes), out_specs=P(axes), check_vma=False)(*args)


def _check_self_attention(q, k, impl):
    if q.shape[1] != k.shape[1]:
        raise ValueError(f"attention impl {impl!r} masks by index: it needs as many queries as keys, "
                         f"got {q.shape[1]} and {k.shape[1]}")


def _splash_block(block, t):
    """The largest multiple of 128 up to `block` that divides t."""
    size = max(_SPLASH_LANES, min(block, t) // _SPLASH_LANES * _SPLASH_LANES)
    while t % size:
        size -= _SPLASH_LANES
    return size


@functools.lru_cache(maxsize=None)
def _splash(t, heads, window, bq, bk, interpret):
    """The splash kernel for one example ([heads, t, head] -> [heads, t, head]), built once per shape."""
    one = (splash_mask.LocalMask((t, t), (window - 1, 0), offset=0) if window
           else splash_mask.CausalMask((t, t)))
    blocks = splash_kernel.BlockSizes(block_q=bq, block_kv=bk, block_kv_compute=bk, block_q_dkv=bq,
                                      block_kv_dkv=bk, block_kv_dkv_compute=bk, block_q_dq=bq, block_kv_dq=bk)
    # The kernel holds its block tables as arrays: concrete ones, or a cached kernel
    # built inside one trace would carry that trace's tracers into the next.
    with jax.ensure_compile_time_eval():
        return splash_kernel.make_splash_mha(splash_mask.MultiHeadMask([one] * heads), block_sizes=blocks,
                                             head_shards=1, q_seq_shards=1, interpret=interpret)
