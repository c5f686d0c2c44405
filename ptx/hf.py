"""Hugging Face safetensors import / export.

Reads and writes the directory layout of `save_pretrained`: `config.json`
plus `model.safetensors`, or shards named in `model.safetensors.index.json`,
with the tokenizer files beside them. The families and how their config.json
maps onto ModelConfig are in `ptx.hf_config`: Llama (3.1 / 3.2 rope scaling
included), Mistral, Qwen2, Qwen3 and the text Gemma 3, as ...ForCausalLM or a
one-label ...ForSequenceClassification. Export writes the family that
computes the model exactly (`hf_config.family_of`).

HF's Linear weight is [out, in]; ptx kernels are [in, ...out] with heads
split out and layers stacked on a leading axis. HF applies RoPE in the same
half-split (rotate_half) layout as `ptx.layers.rope`, so q / k weights need
no permutation. Only numpy and safetensors run here (bfloat16 through
ml_dtypes); torch is never imported.
"""
import contextlib
import dataclasses
import functools
import json
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils
from safetensors import safe_open
from safetensors.numpy import save_file

from ptx.hf_config import CONFIG, config_from_hf, family_of, read_config, to_hf_config
from ptx.model import ModelConfig, Output, Transformer, init_params
from ptx.sources import DataError, read_json_object
from ptx.tokenizer import SPM_MODEL, TOKENIZER_JSON, HFTokenizer, Tokenizer
from ptx.tokenizer import load_tokenizer as _load_tokenizer

SINGLE = "model.safetensors"
INDEX = "model.safetensors.index.json"
# ModelConfig fields that do not change what the weights compute; every other one must match.
_RUNTIME_FIELDS = ("param_dtype", "dtype", "remat", "scan_unroll", "layer_loop_max", "attention",
                   "attention_block_q", "attention_block_k", "head_dim")
DTYPE_NAMES = ("float32", "bfloat16", "float16")
__all__ = ["CONFIG", "config_from_hf", "to_hf_config", "family_of", "read_config"]


@dataclasses.dataclass(frozen=True)
class _Tensor:
    """One ptx leaf and its HF tensor(s).

    n_in: a linear layer whose ptx kernel is [in dims (n_in of them), out dims] and whose
    HF weight is [prod(out), prod(in)]; 0 = not transposed, HF shape flat when `flat`.
    """
    path: tuple
    name: str  # HF name; '{i}' = layer index for a stacked leaf
    n_in: int = 0
    flat: bool = False

    @property
    def stacked(self) -> bool:
        """A layer parameter: ptx stacks the per-layer HF tensors on a leading axis."""
        return self.path[0] == "layers"

    def hf_shape(self, shape):
        if self.n_in:
            return (math.prod(shape[self.n_in:]), math.prod(shape[:self.n_in]))
        return (math.prod(shape),) if self.flat else tuple(shape)

    def to_ptx(self, x, shape):
        return (x.T if self.n_in else x).reshape(shape)

    def to_hf(self, x):
        if self.n_in:
            return x.reshape(math.prod(x.shape[:self.n_in]), -1).T
        return x.reshape(-1) if self.flat else x


