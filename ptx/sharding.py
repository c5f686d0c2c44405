"""Mesh and partitioning: (regex -> PartitionSpec) rules are data.

Axes: `data` (pure data parallel), `fsdp` (data parallel with parameters
sharded over the embedding dimension) and `tensor` (heads and MLP hidden
units). Batches are split over ('data', 'fsdp').
"""
import dataclasses
import re

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from ptx import fields

AXES = ("data", "fsdp", "tensor")
BATCH = ("data", "fsdp")
# Activation layouts the model constrains to when a mesh is set (`constrain`).
RESIDUAL = P(BATCH, None, None)  # [batch, seq, d_model]: d_model whole on every device
EMBED_LOOKUP = P("tensor", None)  # [vocab, d_model] as the token lookup reads it
KV_CACHE = P(None, BATCH, "tensor", None, None)  # [layers, batch, kv_heads, length, head_dim]


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    """The `mesh` section: devices per axis."""

    data: int = -1  # -1 = all devices not used by the other axes
    fsdp: int = 1
    tensor: int = 1

    def __post_init__(self):
        fields.check(self, "mesh", **{axis: fields.AXIS for axis in AXES})


def make_mesh(mesh_cfg: MeshConfig, devices=None) -> Mesh:
    """A (data, fsdp, tensor) mesh over all devices of all processes; -1 takes the rest."""
    devices = list(jax.devices() if devices is None else devices)
    sizes = [int(getattr(mesh_cfg, a)) for a in AXES]
    known = int(np.prod([s for s in sizes if s != -1]))
    if sizes.count(-1) > 1:
        raise ValueError(f"mesh {dict(zip(AXES, sizes))}: at most one axis may be -1")
    if -1 in sizes:
        if len(devices) % known:
            raise ValueError(f"mesh {dict(zip(AXES, sizes))} does not divide {len(devices)} devices")
        sizes[sizes.index(-1)] = len(devices) // known
    if int(np.prod(sizes)) != len(devices):
        raise ValueError(f"mesh {dict(zip(AXES, sizes))} needs {int(np.prod(sizes))} devices, "
                         f"{len(devices)} available")
    return Mesh(np.asarray(devices).reshape(sizes), AXES)


def param_rules(cfg) -> list:
    """Ordered (regex over 'a/b/c' parameter paths, PartitionSpec) for the transformer.

    Layer parameters carry a leading scanned layer axis, never sharded.
    """
    rules = [
        (r"embed/embedding", P("tensor", "fsdp")),  # [vocab, d_model]
        (r"layers/attn/(q|k|v)/kernel", P(None, "fsdp", "tensor", None)),  # [L, d, heads, hd]
        (r"layers/attn/o/kernel", P(None, "tensor", None, "fsdp")),  # [L, heads, hd, d]
        (r"layers/(gate|up)/kernel", P(None, "fsdp", "tensor")),  # [L, d, ff]
        (r"layers/down/kernel", P(None, "tensor", "fsdp")),  # [L, ff, d]
        (r"layers/(attn_norm|mlp_norm)/scale", P(None, None)),
        (r"final_norm/scale", P(None)),
    ]
    if cfg.qk_norm:
        rules.append((r"layers/attn/(q_norm|k_norm)/scale", P(None, None)))  # [L, hd]
    if cfg.post_norms:
        rules.append((r"layers/(attn_post_norm|mlp_post_norm)/scale", P(None, None)))
    if cfg.qkv_bias:
        rules.append((r"layers/attn/(q|k|v)/bias", P(None, "tensor", None)))
    if not cfg.tie_embeddings:
        rules.append((r"lm_head/kernel", P("fsdp", "tensor")))
    if cfg.scalar_head:
        rules.append((r"scalar_head/kernel", P()))
    return rules


def path_str(path) -> str:
    return "/".join(str(getattr(k, "key", getattr(k, "idx", getattr(k, "name", k)))) for k in path)


def _fit(spec: P, shape, mesh: Mesh) -> P:
    """Drop mesh axes from dimensions they do not divide (e.g. 2 kv heads over tensor=4)."""
    out = []
    for dim, axis in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec))):
        size = int(np.prod([mesh.shape[a] for a in (axis if isinstance(axis, tuple) else (axis,))
                            if a is not None]))
        out.append(axis if axis is not None and dim % size == 0 else None)
    return P(*out)


