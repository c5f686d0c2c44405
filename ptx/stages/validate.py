"""One check of a resolved config, before a stage reads data or writes a file.

`check(config)` runs from `ptx.stages.run` for every stage (the quickstart's
sub-stages too) and raises a `ConfigError` naming the dotted field and what
it needs: types and ranges (the tables below, one per stage), the stage's
required fields, the typed sections' own checks (`ModelConfig`, `LoraConfig`,
`RLConfig`, `DPOConfig`, `SourceConfig` are built once here), cross-field
rules, batches against the data-parallel devices, and the paths a run reads
(checkpoints, files). `python -m ptx.main` prints it as one line and exits 2.
"""
import copy
import dataclasses
import math
import os
import re
from collections.abc import Callable

import ml_collections

from ptx import checkpoint, hf, lora, online, rewards, rollout, sharding, sources, steps
from ptx.model import ModelConfig
from ptx.stages import common


class ConfigError(ValueError):
    """A config field a user can fix: "<dotted field>: <problem>"."""

    def __init__(self, field: str, problem: str):
        super().__init__(f"{field}: {problem}")
        self.field, self.problem = field, problem


@dataclasses.dataclass(frozen=True)
class Need:
    """What one field's value must be: a test and its words ("a positive integer")."""

    test: Callable
    words: str


