"""Pure, mask-aware losses for every method: SFT, reward model, the preference family, PPO, GRPO.

Functions take arrays, never models, so each one is tested against a numpy
reference. Masks are explicit float arrays with 1 where a token counts.
String options (`loss_type`, `kind`, `aggregation`) are static Python values:
an unknown one raises ValueError at trace time. Arithmetic runs in at least
float32 whatever the input dtype (float64 inputs stay float64, for grad tests).

One namespace, four files: `tokens` (log-probs, entropy, masked reductions), `supervised`
(SFT, reward model, DPO family, ORPO, CPO), `unpaired` (KTO, BCO), each method's config section
beside its loss, and `rl` (KL, GAE, PPO / GSPO, groups, overlong).
"""
from ptx.losses.rl import *  # noqa: F403 (each file's __all__ is the namespace)
from ptx.losses.supervised import *  # noqa: F403
from ptx.losses.tokens import *  # noqa: F403
from ptx.losses.unpaired import *  # noqa: F403
