"""validate.check: each rule names its dotted field before anything is read or written; every
shipped config passes; the quickstart's sub-stages are checked under their own names."""
import pytest

from configs import ai_feedback as ai_feedback_config
from configs import best_of_n as best_of_n_config
from configs import dapo as dapo_config
from configs import dpo as dpo_config
from configs import export as export_config
from configs import grpo as grpo_config
from configs import gspo as gspo_config
from configs import kto as kto_config
from configs import merge as merge_config
from configs import online_dpo as online_dpo_config
from configs import orpo as orpo_config
from configs import ppo as ppo_config
from configs import pretrain as pretrain_config
from configs import quickstart as quickstart_config
from configs import reward as reward_config
from configs import sample as sample_config
from configs import sft as sft_config
from ptx import methods, stages
from ptx.stages import validate

MODULES = {"sft": sft_config, "pretrain": pretrain_config, "reward": reward_config, "dpo": dpo_config,
           "ppo": ppo_config, "grpo": grpo_config, "sample": sample_config, "best_of_n": best_of_n_config,
           "ai_feedback": ai_feedback_config, "merge": merge_config, "export": export_config,
           "quickstart": quickstart_config, "kto": kto_config, "orpo": orpo_config, "gspo": gspo_config,
           "dapo": dapo_config, "online_dpo": online_dpo_config}
# What a stage needs to be runnable at all; the files and checkpoints need not exist for the
# rules tested below, which come before the paths are read.
REQUIRED = {"ppo": {"init.checkpoint": "x", "reward.checkpoint": "x"}, "grpo": {"init.checkpoint": "x",
                                                                               "reward.checkpoint": "x"},
            "sample": {"checkpoint": "x", "prompt": "hi"}, "best_of_n": {"checkpoint": "x", "reward.checkpoint": "x"},
            "ai_feedback": {"policy_checkpoint": "x", "judge_checkpoint": "x"}, "merge": {"checkpoint": "x"},
            "export": {"checkpoint": "x"}, "gspo": {"init.checkpoint": "x", "reward.checkpoint": "x"},
            "dapo": {"init.checkpoint": "x", "reward.checkpoint": "x"},
            "online_dpo": {"init.checkpoint": "x", "reward.checkpoint": "x"}}


def config(name, arg="tiny", **overrides):
    c = MODULES[name].get_config(arg)
    c.update_from_flattened_dict({**REQUIRED.get(name, {}), **overrides})
    return c


def field_of(c) -> str:
    with pytest.raises(validate.ConfigError) as e:
        validate.check(c)
    return e.value.field


def test_every_stage_has_rules():
    assert set(validate.FIELDS) | {m.name for m in methods.METHODS} == set(stages.RUNNERS)
    assert set(validate.REQUIRED) | set(validate.BATCHES) | set(validate.STAGE_SECTIONS) <= set(stages.RUNNERS)
    # A method's required fields, batches and sections are its row's: every stage has sections.
    assert all(validate.sections_of(stage) for stage in stages.RUNNERS)


@pytest.mark.parametrize("name", list(MODULES))
@pytest.mark.parametrize("arg", ["tiny", None])
def test_every_shipped_config_passes_once_its_paths_are_set(name, arg, monkeypatch):
    # The paths are the user's: here they only have to be named.
    monkeypatch.setattr(validate, "_paths", lambda c: None)
    validate.check(config(name, arg))


