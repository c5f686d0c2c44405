"""LoRA: low-rank adapters in their own pytree beside the frozen base parameters.

Each targeted kernel W (a DenseGeneral kernel of ptx.model) gets two
factors, A: [L, in, r] and B: [L, r, out] (no L axis for an unstacked kernel
such as `lm_head/kernel`), where `in` / `out` are the products of W's input
/ output axes: `layers/attn/q/kernel` [L, d, heads, hd] has in = d and
out = heads * hd; `layers/attn/o/kernel` [L, heads, hd, d] has in = heads * hd
and out = d. The step merges inside the jitted function,

    params = lora.apply(base, adapters, lora_cfg)   # W + alpha / r * (A @ B), reshaped to W's shape

so the model code does not change, the gradient flows to the adapters only
and the base needs no optimiser state. A ~ N(0, 1 / in) (fan-in), B = 0: the
first forward equals the base model's exactly.

The adapters mirror the base tree, with each targeted kernel leaf replaced
by {'a': A, 'b': B} (paths `layers/attn/q/kernel/a`), so they checkpoint and
shard like any parameter tree (`sharding_rules`).

Precision: the sum W + scale * A @ B is formed in float32 and rounded once
to the output dtype (the base's unless `dtype` is given). With a float32
base the merged weights are exact; with a bfloat16 base an update smaller
than W's bfloat16 spacing is invisible in the forward until it grows (the
gradient to A and B is unaffected: the cast passes it through). Pass
`dtype=jnp.float32` to keep the merged kernels in float32; the model casts
them to its compute dtype at use.

Dropout on the adapter input is not supported: the merged weight has no
separate adapter input to drop, and dropping rows of A per step would be a
different (batch-shared) regulariser. `lora.dropout > 0` is an error.
"""
import dataclasses
import math
import re

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from ptx.sharding import path_str

# Every matrix of the attention and the MLP.
DEFAULT_TARGETS = (r"layers/attn/(q|k|v|o)/kernel", r"layers/(gate|up|down)/kernel")
# nn.scan's module name in ptx.model: parameters under it carry a leading layer axis.
STACKED = "layers"
# Number of input axes of a DenseGeneral kernel (after the layer axis): the
# attention output projection reads [heads, head_dim]; every other kernel one axis.
INPUT_AXES = ((r"attn/o/kernel", 2),)


@dataclasses.dataclass(frozen=True)
class LoraConfig:
    """The `lora` config section; hashable, so it can be a static jit argument."""

    rank: int = 0  # 0 = LoRA off (full fine-tuning)
    alpha: float = 16.0  # the update is scaled by alpha / rank
    dropout: float = 0.0  # must be 0: not supported with merged weights
    targets: tuple = DEFAULT_TARGETS  # regexes over 'a/b/c' kernel paths

    @classmethod
    def from_config(cls, c) -> "LoraConfig":
        return cls(rank=int(c.rank), alpha=float(c.alpha), dropout=float(c.dropout),
                   targets=tuple(c.targets))

    @property
    def enabled(self) -> bool:
        return self.rank > 0

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    def __post_init__(self):
        if isinstance(self.targets, str):
            raise ValueError(f"lora.targets={self.targets!r} must be a list of regexes, not one string")
        object.__setattr__(self, "targets", tuple(self.targets))
        if self.rank < 0:
            raise ValueError(f"lora.rank={self.rank}; expected 0 (off) or a positive rank")
        if self.dropout:
            raise NotImplementedError(
                f"lora.dropout={self.dropout}: adapters are merged into the weights inside the step, "
                "so there is no adapter input to drop; set lora.dropout=0")
        if self.enabled and not self.targets:
            raise ValueError("lora.rank > 0 but lora.targets is empty")
        for pattern in self.targets:
            try:
                re.compile(pattern)
            except re.error as e:
                raise ValueError(f"lora.targets: bad regex {pattern!r}: {e}") from None


