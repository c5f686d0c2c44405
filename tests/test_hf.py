"""ptx.hf against transformers: same logits, same greedy tokens, exact round trips, clear errors.

The families: Llama 2 / 3 (tied or not), Llama 3.2 with llama3 rope scaling, Mistral and
Qwen3 with sliding windows shorter than the sequences, Qwen2 (qkv biases), and Gemma 3
(interleaved sliding and global layers with their own rope bases, linear scaling on the
global ones, a query scalar that is not head_dim)."""
import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from ptx import hf, sharding
from ptx.model import ModelConfig, Transformer, init_params
from ptx.sampler import make_generate_fn
from ptx.sources import DataError
from ptx.tokenizer import train_tokenizer

from conftest import assert_same_params

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

TINY = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            vocab_size=128, intermediate_size=128, max_position_embeddings=64, rms_norm_eps=1e-5)
LLAMA3_ROPE = {"rope_type": "llama3", "rope_theta": 5e5, "factor": 32.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 8}
GEMMA3_ROPE = {"full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1e6},
               "sliding_attention": {"rope_type": "default", "rope_theta": 1e4}}
# Windows of 5 and 4 tokens: shorter than every sequence here (12 tokens; prompt 8 + 20 new).
VARIANTS = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", dict(tie_word_embeddings=False, rope_theta=5e5)),
    "llama_tied": ("LlamaConfig", "LlamaForCausalLM", dict(tie_word_embeddings=True, rope_theta=1e4)),
    "llama32": ("LlamaConfig", "LlamaForCausalLM", dict(tie_word_embeddings=True, rope_parameters=LLAMA3_ROPE)),
    "mistral": ("MistralConfig", "MistralForCausalLM", dict(tie_word_embeddings=False, sliding_window=5,
                                                           rope_theta=1e6)),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", dict(tie_word_embeddings=False, rope_theta=1e6)),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", dict(head_dim=32, use_sliding_window=True, sliding_window=5,
                                                     max_window_layers=1, rope_theta=1e6)),
    # Sequences of 12 > max_position_embeddings: the NTK base grows with the length.
    "llama_dynamic": ("LlamaConfig", "LlamaForCausalLM", dict(max_position_embeddings=8, rope_parameters={
        "rope_type": "dynamic", "rope_theta": 1e4, "factor": 4.0})),
    "gemma3": ("Gemma3TextConfig", "Gemma3ForCausalLM", dict(head_dim=16, sliding_window=4, sliding_window_pattern=2,
                                                            query_pre_attn_scalar=24, rope_parameters=GEMMA3_ROPE)),
}
EXPORTED = {"llama_tied": "LlamaForCausalLM", "llama32": "LlamaForCausalLM", "mistral": "MistralForCausalLM",
            "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM", "gemma3": "Gemma3ForCausalLM"}
TOKENS = np.random.default_rng(0).integers(0, 128, (2, 12), dtype=np.int32)


def build(config_cls, model_cls, seed, **kw):
    """A transformers model with every weight random (norm scales and biases too), float32 CPU."""
    rope = kw.pop("rope_parameters", {"rope_type": "default", "rope_theta": kw.pop("rope_theta", 1e4)})
    config = getattr(transformers, config_cls)(**{**TINY, **kw}, rope_parameters=rope)
    torch.manual_seed(seed)
    model = getattr(transformers, model_cls)(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)
            elif name.endswith("bias"):
                p.normal_(0.0, 0.5)
            else:
                p.normal_(0.0, 0.2)
    return model


def torch_logits(model, tokens):
    with torch.no_grad():
        return model(torch.tensor(np.asarray(tokens), dtype=torch.long)).logits.numpy()


@pytest.fixture(scope="module", params=sorted(VARIANTS))
def variant(request, tmp_path_factory):
    """(name, transformers model, its save_pretrained dir, ptx HFModel loaded from it)."""
    config_cls, model_cls, kw = VARIANTS[request.param]
    model = build(config_cls, model_cls, seed=len(request.param), **kw)
    path = str(tmp_path_factory.mktemp(request.param))
    model.save_pretrained(path, safe_serialization=True)
    return request.param, model, path, hf.load_model(path)


