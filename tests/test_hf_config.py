"""ptx.hf_config: Hugging Face config.json <-> ModelConfig, and clear errors for what ptx does not compute."""
import json

import pytest

from ptx import hf
from ptx.model import ModelConfig
from ptx.sources import DataError

transformers = pytest.importorskip("transformers")

BASE = {"architectures": ["LlamaForCausalLM"], "vocab_size": 128, "hidden_size": 64,
        "num_hidden_layers": 2, "num_attention_heads": 4, "intermediate_size": 128,
        "max_position_embeddings": 64}


@pytest.mark.parametrize("override, match", [
    ({"architectures": ["GPT2LMHeadModel"]}, r"config.json architectures=\['GPT2LMHeadModel'\]: ptx imports"),
    ({"architectures": ["GemmaForCausalLM"]}, r"architectures=\['GemmaForCausalLM'\]"),
    ({"architectures": ["Gemma3ForConditionalGeneration"]}, r"multimodal Gemma 3.*Gemma3ForCausalLM"),
    ({"rope_scaling": {"rope_type": "yarn", "factor": 8.0}}, r"rope_scaling=.*'yarn'"),
    ({"rope_parameters": {"rope_type": "longrope", "rope_theta": 1e4}}, r"rope_parameters=.*'longrope'"),
    ({"rope_scaling": {"rope_type": "llama3"}}, r"rope_scaling=.*needs a numeric factor"),
    ({"attention_bias": True}, r"attention_bias=True.*o_proj"),
    ({"hidden_act": "gelu"}, r"hidden_act='gelu'"),
    ({"architectures": ["Gemma3ForCausalLM"], "final_logit_softcapping": 30.0}, r"final_logit_softcapping=30.0"),
    ({"architectures": ["Qwen3ForCausalLM"], "layer_types": ["full_attention"]}, r"layer_types=.*expected 2"),
    ({"num_attention_heads": None}, r"config.json: field 'num_attention_heads' missing"),
    ({"hidden_size": "64"}, r"config.json hidden_size='64': expected int"),
])
def test_unsupported_config_is_a_clear_error(override, match):
    with pytest.raises(ValueError, match=match):
        hf.config_from_hf({**BASE, **override})


