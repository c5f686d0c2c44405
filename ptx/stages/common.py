"""What the stages share: the boundary where a ConfigDict becomes library arguments.

Only `ptx/stages` reads a ConfigDict. The library gets frozen dataclasses
(`ModelConfig`, `LoraConfig`, `RLConfig`, `DPOConfig`, `KTOConfig`, `ORPOConfig`, `SourceConfig`) or
keyword arguments, built here from their config sections and validated on
construction, before a stage writes anything.
"""
import dataclasses
import json
import os
import shutil

import jax

from ptx import checkpoint, hf, lora, online, rewards, rollout, sharding, steps, world
from ptx.model import ModelConfig, abstract_params
from ptx.tokenizer import PromptTemplate, Tokenizer, load_tokenizer, train_tokenizer

# Which embedded-world file a stage reads when `data.train` is empty: (train, eval).
WORLD_FILES = {"text": ("pretrain", ""), "sft": ("sft", ""),
               "preference": ("preference", "preference_heldout"), "prompt": ("sft", "heldout"),
               "unpaired": ("preference", "preference_heldout")}


def require(config, *fields: str):
    """ValueError naming the first of the stage's required (dotted) fields left empty."""
    for field in fields:
        value = config
        for part in field.split("."):
            value = value[part]
        if not value:
            raise ValueError(f"stage {config.stage!r} needs --config.{field}")


def write_config(config, workdir: str):
    """The resolved config as `<workdir>/config.json` (process 0)."""
    if jax.process_index() == 0:
        os.makedirs(workdir, exist_ok=True)
        with open(os.path.join(workdir, "config.json"), "w") as f:
            f.write(config.to_json_best_effort(indent=2))


def write_jsonl(path: str, rows: list[dict]):
    """One JSON object a line, UTF-8 kept readable (process 0)."""
    if jax.process_index() == 0:
        with open(path, "w", encoding="utf-8") as f:
            f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)


def template(config) -> PromptTemplate:
    return PromptTemplate(config.tokenizer.user_prefix, config.tokenizer.assistant_prefix)


def make_world(config) -> world.World:
    """The embedded world of `config.world`: its seed and data set sizes, the one recipe."""
    return world.World(world.WorldConfig(seed=config.world.seed, **dict(config.world.sizes)))


def data_paths(config, workdir: str) -> tuple[str, str]:
    """(train file, eval file or ''): `data.train` / `data.eval`, else the world's files,
    generated into `<workdir>/world`."""
    if config.data.train:
        return config.data.train, config.data.eval
    train_name, eval_name = WORLD_FILES[config.data.kind]
    files = make_world(config).write(os.path.join(workdir, "world"))
    return files[train_name], config.data.eval or (files[eval_name] if eval_name else "")


def texts_of(rows) -> list[str]:
    return [t for r in rows for t in (r.get("text"), r.get("prompt"), r.get("completion"),
                                      r.get("chosen"), r.get("rejected")) if t]


@dataclasses.dataclass(frozen=True)
class InitSource:
    """Where a stage's weights start: a ptx checkpoint or a Hugging Face directory, read once."""

    kind: str  # checkpoint | hf
    path: str
    cfg: ModelConfig

    def load(self, mesh) -> dict:
        """The source's parameters, read straight onto `mesh`."""
        if self.kind == "checkpoint":
            return checkpoint.load_params(self.path, mesh)[0]
        return hf.load_params(self.path, self.cfg,
                              sharding.param_shardings(abstract_params(self.cfg), self.cfg, mesh))[0]

    def tokenizer_path(self) -> str:
        return checkpoint.tokenizer_path(self.path) if self.kind == "checkpoint" else ""

    def as_lora_base(self) -> dict:
        """How a LoRA checkpoint names its frozen base, so the next stage can merge it."""
        path = os.path.abspath(self.path)
        return {"checkpoint": path if self.kind == "checkpoint" else "", "hf_dir": path if self.kind == "hf" else ""}


def init_source(config) -> InitSource | None:
    """`init.checkpoint` or `init.hf_dir` with its architecture, or None for a fresh model."""
    if config.init.checkpoint and config.init.hf_dir:
        raise ValueError("set init.checkpoint or init.hf_dir, not both")
    if config.init.checkpoint:
        meta = checkpoint.read_meta(config.init.checkpoint)
        return InitSource("checkpoint", config.init.checkpoint, ModelConfig(**meta["model"]))
    if config.init.hf_dir:
        with open(os.path.join(config.init.hf_dir, hf.CONFIG)) as f:
            return InitSource("hf", config.init.hf_dir, hf.config_from_hf(json.load(f)))
    return None


def setup_tokenizer(config, workdir: str, rows, source: InitSource | None) -> Tokenizer:
    """`tokenizer.path`, else the init source's, else this workdir's (resume), else one trained on `rows`."""
    own = os.path.join(workdir, "tokenizer.model")
    path = config.tokenizer.path
    if not path and source is not None and source.kind == "hf":
        return hf.load_tokenizer(source.path)
    if not path and source is not None:
        path = source.tokenizer_path()
    if not path and os.path.exists(own):
        path = own
    if path:
        if jax.process_index() == 0 and os.path.abspath(path) != os.path.abspath(own):
            shutil.copyfile(path, own)
        return load_tokenizer(path)
    return train_tokenizer(texts_of(rows), vocab_size=config.model.vocab_size, path=own,
                           template=template(config))


def lora_config(config, *, targets=(), full=()) -> lora.LoraConfig:
    """The `lora` section; a stage adds the heads it trains: `targets` (adapted, e.g. a reward
    model's fresh head) and `full` (trained in full beside the adapters, e.g. a value head)."""
    c = config.lora
    return lora.LoraConfig(rank=int(c.rank), alpha=float(c.alpha), dropout=float(c.dropout),
                           targets=tuple(c.targets) + tuple(targets), full=tuple(full),
                           base_dtype=str(c.base_dtype))


def rl_config(config) -> rollout.RLConfig:
    return rollout.RLConfig(**config.rl.to_dict())


def dpo_config(config) -> steps.DPOConfig:
    return steps.DPOConfig(**config.dpo.to_dict())


def online_config(config) -> online.OnlineConfig:
    return online.OnlineConfig(**config.online.to_dict())


def kto_config(config) -> steps.KTOConfig:
    return steps.KTOConfig(**config.kto.to_dict())


def orpo_config(config) -> steps.ORPOConfig:
    return steps.ORPOConfig(**config.orpo.to_dict())


def reward_source(config) -> rewards.SourceConfig:
    return rewards.SourceConfig(**config.reward.to_dict())
