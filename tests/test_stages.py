"""The stage layer: dispatch, typed configs validated before anything is written, one world
recipe."""
import os

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
from configs import quickstart as quickstart_config
from configs import sample as sample_config
from configs import sft as sft_config
from ptx import losses, rewards, rl_training, stages
from ptx.stages import common


def test_every_config_dispatches_to_a_runner():
    for module in (sft_config, dpo_config, ppo_config, grpo_config, sample_config, best_of_n_config,
                   ai_feedback_config, merge_config, export_config, quickstart_config, kto_config, orpo_config,
                   online_dpo_config, gspo_config, dapo_config):
        assert module.get_config("tiny").stage in stages.RUNNERS
    c = sft_config.get_config("tiny")
    c.stage = "sfft"
    with pytest.raises(ValueError, match="unknown stage 'sfft'"):
        stages.run(c, "unused")


@pytest.mark.parametrize("module,field,what", [
    (merge_config, "", "--config.checkpoint"),
    (export_config, "", "--config.checkpoint"),
    (ai_feedback_config, "", "--config.policy_checkpoint"),
    (ai_feedback_config, "policy_checkpoint", "--config.judge_checkpoint"),
    (sample_config, "", "--config.checkpoint"),
    (sample_config, "checkpoint", "--config.prompt or --config.prompts"),
    (best_of_n_config, "", "--config.checkpoint"),
])
def test_a_missing_required_field_is_named_before_the_workdir_is_written(tmp_path, module, field, what):
    c = module.get_config("tiny")
    if field:
        c[field] = str(tmp_path / "somewhere")
    with pytest.raises(ValueError, match=what.replace("-", r"\-")):
        stages.run(c, str(tmp_path / "run"))
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("overrides,match", [
    ({"rl.advantage": "gae", "rl.critic": "none"}, "needs a critic"),
    ({"rl.rollout_batch": 3, "rl.minibatch_size": 8}, "not a multiple of rl.minibatch_size"),
    ({"rl.advantage": "grpo", "rl.group_size": 1}, "group_size=1 must be at least 2"),
    ({"rl.kl_estimator": "k4"}, "rl.kl_estimator: 'k4'"),
    ({"rl.top_p": 0.0}, "top_p=0.0"),
    ({"reward.source": "model", "reward.checkpoint": ""}, "needs reward.checkpoint"),
    ({"reward.source": "oracle"}, "reward.source: 'oracle'"),
    ({"rl.ratio_level": "group"}, "rl.ratio_level: 'group'"),
    ({"rl.dynamic_sampling": True}, "needs rl.group_size >= 2"),
    ({"rl.overlong_buffer": 100}, "rl.overlong_buffer: 100"),
])
def test_bad_rl_configs_are_errors_before_the_workdir_is_written(tmp_path, overrides, match):
    c = ppo_config.get_config("tiny")
    c.init.checkpoint = str(tmp_path / "sft")  # never read: the config fails first
    c.reward.checkpoint = str(tmp_path / "rm")
    c.update_from_flattened_dict(overrides)
    with pytest.raises(ValueError, match=match):
        stages.run(c, str(tmp_path / "run"))
    assert not (tmp_path / "run").exists()


def test_typed_configs_take_every_field_of_their_section():
    def training(module, arg="tiny"):
        c = module.get_config(arg)
        if "reward" in c and "source" in c.reward:
            c.reward.source = "function"  # a reward model's source needs its checkpoint
        return common.training(c)

    rl = training(grpo_config).sections["rl"]
    assert isinstance(rl, rl_training.RLConfig) and rl.critic_kind == "none" and rl.group_size == 4 and hash(rl)
    assert training(ppo_config).own.critic_kind == "reward"
    assert isinstance(training(dpo_config).own, losses.DPOConfig)
    assert training(kto_config).own == losses.KTOConfig()
    assert training(orpo_config).own == losses.ORPOConfig()
    assert training(online_dpo_config, None).sections["online"].rollout_batch == 64
    assert training(gspo_config).own.ratio_level == "sequence"
    c = ppo_config.get_config("tiny")
    c.reward.source, c.reward.principles = "function", ["Be brief."]
    src = common.training(c).sections["reward"]
    assert isinstance(src, rewards.SourceConfig) and src.principles == ("Be brief.",)
    # A field the dataclass lacks (a typo in a config file) is an error, not ignored.
    c.rl.kl_coeff = 0.1
    with pytest.raises(TypeError, match="kl_coeff"):
        rl_training.RLConfig(**c.rl)


def test_every_stage_reads_the_world_of_its_config_section(tmp_path):
    # One recipe: the world's sizes come from config.world (the quickstart hands its own to
    # every stage), not from WorldConfig's defaults.
    c = ai_feedback_config.get_config("tiny")
    c.world.sizes.n_sft = 37
    train, _ = common.data_paths(c, str(tmp_path))
    with open(train) as f:
        assert sum(1 for _ in f) == 37
    q = quickstart_config.get_config("tiny")
    assert common.make_world(q).config.n_sft == q.world.sizes.n_sft == 300


def test_a_model_without_a_chat_template_falls_back_to_the_prompt_template_with_one_warning(dirs, tmp_path,
                                                                                           monkeypatch):
    import shutil

    from ptx import hf

    plain = tmp_path / "no_template"
    shutil.copytree(dirs["qwen3"], plain)
    os.remove(plain / "chat_template.jinja")  # Qwen3's template lives in that file alone
    warned = []
    monkeypatch.setattr(common.logging, "warning", lambda msg, *args: warned.append(msg % args))
    c = sft_config.get_config("tiny")
    assert common.use_chat(c, hf.load_tokenizer(str(plain))) is False
    assert warned == [f"{plain} has no chat template: rows are formatted with the prompt template "
                      f"(tokenizer.user_prefix {c.tokenizer.user_prefix!r} / tokenizer.assistant_prefix "
                      f"{c.tokenizer.assistant_prefix!r})"]
    with_template = hf.load_tokenizer(dirs["qwen3"])
    assert common.use_chat(c, with_template) is with_template and len(warned) == 1
