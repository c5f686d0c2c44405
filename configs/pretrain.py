"""Pre-training: the SFT step with loss on every token of a plain-text corpus.

python -m ptx.main --config=configs/pretrain.py:tiny --workdir=runs/pretrain
"""
from configs import common


def get_config(arg=None):
    c = common.base_config("sft", arg)
    c.data.kind = "text"
    c.data.pack = True  # documents are short: pack them, segment ids keep them apart
    c.data.loss_on_prompt = True
    return c
