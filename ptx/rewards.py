"""Reward sources: one interface that rollouts and best-of-N share.

A source is called as `source(seq, prompts, completions) -> np.ndarray [b]
float32` where `seq` is the rollout's sequence batch (see
`rollout.build_sequences`) and `prompts` / `completions` are the decoded
texts. A reward model reads `seq`; a Python function reads the texts.
"""
import importlib
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from ptx import checkpoint, sharding
from ptx.model import ModelConfig, Transformer


class ModelReward:
    """A trained reward model: its scalar head at the last prompt + response token."""

    def __init__(self, path: str, mesh):
        meta = checkpoint.read_meta(path)
        self.cfg = ModelConfig(**meta["model"])
        if not self.cfg.scalar_head:
            raise ValueError(f"{path} is a {meta['stage']!r} checkpoint without a scalar head; "
                             f"reward.checkpoint must come from the reward stage")
        from ptx import train

        # On the same mesh as the rollouts it scores.
        self.params, _ = checkpoint.load_params(path, train.param_shardings_for(self.cfg, mesh))
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


def make_source(reward_cfg, mesh):
    """From the config: reward.source = model (reward.checkpoint) | function (reward.function)
    | judge (d-RLAIF: the expected 1-10 rating of a language model at reward.checkpoint).
    Models are placed on `mesh`, the mesh of the samples they score."""
    if reward_cfg.source == "model":
        if not reward_cfg.checkpoint:
            raise ValueError("reward.source='model' needs reward.checkpoint (a reward-stage workdir)")
        return ModelReward(reward_cfg.checkpoint, mesh)
    if reward_cfg.source == "function":
        return FunctionReward(import_function(reward_cfg.function))
    if reward_cfg.source == "judge":
        from ptx import inference, judge

        if not reward_cfg.checkpoint:
            raise ValueError("reward.source='judge' needs reward.checkpoint (a language-model workdir)")
        return judge.JudgeReward(judge.Judge(inference.load_policy(reward_cfg.checkpoint, mesh),
                                             principles=tuple(reward_cfg.principles),
                                             batch_size=reward_cfg.judge_batch_size))
    raise ValueError(f"reward.source={reward_cfg.source!r}; expected model, function or judge")
