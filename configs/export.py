"""Export any checkpoint as a Hugging Face directory that transformers loads: weights, config.json
and the run's tokenizer (with the chat template and generation config of the model it started from).

python -m ptx.main --config=configs/export.py --workdir=runs/hf --config.checkpoint=runs/sft
"""
from configs import common


def get_config(arg=None):
    c = common.base_config("export", arg)
    c.checkpoint = ""  # a ptx workdir or checkpoint dir: any stage, full or LoRA (merged), a reward model
    c.dtype = ""  # tensor dtype: float32 | bfloat16 | float16; '' = the model's param_dtype
    c.max_position_embeddings = 0  # written to config.json; 0 = the Hugging Face model it started from, else 4096
    return c