def _tensors(cfg: ModelConfig) -> list:
    attn, layer = "model.layers.{i}.self_attn.", "model.layers.{i}."
    out = [_Tensor(("embed", "embedding"), "model.embed_tokens.weight")]
    for p in "qkv":
        out.append(_Tensor(("layers", "attn", p, "kernel"), f"{attn}{p}_proj.weight", n_in=1))
        if cfg.qkv_bias:
            out.append(_Tensor(("layers", "attn", p, "bias"), f"{attn}{p}_proj.bias", flat=True))
    out += [
        _Tensor(("layers", "attn", "o", "kernel"), f"{attn}o_proj.weight", n_in=2),
        _Tensor(("layers", "gate", "kernel"), f"{layer}mlp.gate_proj.weight", n_in=1),
        _Tensor(("layers", "up", "kernel"), f"{layer}mlp.up_proj.weight", n_in=1),
        _Tensor(("layers", "down", "kernel"), f"{layer}mlp.down_proj.weight", n_in=1),
        _Tensor(("layers", "attn_norm", "scale"), f"{layer}input_layernorm.weight"),
        _Tensor(("final_norm", "scale"), "model.norm.weight"),
    ]
    if cfg.qk_norm:
        out += [_Tensor(("layers", "attn", f"{p}_norm", "scale"), f"{attn}{p}_norm.weight") for p in "qk"]
    if cfg.post_norms:  # Gemma: post_attention_layernorm is the attention output's norm
        out += [_Tensor(("layers", "attn_post_norm", "scale"), f"{layer}post_attention_layernorm.weight"),
                _Tensor(("layers", "mlp_norm", "scale"), f"{layer}pre_feedforward_layernorm.weight"),
                _Tensor(("layers", "mlp_post_norm", "scale"), f"{layer}post_feedforward_layernorm.weight")]
    else:
        out.append(_Tensor(("layers", "mlp_norm", "scale"), f"{layer}post_attention_layernorm.weight"))
    if not cfg.tie_embeddings:
        out.append(_Tensor(("lm_head", "kernel"), "lm_head.weight", n_in=1))
    if cfg.scalar_head:
        out.append(_Tensor(("scalar_head", "kernel"), "score.weight", n_in=1))
    return out


def _get(tree, path):
    for k in path:
        tree = tree[k]
    return tree


def _set(tree, path, value):
    for k in path[:-1]:
        tree = tree.setdefault(k, {})
    tree[path[-1]] = value


def _names(t: _Tensor, cfg: ModelConfig) -> list:
    return [t.name.format(i=i) for i in range(cfg.n_layers)] if t.stacked else [t.name]


def _abstract(cfg: ModelConfig):
    return jax.eval_shape(lambda: init_params(cfg, jax.random.PRNGKey(0)))


@contextlib.contextmanager
def _reading(file: str):
    """Any error while reading the safetensors `file` (a truncated or corrupt file, a
    vanished shard) as a DataError naming it."""
    try:
        yield
    except DataError:
        raise
    except Exception as e:  # SafetensorError, OSError, ...: the library's words, the file named
        raise DataError(f"{file}: cannot read it as safetensors: {e}") from e


def _open(file: str, stack: contextlib.ExitStack):
    with _reading(file):
        return stack.enter_context(safe_open(file, framework="np"))


def _weight_files(path: str) -> dict:
    """HF tensor name -> safetensors file, from the index or the single file."""
    index = os.path.join(path, INDEX)
    if os.path.isfile(index):
        weight_map = read_json_object(index).get("weight_map")
        if not isinstance(weight_map, dict):
            raise DataError(f"{index}: no 'weight_map' object")
        return {name: os.path.join(path, file) for name, file in weight_map.items()}
    single = os.path.join(path, SINGLE)
    if not os.path.isfile(single):
        raise FileNotFoundError(f"neither {INDEX} nor {SINGLE} in {path}")
    with contextlib.ExitStack() as stack:
        return {name: single for name in _open(single, stack).keys()}


