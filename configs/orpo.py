"""ORPO (Hong et al. 2024): NLL of the chosen response plus λ times an odds-ratio term, on
preference pairs; no reference model, so no second copy of the weights.

python -m ptx.main --config=configs/orpo.py:tiny --workdir=runs/orpo --config.init.checkpoint=runs/sft
(ORPO is meant to start from a base model too: --config.init.checkpoint=runs/pt.)
"""
from configs import common


def get_config(arg=None):
    c = common.base_config("orpo", arg)
    c.data.kind = "preference"
    c.optim.lr = 1e-4 if "tiny" not in common.parse_arg(arg) else 5e-4
    c.orpo = common.ml_collections.ConfigDict()
    c.orpo.lam = 0.1  # λ: weight of the odds-ratio term against the NLL (TRL's ORPOConfig.beta)
    c.orpo.shared_prefix = False  # one row per pair, [prompt | chosen | rejected], as dpo.shared_prefix
    return c