def test_logits_equal_transformers(variant):
    name, model, _, ptx_model = variant
    cfg = ptx_model.cfg
    assert cfg.qkv_bias == (name == "qwen2")
    assert cfg.tie_embeddings == (name in ("llama_tied", "llama32", "gemma3"))
    assert cfg.qk_norm == (name in ("qwen3", "gemma3")) and cfg.post_norms == (name == "gemma3")
    assert (cfg.sliding_window, cfg.global_layers) == {"mistral": (5, ()), "qwen3": (5, (0,)),
                                                       "gemma3": (4, (1,))}.get(name, (0, ()))
    assert cfg.rope_type == {"llama32": "llama3", "gemma3": "linear", "llama_dynamic": "dynamic"}.get(name, "default")
    logits = ptx_model(TOKENS).logits
    assert logits.shape == (2, 12, 128)
    np.testing.assert_allclose(np.asarray(logits), torch_logits(model, TOKENS), atol=1e-4, rtol=0)
    # The scan over stacked layers (deep models) picks each layer's window and rope as the loop does.
    scanned = Transformer(cfg.replace(layer_loop_max=0)).apply({"params": ptx_model.params}, TOKENS).logits
    np.testing.assert_allclose(np.asarray(scanned), torch_logits(model, TOKENS), atol=1e-4, rtol=0)
    if cfg.sliding_window:  # the window is shorter than the sequence: it changes the logits
        full = hf.HFModel(cfg.replace(sliding_window=0), ptx_model.params)(TOKENS).logits
        assert np.abs(np.asarray(full) - np.asarray(logits)).max() > 1e-2


def test_greedy_generation_equals_transformers(variant):
    name, model, path, ptx_model = variant
    if name == "llama_dynamic":  # transformers' dynamic RoPE keeps the longest length it has seen: a fresh one
        model = transformers.AutoModelForCausalLM.from_pretrained(path).eval()
    prompt = TOKENS[:, :8]
    model.generation_config.eos_token_id = None  # no EOS stopping on either side
    with torch.no_grad():
        expected = model.generate(torch.tensor(prompt, dtype=torch.long), do_sample=False,
                                  max_new_tokens=20, pad_token_id=0)[:, 8:].numpy()
    assert expected.shape == (2, 20)
    generate = make_generate_fn(ptx_model.cfg, max_new_tokens=20, eos_id=-1)
    out = generate(ptx_model.params, jnp.asarray(prompt), jnp.full((2,), 8, jnp.int32),
                   jax.random.split(jax.random.PRNGKey(0), 2), temperature=0.0)
    np.testing.assert_array_equal(np.asarray(out.tokens), expected)


def test_export_then_import_is_identity(variant, tmp_path):
    _, _, _, ptx_model = variant
    hf.save_model(ptx_model, str(tmp_path))
    again = hf.load_model(str(tmp_path))
    assert again.cfg == ptx_model.cfg
    assert_same_params(again.params, ptx_model.params)


def test_export_loads_in_transformers_with_same_logits(variant, tmp_path):
    name, model, _, ptx_model = variant
    hf.save_model(ptx_model, str(tmp_path))
    with open(tmp_path / "config.json") as f:
        assert json.load(f)["architectures"] == [EXPORTED.get(name, "LlamaForCausalLM")]
    exported = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path)).eval()
    np.testing.assert_allclose(torch_logits(exported, TOKENS), torch_logits(model, TOKENS), atol=1e-4, rtol=0)


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    model = build("LlamaConfig", "LlamaForCausalLM", seed=7, tie_word_embeddings=False)
    path = str(tmp_path_factory.mktemp("llama"))
    model.save_pretrained(path, safe_serialization=True)
    return model, path