def _int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _num(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def one_of(*choices) -> Need:
    return Need(lambda v: v in choices, f"one of {choices}")


INT = Need(_int, "an integer")
POSITIVE = Need(lambda v: _int(v) and v > 0, "a positive integer")
COUNT = Need(lambda v: _int(v) and v >= 0, "an integer >= 0")
AXIS = Need(lambda v: _int(v) and (v > 0 or v == -1), "a positive integer, or -1 for the rest of the devices")
POSITIVE_NUMBER = Need(lambda v: _num(v) and v > 0, "a finite number > 0")
NON_NEGATIVE = Need(lambda v: _num(v) and v >= 0, "a finite number >= 0")
PROBABILITY = Need(lambda v: _num(v) and 0 <= v <= 1, "a probability in [0, 1]")
TOP_P = Need(lambda v: _num(v) and 0 < v <= 1, "a number in (0, 1]")
DECAY = Need(lambda v: _num(v) and 0 <= v < 1, "a number in [0, 1)")
BOOL = Need(lambda v: isinstance(v, bool), "True or False")
TEXT = Need(lambda v: isinstance(v, str), "a string")
STOPS = Need(lambda v: isinstance(v, (tuple, list)) and all(isinstance(s, str) and s for s in v),
             "a tuple of non-empty strings, e.g. \"('\\n\\nHuman:', '###')\" or () for none")
NS = Need(lambda v: isinstance(v, (tuple, list)) and len(v) > 0 and all(_int(n) and n > 0 for n in v),
          "a non-empty tuple of positive integers, e.g. '(1, 4, 16)'")

# Fields every stage config has (configs/common.py). The typed sections (model, lora, rl,
# dpo, reward) check the rest of themselves when they are built.
COMMON = {
    "seed": INT, "world.seed": INT,
    "model.vocab_size": POSITIVE, "model.d_model": POSITIVE, "model.n_layers": POSITIVE,
    "model.n_heads": POSITIVE, "model.n_kv_heads": POSITIVE, "model.d_ff": POSITIVE, "model.head_dim": COUNT,
    "model.scan_unroll": POSITIVE, "model.rope_theta": POSITIVE_NUMBER, "model.norm_eps": POSITIVE_NUMBER,
    "tokenizer.path": TEXT, "tokenizer.user_prefix": TEXT, "tokenizer.assistant_prefix": TEXT,
    "data.train": TEXT, "data.eval": TEXT, "data.kind": one_of(*common.WORLD_FILES),
    "data.max_len": POSITIVE, "data.max_prompt_len": POSITIVE, "data.pack": BOOL, "data.loss_on_prompt": BOOL,
    "data.on_bad_row": one_of("error", "skip"),
    "mesh.data": AXIS, "mesh.fsdp": AXIS, "mesh.tensor": AXIS,
    "distributed.auto": BOOL, "distributed.num_processes": POSITIVE, "distributed.process_id": COUNT,
    "init.checkpoint": TEXT, "init.hf_dir": TEXT,
}
TRAIN = {
    "optim.lr": POSITIVE_NUMBER, "optim.schedule": one_of("cosine", "linear", "constant"),
    "optim.warmup_steps": COUNT, "optim.end_lr_ratio": PROBABILITY, "optim.weight_decay": NON_NEGATIVE,
    "optim.b1": DECAY, "optim.b2": DECAY, "optim.eps": POSITIVE_NUMBER, "optim.grad_clip": NON_NEGATIVE,
    "train.steps": POSITIVE, "train.log_every": POSITIVE, "train.ckpt_every": COUNT, "train.keep_ckpts": POSITIVE,
}
SUPERVISED = TRAIN | {"train.batch_size": POSITIVE, "train.eval_every": COUNT, "train.eval_batches": POSITIVE,
                      "optim.accum_steps": POSITIVE}
SAMPLING = {
    "batch_size": POSITIVE, "sampling.temperature": NON_NEGATIVE, "sampling.top_k": COUNT,
    "sampling.top_p": TOP_P, "sampling.min_p": PROBABILITY, "sampling.max_new_tokens": POSITIVE,
    "sampling.stop": STOPS, "sampling.keep_stop": BOOL,
}
FIELDS = {
    "sft": COMMON | SUPERVISED,
    "reward": COMMON | SUPERVISED | {"reward.center_coef": NON_NEGATIVE, "reward.shared_prefix": BOOL},
    "dpo": COMMON | SUPERVISED,
    "kto": COMMON | SUPERVISED,
    "orpo": COMMON | SUPERVISED,
    "ppo": COMMON | TRAIN,
    "grpo": COMMON | TRAIN,
    "gspo": COMMON | TRAIN,
    "dapo": COMMON | TRAIN,
    "online_dpo": COMMON | TRAIN,
    "sample": COMMON | SAMPLING | {"sampling.num_samples": POSITIVE, "checkpoint": TEXT, "prompt": TEXT,
                                   "prompts": TEXT, "output": TEXT},
    "best_of_n": COMMON | SAMPLING | {"checkpoint": TEXT, "prompts": TEXT, "ns": NS},
    "ai_feedback": COMMON | SAMPLING | {"policy_checkpoint": TEXT, "judge_checkpoint": TEXT, "num_prompts": COUNT,
                                       "pairs_per_prompt": POSITIVE, "judge.batch_size": POSITIVE,
                                       "judge.threshold": PROBABILITY},
    "merge": COMMON | {"checkpoint": TEXT, "out": TEXT, "hf_out": TEXT, "hf_max_len": POSITIVE},
    "export": COMMON | {"checkpoint": TEXT, "dtype": one_of("", "float32", "bfloat16", "float16"),
                        "max_position_embeddings": COUNT},
    "quickstart": COMMON | {"eval.batch_size": POSITIVE, "eval.max_new_tokens": POSITIVE,
                            "eval.temperature": NON_NEGATIVE, "eval.best_of_n": NS, "eval.seed": INT},
}
# The typed sections each stage builds, with their own checks.
TRAINED = ("model", "lora")
RL = TRAINED + ("rl", "reward")
SECTIONS = {"sft": TRAINED, "reward": TRAINED, "dpo": TRAINED + ("dpo",), "kto": TRAINED + ("kto",),
            "orpo": TRAINED + ("orpo",), "ppo": RL, "grpo": RL, "gspo": RL, "dapo": RL,
            "online_dpo": TRAINED + ("dpo", "online", "reward"), "best_of_n": ("reward",)}
BUILDERS = {"model": lambda c: ModelConfig(**dict(c.model)), "lora": common.lora_config,
            "rl": common.rl_config, "dpo": common.dpo_config, "kto": common.kto_config, "orpo": common.orpo_config,
            "online": common.online_config, "reward": common.reward_source}
CLASSES = {"model": ModelConfig, "lora": lora.LoraConfig, "rl": rollout.RLConfig, "dpo": steps.DPOConfig,
           "kto": steps.KTOConfig, "orpo": steps.ORPOConfig, "online": online.OnlineConfig,
           "reward": rewards.SourceConfig}
# A dataclass field's type -> what its value must be.
TYPED = {int: INT, float: Need(lambda v: _num(v) or (isinstance(v, float) and not math.isfinite(v)), "a number"),
         bool: BOOL, str: TEXT, tuple: Need(lambda v: isinstance(v, (tuple, list)), "a tuple")}
# Fields of which a stage needs one set ('a|b': either), in order.
REQUIRED = {"sample": ("checkpoint", "prompt|prompts"), "best_of_n": ("checkpoint",),
            "ai_feedback": ("policy_checkpoint", "judge_checkpoint"), "merge": ("checkpoint",),
            "export": ("checkpoint",), "ppo": ("init.checkpoint|init.hf_dir",), "grpo": ("init.checkpoint|init.hf_dir",)}
# What each supervised stage trains on.
KINDS = {"sft": ("sft", "text"), "reward": ("preference",), "dpo": ("preference",),
         "kto": ("unpaired", "preference"), "orpo": ("preference",)}
# Batches split over the data-parallel devices: a field, or fields whose product is the batch.
BATCHES = {"sft": ("train.batch_size",), "reward": ("train.batch_size",), "dpo": ("train.batch_size",),
           "kto": ("train.batch_size",), "orpo": ("train.batch_size",),
           **{s: ("rl.rollout_batch*rl.group_size", "rl.minibatch_size") for s in ("ppo", "grpo", "gspo", "dapo")},
           "online_dpo": ("online.rollout_batch*online.group_size", "online.minibatch_size"),
           "sample": ("batch_size",), "best_of_n": ("batch_size",),
           "ai_feedback": ("batch_size", "judge.batch_size"), "quickstart": ("eval.batch_size",)}
# Paths a run reads: ptx checkpoints (a workdir, its checkpoints dir or a step dir) and files.
CHECKPOINTS = ("init.checkpoint", "checkpoint", "policy_checkpoint", "judge_checkpoint", "reward.checkpoint",
               "rl.critic_checkpoint")
FILES = ("tokenizer.path", "prompts", "data.train", "data.eval")
# The paths a caller may set later (see `check`), and what stands for them until then.
FILLABLE = CHECKPOINTS + ("data.train", "data.eval")
FILLED = "<set by the quickstart>"


def check(config, *, filled: bool = False):
    """ConfigError for the first problem of `config` (its stage's rules); None when it is fine.

    filled: the caller sets the stage's paths later (the quickstart does for its sub-stages):
    an empty checkpoint or data field counts as set, and no path is read.
    """
    stage = config.get("stage")
    if stage not in FIELDS:
        raise ConfigError("stage", f"unknown stage {stage!r}; stages: {sorted(FIELDS)}")
    if filled:
        config = copy.deepcopy(config)
        for field in FILLABLE:
            if _has(config, field) and not _get(config, field):
                *path, leaf = field.split(".")
                (_get(config, ".".join(path)) if path else config)[leaf] = FILLED
    _required(config)
    for field, need in FIELDS[stage].items():
        value = _get(config, field)
        if not need.test(value):
            raise ConfigError(field, f"needs {need.words}, got {value!r}")
    for section in SECTIONS.get(stage, ()):
        _build(config, section)
    _cross_field(config)
    _batches(config)
    _paths(config)
    if stage == "quickstart":
        for name, sub in config.items():
            if isinstance(sub, ml_collections.ConfigDict) and "stage" in sub:
                try:
                    check(sub, filled=True)
                except ConfigError as e:
                    raise ConfigError(f"{name}.{e.field}", e.problem) from None


def _get(config, field: str):
    value = config
    for i, part in enumerate(field.split(".")):
        if not isinstance(value, ml_collections.ConfigDict) or part not in value:
            raise ConfigError(".".join(field.split(".")[:i + 1]), f"missing from the {config.stage!r} config")
        value = value[part]
    return value


def _required(config):
    for need in REQUIRED.get(config.stage, ()):
        options = need.split("|")
        if not any(_get(config, f) for f in options):
            what = " or ".join(f"--config.{f}" for f in options)
            raise ConfigError(options[0], f"stage {config.stage!r} needs {what}")


def _build(config, section: str):
    """The typed section's own checks, as a ConfigError naming the field where its message does,
    after the types its dataclass declares."""
    for f in dataclasses.fields(CLASSES[section]):
        need = TYPED.get(f.type)
        if need is not None and f.name in config[section] and not need.test(config[section][f.name]):
            raise ConfigError(f"{section}.{f.name}", f"needs {need.words}, got {config[section][f.name]!r}")
    try:
        BUILDERS[section](config)
    except TypeError as e:  # a field the dataclass lacks, or a value of the wrong type
        name = re.search(r"unexpected keyword argument '(\w+)'", str(e))
        raise (ConfigError(f"{section}.{name[1]}", "no such field") if name else ConfigError(section, str(e))) from None
    except (ValueError, NotImplementedError) as e:
        raise from_message(section, str(e)) from None


def from_message(section: str, message: str) -> ConfigError:
    """'rl.top_k=-1 must be ...' -> ConfigError('rl.top_k', '-1 must be ...'); a message that names no
    dotted field is the section's."""
    named = re.match(r"([a-z_]+(?:\.[a-z0-9_]+)+)(=?)(.*)", message, re.S)
    if named is None:
        return ConfigError(section, message)
    return ConfigError(named[1], named[3].strip() if named[2] else message)


def _cross_field(config):
    stage = config.stage
    if config.init.checkpoint and config.init.hf_dir:
        raise ConfigError("init", "set init.checkpoint or init.hf_dir, not both")
    if SECTIONS.get(stage, ()) and config.lora.rank > 0 and not (config.init.checkpoint or config.init.hf_dir):
        raise ConfigError("lora.rank", "LoRA trains adapters on a base: set init.checkpoint or init.hf_dir")
    if stage in KINDS:
        d, t = config.data, config.train
        if d.kind not in KINDS[stage]:
            raise ConfigError("data.kind", f"stage {stage!r} trains on {' or '.join(KINDS[stage])} data, "
                                           f"not {d.kind!r}")
        if d.kind != "text" and d.max_prompt_len >= d.max_len:
            raise ConfigError("data.max_prompt_len", f"{d.max_prompt_len} leaves no room for the response in "
                                                     f"data.max_len={d.max_len}; needs < data.max_len")
        if t.batch_size % config.optim.accum_steps:
            raise ConfigError("optim.accum_steps", f"{config.optim.accum_steps} does not divide "
                                                   f"train.batch_size={t.batch_size}")
        if t.eval_every % t.log_every:
            raise ConfigError("train.eval_every", f"{t.eval_every} is not a multiple of train.log_every="
                                                  f"{t.log_every}; evaluation runs at logged steps")
    if stage == "online_dpo" and (config.dpo.precompute_ref or config.dpo.soft_labels):
        field = "dpo.precompute_ref" if config.dpo.precompute_ref else "dpo.soft_labels"
        raise ConfigError(field, "online DPO labels fresh samples with its reward source: there is no data set "
                                 "to precompute over or to read soft labels from")
    if stage == "online_dpo" and config.dpo.shared_prefix:
        raise ConfigError("dpo.shared_prefix", "online DPO scores sampled pairs in rollout rows; shared-prefix "
                                               "rows are built from a preference data set (stage dpo)")
    if stage == "online_dpo" and config.lora.rank:
        raise ConfigError("lora.rank", "online DPO trains full weights; lora.rank must be 0")
    if stage in ("ppo", "grpo", "gspo", "dapo") and common.rl_config(config).critic_kind == "reward" and not (
            config.rl.critic_checkpoint or config.reward.checkpoint):
        raise ConfigError("rl.critic", "'reward' starts the critic from a reward model: set reward.checkpoint "
                                       "or rl.critic_checkpoint")
    dist = config.distributed
    if dist.process_id >= dist.num_processes:
        raise ConfigError("distributed.process_id", f"{dist.process_id} is not below "
                                                    f"distributed.num_processes={dist.num_processes}")


def _batches(config):
    try:
        mesh = sharding.make_mesh(config.mesh)
    except ValueError as e:
        raise ConfigError("mesh", str(e).removeprefix("mesh ")) from None
    n = sharding.data_parallel_size(mesh)
    for fields in BATCHES.get(config.stage, ()):
        size = math.prod(_get(config, f) for f in fields.split("*"))
        if size % n:
            name = fields.replace("*", " x ")
            raise ConfigError(fields.split("*")[0], f"{name} = {size} must be a multiple of the {n} data-parallel "
                                                    f"devices of the mesh (mesh.data x mesh.fsdp)")


def _paths(config):
    for field in CHECKPOINTS:
        path = _get(config, field) if _has(config, field) else ""
        if path and path != FILLED:
            try:
                checkpoint.resolve(path)
            except FileNotFoundError:
                raise ConfigError(field, f"no ptx checkpoint under {path}") from None
    for field in FILES:
        path = _get(config, field) if _has(config, field) else ""
        # data.* may name a hub data set: only a name with a data file's extension must exist.
        local = not field.startswith("data.") or os.path.splitext(path)[1] in sources.FORMATS
        if path and path != FILLED and local and not os.path.isfile(path):
            raise ConfigError(field, f"{path}: no such file")
    hf_dir = config.init.hf_dir
    if hf_dir and not os.path.isfile(os.path.join(hf_dir, hf.CONFIG)):
        raise ConfigError("init.hf_dir", f"{hf_dir}: no {hf.CONFIG}; expected a Hugging Face model directory")
    if config.stage == "merge" and not checkpoint.read_meta(config.checkpoint).get("lora"):
        raise ConfigError("checkpoint", f"{config.checkpoint} holds full weights already (its meta names no "
                                        "LoRA base); merge folds the adapters of a run with lora.rank > 0")
    if _has(config, "reward.source") and config.reward.source == "model" and config.reward.checkpoint != FILLED:
        meta = checkpoint.read_meta(config.reward.checkpoint)
        if not meta["model"].get("scalar_head"):
            raise ConfigError("reward.checkpoint", f"{config.reward.checkpoint} is a {meta['stage']!r} checkpoint "
                                                   "without a scalar head; reward.source='model' needs a reward-"
                                                   "stage workdir")


def _has(config, field: str) -> bool:
    try:
        _get(config, field)
        return True
    except ConfigError:
        return False
