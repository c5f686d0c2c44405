"""What the stages share: the boundary where a ConfigDict becomes library arguments.

Only `ptx/stages` reads a ConfigDict. The library gets frozen dataclasses (`ModelConfig`,
`OptimConfig`, `TrainConfig`, `DataConfig`, `MeshConfig`, `SamplingConfig`, `LoraConfig`
and each method's sections, `ptx.methods`) or keyword arguments, built here from their
config sections and validated on construction, before a stage writes anything.
"""
import dataclasses
import json
import os
from typing import Any

import jax
from absl import logging

from ptx import checkpoint, data, hf, lora, methods, optim, sharding, steps, world
from ptx.model import ModelConfig, abstract_params
from ptx.tokenizer import HFTokenizer, PromptTemplate, Tokenizer, load_tokenizer, train_tokenizer

# ModelConfig fields of how a model runs, not what it computes: a Hugging Face source takes them
# from the stage's `model` section.
RUNTIME_FIELDS = ("dtype", "remat", "scan_unroll", "layer_loop_max", "attention", "attention_block_q",
                  "attention_block_k")
# Which embedded-world file a stage reads when `data.train` is empty: (train, eval).
WORLD_FILES = {"text": ("pretrain", ""), "sft": ("sft", ""),
               "preference": ("preference", "preference_heldout"), "prompt": ("sft", "heldout"),
               "unpaired": ("preference", "preference_heldout")}


def typed(config, name: str, cls):
    """config.<name> as its frozen dataclass `cls` (whose checks run on construction)."""
    return cls(**config[name].to_dict())


@dataclasses.dataclass(frozen=True)
class Training:
    """A training stage's typed sections, built (and so checked) once."""

    method: methods.Method
    sections: dict  # the method's own sections by name (`Method.sections`)
    own: Any  # the method's own section config (its first), or None
    optim: optim.OptimConfig
    train: steps.TrainConfig
    data: data.DataConfig
    mesh: sharding.MeshConfig
    lora: lora.LoraConfig


def training(config) -> Training:
    """The typed sections of a training stage (`config.stage` a row of `ptx.methods`)."""
    method = methods.get(config.stage)
    sections = method.section_configs(lambda name: config[name].to_dict())
    return Training(method=method, sections=sections, own=method.own_config(sections),
                    optim=typed(config, "optim", optim.OptimConfig), train=typed(config, "train", steps.TrainConfig),
                    data=typed(config, "data", data.DataConfig), mesh=typed(config, "mesh", sharding.MeshConfig),
                    lora=lora_config(config, targets=method.lora_targets))


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


def report_skipped(workdir: str, *stats: dict):
    """Rows `data.load_rows` skipped (data.on_bad_row=skip), from the `stats` of each file read:
    the first reasons as a warning, every one in `<workdir>/skipped_rows.jsonl` (file, row,
    line, field, problem; process 0)."""
    records = [r for s in stats for r in s.get("skipped_rows", [])]
    path = os.path.join(workdir, "skipped_rows.jsonl")
    if jax.process_index():
        return
    if not records:
        if os.path.exists(path):  # an earlier attempt's, on data fixed since
            os.remove(path)
        return
    data.write_skipped(path, records)
    reasons = [reason for s in stats for reason in s.get("skipped_reasons", [])][:3]
    logging.warning("skipped %d bad rows (data.on_bad_row=skip), all listed in %s; first: %s",
                    len(records), path, "; ".join(reasons))


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
    """The texts of template rows (`data.load_rows` with chat=False), to train a tokenizer on."""
    return [t for r in rows for t in (r.get("text"), r.get("prompt"), r.get("completion"), r.get("chosen"),
                                      r.get("rejected"), *(t for turn in r.get("turns", ()) for t in turn)) if t]


@dataclasses.dataclass(frozen=True)
class InitSource:
    """Where a stage's weights start: a ptx checkpoint or a Hugging Face directory, read once."""

    kind: str  # checkpoint | hf
    path: str
    cfg: ModelConfig
    # The Hugging Face directory the weights came from, first or through earlier stages:
    # {"hf_dir", "max_position_embeddings"} ({} for none), kept in every checkpoint's meta.
    origin: dict = dataclasses.field(default_factory=dict)

    def load(self, mesh) -> dict:
        """The source's parameters, read straight onto `mesh`."""
        if self.kind == "checkpoint":
            return checkpoint.load_params(self.path, mesh)[0]
        return hf.load_params(self.path, self.cfg,
                              sharding.param_shardings(abstract_params(self.cfg), self.cfg, mesh))[0]

    def tokenizer_path(self) -> str:
        """A checkpoint's workdir tokenizer (`checkpoint.tokenizer_path`), or the Hugging Face directory."""
        return checkpoint.tokenizer_path(self.path) if self.kind == "checkpoint" else self.path

    def as_lora_base(self) -> dict:
        """How a LoRA checkpoint names its frozen base, so the next stage can merge it."""
        path = os.path.abspath(self.path)
        return {"checkpoint": path if self.kind == "checkpoint" else "", "hf_dir": path if self.kind == "hf" else ""}


