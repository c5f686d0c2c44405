"""Direct preference optimisation from an SFT checkpoint against its frozen copy.

python -m ptx.main --config=configs/dpo.py:tiny --workdir=runs/dpo --config.init.checkpoint=runs/sft
"""
from configs import common


def get_config(arg=None):
    c = common.base_config("dpo", arg)
    c.data.kind = "preference"
    c.optim.lr = 1e-4 if "tiny" not in common.parse_arg(arg) else 5e-4
    c.dpo = common.ml_collections.ConfigDict()
    c.dpo.beta = 0.1  # strength of the implicit KL to the reference
    c.dpo.loss_type = "sigmoid"  # sigmoid | ipo | hinge | simpo
    c.dpo.label_smoothing = 0.0  # conservative DPO: assumed share of flipped labels
    c.dpo.reference_free = False  # drop the reference terms (simpo is always reference-free)
    c.dpo.gamma = 0.0  # SimPO target margin
    c.dpo.soft_labels = False  # use the data's prob_chosen (AI-judge labels) as soft targets
    c.dpo.precompute_ref = False  # reference log-probs once over the data; steps run the policy only
    # One row per pair, [prompt | chosen | rejected]: the prompt's keys and values computed once, each
    # response masked to see the prompt and itself; the same losses and gradients as two rows.
    c.dpo.shared_prefix = False
    return c
