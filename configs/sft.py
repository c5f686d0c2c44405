"""Supervised finetuning on (prompt, completion) pairs, loss on the response only.

python -m ptx.main --config=configs/sft.py:tiny --workdir=runs/sft
Without data.train it trains on the embedded world's demonstrations.
"""
from configs import common


def get_config(arg=None):
    c = common.base_config("sft", arg)
    return c
