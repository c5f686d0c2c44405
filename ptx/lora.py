"""LoRA: low-rank adapters in their own pytree beside the frozen base parameters.

Each targeted kernel W (a `ptx.model.Dense` kernel) gets two
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
shard like any parameter tree (`sharding_rules`). Leaves that `full` selects
(a fresh value head) sit in the same tree as plain float32 arrays at their
base path and replace the base's leaf: they train in full beside the
adapters.

Precision: the sum W + scale * A @ B is formed in float32 and rounded once
to the output dtype (the base's unless `dtype` is given); the training loss
(`loss_fn`) asks for float32, so the adapter update is never rounded to the
base's precision. `base_dtype='bfloat16'` stores the frozen base in bfloat16
(`frozen_base`): half its memory, each base weight rounded once (relative
error <= 2^-9). `apply` rounds a wider base the same way before adding the
update, so merging the adapters into the float32 source checkpoint gives
exactly the model that was trained.

The `merge` stage (ptx/stages/export.py, configs/merge.py) writes a LoRA
checkpoint's merged weights as a full checkpoint and, optionally, a Hugging
Face directory.

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
# Number of input axes of a Dense kernel (after the layer axis): the
# attention output projection reads [heads, head_dim]; every other kernel one axis.
INPUT_AXES = ((r"attn/o/kernel", 2),)
BASE_DTYPES = ("float32", "bfloat16")


@dataclasses.dataclass(frozen=True)
class LoraConfig:
    """The `lora` config section; hashable, so it can be a static jit argument."""

    rank: int = 0  # 0 = full finetuning; > 0 = rank-r adapters on a frozen base
    alpha: float = 16.0  # the adapter update is scaled by alpha / rank
    dropout: float = 0.0  # must be 0: adapters are merged into the weights inside the step
    targets: tuple = DEFAULT_TARGETS  # regexes over 'a/b/c' kernel paths
    full: tuple = ()  # regexes over base leaves trained in full beside the adapters (a fresh head); set by a stage
    # The frozen base (and so the reference of DPO / PPO / GRPO, adapters off): 'bfloat16' halves
    # its memory and rounds each base weight once (relative error <= 2^-9); adapters, their
    # update and the merged kernels stay float32, and the merge folds them into the same
    # rounded base. A base already narrower is never widened.
    base_dtype: str = "float32"  # float32 | bfloat16

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
        object.__setattr__(self, "full", tuple(self.full))
        if self.base_dtype not in BASE_DTYPES:
            raise ValueError(f"lora.base_dtype={self.base_dtype!r}; expected one of {BASE_DTYPES}")
        if self.rank < 0:
            raise ValueError(f"lora.rank={self.rank}; expected 0 (off) or a positive rank")
        if self.dropout:
            raise NotImplementedError(
                f"lora.dropout={self.dropout}: adapters are merged into the weights inside the step, "
                "so there is no adapter input to drop; set lora.dropout=0")
        if self.enabled and not self.targets:
            raise ValueError("lora.rank > 0 but lora.targets is empty")
        for pattern in self.targets + self.full:
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


def _select(paths, patterns, field: str) -> list[str]:
    """Paths that `patterns` select, in the order of `paths`; ValueError naming a regex that selects none."""
    out = set()
    for pattern in patterns:
        hits = [p for p in paths if _matcher(pattern).search(p)]
        if not hits:
            raise ValueError(f"lora.{field} regex {pattern!r} matches no parameter")
        out.update(hits)
    return [p for p in paths if p in out]


def targeted(base_params, lora_cfg: LoraConfig) -> list[str]:
    """Paths of the kernels `lora_cfg.targets` select, in tree order.

    ValueError naming the regex for a target that matches no parameter or
    matches something other than a kernel (norm scale, bias, embedding), or a
    kernel that `lora_cfg.full` trains in full.
    """
    paths = list(_flat(base_params))
    hits = _select(paths, lora_cfg.targets, "targets")
    for pattern in lora_cfg.targets:
        bad = [p for p in hits if _matcher(pattern).search(p) and p.split("/")[-1] != "kernel"]
        if bad:
            raise ValueError(f"lora.targets regex {pattern!r} matches {bad}: only kernels can be adapted")
    both = set(hits) & set(_select(paths, lora_cfg.full, "full"))
    if both:
        raise ValueError(f"lora: {sorted(both)} both adapted and trained in full")
    return hits


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
    """Fresh adapters {..kernel path..: {'a': [L, in, r], 'b': [L, r, out]}} float32, plus
    a float32 copy of each leaf that `lora_cfg.full` selects.

    base_params may be abstract (jax.ShapeDtypeStruct): only shapes are read
    (a full leaf is then zeros), so `jax.eval_shape` and a jitted init with
    `out_shardings` work.
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
    for path in _select(list(flat), lora_cfg.full, "full"):
        leaf = flat[path]
        adapters[path] = (jnp.zeros(leaf.shape, jnp.float32) if isinstance(leaf, jax.ShapeDtypeStruct)
                          else jnp.asarray(leaf, jnp.float32))
    return _nest(adapters)


