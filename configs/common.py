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


def base_config(stage: str, arg=None) -> ml_collections.ConfigDict:
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

    c.data = ml_collections.ConfigDict()
    c.data.train = ""  # local json / jsonl / parquet / csv file, or a hub data set name
    c.data.eval = ""  # held-out file of the same kind; '' = no eval
    c.data.kind = "sft"  # sft | text | preference | prompt
    c.data.max_len = 64 if tiny else 128  # tokens per training row (after the shift)
    c.data.max_prompt_len = 48 if tiny else 96  # prompts keep their last tokens
    c.data.pack = False  # pack several documents into one row (segment ids keep them apart)
    c.data.loss_on_prompt = False  # SFT loss on response tokens only
    c.data.on_bad_row = "error"  # error | skip (skipped rows are counted in the log)

    c.optim = ml_collections.ConfigDict()
    c.optim.lr = 1e-3 if tiny else 3e-4  # peak learning rate
    c.optim.schedule = "cosine"  # cosine | linear | constant, after the warm-up
    c.optim.warmup_steps = 5 if tiny else 100
    c.optim.end_lr_ratio = 0.1  # final lr as a share of the peak
    c.optim.weight_decay = 0.0  # AdamW decay, on matrices only
    c.optim.b1 = 0.9
    c.optim.b2 = 0.95
    c.optim.eps = 1e-8
    c.optim.grad_clip = 1.0  # global-norm clip; 0 = off
    c.optim.accum_steps = 1  # micro-batches summed into one update

    c.train = ml_collections.ConfigDict()
    c.train.steps = 20 if tiny else 1000
    c.train.batch_size = 8 if tiny else 32  # global batch, split over the data axes
    c.train.log_every = 5 if tiny else 20
    c.train.eval_every = 10 if tiny else 200  # 0 = only at the end
    c.train.eval_batches = 2 if tiny else 10
    c.train.ckpt_every = 10 if tiny else 200
    c.train.keep_ckpts = 2

    c.mesh = ml_collections.ConfigDict()
    c.mesh.data = -1  # -1 = all devices not used by the other axes
    c.mesh.fsdp = 1
    c.mesh.tensor = 1

    # Several processes (one per host) as one device set; see ptx/distributed.py.
    c.distributed = ml_collections.ConfigDict()
    c.distributed.auto = False  # True: coordinator and ids from the environment (Cloud TPU VM, SLURM)
    c.distributed.coordinator = ""  # "host:port" of process 0, when not auto
    c.distributed.num_processes = 1  # 1 = single process, no jax.distributed
    c.distributed.process_id = 0  # this process, 0 .. num_processes - 1
    c.distributed.local_device_ids = ""  # e.g. "0,1": this process's devices; '' = all local ones

    c.world = ml_collections.ConfigDict()
    c.world.seed = 0  # the embedded world used when data.train is empty
    c.world.sizes = world_sizes()  # rows of each of its data sets

    c.lora = ml_collections.ConfigDict()
    c.lora.rank = 0  # 0 = full finetuning; > 0 = rank-r adapters on a frozen base (ptx/lora.py)
    c.lora.alpha = 16.0  # the adapter update is scaled by alpha / rank
    c.lora.dropout = 0.0  # must be 0: adapters are merged into the weights inside the step
    c.lora.targets = (r"layers/attn/(q|k|v|o)/kernel", r"layers/(gate|up|down)/kernel")  # kernel path regexes
    # The frozen base (and so the reference of DPO / PPO / GRPO, adapters off): 'bfloat16' halves
    # its memory and rounds each base weight once (relative error <= 2^-9); adapters, their
    # update and the merged kernels stay float32, and the merge folds them into the same
    # rounded base. A base already narrower is never widened.
    c.lora.base_dtype = "float32"  # float32 | bfloat16

    c.init = ml_collections.ConfigDict()
    c.init.checkpoint = ""  # a ptx workdir or checkpoint dir to start from
    c.init.hf_dir = ""  # a local Hugging Face model directory to start from
    return c
