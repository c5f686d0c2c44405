"""Hugging Face config.json <-> ModelConfig for the families ptx computes exactly.

Llama (1, 2, 3, 3.1 / 3.2 with rope_scaling llama3, linear or dynamic),
Mistral (sliding window), Qwen2 (qkv biases), Qwen3 (q / k norms) and the
text Gemma 3 (interleaved sliding and global layers with their own rope
bases, (1 + w) norms before and after attention and MLP, sqrt(d_model)
embedding scale, GeGLU, query_pre_attn_scalar), each as ...ForCausalLM or
as a one-label ...ForSequenceClassification (a reward model). A field ptx
cannot represent is a ValueError naming the file and the field; so is a
config.json that does not parse or lacks a field.

Fields a config.json leaves out take transformers' defaults for its family
(Qwen3's head_dim is 128, Gemma 3's 256, ...), as transformers would.
"""
import os

from ptx.model import ModelConfig
from ptx.sources import DataError, read_json_object

CONFIG = "config.json"
# Architecture in config.json -> (family, has a scalar head).
ARCHITECTURES = {
    **{f"{f}ForCausalLM": (f, False) for f in ("Llama", "Mistral", "Qwen2", "Qwen3", "Gemma3")},
    **{f"{f}ForSequenceClassification": (f, True) for f in ("Llama", "Mistral", "Qwen2", "Qwen3")},
    "Gemma3TextForSequenceClassification": ("Gemma3", True),
}
MODEL_TYPES = {"Llama": "llama", "Mistral": "mistral", "Qwen2": "qwen2", "Qwen3": "qwen3", "Gemma3": "gemma3_text"}
_QWEN = dict(rms_norm_eps=1e-6, rope_theta=10000.0, tie_word_embeddings=False, hidden_act="silu",
             use_sliding_window=False, sliding_window=4096, max_window_layers=28)
# transformers' defaults for the fields ptx reads, per family.
DEFAULTS = {
    "Llama": dict(rms_norm_eps=1e-6, rope_theta=10000.0, tie_word_embeddings=False, hidden_act="silu"),
    "Mistral": dict(rms_norm_eps=1e-6, rope_theta=10000.0, tie_word_embeddings=False, hidden_act="silu",
                    sliding_window=4096),
    "Qwen2": _QWEN,
    "Qwen3": dict(_QWEN, head_dim=128),
    "Gemma3": dict(rms_norm_eps=1e-6, rope_theta=1e6, rope_local_base_freq=10000.0, tie_word_embeddings=True,
                   hidden_activation="gelu_pytorch_tanh", head_dim=256, query_pre_attn_scalar=256,
                   sliding_window=4096, sliding_window_pattern=6),
}
_REQUIRED = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size")
_SCALED = ("linear", "dynamic", "llama3")
_DTYPE_NAMES = ("float32", "bfloat16", "float16")
_SLIDING, _FULL = "sliding_attention", "full_attention"


def read_config(path: str) -> dict:
    """The config.json of a Hugging Face directory; ValueError naming the file when it is missing,
    does not parse or is not an object."""
    file = os.path.join(path, CONFIG)
    if not os.path.isfile(file):
        raise FileNotFoundError(f"{file}: no such file (a Hugging Face model directory has a {CONFIG})")
    return read_json_object(file)


