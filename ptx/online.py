"""Online (iterative) DPO's pairs: groups of completions sampled from the current policy,
scored by a reward source, the best and the worst of each group as a DPO pair batch built
from the sampled token ids (never by re-encoding decoded text).

Rows arrive in the rollout layout of `rollout.build_sequences`: `[left-aligned prompt (P) |
completion (N)]`. Shifted by one token they are DPO's sequence batch: inputs = tokens[:-1],
targets = tokens[1:], loss on the N completion targets.
"""
import dataclasses

import numpy as np

from ptx import fields, sampler


@dataclasses.dataclass(frozen=True)
class OnlineConfig:
    """The `online` config section of the online DPO stage."""

    rollout_batch: int = 64  # prompts sampled per iteration
    group_size: int = 2  # completions per prompt; the best and the worst form its pair
    max_new_tokens: int = 48
    temperature: float = 1.0  # sampling settings
    top_k: int = 0
    top_p: float = 1.0
    # rollout decoder: static | paged (ptx/engine.py: one device of one process for now, so static by default)
    engine: str = "static"
    num_epochs: int = 1  # passes over each iteration's pairs
    minibatch_size: int = 16  # pairs per update
    missing_eos_penalty: float = 0.0  # subtracted from the score of a completion without EOS (TRL's name)
    max_retries: int = 3  # extra prompt batches drawn to replace groups whose scores all tie
    max_idle_iterations: int = 3  # iterations in a row without a pair that stop the run (0 = never)

    def __post_init__(self):
        for name in ("rollout_batch", "max_new_tokens", "num_epochs", "minibatch_size"):
            if getattr(self, name) <= 0:
                raise ValueError(f"online.{name}={getattr(self, name)} must be positive")
        if self.group_size < 2:
            raise ValueError(f"online.group_size={self.group_size}: a pair needs at least 2 completions per prompt")
        if self.minibatch_size > self.rollout_batch:
            raise ValueError(f"online.minibatch_size={self.minibatch_size} pairs exceed the "
                             f"online.rollout_batch={self.rollout_batch} an iteration samples")
        if self.max_retries < 0 or self.missing_eos_penalty < 0 or self.max_idle_iterations < 0:
            raise ValueError("online.max_retries, online.missing_eos_penalty and online.max_idle_iterations "
                             "must be >= 0")
        if self.temperature < 0 or not 0.0 < self.top_p <= 1.0 or self.top_k < 0:
            raise ValueError(f"online sampling: temperature={self.temperature} must be >= 0, top_p={self.top_p} "
                             f"in (0, 1], top_k={self.top_k} >= 0")
        fields.check(self, "online", engine=fields.one_of(*sampler.ENGINES))


def sequence_batch(seq: dict, rows) -> dict:
    """Rollout rows `rows` of the host batch `seq` (tokens / positions / segment_ids [b, P + N],
    completion / mask [b, N]) as a DPO sequence batch: inputs / positions / segment_ids
    [n, P + N - 1] int32, and the completion's columns (the last N): targets [n, N] int32 and
    loss_mask [n, N] float32 (`logprobs.pair_logps`)."""
    tokens = seq["tokens"][rows]
    return {"inputs": tokens[:, :-1], "targets": seq["completion"][rows], "positions": seq["positions"][rows, :-1],
            "segment_ids": seq["segment_ids"][rows, :-1], "loss_mask": seq["mask"][rows]}


def preference_batch(seq: dict, scores: np.ndarray, group_size: int) -> tuple[dict, np.ndarray]:
    """The best (chosen) and worst (rejected) completion of each group as a DPO pair batch.

    seq: host rollout rows, `group_size` consecutive rows per prompt; scores: [rows].
    Returns (batch with 'chosen_*' / 'rejected_*' sequence fields and 'prob_chosen'
    [groups] (1.0), tied [groups] bool: groups whose scores are all equal, which carry no
    preference). The first of equal best (worst) scores is taken.
    """
    s = np.asarray(scores).reshape(-1, group_size)
    first = np.arange(len(s)) * group_size
    batch = {f"chosen_{k}": v for k, v in sequence_batch(seq, first + s.argmax(1)).items()}
    batch.update({f"rejected_{k}": v for k, v in sequence_batch(seq, first + s.argmin(1)).items()})
    batch["prob_chosen"] = np.ones(len(s), np.float32)
    return batch, s.max(1) == s.min(1)