def _matcher(pattern: str):
    """A pattern matches a path that ends with it, as in ptx.sharding."""
    return re.compile(r"(^|/)(?:" + pattern + r")$")


def _flat(tree) -> dict:
    return {path_str(p): leaf for p, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


def _layout(path: str, shape) -> tuple[int, int, int]:
    """(leading layer axes 0 / 1, in, out) of kernel `path` with `shape`."""
    lead = 1 if path.split("/")[0] == STACKED else 0
    n_in = next((n for pattern, n in INPUT_AXES if _matcher(pattern).search(path)), 1)
    if len(shape) < lead + n_in + 1:
        raise ValueError(f"lora: {path} {tuple(shape)} has no output axis")
    return lead, math.prod(shape[lead:lead + n_in]), math.prod(shape[lead + n_in:])


def targeted(base_params, lora_cfg: LoraConfig) -> list[str]:
    """Paths of the kernels `lora_cfg.targets` select, in tree order.

    ValueError naming the regex for a target that matches no parameter or
    matches something other than a kernel (norm scale, bias, embedding).
    """
    paths = list(_flat(base_params))
    out = []
    for pattern in lora_cfg.targets:
        hits = [p for p in paths if _matcher(pattern).search(p)]
        if not hits:
            raise ValueError(f"lora.targets regex {pattern!r} matches no parameter")
        bad = [p for p in hits if p.split("/")[-1] != "kernel"]
        if bad:
            raise ValueError(f"lora.targets regex {pattern!r} matches {bad}: only kernels can be adapted")
        out += [p for p in hits if p not in out]
    return [p for p in paths if p in out]


def _nest(flat: dict) -> dict:
    tree = {}
    for path, value in flat.items():
        node = tree
        *parents, last = path.split("/")
        for key in parents:
            node = node.setdefault(key, {})
        node[last] = value
    return tree


def init(base_params, lora_cfg: LoraConfig, rng: jax.Array) -> dict:
    """Fresh adapters {..kernel path..: {'a': [L, in, r], 'b': [L, r, out]}} float32.

    base_params may be abstract (jax.ShapeDtypeStruct): only shapes are read,
    so `jax.eval_shape` and a jitted init with `out_shardings` work.
    """
    if not lora_cfg.enabled:
        raise ValueError("lora.rank=0 means LoRA is off; do not build adapters")
    flat, r = _flat(base_params), lora_cfg.rank
    adapters = {}
    for i, path in enumerate(targeted(base_params, lora_cfg)):
        shape = flat[path].shape
        lead, n_in, n_out = _layout(path, shape)
        layers = tuple(shape[:lead])
        a = jax.random.normal(jax.random.fold_in(rng, i), layers + (n_in, r), jnp.float32)
        adapters[path] = {"a": a / math.sqrt(n_in), "b": jnp.zeros(layers + (r, n_out), jnp.float32)}
    return _nest(adapters)


def _pairs(adapters) -> dict:
    """{kernel path: (A, B)} from the adapter tree."""
    flat = _flat(adapters)
    out = {}
    for path in flat:
        kernel, _, leaf = path.rpartition("/")
        if leaf not in ("a", "b") or (kernel + "/a") not in flat or (kernel + "/b") not in flat:
            raise ValueError(f"lora: adapter leaf {path} is not half of an {{'a', 'b'}} pair")
        out[kernel] = (flat[kernel + "/a"], flat[kernel + "/b"])
    return out


def apply(base, adapters, lora_cfg: LoraConfig, *, dtype=None):
    """The base tree with every adapted kernel W replaced by W + scale * (A @ B).

    Pure and jit-able; same structure as `base`, same dtypes unless `dtype`
    (the merged kernels' dtype; None = each kernel's own). The sum is formed
    in float32. `adapters=None` returns `base` itself (adapters disabled).
    """
    if adapters is None:
        return base
    pairs = _pairs(adapters)
    missing = sorted(set(pairs) - set(_flat(base)))
    if missing:
        raise ValueError(f"lora: adapters for {missing}, which the base parameters lack")

    def one(path, w):
        name = path_str(path)
        if name not in pairs:
            return w
        a, b = pairs[name]
        delta = jnp.matmul(a.astype(jnp.float32), b.astype(jnp.float32), precision=jax.lax.Precision.HIGHEST)
        merged = w.astype(jnp.float32) + lora_cfg.scale * delta.reshape(w.shape)
        return merged.astype(dtype or w.dtype)

    return jax.tree_util.tree_map_with_path(one, base)


# Export (Hugging Face, sampling, the next stage): the adapters folded into the base.
merge = jax.jit(apply, static_argnums=(2,), static_argnames=("dtype",))


def loss_fn(base_loss_fn, lora_cfg: LoraConfig):
    """A stage's `loss_fn(params, batch, frozen)` over adapters.

    Returns `fn(adapters, batch, frozen)` with frozen = {'base': base params,
    'ref': what the stage's loss reads as `frozen` (the DPO reference: the
    base tree itself, no copy) or None}.
    """
    def fn(adapters, batch, frozen):
        return base_loss_fn(apply(frozen["base"], adapters, lora_cfg), batch, frozen["ref"])

    return fn


def _axis(specs: tuple):
    """One spec for axes flattened into one: the leading axis's, if the rest are unsharded."""
    return specs[0] if specs and all(s is None for s in specs[1:]) else None


def sharding_rules(base_rules, adapters) -> list:
    """(regex, PartitionSpec) rules for the adapter tree, derived from the base rules.

    A [L, in, r] takes W's input-axis sharding on `in`, B [L, r, out] W's
    output-axis sharding on `out` (axes flattened into one keep the leading
    axis's mesh axis when the others are unsharded); the layer and rank axes
    are not sharded. One (a, b) rule pair per base rule that matches some
    adapted kernel. adapters may be abstract (jax.eval_shape of `init`).
    """
    compiled = [(_matcher(pattern), spec) for pattern, spec in base_rules]
    found = {}
    for path, (a, _) in _pairs(adapters).items():
        hits = [i for i, (rx, _) in enumerate(compiled) if rx.search(path)]
        if len(hits) != 1:
            raise ValueError(f"lora: adapted kernel {path} matches {len(hits)} base sharding rules; "
                             "it must match exactly one")
        lead = a.ndim - 2
        n_in = next((n for pattern, n in INPUT_AXES if _matcher(pattern).search(path)), 1)
        spec = tuple(compiled[hits[0]][1])
        spec += (None,) * max(0, lead + n_in + 1 - len(spec))
        rule = (P(*((None,) * lead), _axis(spec[lead:lead + n_in]), None),
                P(*((None,) * lead), None, _axis(spec[lead + n_in:])))
        if found.setdefault(hits[0], rule) != rule:
            raise ValueError(f"lora: kernels under base rule {base_rules[hits[0]][0]!r} need different "
                             "adapter shardings")
    rules = []
    for i in sorted(found):
        pattern = base_rules[i][0]
        rules += [(f"(?:{pattern})/a", found[i][0]), (f"(?:{pattern})/b", found[i][1])]
    return rules


def param_counts(base, adapters) -> dict:
    """Trainable (adapter) and frozen (base) parameter counts and bytes."""
    def count(tree):
        leaves = jax.tree_util.tree_leaves(tree)
        return sum(x.size for x in leaves), sum(x.size * jnp.dtype(x.dtype).itemsize for x in leaves)

    (n_train, b_train), (n_frozen, b_frozen) = count(adapters), count(base)
    return {"trainable": n_train, "frozen": n_frozen, "trainable_bytes": b_train,
            "frozen_bytes": b_frozen, "trainable_fraction": n_train / max(n_train + n_frozen, 1)}