def config_from_hf(hf_config: dict, *, where: str = CONFIG) -> ModelConfig:
    """A Hugging Face config.json (as a dict) -> ModelConfig; param_dtype is the checkpoint's dtype.

    where: the file named in errors. ValueError names the field ptx cannot
    represent, or the one missing or of the wrong type.
    """
    archs = hf_config.get("architectures") or []
    arch = archs[0] if isinstance(archs, list) and len(archs) == 1 else ""
    if arch not in ARCHITECTURES:
        hint = (" (the multimodal Gemma 3; ptx imports its text model, Gemma3ForCausalLM)"
                if arch == "Gemma3ForConditionalGeneration" else "")
        raise DataError(f"{where} architectures={archs}{hint}: ptx imports exactly one of {sorted(ARCHITECTURES)}")
    family, scalar_head = ARCHITECTURES[arch]
    defaults = DEFAULTS[family]

    def refuse(field, why):
        raise DataError(f"{where} {field}={hf_config.get(field)!r}: {why}")

    def get(field, kind=None, default=None):
        value = hf_config.get(field, defaults.get(field, default))
        if value is None and field in _REQUIRED:
            raise DataError(f"{where}: field {field!r} missing ({arch} needs it)")
        if kind is not None and value is not None and (not isinstance(value, kind) or isinstance(value, bool)):
            refuse(field, f"expected {getattr(kind, '__name__', 'a number')}")
        return value

    for field in _REQUIRED:
        if get(field, int) < 1:
            refuse(field, "expected a positive integer")
    gemma = family == "Gemma3"
    act_field = "hidden_activation" if gemma else "hidden_act"
    act = get(act_field) or get("hidden_act")
    if act != ("gelu_pytorch_tanh" if gemma else "silu"):
        refuse(act_field, "ptx's gated MLP is SwiGLU (silu), or GeGLU with tanh GELU (gelu_pytorch_tanh) for Gemma 3")
    if hf_config.get("mlp_bias"):
        refuse("mlp_bias", "ptx's MLP has no biases")
    # Llama's, Qwen3's and Gemma's attention_bias also puts a bias on o_proj, which ptx lacks;
    # Qwen2 always has q/k/v biases and none on o_proj.
    if family != "Qwen2" and hf_config.get("attention_bias"):
        refuse("attention_bias", "ptx has q/k/v biases but no o_proj bias")
    for field in ("attn_logit_softcapping", "final_logit_softcapping", "use_bidirectional_attention"):
        if hf_config.get(field):
            refuse(field, "ptx has no logit soft-capping and attends causally")
    if hf_config.get("partial_rotary_factor", 1.0) != 1.0:
        refuse("partial_rotary_factor", "ptx rotates the whole head")
    labels = hf_config.get("id2label") or {"0": "LABEL_0"}
    if scalar_head and len(labels) != 1:
        refuse("id2label", "a ptx scalar head has exactly one label")

    n_layers, d, heads = get("num_hidden_layers"), get("hidden_size"), get("num_attention_heads")
    head_dim = get("head_dim", int) or d // heads
    sliding = [i for i, kind in enumerate(_layer_types(hf_config, family, n_layers, get, refuse)) if kind == _SLIDING]
    window = get("sliding_window", int) if sliding else 0
    if sliding and not window:
        refuse("sliding_window", f"layers {sliding} slide, so the window must be a positive integer")
    rope, rope_field = _rope(hf_config, family, get, refuse, where)
    dtype = hf_config.get("dtype") or hf_config.get("torch_dtype")
    return ModelConfig(
        vocab_size=get("vocab_size"), d_model=d, n_layers=n_layers, n_heads=heads,
        n_kv_heads=get("num_key_value_heads", int) or heads, head_dim=0 if head_dim == d // heads else head_dim,
        d_ff=get("intermediate_size"), norm_eps=float(get("rms_norm_eps", (int, float))), qkv_bias=family == "Qwen2",
        tie_embeddings=bool(get("tie_word_embeddings")), scalar_head=scalar_head,
        param_dtype=dtype if dtype in _DTYPE_NAMES else "float32",
        sliding_window=window or 0, global_layers=tuple(i for i in range(n_layers) if i not in sliding)
        if len(sliding) not in (0, n_layers) else (),
        qk_norm=family in ("Qwen3", "Gemma3"), norm_plus_one=gemma, post_norms=gemma, scale_embed=gemma,
        mlp_act="gelu_tanh" if gemma else "silu",
        query_pre_attn_scalar=float(get("query_pre_attn_scalar", (int, float))) if gemma else 0.0,
        **_rope_fields(rope, rope_field, hf_config, refuse))


def _layer_types(hf_config, family, n_layers, get, refuse) -> list:
    """Each layer's "sliding_attention" or "full_attention", as transformers derives them."""
    types = hf_config.get("layer_types")
    if types is not None and family != "Mistral":
        if not isinstance(types, list) or len(types) != n_layers or not set(types) <= {_SLIDING, _FULL}:
            refuse("layer_types", f"expected {n_layers} of {_SLIDING!r} / {_FULL!r}")
        return types
    if family == "Mistral":
        return [_SLIDING if get("sliding_window") is not None else _FULL] * n_layers
    if family in ("Qwen2", "Qwen3"):
        slide = get("use_sliding_window") and get("sliding_window") is not None
        return [_SLIDING if slide and i >= get("max_window_layers", int) else _FULL for i in range(n_layers)]
    if family == "Gemma3":
        pattern = hf_config.get("sliding_window_pattern", hf_config.get("_sliding_window_pattern",
                                                                        get("sliding_window_pattern")))
        return [_SLIDING if (i + 1) % pattern else _FULL for i in range(n_layers)]
    return [_FULL] * n_layers


