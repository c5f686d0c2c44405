"""CPO (Xu et al. 2024): contrastive preference optimisation, reference-free: -log sigmoid(beta (log pi(y_w) -
log pi(y_l))) on summed log-probs, plus cpo.alpha times the NLL of the chosen responses.

python -m ptx.main --config=configs/cpo.py:tiny --workdir=runs/cpo --config.init.checkpoint=runs/sft
"""
from configs import common
from ptx.losses import CPOConfig


def get_config(arg=None):
    c = common.base_config("cpo", arg)
    c.data.kind = "preference"
    c.optim.lr = 1e-4 if "tiny" not in common.parse_arg(arg) else 5e-4
    c.cpo = common.section(CPOConfig)
    return c


def quickstart(tiny: bool) -> dict:
    """Its quickstart row: steps, batch, lr and overrides (configs/quickstart.py)."""
    return dict(steps=150, batch=32, lr=5e-5, **{"optim.warmup_steps": 10, "data.max_len": 64})
