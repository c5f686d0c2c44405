"""The `merge` stage: a LoRA run's adapters folded into its base, written as a full
checkpoint that any stage's `init.checkpoint` reads and, with `hf_out`, as a
Hugging Face directory.

python -m ptx.main --config=configs/merge.py --workdir=runs/merged \
    --config.checkpoint=runs/lora_sft [--config.hf_out=runs/merged_hf]
"""
import os
import shutil

import jax

from ptx import checkpoint, hf, sharding
from ptx.model import ModelConfig
from ptx.stages import common
from ptx.tokenizer import load_tokenizer


def run(config, workdir: str) -> str:
    """The newest checkpoint of the LoRA workdir `config.checkpoint` -> a full checkpoint (params
    only, its step kept) in `config.out` ('' = workdir); returns the out dir."""
    common.require(config, "checkpoint")
    meta = checkpoint.read_meta(config.checkpoint)
    if not meta.get("lora"):
        raise ValueError(f"{config.checkpoint} holds full weights already (its meta names no LoRA base)")
    mesh = sharding.make_mesh(config.mesh)
    workdir = os.path.abspath(workdir)
    common.write_config(config, workdir)
    cfg = ModelConfig(**meta["model"])
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
    tok = load_tokenizer(tok_path) if os.path.isfile(tok_path) else None
    if tok is not None and jax.process_index() == 0:
        shutil.copyfile(tok_path, os.path.join(out, "tokenizer.model"))
    if config.hf_out:
        # Only a reward model exports its scalar head; a policy's value head stays behind.
        head = cfg.scalar_head and meta["stage"] == "reward"
        hf_params = params if head else {k: v for k, v in params.items() if k != "scalar_head"}
        hf.save_params(hf_params, cfg.replace(scalar_head=head), config.hf_out, tokenizer=tok,
                       max_position_embeddings=config.hf_max_len)
    return out