def test_sharded_export_writes_index_and_round_trips(llama, tmp_path):
    model, path = llama
    params, cfg = hf.load_params(path)
    hf.save_params(params, cfg, str(tmp_path), max_shard_bytes=40_000)
    with open(tmp_path / hf.INDEX) as f:
        index = json.load(f)
    files = sorted(set(index["weight_map"].values()))
    assert len(files) > 2 and not (tmp_path / hf.SINGLE).exists()
    assert sorted(p.name for p in tmp_path.glob("*.safetensors")) == files
    for file in files:
        assert sum(x.nbytes for x in load_file(str(tmp_path / file)).values()) <= 40_000
    assert index["metadata"]["total_size"] == sum(x.size * 4 for x in jax.tree_util.tree_leaves(params))
    again, again_cfg = hf.load_params(str(tmp_path))
    assert again_cfg == cfg
    assert_same_params(again, params)
    exported = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path)).eval()
    np.testing.assert_allclose(torch_logits(exported, TOKENS), torch_logits(model, TOKENS), atol=1e-4, rtol=0)


def test_bfloat16_export_round_trips(llama, tmp_path):
    _, path = llama
    params, cfg = hf.load_params(path)
    hf.save_params(params, cfg, str(tmp_path), dtype="bfloat16")
    with open(tmp_path / "config.json") as f:
        assert json.load(f)["torch_dtype"] == "bfloat16"
    again, again_cfg = hf.load_params(str(tmp_path))
    assert again_cfg == cfg.replace(param_dtype="bfloat16")
    assert_same_params(again, jax.tree_util.tree_map(lambda x: x.astype(jnp.bfloat16), params))
    exported = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path), dtype=torch.float32).eval()
    ours = hf.HFModel(again_cfg, again)(TOKENS).logits
    np.testing.assert_allclose(torch_logits(exported, TOKENS), np.asarray(ours), atol=1e-4, rtol=0)


def test_loads_onto_fsdp_tensor_mesh_with_same_logits_and_exports(llama, tmp_path):
    model, path = llama
    with open(os.path.join(path, "config.json")) as f:
        cfg = hf.config_from_hf(json.load(f))
    mesh = sharding.make_mesh(sharding.MeshConfig(data=1, fsdp=2, tensor=4))
    abstract = jax.eval_shape(lambda: init_params(cfg, jax.random.PRNGKey(0)))
    shardings = sharding.named(mesh, sharding.tree_specs(abstract, sharding.param_rules(cfg), mesh, strict=True))
    params, _ = hf.load_params(path, shardings=shardings)
    for x, s in zip(jax.tree_util.tree_leaves(params), jax.tree_util.tree_leaves(shardings)):
        assert x.sharding == s
    assert len(params["layers"]["attn"]["q"]["kernel"].addressable_shards) == 8
    logits = hf.HFModel(cfg, params)(TOKENS).logits
    np.testing.assert_allclose(np.asarray(logits), torch_logits(model, TOKENS), atol=1e-4, rtol=0)
    hf.save_params(params, cfg, str(tmp_path))
    assert_same_params(hf.load_params(str(tmp_path))[0], hf.load_params(path)[0])


def test_reward_model_exports_as_sequence_classification(tmp_path):
    cfg = ModelConfig(vocab_size=128, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=128,
                      tie_embeddings=False, scalar_head=True)
    params = jax.jit(lambda key: jax.tree_util.tree_map(lambda x: x * 5, init_params(cfg, key)))(
        jax.random.PRNGKey(1))
    hf.save_params(params, cfg, str(tmp_path))
    again, again_cfg = hf.load_params(str(tmp_path))
    assert again_cfg == cfg
    assert_same_params(again, params)
    scorer = transformers.AutoModelForSequenceClassification.from_pretrained(str(tmp_path)).eval()
    assert type(scorer).__name__ == "LlamaForSequenceClassification"
    scorer.config.pad_token_id = cfg.vocab_size  # an id that never occurs: score the last token
    with torch.no_grad():
        expected = scorer(torch.tensor(TOKENS, dtype=torch.long)).logits.numpy()[:, 0]
    values = hf.HFModel(cfg, params)(TOKENS).values
    np.testing.assert_allclose(np.asarray(values[:, -1]), expected, atol=1e-4, rtol=1e-5)


def test_transformers_reward_model_imports_with_tied_head(tmp_path):
    model = build("LlamaConfig", "LlamaForSequenceClassification", seed=3, num_labels=1, pad_token_id=0)
    model.save_pretrained(str(tmp_path), safe_serialization=True)
    ptx_model = hf.load_model(str(tmp_path))
    assert ptx_model.cfg.scalar_head and ptx_model.cfg.tie_embeddings
    with torch.no_grad():
        expected = model(torch.tensor(TOKENS + 1, dtype=torch.long)).logits.numpy()[:, 0]
    values = ptx_model(TOKENS + 1).values
    np.testing.assert_allclose(np.asarray(values[:, -1]), expected, atol=1e-4, rtol=1e-5)