def _split(adapters) -> tuple[dict, dict]:
    """({kernel path: (A, B)}, {path: leaf trained in full}) from the adapter tree."""
    flat = _flat(adapters)
    pairs, full = {}, {}
    for path, leaf in flat.items():
        kernel, _, name = path.rpartition("/")
        if name not in ("a", "b"):
            full[path] = leaf
        elif (kernel + "/a") not in flat or (kernel + "/b") not in flat:
            raise ValueError(f"lora: adapter leaf {path} is not half of an {{'a', 'b'}} pair")
        else:
            pairs[kernel] = (flat[kernel + "/a"], flat[kernel + "/b"])
    return pairs, full


def _narrows(x, lora_cfg: LoraConfig) -> bool:
    """Whether storing leaf x in lora_cfg.base_dtype loses precision."""
    return (jnp.issubdtype(x.dtype, jnp.floating)
            and jnp.finfo(lora_cfg.base_dtype).bits < jnp.finfo(x.dtype).bits)


def _round(w, lora_cfg: LoraConfig):
    """w's values as a base stored in `lora_cfg.base_dtype` holds them, in w's own dtype."""
    return w.astype(lora_cfg.base_dtype).astype(w.dtype) if _narrows(w, lora_cfg) else w


def apply(base, adapters, lora_cfg: LoraConfig, *, dtype=None):
    """The base tree with every adapted kernel W replaced by W + scale * (A @ B), and every
    full leaf of `adapters` in place of the base's (added where the base lacks it).

    Pure and jit-able; the structure of `base` (plus any added full leaf), the
    same dtypes unless `dtype` (the merged kernels' and full leaves' dtype;
    None = the base leaf's own). Base leaves are first rounded to
    `lora_cfg.base_dtype` (a no-op for a base stored that way), and the sum is
    formed in float32. `adapters=None` returns `base` itself (adapters disabled).
    """
    if adapters is None:
        return base
    pairs, full = _split(adapters)
    flat = _flat(base)
    missing = sorted(set(pairs) - set(flat))
    if missing:
        raise ValueError(f"lora: adapters for {missing}, which the base parameters lack")

    def one(path, w):
        w = _round(w, lora_cfg)
        if path not in pairs:
            return w
        a, b = pairs[path]
        delta = jnp.matmul(a.astype(jnp.float32), b.astype(jnp.float32), precision=jax.lax.Precision.HIGHEST)
        merged = w.astype(jnp.float32) + lora_cfg.scale * delta.reshape(w.shape)
        return merged.astype(dtype or w.dtype)

    merged = {path: one(path, w) for path, w in flat.items()}
    merged.update({path: x.astype(dtype or (flat[path].dtype if path in flat else x.dtype))
                   for path, x in full.items()})
    return _nest(merged)


