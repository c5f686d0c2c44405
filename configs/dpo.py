"""Direct preference optimisation from an SFT checkpoint against its frozen copy.

python -m ptx.main --config=configs/dpo.py:tiny --workdir=runs/dpo --config.init.checkpoint=runs/sft
"""
from configs import common
from ptx.losses import DPOConfig


def get_config(arg=None):
    c = common.base_config("dpo", arg)
    c.data.kind = "preference"
    c.optim.lr = 1e-4 if "tiny" not in common.parse_arg(arg) else 5e-4
    c.dpo = common.section(DPOConfig)
    return c