def _rope(hf_config, family, get, refuse, where: str) -> tuple:
    """(the rope parameters of the global layers as one dict with rope_theta, the field they came from);
    Gemma 3's also carry its sliding layers' base as "local_theta".

    As transformers reads them: 4.x reads `rope_scaling`; 5 reads `rope_parameters`, unless
    `rope_scaling` is set too, which then wins. Both set and saying different things is a
    DataError naming both, since the two versions would build different models."""
    for f in ("rope_parameters", "rope_scaling"):
        if hf_config.get(f) is not None and not isinstance(hf_config[f], dict):
            refuse(f, "expected an object")
    field = "rope_scaling" if hf_config.get("rope_scaling") else "rope_parameters"
    params = hf_config.get(field) or {}
    if hf_config.get("rope_scaling") and hf_config.get("rope_parameters"):
        _check_rope_agree(hf_config, family, where)
    if family == "Gemma3":
        nested = {_FULL, _SLIDING} & set(params)
        full = dict(params.get(_FULL) or {}) if nested else dict(params)
        local = dict(params.get(_SLIDING) or {}) if nested else {}
        full.setdefault("rope_theta", get("rope_theta", (int, float)))
        local.setdefault("rope_theta", get("rope_local_base_freq", (int, float)))
        if local.get("rope_type", local.get("type", "default")) != "default":
            refuse(field, "Gemma 3's sliding layers must use plain RoPE")
        return dict(full, local_theta=float(local["rope_theta"])), field
    params = dict(params)
    params.setdefault("rope_theta", get("rope_theta", (int, float)))
    return params, field


def _check_rope_agree(hf_config: dict, family: str, where: str):
    """`rope_scaling` (transformers 4.x) and `rope_parameters` (5) set together must say the same:
    one rope type, equal values for the fields both name, and rope_parameters' rope_theta equal
    to the plain rope_theta field (or its default) that goes with rope_scaling."""
    scaling, parameters = hf_config["rope_scaling"], hf_config["rope_parameters"]
    if family == "Gemma3" and _FULL in parameters:  # 4.x's rope_scaling is the global layers'
        parameters = parameters[_FULL] or {}

    def plain(p):
        p = {("rope_type" if k == "type" else k): v for k, v in p.items() if k != "rope_theta"}
        return dict(p, rope_type=p.get("rope_type", "default"))

    a, b = plain(scaling), plain(parameters)
    theta = hf_config.get("rope_theta", DEFAULTS[family]["rope_theta"])
    if any(a[k] != b[k] for k in set(a) & set(b)) or parameters.get("rope_theta", theta) != theta:
        raise DataError(f"{where}: rope_scaling={scaling!r} and rope_parameters={hf_config['rope_parameters']!r} "
                        f"disagree (transformers 4 reads rope_scaling, transformers 5 reads rope_scaling when set, "
                        f"else rope_parameters); keep one of them")


def _rope_fields(rope: dict, field: str, hf_config: dict, refuse) -> dict:
    kind = rope.get("rope_type", rope.get("type", "default"))
    if kind not in ("default",) + _SCALED:
        refuse(field, f"rope type {kind!r} is not representable; ptx has default, linear, dynamic and llama3 RoPE")
    out = dict(rope_theta=float(rope["rope_theta"]), rope_type=kind,
               rope_local_theta=float(rope.get("local_theta", 0.0)))
    if kind == "default":
        return out
    original = rope.get("original_max_position_embeddings", hf_config.get("max_position_embeddings"))
    if kind == "dynamic":  # transformers' dynamic NTK counts from max_position_embeddings
        original = hf_config.get("max_position_embeddings")
    if not isinstance(rope.get("factor"), (int, float)) or (kind != "linear" and not isinstance(original, int)):
        refuse(field, f"rope type {kind!r} needs a numeric factor and original_max_position_embeddings")
    out.update(rope_factor=float(rope["factor"]), rope_original_max_len=0 if kind == "linear" else int(original))
    if kind == "llama3":
        out.update(rope_low_freq_factor=float(rope.get("low_freq_factor", 1.0)),
                   rope_high_freq_factor=float(rope.get("high_freq_factor", 4.0)))
    return out


