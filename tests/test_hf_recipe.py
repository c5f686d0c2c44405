"""Post-training a Hugging Face model, as the README's recipe does it: directories made by
transformers (random weights; a trained byte-level BPE tokenizer.json with a Jinja chat template)
of Llama 3.2 (llama3 rope scaling), Qwen3 and Gemma 3 (a sliding window shorter than the
sequences) go through SFT on a TRL conversational file, DPO on implicit-prompt pairs, GRPO with a
Python reward and export; transformers loads the export with the same logits and chat template."""
import json
import os

import numpy as np
import pytest

from configs import dpo as dpo_config
from configs import export as export_config
from configs import grpo as grpo_config
from configs import reward as reward_config
from configs import sample as sample_config
from configs import sft as sft_config
from ptx import checkpoint, hf, stages
from ptx.model import ModelConfig, Transformer

from chat_dirs import FAMILIES, write_dir
from conftest import write_jsonl

# Every test here runs a stage end to end (see pyproject.toml's markers).
pytestmark = pytest.mark.stage

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

TINY = dict(hidden_size=32, intermediate_size=64, num_attention_heads=4, num_key_value_heads=2,
            max_position_embeddings=128)
MODELS = {
    "llama3": ("LlamaConfig", "LlamaForCausalLM", dict(num_hidden_layers=2, tie_word_embeddings=True, rope_parameters={
        "rope_type": "llama3", "rope_theta": 5e5, "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 16})),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", dict(num_hidden_layers=2, head_dim=16, tie_word_embeddings=True)),
    "gemma3": ("Gemma3TextConfig", "Gemma3ForCausalLM", dict(num_hidden_layers=3, head_dim=8, sliding_window=4,
                                                            sliding_window_pattern=2, query_pre_attn_scalar=8)),
}
REWARD_MODULE = '''
def concise(prompt: str, completion: str) -> float:
    """Shorter answers score higher."""
    return -len(completion) / 100.0
'''


def conversation(i: int) -> list[dict]:
    return [{"role": "system", "content": "Answer briefly."},
            {"role": "user", "content": f"What is {i} plus {i}?"},
            {"role": "assistant", "content": f"{2 * i}."},
            {"role": "user", "content": "And doubled?"},
            {"role": "assistant", "content": f"That is {4 * i}."}]


def data_files(root) -> dict:
    """TRL conversational files: SFT messages, implicit-prompt preferences, prompts with an answer."""
    return {
        "sft": write_jsonl(root / "sft.jsonl", [{"messages": conversation(i)} for i in range(16)]),
        "prefs": write_jsonl(root / "prefs.jsonl", [{
            "chosen": conversation(i)[:4] + [{"role": "assistant", "content": f"That is {4 * i}."}],
            "rejected": conversation(i)[:4] + [{"role": "assistant", "content": "I would rather not say."}]}
            for i in range(16)]),
        "prompts": write_jsonl(root / "prompts.jsonl", [
            {"prompt": [{"role": "user", "content": f"What is {i} plus {i}?"}], "answer": str(2 * i)}
            for i in range(16)]),
    }


def hf_dir(path, family: str, bpe_json: str) -> str:
    """A directory as downloaded: transformers' save_pretrained, then the tokenizer's files."""
    tok_dir = write_dir(path / "tok", bpe_json, family)
    tok = hf.load_tokenizer(tok_dir)
    config_cls, model_cls, kw = MODELS[family]
    config = getattr(transformers, config_cls)(**TINY, **kw, vocab_size=tok.vocab_size, eos_token_id=tok.eos_id,
                                               bos_token_id=tok.bos_id if tok.bos_id >= 0 else None,
                                               pad_token_id=tok.pad_id)
    torch.manual_seed(0)
    getattr(transformers, model_cls)(config).save_pretrained(str(path))
    write_dir(path, bpe_json, family)  # tokenizer files and the generation config's stop ids
    return str(path)


def tiny(config, *, steps=2):
    config.train.steps, config.train.batch_size, config.train.eval_every, config.train.log_every = steps, 8, 0, 1
    config.optim.warmup_steps = 0
    config.data.max_len, config.data.max_prompt_len = 128, 96
    return config


def logits_of_checkpoint(path, tokens):
    params, meta = checkpoint.load_params(path)
    return np.asarray(Transformer(ModelConfig(**meta["model"])).apply({"params": params}, tokens).logits)


def check_export(run_dir, out, source_dir, tokens):
    """The export of run_dir loads in transformers with the run's logits and the source's chat template."""
    e = export_config.get_config()
    e.checkpoint = run_dir
    assert stages.run(e, out) == out
    model = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    with torch.no_grad():
        theirs = model(torch.tensor(tokens, dtype=torch.long)).logits.numpy()
    np.testing.assert_allclose(theirs, logits_of_checkpoint(run_dir, tokens), atol=1e-4, rtol=0)
    exported, source = (transformers.AutoTokenizer.from_pretrained(d) for d in (out, source_dir))
    chat = conversation(3)
    assert exported.apply_chat_template(chat, tokenize=False) == source.apply_chat_template(chat, tokenize=False)
    assert model.generation_config.eos_token_id == transformers.GenerationConfig.from_pretrained(
        source_dir).eos_token_id
    assert json.load(open(os.path.join(out, "config.json")))["max_position_embeddings"] == 128


@pytest.mark.parametrize("family", FAMILIES)
def test_sft_on_a_conversational_file_trains_and_its_export_loads_in_transformers(family, bpe_json, tmp_path):
    source = hf_dir(tmp_path / "hf", family, bpe_json)
    files = data_files(tmp_path)
    c = tiny(sft_config.get_config("tiny"))
    c.init.hf_dir, c.data.train, c.optim.lr = source, files["sft"], 1e-2
    c.model.remat = "full"  # how the model runs is the stage's; what it computes, the directory's
    last = stages.run(c, str(tmp_path / "sft"))
    assert np.isfinite(last["loss"])
    # The run keeps the model's tokenizer (files, chat template, stop ids) for the next stages.
    assert sorted(os.listdir(tmp_path / "sft" / "tokenizer")) == sorted(os.listdir(tmp_path / "hf" / "tok"))
    params, meta = checkpoint.load_params(str(tmp_path / "sft"))
    assert meta["origin"] == {"hf_dir": source, "max_position_embeddings": 128} and meta["model"]["remat"] == "full"
    start, _ = hf.load_params(source)
    assert np.abs(np.asarray(params["layers"]["attn"]["q"]["kernel"]
                             - start["layers"]["attn"]["q"]["kernel"])).max() > 0
    tokens = np.random.default_rng(0).integers(0, meta["model"]["vocab_size"], (2, 12))
    check_export(str(tmp_path / "sft"), str(tmp_path / "export"), source, tokens)


def test_readme_recipe_sft_dpo_grpo_with_a_python_reward_then_export(bpe_json, tmp_path, monkeypatch):
    source = hf_dir(tmp_path / "hf", "qwen3", bpe_json)
    files = data_files(tmp_path)
    (tmp_path / "my_rewards.py").write_text(REWARD_MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    runs = {name: str(tmp_path / name) for name in ("sft", "dpo", "grpo", "export", "sample")}

    c = tiny(sft_config.get_config("tiny"))
    c.init.hf_dir, c.data.train = source, files["sft"]
    stages.run(c, runs["sft"])

    c = tiny(dpo_config.get_config("tiny"))
    c.init.checkpoint, c.data.train = runs["sft"], files["prefs"]
    assert np.isfinite(stages.run(c, runs["dpo"])["loss"])

    c = tiny(grpo_config.get_config("tiny"), steps=1)
    c.init.checkpoint, c.data.train = runs["dpo"], files["prompts"]
    c.reward.source, c.reward.function = "function", "my_rewards:concise"
    c.rl.max_new_tokens = 8
    last = stages.run(c, runs["grpo"])
    assert np.isfinite(last["loss"]) and last["objective/scores"] <= 0

    tokens = np.random.default_rng(1).integers(0, hf.load_tokenizer(source).vocab_size, (2, 10))
    check_export(runs["grpo"], runs["export"], source, tokens)

    # Sampling applies the chat template with the generation prompt and stops at the model's stop ids.
    s = sample_config.get_config("tiny")
    s.checkpoint, s.prompt, s.sampling.max_new_tokens = runs["grpo"], "What is 2 plus 2?", 4
    with open(stages.run(s, runs["sample"])) as f:
        record = json.loads(f.readline())
    tok = hf.load_tokenizer(source)
    assert record["prompt"] == tok.render_chat([{"role": "user", "content": "What is 2 plus 2?"}], True)
    assert record["finish_reason"] in ("eos", "length")


def test_a_lora_reward_model_exports_as_sequence_classification_with_its_scores(bpe_json, tmp_path):
    source = hf_dir(tmp_path / "hf", "gemma3", bpe_json)
    c = tiny(reward_config.get_config("tiny"), steps=3)
    c.init.hf_dir, c.data.train, c.lora.rank, c.optim.lr = source, data_files(tmp_path)["prefs"], 4, 1e-2
    stages.run(c, str(tmp_path / "rm"))
    e = export_config.get_config()
    e.checkpoint = str(tmp_path / "rm")
    stages.run(e, str(tmp_path / "export"))  # adapters merged into the Gemma 3 base, the head kept
    scorer = transformers.AutoModelForSequenceClassification.from_pretrained(str(tmp_path / "export")).eval()
    assert type(scorer).__name__ == "Gemma3TextForSequenceClassification"
    tokens = np.random.default_rng(2).integers(0, 600, (2, 12))  # no pad id: the last token is scored
    with torch.no_grad():
        theirs = scorer(torch.tensor(tokens, dtype=torch.long)).logits.numpy()[:, 0]
    params, meta = checkpoint.load_params(str(tmp_path / "rm"))
    ours = Transformer(ModelConfig(**meta["model"])).apply({"params": params}, tokens).values[:, -1]
    assert np.abs(np.asarray(ours)).max() > 0  # the head trained
    np.testing.assert_allclose(theirs, np.asarray(ours), atol=1e-4, rtol=1e-4)


def test_a_directory_without_a_tokenizer_is_an_error_naming_it(bpe_json, tmp_path):
    source = hf_dir(tmp_path / "hf", "llama3", bpe_json)
    os.remove(os.path.join(source, "tokenizer.json"))
    c = tiny(sft_config.get_config("tiny"))
    c.init.hf_dir, c.data.train = source, data_files(tmp_path)["sft"]
    with pytest.raises(FileNotFoundError, match=rf"{source}: no tokenizer \(looked for tokenizer.json and "
                                                r"tokenizer.model\)"):
        stages.run(c, str(tmp_path / "sft"))
