"""Export: any checkpoint as a Hugging Face directory (`export`), and a LoRA run's adapters folded
into its base as a full ptx checkpoint (`merge`).

python -m ptx.main --config=configs/export.py --workdir=runs/hf --config.checkpoint=runs/sft
python -m ptx.main --config=configs/merge.py --workdir=runs/merged \
    --config.checkpoint=runs/lora_sft [--config.hf_out=runs/merged_hf]

The Hugging Face directory is what transformers loads with AutoModelForCausalLM
(a reward model: AutoModelForSequenceClassification) and AutoTokenizer: weights,
config.json, and the tokenizer of the run (for a model started from a Hugging Face
directory: its tokenizer files, chat template and generation_config.json).
"""
import os

import jax
from absl import logging

from ptx import checkpoint, hf, sharding
from ptx.model import ModelConfig
from ptx.sources import DataError
from ptx.stages import common
from ptx.tokenizer import load_tokenizer

DEFAULT_MAX_POSITIONS = 4096


def export_tokenizer(source: str, meta: dict):
    """The tokenizer an export writes (with its chat template and generation_config.json): the
    run's copy (`checkpoint.tokenizer_path`), else the Hugging Face directory the weights came
    from (the checkpoint meta's `origin`), with a warning; DataError naming both when neither is
    there, since a model without its tokenizer is no export."""
    own = checkpoint.tokenizer_path(source)
    if os.path.exists(own):
        return load_tokenizer(own)
    origin = meta.get("origin", {}).get("hf_dir", "")
    if origin and os.path.isdir(origin):
        try:
            tok = load_tokenizer(origin)
        except FileNotFoundError:
            tok = None
        if tok is not None:
            logging.warning("%s is missing: exporting the tokenizer, chat template and generation config of %s "
                            "(the source model, the checkpoint meta's origin)", own, origin)
            return tok
    why = (f"the source model directory {origin} (the checkpoint meta's origin) is gone or has none" if origin
           else "the checkpoint meta names no source model directory (origin)")
    workdir = os.path.dirname(checkpoint.resolve(source)[0])
    raise DataError(f"{source}: no tokenizer to export: the run's copy ({os.path.join(workdir, 'tokenizer')}/ or "
                    f"tokenizer.model) is missing and {why}; restore one of them")


def write_hf(params, meta: dict, source: str, out: str, *, dtype: str | None = None, max_positions: int = 0):
    """Writes params (of the checkpoint `source`, whose meta is `meta`) as a Hugging Face directory.

    Only a reward model exports its scalar head (as ...ForSequenceClassification); a policy's value
    head stays behind. The tokenizer is the run's, else its source model's (`export_tokenizer`).
    max_positions: config.json's max_position_embeddings; 0 = the Hugging Face model the run
    started from, else 4096.
    """
    cfg = ModelConfig(**meta["model"])
    head = cfg.scalar_head and meta["stage"] == "reward"
    params = params if head else {k: v for k, v in params.items() if k != "scalar_head"}
    tok = export_tokenizer(source, meta)
    max_positions = max_positions or meta.get("origin", {}).get("max_position_embeddings") or DEFAULT_MAX_POSITIONS
    hf.save_params(params, cfg.replace(scalar_head=head), out, dtype=dtype, tokenizer=tok,
                   max_position_embeddings=max_positions)


def export(config, workdir: str) -> str:
    """The newest checkpoint of `config.checkpoint` (full, LoRA merged into its base, an RL policy, a
    reward model) -> a Hugging Face directory at `workdir`; returns its path. The stage's own config
    is not written there: config.json is the model's."""
    if config.dtype and config.dtype not in hf.DTYPE_NAMES:
        raise ValueError(f"export dtype={config.dtype!r}; expected one of {hf.DTYPE_NAMES} or ''")
    meta = checkpoint.read_meta(config.checkpoint)  # fails before anything is written
    export_tokenizer(config.checkpoint, meta)  # so does a missing tokenizer, before the weights are read
    mesh = sharding.make_mesh(common.typed(config, "mesh", sharding.MeshConfig))
    params, _ = checkpoint.load_params(config.checkpoint, mesh)
    out = os.path.abspath(workdir)
    write_hf(params, meta, config.checkpoint, out, dtype=config.dtype or None,
             max_positions=config.max_position_embeddings)
    return out


def merge(config, workdir: str) -> str:
    """The newest checkpoint of the LoRA workdir `config.checkpoint` -> a full checkpoint (params
    only, its step kept) in `config.out` ('' = workdir); returns the out dir."""
    meta = checkpoint.read_meta(config.checkpoint)
    if not meta.get("lora"):
        raise ValueError(f"{config.checkpoint} holds full weights already (its meta names no LoRA base)")
    mesh = sharding.make_mesh(common.typed(config, "mesh", sharding.MeshConfig))
    workdir = os.path.abspath(workdir)
    common.write_config(config, workdir)
    params, _ = checkpoint.load_params(config.checkpoint, mesh)
    _, step = checkpoint.resolve(config.checkpoint)
    out = os.path.abspath(config.out or workdir)
    # The merged tree is the policy itself: no 'params_key', no base to find.
    full_meta = {k: v for k, v in meta.items() if k not in ("lora", "params_key")}
    full_meta["merged_from"] = {"checkpoint": os.path.abspath(config.checkpoint), "step": step, "lora": meta["lora"]}
    ckpt = checkpoint.Checkpointer(out, every=0, keep=1)
    try:
        # Checkpointer.save skips a step that exists: out must not be the LoRA workdir or an earlier merge.
        if not ckpt.save(step, {"params": params}, full_meta, force=True):
            raise FileExistsError(f"merge: {checkpoint.checkpoint_dir(out)} already holds step {step}")
    finally:
        ckpt.close()
    tok_path = checkpoint.tokenizer_path(config.checkpoint)
    if os.path.exists(tok_path) and jax.process_index() == 0:
        tok = load_tokenizer(tok_path)
        tok.save(os.path.join(out, "tokenizer") if os.path.isdir(tok_path) else out)
    if config.hf_out:
        write_hf(params, meta, config.checkpoint, config.hf_out, max_positions=config.hf_max_len)
    return out
