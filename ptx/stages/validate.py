"""One check of a resolved config, before a stage reads data or writes a file.

`check(config)` runs from `ptx.stages.run` for every stage (the quickstart's
sub-stages too) and raises a `ConfigError` naming the dotted field and what
it needs: the types of the fields outside typed sections (the tables below),
the stage's required fields, the typed sections' own types and checks (each
section's frozen dataclass, built once here; a training method's from its
`ptx.methods` row), cross-field rules (the method's own `check` among them),
batches against the data-parallel devices, and the paths a run reads
(checkpoints, files). `python -m ptx.main` prints it as one line and exits 2.
"""
import copy
import dataclasses
import math
import os
import re

import ml_collections

from ptx import (
    checkpoint,
    data,
    distributed,
    engine,
    fields,
    hf,
    lora,
    methods,
    optim,
    rewards,
    sampler,
    sharding,
    sources,
    steps,
)
from ptx.model import ModelConfig
from ptx.stages import common


class ConfigError(ValueError):
    """A config field a user can fix: "<dotted field>: <problem>"."""

    def __init__(self, field: str, problem: str):
        super().__init__(f"{field}: {problem}")
        self.field, self.problem = field, problem


Need, one_of = fields.Need, fields.one_of
INT, POSITIVE, COUNT, BOOL, TEXT = fields.INT, fields.POSITIVE, fields.COUNT, fields.BOOL, fields.TEXT
NON_NEGATIVE, PROBABILITY = fields.NON_NEGATIVE, fields.PROBABILITY
NS = Need(lambda v: isinstance(v, (tuple, list)) and len(v) > 0 and all(fields.is_int(n) and n > 0 for n in v),
          "a non-empty tuple of positive integers, e.g. '(1, 4, 16)'")

# Fields every stage config has (configs/common.py) outside its typed sections (below), which
# check themselves when they are built.
COMMON = {
    "seed": INT, "world.seed": INT,
    "tokenizer.path": TEXT, "tokenizer.user_prefix": TEXT, "tokenizer.assistant_prefix": TEXT,
    "tokenizer.use_chat_template": BOOL, "init.checkpoint": TEXT, "init.hf_dir": TEXT,
}
# The stages that train nothing: their own fields (the training methods' are their sections, `ptx.methods`).
FIELDS = {
    "sample": {"sampling.num_samples": POSITIVE, "checkpoint": TEXT, "prompt": TEXT, "prompts": TEXT, "output": TEXT,
               "batch_size": POSITIVE},
    "best_of_n": {"checkpoint": TEXT, "prompts": TEXT, "ns": NS, "batch_size": POSITIVE},
    "ai_feedback": {"policy_checkpoint": TEXT, "judge_checkpoint": TEXT, "num_prompts": COUNT,
                    "pairs_per_prompt": POSITIVE, "batch_size": POSITIVE, "judge.batch_size": POSITIVE,
                    "judge.threshold": PROBABILITY},
    "merge": {"checkpoint": TEXT, "out": TEXT, "hf_out": TEXT, "hf_max_len": POSITIVE},
    "export": {"checkpoint": TEXT, "dtype": one_of("", "float32", "bfloat16", "float16"),
               "max_position_embeddings": COUNT},
    "quickstart": {"eval.batch_size": POSITIVE, "eval.max_new_tokens": POSITIVE, "eval.temperature": NON_NEGATIVE,
                   "eval.best_of_n": NS, "eval.seed": INT, "eval.engine": one_of(*sampler.ENGINES)},
}
# Every config's typed sections, and those of the stages that sample or train.
SECTIONS = {"data": data.DataConfig, "mesh": sharding.MeshConfig, "distributed": distributed.DistributedConfig}
SAMPLING = {"sampling": sampler.SamplingConfig}
TRAINED = {"model": ModelConfig, "optim": optim.OptimConfig, "train": steps.TrainConfig, "lora": lora.LoraConfig}
STAGE_SECTIONS = {"sample": SAMPLING, "best_of_n": SAMPLING | {"reward": rewards.SourceConfig},
                  "ai_feedback": SAMPLING}
# A dataclass field's type -> what its value must be.
TYPED = {int: INT, float: Need(lambda v: fields.is_number(v) or (isinstance(v, float) and not math.isfinite(v)),
                               "a number"),
         bool: BOOL, str: TEXT, tuple: Need(lambda v: isinstance(v, (tuple, list)), "a tuple")}
# Fields of which a stage needs one set ('a|b': either), in order; a method's from its row.
REQUIRED = {"sample": ("checkpoint", "prompt|prompts"), "best_of_n": ("checkpoint",),
            "ai_feedback": ("policy_checkpoint", "judge_checkpoint"), "merge": ("checkpoint",),
            "export": ("checkpoint",)}
INIT = "init.checkpoint|init.hf_dir"
# Batches split over the data-parallel devices: a field, or fields whose product is the batch;
# a method's from its row.
BATCHES = {"sample": ("batch_size",), "best_of_n": ("batch_size",), "ai_feedback": ("batch_size", "judge.batch_size"),
           "quickstart": ("eval.batch_size",)}
# Paths a run reads: ptx checkpoints (a workdir, its checkpoints dir or a step dir) and files.
CHECKPOINTS = ("init.checkpoint", "checkpoint", "policy_checkpoint", "judge_checkpoint", "reward.checkpoint",
               "rl.critic_checkpoint")
FILES = ("tokenizer.path", "prompts", "data.train", "data.eval")
# The decoder switches (`sampler.ENGINES`): paged needs a mesh of one device (`engine.check_mesh`).
ENGINES = ("sampling.engine", "rl.engine", "online.engine", "eval.engine")
# The paths a caller may set later (see `check`), and what stands for them until then.
FILLABLE = CHECKPOINTS + ("data.train", "data.eval")
FILLED = "<set by the quickstart>"


