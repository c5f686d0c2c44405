"""Pieces every stage config shares: model size presets, mesh, optimiser, data.

A stage config calls `base_config(stage, arg)` and then sets what is its own.
`arg` is the text after the colon in `--config=configs/sft.py:tiny`: a comma
separated list of switches (`tiny`, `size=small`).
"""
import dataclasses

import ml_collections

# Named sizes; any field can still be overridden (--config.model.n_layers=6).
MODEL_PRESETS = {
    "tiny": dict(vocab_size=512, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=192),
    "small": dict(vocab_size=1024, d_model=128, n_layers=4, n_heads=4, n_kv_heads=2, d_ff=384),
    "bench": dict(vocab_size=8192, d_model=512, n_layers=8, n_heads=4, n_kv_heads=4, d_ff=1536),
    "llama3-8b": dict(vocab_size=128256, d_model=4096, n_layers=32, n_heads=32, n_kv_heads=8,
                      d_ff=14336, rope_theta=500000.0, tie_embeddings=False,
                      dtype="bfloat16", remat="full"),
}


def parse_arg(arg):
    """'tiny,size=small' -> {'tiny': True, 'size': 'small'}."""
    out = {}
    for part in (arg or "").split(","):
        if not part:
            continue
        key, _, value = part.partition("=")
        out[key] = value or True
    return out


def model_config(size: str) -> ml_collections.ConfigDict:
    """Every ModelConfig field, filled from a preset."""
    from ptx.model import ModelConfig

    if size not in MODEL_PRESETS:
        raise ValueError(f"unknown model size {size!r}; presets: {sorted(MODEL_PRESETS)}")
    fields = ModelConfig(**MODEL_PRESETS[size]).__dict__
    return ml_collections.ConfigDict(dict(fields))


def world_sizes() -> ml_collections.ConfigDict:
    """The embedded world's data set sizes (`n_*` fields of ptx.world.WorldConfig), its defaults."""
    from ptx.world import WorldConfig

    return ml_collections.ConfigDict({f.name: f.default for f in dataclasses.fields(WorldConfig)
                                      if f.name.startswith("n_")})


def section(cls, *, exclude=(), **overrides) -> ml_collections.ConfigDict:
    """Every field of the frozen dataclass `cls` (where each is declared, with its comment) at
    its default, then `overrides`; `exclude`: fields a stage fills in, not the user."""
    values = {f.name: f.default for f in dataclasses.fields(cls) if f.name not in exclude}
    unknown = set(overrides) - set(values)
    if unknown:
        raise ValueError(f"{cls.__name__} has no fields {sorted(unknown)}")
    return ml_collections.ConfigDict(values | overrides)


def base_config(stage: str, arg=None) -> ml_collections.ConfigDict:
    from ptx.data import DataConfig
    from ptx.distributed import DistributedConfig
    from ptx.lora import LoraConfig
    from ptx.optim import OptimConfig
    from ptx.sharding import MeshConfig
    from ptx.steps import TrainConfig

    args = parse_arg(arg)
    tiny = bool(args.get("tiny"))
    c = ml_collections.ConfigDict()
    c.stage = stage
    c.seed = 0  # parameter init, data order and sampling keys all derive from it
    c.model = model_config(args.get("size", "tiny" if tiny else "small"))

    c.tokenizer = ml_collections.ConfigDict()
    c.tokenizer.path = ""  # a sentencepiece .model or a Hugging Face tokenizer directory; '' = the init
    # source's, else train one on the train data
    # Render conversations with the tokenizer's chat template when it has one (a Hugging Face model's);
    # False, or a tokenizer without one: the prompt template below.
    c.tokenizer.use_chat_template = True
    c.tokenizer.user_prefix = "\n\nHuman: "  # prompt template (Anthropic HH format)
    c.tokenizer.assistant_prefix = "\n\nAssistant:"

    # The typed sections: every field declared (with its comment) in its ptx dataclass.
    c.data = section(DataConfig, **(dict(max_len=64, max_prompt_len=48) if tiny else {}))
    c.optim = section(OptimConfig, **(dict(lr=1e-3, warmup_steps=5) if tiny else {}))
    c.train = section(TrainConfig, **(dict(steps=20, batch_size=8, log_every=5, eval_every=10, eval_batches=2,
                                           ckpt_every=10) if tiny else {}))
    c.mesh = section(MeshConfig)
    # Several processes (one per host) as one device set; see ptx/distributed.py.
    c.distributed = section(DistributedConfig)

    c.world = ml_collections.ConfigDict()
    c.world.seed = 0  # the embedded world used when data.train is empty
    c.world.sizes = world_sizes()  # rows of each of its data sets

    c.lora = section(LoraConfig, exclude=("full",))  # rank 0 = full finetuning; see ptx/lora.py

    c.init = ml_collections.ConfigDict()
    c.init.checkpoint = ""  # a ptx workdir or checkpoint dir to start from
    c.init.hf_dir = ""  # a local Hugging Face model directory to start from
    return c