def family_of(cfg: ModelConfig) -> str:
    """The transformers family that computes exactly `cfg`; ValueError when none does."""
    gemma = (cfg.norm_plus_one, cfg.post_norms, cfg.scale_embed, cfg.mlp_act == "gelu_tanh", cfg.qk_norm)
    if any(gemma[:4]) or cfg.query_pre_attn_scalar:
        if not all(gemma) or cfg.qkv_bias:
            raise ValueError(f"no transformers architecture computes {cfg}: Gemma 3 has (1 + w) norms, post "
                             "norms, a scaled embedding, GeGLU and q / k norms, all of them, and no qkv bias")
        return "Gemma3"
    if cfg.rope_local_theta and cfg.mixed_layers:
        raise ValueError(f"no transformers architecture computes {cfg}: a separate sliding-layer rope base is "
                         "Gemma 3's")
    if cfg.qk_norm:
        if cfg.qkv_bias:
            raise ValueError(f"no transformers architecture computes {cfg}: q / k norms with qkv biases")
        return "Qwen3"
    if cfg.qkv_bias:
        return "Qwen2"
    if cfg.mixed_layers:
        raise ValueError(f"no transformers architecture computes {cfg}: sliding and global layers without "
                         "q / k norms or qkv biases")
    return "Mistral" if cfg.is_local(0) else "Llama"


def to_hf_config(cfg: ModelConfig, dtype: str, tokenizer=None, max_position_embeddings: int = 4096) -> dict:
    """The config.json that makes `transformers` build exactly this model (`family_of`).

    tokenizer: gives bos / eos / pad ids (its eos_id; generation_config.json lists every stop id).
    """
    family = family_of(cfg)
    head = "ForSequenceClassification" if cfg.scalar_head else "ForCausalLM"
    arch = "Gemma3TextForSequenceClassification" if family == "Gemma3" and cfg.scalar_head else family + head
    types = [_SLIDING if cfg.is_local(i) else _FULL for i in range(cfg.n_layers)]
    window = cfg.sliding_window if _SLIDING in types else None
    scaling = None
    if cfg.rope_type != "default":
        scaling = {"rope_type": cfg.rope_type, "factor": cfg.rope_factor}
        if cfg.rope_type == "llama3":
            scaling.update(low_freq_factor=cfg.rope_low_freq_factor, high_freq_factor=cfg.rope_high_freq_factor,
                           original_max_position_embeddings=cfg.rope_original_max_len)
        if cfg.rope_type == "dynamic":
            max_position_embeddings = cfg.rope_original_max_len
    out = {
        "architectures": [arch], "model_type": MODEL_TYPES[family], "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.d_model, "intermediate_size": cfg.d_ff, "num_hidden_layers": cfg.n_layers,
        "num_attention_heads": cfg.n_heads, "num_key_value_heads": cfg.n_kv_heads, "head_dim": cfg.head_size,
        "rms_norm_eps": cfg.norm_eps, "rope_theta": cfg.rope_theta, "rope_scaling": scaling,
        "max_position_embeddings": max_position_embeddings, "tie_word_embeddings": cfg.tie_embeddings,
        "torch_dtype": dtype, "use_cache": True, "initializer_range": 0.02,
    }
    if family == "Gemma3":
        scalar = cfg.query_pre_attn_scalar or cfg.head_size  # an int in transformers' Gemma3TextConfig
        out.update(hidden_activation="gelu_pytorch_tanh", query_pre_attn_scalar=int(scalar) if scalar == int(scalar)
                   else scalar, rope_local_base_freq=cfg.rope_local_theta or cfg.rope_theta,
                   sliding_window=window, layer_types=types, attention_bias=False,
                   attn_logit_softcapping=None, final_logit_softcapping=None, use_bidirectional_attention=False)
    else:
        out["hidden_act"] = "silu"
    if family in ("Llama", "Mistral", "Qwen3"):
        out.update(attention_bias=False)
    if family == "Llama":
        out.update(mlp_bias=False)
    if family == "Mistral":
        out.update(sliding_window=window)
    if family in ("Qwen2", "Qwen3"):
        first = next((i for i in range(cfg.n_layers) if cfg.is_local(i)), cfg.n_layers)
        out.update(use_sliding_window=window is not None, sliding_window=window,
                   max_window_layers=first, layer_types=types)
    if cfg.scalar_head:
        out.update(id2label={"0": "LABEL_0"}, label2id={"LABEL_0": 0})
    if tokenizer is not None:
        out.update({f"{k}_token_id": v for k in ("bos", "eos", "pad") if (v := getattr(tokenizer, f"{k}_id")) >= 0})
    return out
