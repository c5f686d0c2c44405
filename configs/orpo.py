"""ORPO (Hong et al. 2024): NLL of the chosen response plus λ times an odds-ratio term, on
preference pairs; no reference model, so no second copy of the weights.

python -m ptx.main --config=configs/orpo.py:tiny --workdir=runs/orpo --config.init.checkpoint=runs/sft
(ORPO is meant to start from a base model too: --config.init.checkpoint=runs/pt.)
"""
from configs import common
from ptx.losses import ORPOConfig


def get_config(arg=None):
    c = common.base_config("orpo", arg)
    c.data.kind = "preference"
    c.optim.lr = 1e-4 if "tiny" not in common.parse_arg(arg) else 5e-4
    c.orpo = common.section(ORPOConfig)
    return c


def quickstart(tiny: bool) -> dict:
    """Its quickstart row: steps, batch, lr and overrides (configs/quickstart.py)."""
    return dict(steps=150, batch=32, lr=5e-5, **{"optim.warmup_steps": 10, "data.max_len": 64})
