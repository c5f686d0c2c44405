"""KTO (Ethayarajh et al. 2024): unpaired binary feedback, from an SFT checkpoint against its
frozen copy; the reference point z0 comes from mismatched prompt / completion pairs.

python -m ptx.main --config=configs/kto.py:tiny --workdir=runs/kto --config.init.checkpoint=runs/sft
Data: {prompt, completion, label: bool} rows (or TRL's conversational message lists), or a
preference file, each pair giving one desirable and one undesirable row; without data.train,
the world's comparisons.
"""
from configs import common
from ptx.losses import KTOConfig


def get_config(arg=None):
    c = common.base_config("kto", arg)
    c.data.kind = "unpaired"
    c.optim.lr = 1e-4 if "tiny" not in common.parse_arg(arg) else 5e-4
    c.kto = common.section(KTOConfig)
    return c


def quickstart(tiny: bool) -> dict:
    """Its quickstart row: steps, batch, lr and overrides (configs/quickstart.py)."""
    return dict(steps=150, batch=64, lr=5e-5, **{"optim.warmup_steps": 10, "data.max_len": 64, "kto.beta": 0.3})
