"""Fold a LoRA run's adapters into its base: a full checkpoint that every stage's
init.checkpoint reads, and optionally a Hugging Face directory.

python -m ptx.main --config=configs/merge.py --workdir=runs/merged \
    --config.checkpoint=runs/lora_sft [--config.hf_out=runs/merged_hf]
"""
from configs import common


def get_config(arg=None):
    c = common.base_config("merge", arg)
    c.checkpoint = ""  # a workdir trained with lora.rank > 0 (any stage); its newest checkpoint is merged
    c.out = ""  # where the full checkpoint goes; '' = --workdir
    c.hf_out = ""  # a directory for the Hugging Face export of the merged model; '' = none
    c.hf_max_len = 4096  # max_position_embeddings written to the export's config.json
    return c