def load_params(path: str, cfg: ModelConfig | None = None, shardings=None):
    """Reads a Hugging Face checkpoint directory -> (params, cfg).

    cfg: None = from config.json (`config_from_hf`); given, its architecture must
    match config.json and only its dtypes, remat, ... are taken. shardings: a
    pytree like params of jax shardings (e.g. `ptx.sharding.named(mesh,
    tree_specs(...))`), None = the default device. Each leaf is assembled on the
    host from its per-layer tensors, cast to cfg.param_dtype and put straight
    onto its sharding, so the host holds one leaf at a time and each device
    receives only its shard. A missing, misshapen or unexpected tensor is a
    ValueError naming it; so is a config.json field ptx cannot read (`hf_config`).
    """
    derived = config_from_hf(read_config(path), where=os.path.join(path, CONFIG))
    files = _weight_files(path)
    # A reward model's HF class has no lm_head: score it with the tied embedding.
    if derived.scalar_head and "lm_head.weight" not in files:
        derived = derived.replace(tie_embeddings=True)
    if cfg is None:
        cfg = derived
    fields = [f.name for f in dataclasses.fields(ModelConfig) if f.name not in _RUNTIME_FIELDS] + ["head_size"]
    diff = {k: (getattr(cfg, k), getattr(derived, k)) for k in fields if getattr(cfg, k) != getattr(derived, k)}
    if diff:
        raise ValueError(f"cfg differs from {path}/{CONFIG} in (given, checkpoint): {diff}")
    abstract, specs = _abstract(cfg), _tensors(cfg)
    expected = {n for t in specs for n in _names(t, cfg)}
    missing = sorted(expected - set(files))
    if missing:
        raise DataError(f"tensor {missing[0]} missing from {path} ({len(missing)} missing in all)")
    # Rotary inverse frequencies that old checkpoints store follow from rope_theta.
    extra = sorted(n for n in set(files) - expected if not n.endswith("rotary_emb.inv_freq"))
    with contextlib.ExitStack() as stack:
        handles = {file: _open(file, stack) for file in set(files.values())}

        def read(name, shape):
            handle = handles[files[name]]
            with _reading(files[name]):
                found = tuple(handle.get_slice(name).get_shape())
                if found != tuple(shape):
                    raise DataError(f"tensor {name} has shape {found} in {path}, expected {tuple(shape)}")
                return handle.get_tensor(name)

        if cfg.tie_embeddings and "lm_head.weight" in extra:
            # Some tied checkpoints store the head anyway; harmless only if it is the embedding.
            embed = read("model.embed_tokens.weight", (cfg.vocab_size, cfg.d_model))
            if np.array_equal(read("lm_head.weight", embed.shape), embed):
                extra.remove("lm_head.weight")
        if extra:
            raise DataError(f"unexpected tensor {extra[0]} in {path} for {cfg} ({len(extra)} in all)")
        params = {}
        for t in specs:
            leaf = _get(abstract, t.path)
            shape = leaf.shape[1:] if t.stacked else leaf.shape
            host = np.stack([t.to_ptx(read(n, t.hf_shape(shape)), shape) for n in _names(t, cfg)])
            host = host if t.stacked else host[0]
            sharding = None if shardings is None else _get(shardings, t.path)
            _set(params, t.path, jax.device_put(host.astype(leaf.dtype), sharding))
    return params, cfg


