"""KTO (Ethayarajh et al. 2024): unpaired binary feedback, from an SFT checkpoint against its
frozen copy; the reference point z0 comes from mismatched prompt / completion pairs.

python -m ptx.main --config=configs/kto.py:tiny --workdir=runs/kto --config.init.checkpoint=runs/sft
Data: {prompt, completion, label: bool} rows (or TRL's conversational message lists), or a
preference file, each pair giving one desirable and one undesirable row; without data.train,
the world's comparisons.
"""
from configs import common


def get_config(arg=None):
    c = common.base_config("kto", arg)
    c.data.kind = "unpaired"
    c.optim.lr = 1e-4 if "tiny" not in common.parse_arg(arg) else 5e-4
    c.kto = common.ml_collections.ConfigDict()
    c.kto.beta = 0.1  # strength of the implicit KL to the reference
    c.kto.desirable_weight = 1.0  # λ_D: weight of desirable rows (raise it when they are rarer)
    c.kto.undesirable_weight = 1.0  # λ_U: weight of undesirable rows
    return c
