"""The stage layer: dispatch, typed configs validated before anything is written, one world
recipe, and the supervised loop's host transfers."""
import json
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
from ptx import metrics, rewards, rollout, stages, steps
from ptx.stages import common, supervised


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
    rl = common.rl_config(grpo_config.get_config("tiny"))
    assert isinstance(rl, rollout.RLConfig) and rl.critic_kind == "none" and rl.group_size == 4 and hash(rl)
    assert common.rl_config(ppo_config.get_config("tiny")).critic_kind == "reward"
    assert isinstance(common.dpo_config(dpo_config.get_config("tiny")), steps.DPOConfig)
    assert common.kto_config(kto_config.get_config("tiny")) == steps.KTOConfig()
    assert common.orpo_config(orpo_config.get_config("tiny")) == steps.ORPOConfig()
    assert common.online_config(online_dpo_config.get_config()).rollout_batch == 64
    assert common.rl_config(gspo_config.get_config("tiny")).ratio_level == "sequence"
    c = ppo_config.get_config("tiny")
    c.reward.source, c.reward.principles = "function", ["Be brief."]
    src = common.reward_source(c)
    assert isinstance(src, rewards.SourceConfig) and src.principles == ("Be brief.",)
    # A field the dataclass lacks (a typo in a config file) is an error, not ignored.
    c.rl.kl_coeff = 0.1
    with pytest.raises(TypeError, match="kl_coeff"):
        common.rl_config(c)


@pytest.mark.parametrize("overrides,match", [
    ({"soft_labels": True, "label_smoothing": 0.1}, "set one"),
    ({"loss_type": "ipo", "label_smoothing": 0.1}, "takes no label_smoothing"),
    ({"gamma": 0.5}, "SimPO margin"),
    ({"loss_type": "simpo", "precompute_ref": True}, "no reference to precompute"),
    ({"beta": 0.0}, "must be positive"),
    ({"loss_type": "kto"}, "dpo.loss_type='kto'"),
])
def test_bad_dpo_configs_are_errors(overrides, match):
    with pytest.raises(ValueError, match=match):
        steps.DPOConfig(**overrides)


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


def test_with_ckpt_every_0_metrics_reach_the_host_only_at_log_steps(tmp_path, monkeypatch):
    calls = []
    original = metrics.mean_metrics
    monkeypatch.setattr(metrics, "mean_metrics", lambda h: calls.append(len(h)) or original(h))
    c = sft_config.get_config("tiny")
    c.train.steps, c.train.log_every, c.train.ckpt_every, c.train.eval_every = 6, 3, 0, 0
    supervised.run(c, str(tmp_path))
    # One transfer of each 3-step window; before, one per step (ckpt_every 0 counted as 1).
    assert calls == [3, 3]
    with open(os.path.join(tmp_path, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    assert [r["step"] for r in rows] == [0, 3, 6] and "tokens_per_s" in rows[-1]


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
