"""The one ptx transformer: policy, reference, reward model and critic.

A Llama-family decoder (RMSNorm, RoPE, SwiGLU, grouped-query attention,
optional qkv bias, tied or untied embeddings) whose layers are scanned, so
compile time does not grow with depth. Without a KV cache, attention runs by
`cfg.attention` (ptx.attention); with one, it is the dense path reading keys
and values from the cache, so decoding equals the full forward.

The open families are fields of the one config, not copies of the model:
scaled RoPE (Llama 3.1 / 3.2), q / k RMSNorm per head (Qwen3, Gemma 3), a
sliding window on every layer (Mistral) or on all but `global_layers` with
their own rope base (Gemma 3), and Gemma's (1 + w) norms, norms after
attention and MLP, sqrt(d_model) embedding scale, GeGLU and query scalar.
"""
import dataclasses
import math
from typing import Any

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name
from jax.sharding import PartitionSpec as P

from ptx import attention, fields, lookup, remat, sharding
from ptx.layers import ACTIVATIONS, ROPE_TYPES, Dense, RMSNorm, rope, rope_tables, split_layers

_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Architecture of the ptx transformer; `.replace()` makes variants."""

    vocab_size: int = 1024
    d_model: int = 128
    n_layers: int = 2
    n_heads: int = 4
    n_kv_heads: int = 4
    head_dim: int = 0  # 0 = d_model // n_heads
    d_ff: int = 512
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    qkv_bias: bool = False
    tie_embeddings: bool = True
    scalar_head: bool = False  # reward / value head on the same trunk
    param_dtype: str = "float32"
    dtype: str = "float32"  # compute dtype: bfloat16 on TPU / GPU
    remat: str = "none"  # none | full | dots | offload (ptx.remat: what the backward keeps per layer)
    scan_unroll: int = 1  # layers unrolled per scan step; n_layers = no loop
    # Up to this depth a forward without a KV cache runs the layers as a Python loop
    # over slices of the stacked weights instead of a scan: no stacked residuals to
    # write and read back (about 14 % more SFT tokens/s on CPU at the bench size), at
    # the price of compile time that grows with depth. 0 = always scan.
    layer_loop_max: int = 8
    # Attention without a KV cache (ptx.attention.IMPLS): xla (dense scores), blockwise
    # (memory linear in length), cudnn (GPU), splash (TPU) or auto (per backend).
    attention: str = "xla"
    attention_block_q: int = 512  # query / key blocks of blockwise and splash
    attention_block_k: int = 512
    sliding_window: int = 0  # keys visible to a query, its own included; 0 = all earlier ones
    # Layers that attend the whole context when sliding_window > 0 (Gemma 3: every 6th);
    # () = every layer slides (Mistral).
    global_layers: tuple = ()
    rope_local_theta: float = 0.0  # rope base of the sliding layers, unscaled (Gemma 3); 0 = as the others
    rope_type: str = "default"  # default | linear | dynamic | llama3 (ptx.layers.rope_frequencies)
    rope_factor: float = 1.0  # linear / dynamic / llama3 scaling factor
    rope_low_freq_factor: float = 1.0  # llama3
    rope_high_freq_factor: float = 4.0  # llama3
    rope_original_max_len: int = 0  # dynamic / llama3: the pre-training context length
    qk_norm: bool = False  # RMSNorm over each q and k head before RoPE (Qwen3, Gemma 3)
    norm_plus_one: bool = False  # RMSNorm scale is 1 + weight (Gemma)
    post_norms: bool = False  # RMSNorm on the attention and MLP outputs too (Gemma 2 / 3)
    scale_embed: bool = False  # embeddings times sqrt(d_model), rounded to param_dtype (Gemma)
    mlp_act: str = "silu"  # gated MLP activation: silu (SwiGLU) | gelu_tanh (GeGLU, Gemma)
    query_pre_attn_scalar: float = 0.0  # attention logits scaled by its -1/2 power (Gemma); 0 = head_size
    loss_chunk: int = 0  # tokens per chunk of the LM head under a loss (ptx.logprobs); 0 = 2**26 // vocab_size

    def replace(self, **kw) -> "ModelConfig":
        return dataclasses.replace(self, **kw)

    @property
    def head_size(self) -> int:
        return self.head_dim or self.d_model // self.n_heads

    def is_local(self, layer: int) -> bool:
        """Whether `layer` attends through the sliding window."""
        return bool(self.sliding_window) and layer not in self.global_layers

    @property
    def mixed_layers(self) -> bool:
        """Some layers slide and some attend globally: each layer picks its window and rope."""
        return len({self.is_local(i) for i in range(self.n_layers)}) > 1

    def __post_init__(self):
        p = fields.POSITIVE
        fields.check(self, "model", vocab_size=p, d_model=p, n_layers=p, n_heads=p, n_kv_heads=p, d_ff=p,
                     head_dim=fields.COUNT, scan_unroll=p, rope_theta=fields.POSITIVE_NUMBER,
                     norm_eps=fields.POSITIVE_NUMBER)
        # A config read back from JSON (checkpoint meta) holds a list: keep it hashable.
        object.__setattr__(self, "global_layers", tuple(int(i) for i in self.global_layers))
        if any(not 0 <= i < self.n_layers for i in self.global_layers):
            raise ValueError(f"model.global_layers={self.global_layers}: each must be in [0, {self.n_layers})")
        if self.rope_type not in ROPE_TYPES:
            raise ValueError(f"model.rope_type={self.rope_type!r}; expected one of {ROPE_TYPES}")
        if self.rope_type in ("dynamic", "llama3") and self.rope_original_max_len < 1:
            raise ValueError(f"model.rope_type={self.rope_type!r} needs model.rope_original_max_len >= 1")
        if self.mlp_act not in ACTIVATIONS:
            raise ValueError(f"model.mlp_act={self.mlp_act!r}; expected one of {tuple(ACTIVATIONS)}")
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"n_heads={self.n_heads} is not a multiple of n_kv_heads={self.n_kv_heads}")
        for field in ("param_dtype", "dtype"):
            if getattr(self, field) not in _DTYPES:
                raise ValueError(f"model.{field}={getattr(self, field)!r}; expected one of {sorted(_DTYPES)}")
        if self.remat not in remat.POLICIES:
            raise ValueError(f"model.remat={self.remat!r}; expected one of {remat.POLICIES}")
        if self.layer_loop_max < 0:
            raise ValueError(f"model.layer_loop_max={self.layer_loop_max}; expected >= 0 (0 = always scan)")
        if self.attention not in attention.IMPLS:
            raise ValueError(f"model.attention={self.attention!r}; expected one of {attention.IMPLS}")
        if min(self.attention_block_q, self.attention_block_k, self.sliding_window + 1) < 1:
            raise ValueError("model.attention_block_q / _k must be >= 1 and model.sliding_window >= 0")
        if self.loss_chunk < 0:
            raise ValueError(f"model.loss_chunk={self.loss_chunk}; expected >= 0 (0 = auto)")


@flax.struct.dataclass
class Output:
    """What one forward returns.

    logits: [batch, seq, vocab] (compute dtype) or None when not asked for.
    values: [batch, seq] float32 from the scalar head, or None.
    hidden: [batch, seq, d_model] final-norm hidden states.
    cache: the updated KV cache, or None.
    """

    logits: Any
    values: Any
    hidden: Any
    cache: Any


def init_cache(cfg: ModelConfig, batch: int, length: int) -> dict:
    """An empty KV cache for `length` positions.

    k, v: [layers, batch, kv_heads, length, head] compute dtype (the layout the
    attention dots read without a transpose); positions, segment_ids: [batch,
    length] int32, shared by all layers (segment 0 = empty, so no query ever
    attends an unwritten slot).
    """
    kv_shape = (cfg.n_layers, batch, cfg.n_kv_heads, length, cfg.head_size)
    dt = _DTYPES[cfg.dtype]
    return {
        "k": jnp.zeros(kv_shape, dt),
        "v": jnp.zeros(kv_shape, dt),
        "positions": jnp.zeros((batch, length), jnp.int32),
        "segment_ids": jnp.zeros((batch, length), jnp.int32),
    }


def unstack_layers(params: dict) -> dict:
    """Parameters of `Transformer(cfg)` -> those of `Transformer(cfg, scan_layers=False)`:
    'layers' [n_layers, ...] becomes 'layers_0' ... (one copy of the layer weights)."""
    out = {k: v for k, v in params.items() if k != "layers"}
    out.update({f"layers_{i}": layer for i, layer in enumerate(split_layers(params["layers"]))})
    return out


def unstack_cache(cache: dict) -> dict:
    """A KV cache of `Transformer(cfg)` -> that of `Transformer(cfg, scan_layers=False)`:
    k and v become tuples of n_layers arrays [batch, kv_heads, length, head]."""
    return dict(cache, **{n: tuple(cache[n]) for n in ("k", "v")})


def _dense(features, in_axes, cfg, name, use_bias=False):
    features = features if isinstance(features, tuple) else (features,)
    return Dense(features, in_axes, use_bias, _DTYPES[cfg.dtype], _DTYPES[cfg.param_dtype], name=name)


def _norm(cfg: ModelConfig, name: str):
    return RMSNorm(cfg.norm_eps, _DTYPES[cfg.dtype], _DTYPES[cfg.param_dtype], cfg.norm_plus_one, name=name)


def _pick(local, if_local, if_global):
    """if_local or if_global (pytrees alike) by `local`: a Python bool, or a traced one (a mixed scan)."""
    if isinstance(local, bool):
        return if_local if local else if_global
    return jax.tree.map(lambda a, b: jnp.where(local, a, b), if_local, if_global)


class Attention(nn.Module):
    cfg: ModelConfig

    @nn.compact
    def __call__(self, x, positions, rotary, segment_ids, branch_ids, kv, layer, k_pos, k_seg, cache_index, local):
        """rotary: (`rope_tables` of the global layers, of the sliding ones). kv: None (keys are
        this chunk's, attended by `cfg.attention`), the whole cache (k, v) [L, b, kvh, S, hd]
        carried through the layer scan with `layer` this layer's index, or (layer None) this
        layer's own (k, v) [b, kvh, S, hd]. The new rows are written at cache_index, in place.
        branch_ids: [b, t] int32 shared-prefix branches (`attention.attend`) or None; no cache then.
        local: whether this layer slides (`cfg.is_local`), a bool or, in a scan over mixed
        layers, a traced one."""
        cfg = self.cfg
        h, kvh = cfg.n_heads, cfg.n_kv_heads
        b, t = x.shape[:2]
        # Projections on [b * t, d] (see Block): one token axis for the weight gradients.
        x2 = x.reshape(b * t, x.shape[-1])
        q = _dense((h, cfg.head_size), 1, cfg, "q", cfg.qkv_bias)(x2).reshape(b, t, h, cfg.head_size)
        k = _dense((kvh, cfg.head_size), 1, cfg, "k", cfg.qkv_bias)(x2).reshape(b, t, kvh, cfg.head_size)
        v = _dense((kvh, cfg.head_size), 1, cfg, "v", cfg.qkv_bias)(x2).reshape(b, t, kvh, cfg.head_size)
        if cfg.qk_norm:
            q, k = _norm(cfg, "q_norm")(q), _norm(cfg, "k_norm")(k)
        tables = _pick(local, rotary[1], rotary[0])
        q = rope(q, tables)
        k = rope(k, tables)
        if cfg.query_pre_attn_scalar and cfg.query_pre_attn_scalar != cfg.head_size:
            # attend() divides by sqrt(head_size); the logits are to be divided by sqrt(scalar).
            q = (q.astype(jnp.float32) * math.sqrt(cfg.head_size / cfg.query_pre_attn_scalar)).astype(q.dtype)
        masks = dict(q_positions=positions, k_positions=k_pos, q_segment_ids=segment_ids, k_segment_ids=k_seg)
        if kv is None:
            attend = lambda window: attention.attend(
                q, k, v, **masks, window=window, q_branch_ids=branch_ids, k_branch_ids=branch_ids,
                impl=cfg.attention, block_q=cfg.attention_block_q, block_k=cfg.attention_block_k)
        else:
            lead = () if layer is None else (layer,)
            put = lambda buf, new: jax.lax.dynamic_update_slice(
                buf, jnp.expand_dims(new.transpose(0, 2, 1, 3), tuple(range(len(lead)))).astype(buf.dtype),
                lead + (0, 0, cache_index, 0))
            kv = (put(kv[0], k), put(kv[1], v))
            keys, values = kv if layer is None else (
                jax.lax.dynamic_index_in_dim(c, layer, 0, keepdims=False) for c in kv)
            # The cache path stays dense: a decode step's scores are [b, heads, t, cache length].
            attend = lambda window: attention.xla_attention(q, keys, values, **masks, window=window,
                                                            kv_heads_first=True)
        if isinstance(local, bool):
            out = attend(cfg.sliding_window if local else 0)
        else:  # the window is static to every implementation: one branch per kind of layer
            out = jax.lax.cond(local, lambda: attend(cfg.sliding_window), lambda: attend(0))
        out = out.reshape(b * t, h, cfg.head_size)
        return _dense(cfg.d_model, 2, cfg, "o")(out).reshape(b, t, cfg.d_model), kv


class Block(nn.Module):
    """One decoder layer. local: whether it slides (`cfg.is_local`); None in a scan over mixed
    layers, whose scanned `layer` is then (index, local)."""
    cfg: ModelConfig
    local: bool | None = False

    @nn.compact
    def __call__(self, carry, layer, positions, rotary, segment_ids, branch_ids, k_pos, k_seg, cache_index):
        x, kv = carry
        x = checkpoint_name(x, remat.RESIDUAL)  # what remat='offload' moves to the host
        cfg = self.cfg
        local = self.local
        if local is None:
            layer, local = layer
        a, kv = Attention(cfg, name="attn")(_norm(cfg, "attn_norm")(x), positions, rotary, segment_ids,
                                            branch_ids, kv, layer, k_pos, k_seg, cache_index, local)
        if cfg.post_norms:
            a = _norm(cfg, "attn_post_norm")(a)
        x = x + a
        # The MLP on [b * t, d]: with one token axis, each weight gradient is a plain
        # matmul; with two, XLA's CPU backend copies a transposed [ff, b * t] operand.
        y = _norm(cfg, "mlp_norm")(x).reshape(-1, cfg.d_model)
        gate = _dense(cfg.d_ff, 1, cfg, "gate")(y)
        up = _dense(cfg.d_ff, 1, cfg, "up")(y)
        m = _dense(cfg.d_model, 1, cfg, "down")(ACTIVATIONS[cfg.mlp_act](gate) * up).reshape(x.shape)
        if cfg.post_norms:
            m = _norm(cfg, "mlp_post_norm")(m)
        x = x + m
        # The residual stream between blocks: batch over the data axes, d_model whole.
        return (sharding.constrain(x, sharding.RESIDUAL), kv), None


class Transformer(nn.Module):
    """Decoder-only transformer with an LM head and an optional scalar head.

    scan_layers: True (training, prefill) keeps the parameters stacked as 'layers'
    [n_layers, ...]; without a KV cache the Block runs on each layer's slice, in
    `remat.scan` or, without remat and for at most `cfg.layer_loop_max` layers, a
    Python loop (`split_layers`); with one, one Block is scanned. False runs
    'layers_0' ... 'layers_{n-1}' with a per-layer KV cache (`unstack_layers`,
    `unstack_cache`): the decode step, where slicing a layer's weights and cache
    out of the stacks would copy them on every token.
    """

    cfg: ModelConfig
    scan_layers: bool = True

    @nn.compact
    def __call__(self, tokens, positions=None, segment_ids=None, *, branch_ids=None, cache=None,
                 cache_index=0, logits=True):
        """Forward pass.

        tokens: [batch, seq] int32. positions: [batch, seq] int32 (default
        0..seq-1). segment_ids: [batch, seq] int32, 0 = padding, equal ids
        attend each other causally (default all 1). branch_ids: [batch, seq]
        int32 shared-prefix branches within a segment (`ptx.attention`: 0 =
        the prefix, seen by all; k > 0 seen by branch k alone) or None; not
        with a cache. cache: from `init_cache`
        (scan_layers=False: `unstack_cache` of it), written at slot
        `cache_index` (int32 scalar). logits: True for the LM
        head at every position, "last" for the last column only ([batch, 1,
        vocab]: a prefill needs no more), a slice of columns for those alone
        ([batch, len, vocab]: a loss on the response columns), False to skip it
        (reward model, or `Output.hidden` and `lm_head` into
        `losses.chunked_token_logprobs`).
        """
        cfg = self.cfg
        b, t = tokens.shape
        if positions is None:
            positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
        if segment_ids is None:
            segment_ids = jnp.ones((b, t), jnp.int32)
        if branch_ids is not None and cache is not None:
            raise ValueError("branch_ids are for full forwards: the KV cache holds no branches")
        embed = nn.Embed(cfg.vocab_size, cfg.d_model, dtype=_DTYPES[cfg.dtype],
                         param_dtype=_DTYPES[cfg.param_dtype],
                         embedding_init=nn.initializers.normal(0.02), name="embed")
        # The row lookup reads whole rows: gather the table's FSDP shards first, or the
        # partitioner would have to replicate the looked-up activations to re-split them.
        table = sharding.constrain(embed.embedding, sharding.EMBED_LOOKUP).astype(_DTYPES[cfg.dtype])
        x = lookup.rows(table, tokens)
        if cfg.scale_embed:  # sqrt(d_model) rounded to the weights' dtype, as Gemma's embedding scales
            x = x * jnp.asarray(math.sqrt(cfg.d_model), _DTYPES[cfg.param_dtype]).astype(x.dtype)
        x = sharding.constrain(x, sharding.RESIDUAL)
        if cache is None:
            kv, k_pos, k_seg = None, positions, segment_ids
        else:
            put = lambda buf, new: jax.lax.dynamic_update_slice_in_dim(buf, new.astype(buf.dtype), cache_index, 1)
            spec = sharding.KV_CACHE if self.scan_layers else P(*sharding.KV_CACHE[1:])
            kv = tuple(jax.tree.map(lambda c: sharding.constrain(c, spec), cache[n]) for n in ("k", "v"))
            k_pos, k_seg = put(cache["positions"], positions), put(cache["segment_ids"], segment_ids)
        rotary = rope_tables(positions, cfg.head_size, cfg.rope_theta, cfg.rope_type, factor=cfg.rope_factor,
                             low_freq_factor=cfg.rope_low_freq_factor, high_freq_factor=cfg.rope_high_freq_factor,
                             original_max_len=cfg.rope_original_max_len)
        # (global layers' tables, sliding layers' tables).
        rotary = (rotary, rope_tables(positions, cfg.head_size, cfg.rope_local_theta)
                  if cfg.rope_local_theta and cfg.mixed_layers else rotary)
        index = jnp.arange(cfg.n_layers, dtype=jnp.int32)
        # Mixed layers scan (index, local) and pick their window and rope per layer.
        local = None if cfg.mixed_layers else cfg.is_local(0)
        if cfg.mixed_layers:
            index = (index, jnp.asarray([cfg.is_local(i) for i in range(cfg.n_layers)]))
        if self.scan_layers and cache is None and not self.is_initializing():
            masks = (positions, rotary, segment_ids, branch_ids, k_pos, k_seg)
            stacked = self.variables["params"]["layers"]
            if cfg.remat == "none" and cfg.n_layers <= cfg.layer_loop_max:
                # Applied to each slice, they own no parameters: one per kind of layer.
                blocks = {kind: Block(cfg, kind, parent=None) for kind in (False, True)}
                for i, layer_params in enumerate(split_layers(stacked)):
                    (x, _), _ = blocks[cfg.is_local(i)].apply({"params": layer_params}, (x, None), None, *masks,
                                                              cache_index)
            else:
                block = Block(cfg, local, parent=None)
                layer = lambda x, p, *a: block.apply({"params": p[0]}, (x, None), p[1], *a, cache_index)[0][0]
                x = remat.scan(layer, x, (stacked, index), masks, cfg.remat, cfg.scan_unroll)
        elif self.scan_layers:  # initialisation, and prefill into a KV cache
            layers = nn.scan(Block, variable_axes={"params": 0}, split_rngs={"params": True},
                             in_axes=(0,) + (nn.broadcast,) * 7, length=cfg.n_layers, unroll=cfg.scan_unroll)
            (x, kv), _ = layers(cfg, local, name="layers")((x, kv), index, positions, rotary, segment_ids,
                                                           branch_ids, k_pos, k_seg, cache_index)
        else:
            new = []
            for i in range(cfg.n_layers):
                (x, kv_i), _ = Block(cfg, cfg.is_local(i), name=f"layers_{i}")(
                    (x, None if kv is None else (kv[0][i], kv[1][i])), None, positions, rotary, segment_ids,
                    branch_ids, k_pos, k_seg, cache_index)
                new.append(kv_i)
            kv = None if kv is None else tuple(zip(*new))
        if cache is not None:
            cache = {"k": kv[0], "v": kv[1], "positions": k_pos, "segment_ids": k_seg}
        hidden = _norm(cfg, "final_norm")(x)
        out_logits = None
        if logits:
            head_in = hidden[:, logits] if isinstance(logits, slice) else hidden[:, -1:] if logits == "last" else hidden
            flat = head_in.reshape(-1, cfg.d_model)  # one token axis for the weight gradient (see Block)
            if cfg.tie_embeddings:
                out_logits = embed.attend(flat)
            else:
                out_logits = _dense(cfg.vocab_size, 1, cfg, "lm_head")(flat)
            out_logits = out_logits.reshape(head_in.shape[:2] + (cfg.vocab_size,))
        values = None
        if cfg.scalar_head:
            # No bias, as in Hugging Face's sequence-classification `score` layer: the
            # pairwise loss cannot see a constant, so a bias would only drift. Zero
            # init: a fresh value head predicts 0 instead of per-token noise that
            # would swamp the first GAE advantages.
            values = nn.Dense(1, use_bias=False, dtype=jnp.float32, param_dtype=_DTYPES[cfg.param_dtype],
                              kernel_init=nn.initializers.zeros, name="scalar_head")(
                hidden.astype(jnp.float32))[..., 0]
        return Output(logits=out_logits, values=values, hidden=hidden, cache=cache)


def lm_head(cfg: ModelConfig, params: dict) -> tuple:
    """The LM head of `params` as `losses.chunked_token_logprobs` takes it: (kernel, vocab_major).

    Tied embeddings: the table [vocab, d_model], vocab_major True; else the
    'lm_head' kernel [d_model, vocab], vocab_major False. In the parameter dtype:
    the logits are computed in the dtype of `Output.hidden`, as in the forward.
    """
    if cfg.tie_embeddings:
        return params["embed"]["embedding"], True
    return params["lm_head"]["kernel"], False


def init_params(cfg: ModelConfig, rng: jax.Array) -> dict:
    """Fresh parameters (unsharded; see ptx.sharding for sharded init)."""
    tokens = jnp.zeros((1, 8), jnp.int32)
    return Transformer(cfg).init(rng, tokens)["params"]


def abstract_params(cfg: ModelConfig) -> dict:
    """The parameter tree as jax.ShapeDtypeStructs: shapes and dtypes, nothing allocated."""
    return jax.eval_shape(lambda: init_params(cfg, jax.random.PRNGKey(0)))


def count_params(params) -> int:
    return sum(x.size for x in jax.tree_util.tree_leaves(params))


def flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    """Forward FLOPs per token: 2 x matmul params (embedding lookup excluded) + attention."""
    hd = cfg.head_size
    attn = cfg.d_model * hd * (2 * cfg.n_heads + 2 * cfg.n_kv_heads)
    mlp = 3 * cfg.d_model * cfg.d_ff
    per_layer = 2 * (attn + mlp) + 2 * 2 * seq_len * cfg.n_heads * hd
    return cfg.n_layers * per_layer + 2 * cfg.d_model * cfg.vocab_size