def tree_specs(tree, rules, mesh: Mesh, *, strict: bool):
    """PartitionSpecs for a pytree of arrays (or ShapeDtypeStructs).

    A rule matches a leaf whose path ends with it. strict (parameters): every
    leaf matches exactly one rule and every rule some leaf, else ValueError.
    Not strict (optimiser state): unmatched leaves are replicated.
    """
    compiled = [(re.compile(r"(^|/)" + pattern + r"$"), spec) for pattern, spec in rules]
    used = set()

    def one(path, leaf):
        name = path_str(path)
        hits = [i for i, (rx, _) in enumerate(compiled) if rx.search(name)]
        if strict and len(hits) != 1:
            raise ValueError(f"parameter {name} matches {len(hits)} sharding rules "
                             f"{[rules[i][0] for i in hits]}; it must match exactly one")
        if not hits:
            return P()
        used.add(hits[0])
        return _fit(compiled[hits[0]][1], leaf.shape, mesh)

    specs = jax.tree_util.tree_map_with_path(one, tree)
    if strict:
        unused = [rules[i][0] for i in range(len(rules)) if i not in used]
        if unused:
            raise ValueError(f"sharding rules match no parameter: {unused}")
    return specs


def param_shardings(params, cfg, mesh: Mesh):
    """NamedShardings of a transformer's parameter tree (arrays or ShapeDtypeStructs, e.g.
    `model.abstract_params(cfg)`) by `param_rules(cfg)`; each parameter matches exactly one rule."""
    return named(mesh, tree_specs(params, param_rules(cfg), mesh, strict=True))


def data_parallel_size(mesh: Mesh) -> int:
    """Devices a batch is split over: the product of the batch axes."""
    return int(np.prod([mesh.shape[a] for a in BATCH]))


def check_batch(mesh: Mesh, batch_size: int, field: str):
    """ValueError naming `field` unless batch_size is a positive multiple of the batch axes."""
    n = data_parallel_size(mesh)
    if batch_size <= 0 or batch_size % n:
        raise ValueError(f"{field}={batch_size} must be a positive multiple of the {n} "
                         f"data-parallel devices of the mesh (mesh.data x mesh.fsdp)")


def named(mesh: Mesh, specs):
    return jax.tree_util.tree_map(lambda s: NamedSharding(mesh, s), specs,
                                  is_leaf=lambda x: isinstance(x, P))


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Leading (batch) axis split over the data-parallel axes."""
    return NamedSharding(mesh, P(BATCH))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def constrain(x: jax.Array, spec: P) -> jax.Array:
    """`x` laid out as `spec` on the mesh of `jax.set_mesh`, inside a jitted function.

    Axes a dimension does not divide are dropped (as for parameters). Without a
    mesh (one device, or a caller that placed its inputs itself) `x` is
    returned as it is, so the model runs unchanged outside a run loop.
    """
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return x
    return jax.lax.with_sharding_constraint(x, _fit(spec, x.shape, mesh))


def put_global(batch: dict, mesh: Mesh) -> dict:
    """Host numpy batch with all rows, the same on every process -> global arrays sharded
    over the batch axes; each process copies only the rows its own devices hold."""
    sharding = batch_sharding(mesh)
    if jax.process_count() == 1:
        return jax.device_put(batch, sharding)
    return {k: jax.make_array_from_callback(v.shape, sharding, lambda index, v=v: v[index])
            for k, v in batch.items()}


def put_replicated(x, mesh: Mesh) -> jax.Array:
    """A host value (the same on every process) as a global array replicated over the mesh."""
    x = np.asarray(x)
    return jax.make_array_from_callback(x.shape, replicated(mesh), lambda index: x[index])


def chunks(arrays: dict, batch_size: int, mesh: Mesh, *, limit: int = None):
    """Fixed-size chunks of host rows on the mesh, for the loops that read a whole data set.

    arrays: {name: [n, ...]} numpy, the same on every process. Yields
    (placed, idx, keep): chunk i holds rows i * batch_size, ... of `arrays`
    (the last chunk padded by repeating rows from the start, so every chunk
    has one shape and compiles once) placed by `put_global`; idx [batch_size]
    int64 the rows it holds and keep the real ones among them. limit: at most
    that many chunks.
    """
    n = len(next(iter(arrays.values())))
    count = -(-n // batch_size) if limit is None else min(limit, -(-n // batch_size))
    for i in range(count):
        start = i * batch_size
        idx = np.arange(start, start + batch_size) % n
        yield put_global({k: v[idx] for k, v in arrays.items()}, mesh), idx, min(batch_size, n - start)


def gather(tree):
    """Global arrays -> host numpy arrays with every row, on every process."""
    return multihost_utils.process_allgather(tree, tiled=True)