@pytest.mark.parametrize("name,overrides,field", [
    ("sft", {"train.log_every": 0}, "train.log_every"),
    ("sft", {"train.ckpt_every": -1}, "train.ckpt_every"),
    ("sft", {"train.eval_batches": 0}, "train.eval_batches"),
    ("sft", {"optim.lr": float("nan")}, "optim.lr"),
    ("sft", {"optim.b2": 1.0}, "optim.b2"),
    ("sft", {"optim.end_lr_ratio": 1.5}, "optim.end_lr_ratio"),
    ("sft", {"optim.schedule": "cosin"}, "optim.schedule"),
    ("sft", {"optim.warmup_steps": -1}, "optim.warmup_steps"),
    ("sft", {"data.on_bad_row": "drop"}, "data.on_bad_row"),
    ("sft", {"data.max_len": 0}, "data.max_len"),
    ("sft", {"model.n_heads": 0}, "model.n_heads"),
    ("sft", {"model.n_kv_heads": 3}, "model"),  # ModelConfig's own check: 4 heads over 3 KV heads
    ("sft", {"model.remat": "some"}, "model.remat"),
    ("sft", {"mesh.fsdp": 0}, "mesh.fsdp"),
    ("sft", {"train.eval_every": 7}, "train.eval_every"),
    ("sft", {"distributed.process_id": 1}, "distributed.process_id"),
    ("sft", {"lora.rank": -1, "init.checkpoint": "x"}, "lora.rank"),
    ("sft", {"init.checkpoint": "x", "init.hf_dir": "y"}, "init"),
    ("pretrain", {"data.kind": "prompt"}, "data.kind"),
    ("reward", {"reward.center_coef": -1.0}, "reward.center_coef"),
    ("dpo", {"dpo.loss_type": "kto"}, "dpo.loss_type"),
    ("dpo", {"dpo.soft_labels": True, "dpo.label_smoothing": 0.1}, "dpo.soft_labels"),
    ("ppo", {"rl.critic": "none"}, "rl.advantage"),
    ("ppo", {"rl.top_p": 0.0}, "rl"),  # RLConfig's message names the section only
    ("ppo", {"rl.max_new_tokens": 0}, "rl.max_new_tokens"),
    ("ppo", {"reward.checkpoint": "", "rl.critic": "reward"}, "reward.source"),
    ("ppo", {"reward.source": "function", "reward.checkpoint": "", "rl.critic": "reward"}, "rl.critic"),
    ("grpo", {"rl.rollout_batch": 3}, "rl.rollout_batch"),
    ("grpo", {"rl.group_size": 1, "rl.rollout_batch": 8}, "rl.advantage"),
    ("sample", {"prompt": ""}, "prompt"),
    ("sample", {"sampling.temperature": -0.5}, "sampling.temperature"),
    ("sample", {"sampling.min_p": 1.5}, "sampling.min_p"),
    ("sample", {"sampling.num_samples": 0}, "sampling.num_samples"),
    ("sample", {"sampling.engine": "vllm"}, "sampling.engine"),
    ("grpo", {"rl.engine": "vllm"}, "rl.engine"),
    ("online_dpo", {"online.engine": "vllm"}, "online.engine"),
    ("quickstart", {"eval.engine": "vllm"}, "eval.engine"),
    ("sample", {"sampling.engine": "paged"}, "sampling.engine"),  # on the 8 devices: one device for now
    ("grpo", {"rl.engine": "paged"}, "rl.engine"),
    ("quickstart", {"eval.engine": "paged"}, "eval.engine"),
    ("sample", {"batch_size": 4}, "batch_size"),
    ("best_of_n", {"ns": ()}, "ns"),
    ("best_of_n", {"ns": (1, 0)}, "ns"),
    ("ai_feedback", {"judge.threshold": 1.5}, "judge.threshold"),
    ("ai_feedback", {"judge.batch_size": 12}, "judge.batch_size"),
    ("merge", {"hf_max_len": 0}, "hf_max_len"),
    ("quickstart", {"eval.best_of_n": (2, -4)}, "eval.best_of_n"),
    ("quickstart", {"ppo.rl.kl_estimator": "k9"}, "ppo.rl.kl_estimator"),
    ("quickstart", {"judge.data.max_prompt_len": 200}, "judge.data.max_prompt_len"),
])
def test_each_rule_names_its_field(name, overrides, field):
    assert field_of(config(name, **overrides)) == field


def test_a_value_of_the_wrong_type_from_a_config_file_is_named():
    # Flags keep a field's type; a config file can set anything.
    for field, value in (("seed", 1.5), ("data.pack", "yes"), ("sampling.stop", "###"), ("train.steps", True)):
        c = config("sample" if field == "sampling.stop" else "sft")
        *section, leaf = field.split(".")
        holder = c[section[0]] if section else c
        with holder.ignore_type():
            holder[leaf] = value
        assert field_of(c) == field


def test_a_field_the_typed_section_lacks_is_named():
    c = config("grpo")
    c.rl.unlock()
    c.rl.kl_coeff = 0.1
    assert field_of(c) == "rl.kl_coeff"


@pytest.mark.stage
def test_paths_are_read_last_and_name_their_field(tmp_path, sft_dir):
    assert field_of(config("sample", checkpoint=str(tmp_path))) == "checkpoint"
    assert field_of(config("sample", checkpoint=sft_dir, prompts=str(tmp_path / "p.jsonl"), prompt="")) == "prompts"
    assert field_of(config("sft", **{"tokenizer.path": str(tmp_path / "t.model")})) == "tokenizer.path"
    # A hub data set name is not a local file; a name with a data file's extension is.
    validate.check(config("sft", **{"data.train": "Anthropic/hh-rlhf"}))
    assert field_of(config("sft", **{"data.eval": "eval.parquet"})) == "data.eval"
    # A reward model must have a scalar head, and merge needs a LoRA run.
    assert field_of(config("ppo", **{"init.checkpoint": sft_dir, "reward.checkpoint": sft_dir})) == "reward.checkpoint"
    assert field_of(config("merge", checkpoint=sft_dir)) == "checkpoint"
    validate.check(config("sample", checkpoint=sft_dir))


def test_a_wrong_type_inside_a_typed_section_is_named_from_its_dataclass():
    c = config("grpo")
    with c.rl.ignore_type():
        c.rl.rollout_batch = "16"
    assert field_of(c) == "rl.rollout_batch"