def sections_of(stage: str) -> dict:
    """The typed sections a stage's config holds: {section: frozen dataclass}."""
    method = methods.get(stage)
    if method is None:
        return SECTIONS | STAGE_SECTIONS.get(stage, {})
    return SECTIONS | TRAINED | dict(method.sections)


def check(config, *, filled: bool = False):
    """ConfigError for the first problem of `config` (its stage's rules); None when it is fine.

    filled: the caller sets the stage's paths later (the quickstart does for its sub-stages):
    an empty checkpoint or data field counts as set, and no path is read.
    """
    stage = config.get("stage")
    if stage not in FIELDS and methods.get(stage) is None:
        known = sorted(FIELDS) + [m.name for m in methods.METHODS]
        raise ConfigError("stage", f"unknown stage {stage!r}; stages: {sorted(known)}")
    if filled:
        config = copy.deepcopy(config)
        for field in FILLABLE:
            if _has(config, field) and not _get(config, field):
                *path, leaf = field.split(".")
                (_get(config, ".".join(path)) if path else config)[leaf] = FILLED
    _required(config)
    for field, need in (COMMON | FIELDS.get(stage, {})).items():
        value = _get(config, field)
        if not need.test(value):
            raise ConfigError(field, f"needs {need.words}, got {value!r}")
    built = {section: _build(config, section, cls) for section, cls in sections_of(stage).items()}
    _cross_field(config, built)
    _batches(config, built.get("mesh"))
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
    method = methods.get(config.stage)
    for need in REQUIRED.get(config.stage, (INIT,) if method is not None and method.needs_init else ()):
        options = need.split("|")
        if not any(_get(config, f) for f in options):
            what = " or ".join(f"--config.{f}" for f in options)
            raise ConfigError(options[0], f"stage {config.stage!r} needs {what}")


def _build(config, section: str, cls):
    """The typed section built from its config section: a ConfigError naming the field where the
    dataclass's message does, after the types it declares."""
    if section not in config:
        raise ConfigError(section, f"missing from the {config.stage!r} config")
    values = config[section].to_dict()
    for f in dataclasses.fields(cls):
        need = TYPED.get(f.type)
        if need is not None and f.name in values and not need.test(values[f.name]):
            raise ConfigError(f"{section}.{f.name}", f"needs {need.words}, got {values[f.name]!r}")
    try:
        if section == "lora":
            return common.lora_config(config)
        return cls(**values)
    except TypeError as e:  # a field the dataclass lacks, or a value of the wrong type
        name = re.search(r"unexpected keyword argument '(\w+)'", str(e))
        raise (ConfigError(f"{section}.{name[1]}", "no such field") if name else ConfigError(section, str(e))) from None
    except (ValueError, NotImplementedError) as e:
        raise from_message(section, str(e)) from None


def from_message(section: str, message: str) -> ConfigError:
    """'rl.top_k=-1 must be ...' -> ConfigError('rl.top_k', '-1 must be ...'); a message that names no
    dotted field is the section's."""
    named = re.match(r"([a-z_]+(?:\.[a-z0-9_]+)+)(=|: )?(.*)", message, re.S)
    if named is None:
        return ConfigError(section, message)
    return ConfigError(named[1], named[3].strip() if named[2] else message)


def _cross_field(config, built: dict):
    method = methods.get(config.stage)
    if config.init.checkpoint and config.init.hf_dir:
        raise ConfigError("init", "set init.checkpoint or init.hf_dir, not both")
    if method is None:
        return
    if built["lora"].enabled and not (config.init.checkpoint or config.init.hf_dir):
        raise ConfigError("lora.rank", "LoRA trains adapters on a base: set init.checkpoint or init.hf_dir")
    d, t = built["data"], built["train"]
    if d.kind not in method.data_kinds:
        raise ConfigError("data.kind", f"stage {method.name!r} trains on {' or '.join(method.data_kinds)} data, "
                                       f"not {d.kind!r}")
    if method.loop == "supervised":
        if d.kind != "text" and d.max_prompt_len >= d.max_len:
            raise ConfigError("data.max_prompt_len", f"{d.max_prompt_len} leaves no room for the response in "
                                                     f"data.max_len={d.max_len}; needs < data.max_len")
        if t.batch_size % built["optim"].accum_steps:
            raise ConfigError("optim.accum_steps", f"{built['optim'].accum_steps} does not divide "
                                                   f"train.batch_size={t.batch_size}")
    if method.check is not None:
        try:
            method.check({name: built[name] for name, _ in method.sections}, built["lora"].rank)
        except ValueError as e:
            raise from_message(config.stage, str(e)) from None


def _batches(config, mesh_cfg: sharding.MeshConfig):
    try:
        mesh = sharding.make_mesh(mesh_cfg)
    except ValueError as e:
        raise ConfigError("mesh", str(e).removeprefix("mesh ")) from None
    n = sharding.data_parallel_size(mesh)
    method = methods.get(config.stage)
    for product in BATCHES.get(config.stage, method.batches if method is not None else ()):
        size = math.prod(_get(config, f) for f in product.split("*"))
        if size % n:
            name = product.replace("*", " x ")
            raise ConfigError(product.split("*")[0], f"{name} = {size} must be a multiple of the {n} data-parallel "
                                                    f"devices of the mesh (mesh.data x mesh.fsdp)")
    for field in ENGINES:
        if _has(config, field):
            try:
                engine.check_mesh(_get(config, field), mesh, field)
            except ValueError as e:
                raise from_message(field, str(e)) from None


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