def test_config_mapping():
    cfg = hf.config_from_hf({**BASE, "architectures": ["MistralForCausalLM"], "num_key_value_heads": 2,
                             "head_dim": 32, "sliding_window": 16, "rope_theta": 5e5, "rms_norm_eps": 1e-6,
                             "tie_word_embeddings": True, "torch_dtype": "bfloat16"})
    assert cfg == ModelConfig(vocab_size=128, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=32,
                              d_ff=128, rope_theta=5e5, norm_eps=1e-6, tie_embeddings=True,
                              param_dtype="bfloat16", sliding_window=16)
    # Qwen2 stores a sliding_window that only counts with use_sliding_window.
    qwen = hf.config_from_hf({**BASE, "architectures": ["Qwen2ForCausalLM"], "sliding_window": 16,
                              "use_sliding_window": False})
    assert qwen.qkv_bias and qwen.head_dim == 0 and qwen.n_kv_heads == 4 and qwen.sliding_window == 0
    # Llama 3.2 as downloaded: rope_theta beside rope_scaling.
    llama = hf.config_from_hf({**BASE, "rope_theta": 5e5, "rope_scaling": {
        "rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192}})
    assert (llama.rope_type, llama.rope_theta, llama.rope_factor, llama.rope_original_max_len) == (
        "llama3", 5e5, 32.0, 8192)
    # Gemma 3 1B as downloaded: no layer_types, the pattern and both rope bases as plain fields,
    # and transformers' Gemma 3 defaults (head_dim 256, query_pre_attn_scalar 256) where absent.
    gemma = hf.config_from_hf({**BASE, "architectures": ["Gemma3ForCausalLM"], "num_hidden_layers": 12,
                               "sliding_window": 512, "sliding_window_pattern": 6, "rope_theta": 1e6,
                               "rope_local_base_freq": 1e4, "rope_scaling": None})
    assert gemma.global_layers == (5, 11) and gemma.sliding_window == 512 and gemma.head_size == 256
    assert (gemma.rope_theta, gemma.rope_local_theta, gemma.query_pre_attn_scalar) == (1e6, 1e4, 256.0)
    assert gemma.norm_plus_one and gemma.scale_embed and gemma.mlp_act == "gelu_tanh" and gemma.tie_embeddings


@pytest.mark.parametrize("cfg", [
    ModelConfig(vocab_size=64, d_model=32, n_heads=4, n_kv_heads=2, rope_type="dynamic", rope_factor=2.0,
                rope_original_max_len=16),
    ModelConfig(vocab_size=64, d_model=32, rope_type="linear", rope_factor=4.0, qk_norm=True, sliding_window=8,
                n_layers=3, global_layers=(0, 2)),
    ModelConfig(vocab_size=64, d_model=32, qkv_bias=True, scalar_head=True, tie_embeddings=False),
    ModelConfig(vocab_size=64, d_model=32, n_layers=4, head_dim=16, qk_norm=True, norm_plus_one=True,
                post_norms=True, scale_embed=True, mlp_act="gelu_tanh", query_pre_attn_scalar=24.0,
                sliding_window=4, global_layers=(3,), rope_local_theta=1e4, rope_theta=1e6, scalar_head=True),
])
def test_exported_config_reads_back_as_the_same_model(cfg):
    hf_config = hf.to_hf_config(cfg, "float32", max_position_embeddings=16)
    assert hf.config_from_hf(hf_config) == cfg
    # transformers builds it: its config class accepts every field.
    config_cls = transformers.AutoConfig.for_model(hf_config["model_type"]).__class__
    config_cls.from_dict(hf_config)


def test_a_broken_directory_is_an_error_naming_the_file_and_field(tmp_path):
    (tmp_path / "config.json").write_text('{"architectures": ["LlamaForCausalLM"], ')
    with pytest.raises(ValueError, match=r"config\.json: malformed JSON"):
        hf.load_model(str(tmp_path))
    (tmp_path / "config.json").write_text(json.dumps({k: v for k, v in BASE.items() if k != "num_attention_heads"}))
    with pytest.raises(ValueError, match=rf"{tmp_path}/config\.json: field 'num_attention_heads' missing"):
        hf.load_model(str(tmp_path))
    (tmp_path / "config.json").unlink()
    with pytest.raises(FileNotFoundError, match=r"config\.json: no such file"):
        hf.load_model(str(tmp_path))


def test_rope_scaling_and_rope_parameters_are_read_as_transformers_reads_them():
    # transformers 4.x writes rope_scaling, 5 rope_parameters; each alone, or both agreeing, is one model.
    yarn_free = {"rope_type": "linear", "factor": 4.0}
    alone = [hf.config_from_hf({**BASE, "rope_scaling": yarn_free}),
             hf.config_from_hf({**BASE, "rope_parameters": {**yarn_free, "rope_theta": 1e4}}),
             hf.config_from_hf({**BASE, "rope_scaling": {"type": "linear", "factor": 4.0},
                                "rope_parameters": {**yarn_free, "rope_theta": 1e4}})]
    assert all(c == alone[0] for c in alone) and alone[0].rope_factor == 4.0
    assert hf.config_from_hf({**BASE, "rope_scaling": None, "rope_parameters": {"rope_type": "default",
                                                                                "rope_theta": 5e5}}).rope_theta == 5e5


@pytest.mark.parametrize("scaling, parameters", [
    ({"rope_type": "yarn", "factor": 4.0}, {"rope_type": "default"}),  # the case
    ({"rope_type": "linear", "factor": 4.0}, {"rope_type": "linear", "factor": 8.0}),
    ({"rope_type": "linear", "factor": 4.0}, {"rope_type": "linear", "factor": 4.0, "rope_theta": 5e5}),
])
def test_rope_scaling_and_rope_parameters_that_disagree_are_one_error_naming_both(scaling, parameters):
    with pytest.raises(DataError) as e:
        hf.config_from_hf({**BASE, "rope_scaling": scaling, "rope_parameters": parameters}, where="m/config.json")
    line = str(e.value)
    assert "\n" not in line and line.startswith(f"m/config.json: rope_scaling={scaling!r} and rope_parameters="
                                                f"{parameters!r} disagree")