def save_params(params, cfg: ModelConfig, path: str, *, dtype: str | None = None,
                tokenizer: Tokenizer | HFTokenizer | None = None, max_position_embeddings: int = 4096,
                max_shard_bytes: int = 2 << 30) -> None:
    """Writes params as a Hugging Face checkpoint directory that `transformers` loads.

    dtype: tensor dtype name ("float32", "bfloat16", "float16"); None = cfg.param_dtype.
    tokenizer: gives bos / eos / pad ids in config.json, and its files are copied
    (`save`: tokenizer.model, or tokenizer.json with its config, chat template and
    generation_config.json). The architecture is `hf_config.family_of(cfg)`. Tensors go to
    `model.safetensors`, or to numbered shards of at most max_shard_bytes with an index; old model*.safetensors files in
    `path` are removed. Every process must call it (leaves are gathered across
    hosts); process 0 writes.
    """
    dtype = dtype or cfg.param_dtype
    if dtype not in DTYPE_NAMES:
        raise ValueError(f"dtype={dtype!r}; expected one of {DTYPE_NAMES}")
    hf_config = to_hf_config(cfg, dtype, tokenizer, max_position_embeddings)  # fails before writing
    np_dtype, abstract = np.dtype(jnp.dtype(dtype)), _abstract(cfg)
    # Plan the shards from shapes alone, so each leaf is gathered only once while writing.
    shards, size, total = [[]], 0, 0
    for t in _tensors(cfg):
        shape = _get(abstract, t.path).shape
        for i, name in enumerate(_names(t, cfg)):
            nbytes = math.prod(shape[1:] if t.stacked else shape) * np_dtype.itemsize
            if shards[-1] and size + nbytes > max_shard_bytes:
                shards.append([])
                size = 0
            shards[-1].append((name, t, i))
            size, total = size + nbytes, total + nbytes
    write = jax.process_index() == 0
    if write:
        os.makedirs(path, exist_ok=True)
        for old in os.listdir(path):
            if old.startswith("model") and (old.endswith(".safetensors") or old == INDEX):
                os.remove(os.path.join(path, old))
    files = [SINGLE] if len(shards) == 1 else [
        f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors" for k in range(len(shards))]
    cached = (None, None)
    for file, shard in zip(files, shards):
        tensors = {}
        for name, t, i in shard:
            if cached[0] is not t:
                cached = (t, np.asarray(multihost_utils.process_allgather(_get(params, t.path), tiled=True)))
            x = cached[1][i] if t.stacked else cached[1]
            tensors[name] = np.ascontiguousarray(t.to_hf(x).astype(np_dtype))
        if write:
            save_file(tensors, os.path.join(path, file), metadata={"format": "pt"})
    if not write:
        return
    if len(files) > 1:
        weight_map = {name: file for file, shard in zip(files, shards) for name, _, _ in shard}
        with open(os.path.join(path, INDEX), "w") as f:
            json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
    with open(os.path.join(path, CONFIG), "w") as f:
        json.dump(hf_config, f, indent=2)
    if tokenizer is not None:
        tokenizer.save(path)


def load_tokenizer(path: str) -> HFTokenizer | Tokenizer:
    """The tokenizer of a Hugging Face directory.

    tokenizer.json (what transformers reads, with the chat template and stop
    ids) gives an HFTokenizer; a directory with only the sentencepiece
    tokenizer.model gives a Tokenizer. FileNotFoundError names the directory
    and both files when it has neither; ValueError names a malformed file.
    """
    if not os.path.isdir(path):
        raise FileNotFoundError(f"{path}: no such directory")
    return _load_tokenizer(path)


@functools.partial(jax.jit, static_argnums=0)
def _forward(cfg, params, tokens):
    return Transformer(cfg).apply({"params": params}, tokens)


@dataclasses.dataclass
class HFModel:
    """An imported checkpoint: config, params, and the directory's tokenizer (None when it has none).

    max_len: the longest sequence it was imported for (written back as
    max_position_embeddings).
    """
    cfg: ModelConfig
    params: dict
    tokenizer: Tokenizer | HFTokenizer | None = None
    max_len: int = 4096

    def __call__(self, tokens) -> Output:
        """tokens: [batch, seq] int32 -> Output (logits [batch, seq, vocab])."""
        return _forward(self.cfg, self.params, jnp.asarray(tokens, jnp.int32))


def load_model(path: str, *, max_len: int | None = None, shardings=None) -> HFModel:
    """A Hugging Face directory -> HFModel with its tokenizer (`load_tokenizer`; None when the directory
    holds neither tokenizer.json nor tokenizer.model). max_len: written back as max_position_embeddings
    (default the directory's). shardings: see `load_params`."""
    params, cfg = load_params(path, shardings=shardings)
    max_len = max_len or read_config(path).get("max_position_embeddings") or 4096
    has_tokenizer = any(os.path.isfile(os.path.join(path, f)) for f in (TOKENIZER_JSON, SPM_MODEL))
    return HFModel(cfg, params, load_tokenizer(path) if has_tokenizer else None, max_len)


def save_model(model: HFModel, path: str, *, dtype: str | None = None) -> None:
    """Writes an HFModel back as a Hugging Face directory (see `save_params`)."""
    save_params(model.params, model.cfg, path, dtype=dtype, tokenizer=model.tokenizer,
                max_position_embeddings=model.max_len)