def init_source(config) -> InitSource | None:
    """`init.checkpoint` or `init.hf_dir` (validate.check allows one) with its architecture, or None
    for a fresh model."""
    if config.init.checkpoint:
        meta = checkpoint.read_meta(config.init.checkpoint)
        return InitSource("checkpoint", config.init.checkpoint, ModelConfig(**meta["model"]), meta.get("origin", {}))
    if config.init.hf_dir:
        hf_config = hf.read_config(config.init.hf_dir)
        cfg = hf.config_from_hf(hf_config, where=os.path.join(config.init.hf_dir, hf.CONFIG))
        # How to run it (compute dtype, remat, attention) is this stage's: config.json has no say.
        cfg = cfg.replace(**{k: config.model[k] for k in RUNTIME_FIELDS})
        origin = {"hf_dir": os.path.abspath(config.init.hf_dir),
                  "max_position_embeddings": hf_config.get("max_position_embeddings") or 0}
        return InitSource("hf", config.init.hf_dir, cfg, origin)
    return None


def find_tokenizer(config, workdir: str, source: InitSource | None) -> Tokenizer | HFTokenizer | None:
    """`tokenizer.path` (a sentencepiece .model or a Hugging Face directory), else the init source's,
    else this workdir's (resume), or None when there is none yet. It is recorded in the workdir for
    later stages and export: `tokenizer.model`, or `tokenizer/` with a Hugging Face tokenizer's files
    (chat template and generation_config.json included)."""
    own_model, own_dir = os.path.join(workdir, "tokenizer.model"), os.path.join(workdir, "tokenizer")
    path = config.tokenizer.path or (source.tokenizer_path() if source is not None else "")
    if not path:
        path = own_dir if os.path.isdir(own_dir) else own_model if os.path.exists(own_model) else ""
    if not path:
        return None
    tok = load_tokenizer(path)
    if jax.process_index() == 0:
        tok.save(own_dir if isinstance(tok, HFTokenizer) else workdir)
    return tok


def train_workdir_tokenizer(config, workdir: str, rows) -> Tokenizer:
    """A sentencepiece tokenizer trained on template rows, as `<workdir>/tokenizer.model`."""
    return train_tokenizer(texts_of(rows), vocab_size=config.model.vocab_size,
                           path=os.path.join(workdir, "tokenizer.model"), template=template(config))


def load_prompts(config, workdir: str, source: InitSource | None):
    """The prompt rows of an RL-style stage (`data.train`, else the world's), its tokenizer and
    the encoded prompts: (rows, tokenizer, {'prompt_tokens', 'prompt_lens'}). Skipped rows are
    reported into the workdir."""
    prompt_path, _ = data_paths(config, workdir)
    tok = find_tokenizer(config, workdir, source)
    rows, stats = data.load_rows(prompt_path, "prompt", on_bad_row=config.data.on_bad_row,
                                 template=template(config), chat=use_chat(config, tok))
    report_skipped(workdir, stats)
    tok = tok or train_workdir_tokenizer(config, workdir, rows)
    arrays, _ = data.encode_prompts(rows, tok, max_prompt_len=config.data.max_prompt_len)
    return rows, tok, arrays


def use_chat(config, tok):
    """Whether rows go through the tokenizer's chat template (it has one and
    `tokenizer.use_chat_template`), else the configured prompt template: the tokenizer
    (truthy; `data.load_rows` checks each row against its template) or False."""
    if isinstance(tok, HFTokenizer) and config.tokenizer.use_chat_template and not tok.has_chat_template:
        logging.warning("%s has no chat template: rows are formatted with the prompt template (tokenizer.user_prefix "
                        "%r / tokenizer.assistant_prefix %r)", tok.path, config.tokenizer.user_prefix,
                        config.tokenizer.assistant_prefix)
    return tok if tok is not None and config.tokenizer.use_chat_template and tok.has_chat_template else False


def lora_config(config, *, targets=(), full=()) -> lora.LoraConfig:
    """The `lora` section; a stage adds the heads it trains: `targets` (adapted, e.g. a reward
    model's fresh head) and `full` (trained in full beside the adapters, e.g. a value head)."""
    c = config.lora
    return lora.LoraConfig(rank=int(c.rank), alpha=float(c.alpha), dropout=float(c.dropout),
                           targets=tuple(c.targets) + tuple(targets), full=tuple(full),
                           base_dtype=str(c.base_dtype))
