"""BCO (Jung et al. 2024): binary classifier optimisation on unpaired feedback, from an SFT checkpoint
against its frozen copy: -log sigmoid(+-(beta log(pi / pi_ref) - delta)), delta the running mean reward.

python -m ptx.main --config=configs/bco.py:tiny --workdir=runs/bco --config.init.checkpoint=runs/sft
Data: {prompt, completion, label: bool} rows (or TRL's conversational message lists), or a preference
file, each pair giving one desirable and one undesirable row, as KTO reads them.
"""
from configs import common
from ptx.losses import BCOConfig


def get_config(arg=None):
    c = common.base_config("bco", arg)
    c.data.kind = "unpaired"
    c.optim.lr = 1e-4 if "tiny" not in common.parse_arg(arg) else 5e-4
    c.bco = common.section(BCOConfig)
    return c


def quickstart(tiny: bool) -> dict:
    """Its quickstart row: steps, batch, lr and overrides (configs/quickstart.py), as KTO's."""
    return dict(steps=150, batch=64, lr=5e-5, **{"optim.warmup_steps": 10, "data.max_len": 64, "bco.beta": 0.3})