def frozen_base(params, lora_cfg: LoraConfig):
    """The base as a LoRA run keeps it: floating leaves narrowed to `lora_cfg.base_dtype`, on the
    shardings they have. Returns `params` itself when nothing narrows (no copy); else the caller
    should drop `params` so that only the narrow copy stays in memory."""
    if not any(_narrows(x, lora_cfg) for x in jax.tree_util.tree_leaves(params)):
        return params
    cast = lambda x: x.astype(lora_cfg.base_dtype) if _narrows(x, lora_cfg) else x
    shardings = jax.tree_util.tree_map(lambda x: x.sharding, params)
    return jax.jit(lambda p: jax.tree_util.tree_map(cast, p), out_shardings=shardings)(params)


# Export (Hugging Face, sampling, the next stage): the adapters folded into the base.
merge = jax.jit(apply, static_argnums=(2,), static_argnames=("dtype",))


def loss_fn(base_loss_fn, lora_cfg: LoraConfig):
    """A stage's `loss_fn(params, batch, frozen)` over adapters.

    Returns `fn(adapters, batch, frozen, **kw)` with frozen = {'base': base params,
    'ref': what the stage's loss reads as `frozen` (the DPO reference: the
    base tree itself, no copy) or None}; `kw` (a method's carry) passes through.
    """
    def fn(adapters, batch, frozen, **kw):
        wide = sorted({str(x.dtype) for x in jax.tree_util.tree_leaves(frozen["base"]) if _narrows(x, lora_cfg)})
        if wide:
            # Merging into a wider base would train one model and export another (apply rounds it).
            raise ValueError(f"lora.base_dtype={lora_cfg.base_dtype!r} but the frozen base reached the step "
                             f"in {wide}: store it with lora.frozen_base")
        # Float32 merged kernels: a bfloat16 base must not round the adapter update away.
        return base_loss_fn(apply(frozen["base"], adapters, lora_cfg, dtype=jnp.float32), batch, frozen["ref"], **kw)

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
    adapted kernel, and the base rule itself for a leaf trained in full.
    adapters may be abstract (jax.eval_shape of `init`).
    """
    compiled = [(_matcher(pattern), spec) for pattern, spec in base_rules]

    def rule_of(path):
        hits = [i for i, (rx, _) in enumerate(compiled) if rx.search(path)]
        if len(hits) != 1:
            raise ValueError(f"lora: {path} matches {len(hits)} base sharding rules; it must match exactly one")
        return hits[0]

    pairs, full = _split(adapters)
    found = {}
    for path, (a, _) in pairs.items():
        i = rule_of(path)
        lead = a.ndim - 2
        n_in = next((n for pattern, n in INPUT_AXES if _matcher(pattern).search(path)), 1)
        spec = tuple(compiled[i][1])
        spec += (None,) * max(0, lead + n_in + 1 - len(spec))
        rule = (P(*((None,) * lead), _axis(spec[lead:lead + n_in]), None),
                P(*((None,) * lead), None, _axis(spec[lead + n_in:])))
        if found.setdefault(i, rule) != rule:
            raise ValueError(f"lora: kernels under base rule {base_rules[i][0]!r} need different "
                             "adapter shardings")
    rules = []
    for i in sorted(found):
        pattern = base_rules[i][0]
        rules += [(f"(?:{pattern})/a", found[i][0]), (f"(?:{pattern})/b", found[i][1])]
    return rules + [base_rules[i] for i in sorted({rule_of(path) for path in full})]


def param_counts(base, adapters) -> dict:
    """Trainable (adapter) and frozen (base) parameter counts and bytes."""
    def count(tree):
        leaves = jax.tree_util.tree_leaves(tree)
        return sum(x.size for x in leaves), sum(x.size * jnp.dtype(x.dtype).itemsize for x in leaves)

    (n_train, b_train), (n_frozen, b_frozen) = count(adapters), count(base)
    return {"trainable": n_train, "frozen": n_frozen, "trainable_bytes": b_train,
            "frozen_bytes": b_frozen, "trainable_fraction": n_train / max(n_train + n_frozen, 1)}