def test_tokenizer_model_is_loaded_and_exported(llama, tmp_path):
    texts = [f"Human: what is {i} plus {i}? Assistant: {2 * i}." for i in range(50)]
    tok = train_tokenizer(texts, vocab_size=300, path=str(tmp_path / "spm" / "t.model"))
    params, cfg = hf.load_params(llama[1])
    hf.save_model(hf.HFModel(cfg, params, tok), str(tmp_path / "out"))
    with open(tmp_path / "out" / "config.json") as f:
        config = json.load(f)
    assert (config["bos_token_id"], config["eos_token_id"]) == (tok.bos_id, tok.eos_id)
    again = hf.load_model(str(tmp_path / "out"))
    assert again.tokenizer.encode("what is 3 plus 4?") == tok.encode("what is 3 plus 4?")
    os.remove(tmp_path / "out" / "tokenizer.model")
    (tmp_path / "out" / "tokenizer.json").write_text("{}")
    # A broken tokenizer.json is an error naming the file.
    with pytest.raises(ValueError, match=r"tokenizer\.json: not a tokenizers file"):
        hf.load_tokenizer(str(tmp_path / "out"))


def copy_checkpoint(path, tmp_path):
    out = tmp_path / "ckpt"
    shutil.copytree(path, out)
    return out


def test_missing_tensor_is_named(llama, tmp_path):
    out = copy_checkpoint(llama[1], tmp_path)
    tensors = load_file(str(out / hf.SINGLE))
    del tensors["model.layers.1.mlp.up_proj.weight"]
    save_file(tensors, str(out / hf.SINGLE), metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"tensor model\.layers\.1\.mlp\.up_proj\.weight missing"):
        hf.load_params(str(out))


def test_unexpected_tensor_is_named(llama, tmp_path):
    out = copy_checkpoint(llama[1], tmp_path)
    tensors = load_file(str(out / hf.SINGLE))
    tensors["model.layers.0.mlp.extra_proj.weight"] = np.zeros((4, 4), np.float32)
    save_file(tensors, str(out / hf.SINGLE), metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"unexpected tensor model\.layers\.0\.mlp\.extra_proj\.weight"):
        hf.load_params(str(out))


def test_shape_mismatch_is_named(llama, tmp_path):
    out = copy_checkpoint(llama[1], tmp_path)
    config = json.loads((out / "config.json").read_text())
    (out / "config.json").write_text(json.dumps({**config, "intermediate_size": 96}))
    with pytest.raises(ValueError, match=r"tensor model\.layers\.0\.mlp\.gate_proj\.weight has shape "
                                         r"\(128, 64\).*expected \(96, 64\)"):
        hf.load_params(str(out))


def test_given_cfg_must_match_checkpoint(llama):
    with open(os.path.join(llama[1], "config.json")) as f:
        cfg = hf.config_from_hf(json.load(f))
    with pytest.raises(ValueError, match="rope_theta"):
        hf.load_params(llama[1], cfg.replace(rope_theta=1.0))


def test_a_config_no_transformers_family_computes_is_refused_before_writing(tmp_path):
    cfg = ModelConfig(vocab_size=64, d_model=32, qk_norm=True, qkv_bias=True)
    with pytest.raises(ValueError, match="q / k norms with qkv biases"):
        hf.save_params(init_params(cfg, jax.random.PRNGKey(0)), cfg, str(tmp_path / "out"))
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("keep", [0.5, 40])  # the data cut short; the header cut short
def test_a_truncated_safetensors_file_is_an_error_naming_the_file(llama, tmp_path, keep):
    out = copy_checkpoint(llama[1], tmp_path)
    file = out / hf.SINGLE
    data = file.read_bytes()
    file.write_bytes(data[:int(len(data) * keep) if keep < 1 else keep])
    with pytest.raises(DataError, match=f"^{file}: cannot read it as safetensors: .+"):
        hf.load_params(str(out))
