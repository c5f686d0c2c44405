"""Reward sources: one interface that rollouts and best-of-N share.

A source is called as `source(seq, prompts, completions) -> np.ndarray [b]
float32` where `seq` is the rollout's sequence batch (see
`rollout.build_sequences`) and `prompts` / `completions` are the decoded
texts. A reward model reads `seq`; a Python function reads the texts.
"""
import dataclasses
import importlib
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from ptx import checkpoint, inference, judge, sharding
from ptx.model import ModelConfig, Transformer

SOURCES = ("model", "function", "judge")


@dataclasses.dataclass(frozen=True)
class SourceConfig:
    """Where rewards come from (the `reward` section of the RL and best-of-N stages)."""

    source: str = "model"  # model | function | judge
    checkpoint: str = ""  # model: a reward-stage workdir; judge: any language-model workdir
    function: str = "ptx.world:oracle_reward"  # function: 'module:fn', fn(prompt, completion) -> float
    principles: tuple = ()  # judge: plain lines above the rating prompt
    judge_batch_size: int = 16  # judge: prompts per forward

    def __post_init__(self):
        object.__setattr__(self, "principles", tuple(self.principles))
        if self.source not in SOURCES:
            raise ValueError(f"reward.source={self.source!r}; expected one of {SOURCES}")
        if self.source in ("model", "judge") and not self.checkpoint:
            what = "a reward-stage workdir" if self.source == "model" else "a language-model workdir"
            raise ValueError(f"reward.source={self.source!r} needs reward.checkpoint ({what})")
        if self.source == "function" and ":" not in self.function:
            raise ValueError(f"reward.function={self.function!r}; expected 'module:function'")
        if self.judge_batch_size <= 0:
            raise ValueError(f"reward.judge_batch_size={self.judge_batch_size} must be positive")


class ModelReward:
    """A trained reward model: its scalar head at the last prompt + response token."""

    def __init__(self, path: str, mesh):
        meta = checkpoint.read_meta(path)
        self.cfg = ModelConfig(**meta["model"])
        if not self.cfg.scalar_head:
            raise ValueError(f"{path} is a {meta['stage']!r} checkpoint without a scalar head; "
                             f"reward.checkpoint must come from the reward stage")
        # On the same mesh as the rollouts it scores.
        self.params, _ = checkpoint.load_params(path, mesh)
        model = Transformer(self.cfg)

        def score(params, tokens, positions, segment_ids, index):
            values = model.apply({"params": params}, tokens, positions, segment_ids, logits=False).values
            return jnp.take_along_axis(values, index[:, None], axis=1)[:, 0]

        # Replicated out: every process reads all the scores back to the host.
        self._score = jax.jit(score, out_shardings=sharding.replicated(mesh))

    def __call__(self, seq, prompts, completions) -> np.ndarray:
        return np.asarray(self._score(self.params, seq["tokens"], seq["positions"],
                                      seq["segment_ids"], seq["score_index"]), np.float32)


class FunctionReward:
    """A Python function `(prompt, completion) -> float`, e.g. a verifier or the world's oracle."""

    def __init__(self, fn: Callable[[str, str], float]):
        self.fn = fn

    def __call__(self, seq, prompts, completions) -> np.ndarray:
        return np.asarray([self.fn(p, c) for p, c in zip(prompts, completions)], np.float32)


def import_function(name: str) -> Callable:
    """'package.module:function' -> the function."""
    module, _, attr = name.partition(":")
    if not attr:
        raise ValueError(f"reward.function={name!r}; expected 'module:function'")
    return getattr(importlib.import_module(module), attr)


def make_source(cfg: SourceConfig, mesh):
    """The reward source `cfg` names; models are placed on `mesh`, the mesh of the samples they score.
    model: a reward model's scalar head; function: a Python function of the texts; judge (d-RLAIF):
    the expected 1-10 rating of a language model."""
    if cfg.source == "model":
        return ModelReward(cfg.checkpoint, mesh)
    if cfg.source == "function":
        return FunctionReward(import_function(cfg.function))
    return judge.JudgeReward(judge.Judge(inference.load_policy(cfg.checkpoint, mesh),
                                         principles=cfg.principles, batch_size=cfg.judge_batch_size))
