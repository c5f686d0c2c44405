"""Reward sources: one interface that rollouts, online DPO and best-of-N share.

A source is called as `source(seq, prompts, completions, rows=None) ->
np.ndarray [b] float32` where `seq` is the rollout's sequence batch (see
`rollout.build_sequences`), `prompts` / `completions` are the decoded texts
and `rows` (optional) the data row of each prompt, whose other fields (a
reference `answer` or `solution`, a `kind`, ...) a verifier may read. A
reward model reads `seq`; a Python function reads the texts and the fields
it names.

Verifiable rewards ready to name in `reward.function`: `math_reward` (answer
equivalence by math-verify: boxed answers, GSM8K's `#### n`, fractions and
expressions), `format_reward` (a regex the whole completion must match) and
`length_penalty` (words beyond a limit, by default twice the reference's).
"""
import dataclasses
import importlib
import inspect
import re
import threading
from typing import Callable

import jax
import jax.numpy as jnp
import math_verify
import numpy as np

from ptx import checkpoint, inference, judge, sharding
from ptx.model import ModelConfig, Transformer

SOURCES = ("model", "function", "judge")


@dataclasses.dataclass(frozen=True)
class SourceConfig:
    """Where rewards come from (the `reward` section of the RL and best-of-N stages)."""

    source: str = "model"  # model (reward.checkpoint) | function (reward.function) | judge (d-RLAIF)
    checkpoint: str = ""  # model: a reward-stage workdir; judge: any language-model workdir
    # 'module:fn' with fn(prompt, completion, **fields of the data row it names) -> float; verifiers:
    # ptx.rewards:math_reward (the row's answer / solution), format_reward, length_penalty
    function: str = "ptx.world:oracle_reward"
    principles: tuple = ()  # judge: plain lines above the rating prompt
    judge_batch_size: int = 16  # judge: prompts per forward (a multiple of the data-parallel devices)

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

    def __call__(self, seq, prompts, completions, rows=None) -> np.ndarray:
        return np.asarray(self._score(self.params, seq["tokens"], seq["positions"],
                                      seq["segment_ids"], seq["score_index"]), np.float32)


class FunctionReward:
    """A Python function `fn(prompt, completion, **fields) -> float`, e.g. a verifier or the world's
    oracle. The data row's fields that fn names as parameters after the first two (`answer`,
    `solution`, ...), or every field when it takes **kwargs, are passed as keywords."""

    def __init__(self, fn: Callable[..., float]):
        self.fn = fn
        params = list(inspect.signature(fn).parameters.values())[2:]
        self.every_field = any(p.kind == p.VAR_KEYWORD for p in params)
        self.fields = {p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}

    def _fields(self, row: dict) -> dict:
        return {k: v for k, v in row.items()
                if k not in ("prompt", "completion") and (self.every_field or k in self.fields)}

    def __call__(self, seq, prompts, completions, rows=None) -> np.ndarray:
        rows = [{}] * len(prompts) if rows is None else rows
        return np.asarray([self.fn(p, c, **self._fields(r)) for p, c, r in zip(prompts, completions, rows)],
                          np.float32)


# Verifiable rewards: each reads the row's reference answer (`answer`, else `solution`).


def _reference_text(answer, solution) -> str:
    text = next((str(x) for x in (answer, solution) if x is not None and str(x).strip()), None)
    if text is None:
        raise ValueError("this reward needs the data row's reference answer: an 'answer' or 'solution' field")
    return text


def reference_answer(answer=None, solution=None) -> str:
    """The row's reference: `answer`, else `solution`; after GSM8K's '####' only the number stays."""
    text = _reference_text(answer, solution)
    if "####" in text:
        text = text.rsplit("####", 1)[1].strip().replace(",", "")
    return text


def _timeout() -> int | None:
    # math-verify times out by SIGALRM, which only the main thread may set.
    return 5 if threading.current_thread() is threading.main_thread() else None


def math_reward(prompt: str, completion: str, answer=None, solution=None) -> float:
    """1.0 when the completion's final answer equals the reference (math-verify: a \\boxed{}
    answer, GSM8K's '#### n' or the last number or expression; 0.5 = 1/2 = \\frac{1}{2}), else 0.0.

    The reference is `answer` or `solution` (a bare number, LaTeX, or a worked solution with
    '#### n' or a boxed answer). A reference math-verify cannot read is a ValueError.
    """
    ref = reference_answer(answer, solution)
    gold = math_verify.parse(ref, parsing_timeout=_timeout())
    if not gold:  # bare LaTeX (x^2+1) reads as maths only between dollars; mere text stays unread
        gold = math_verify.parse(f"${ref}$", parsing_timeout=_timeout())
        gold = gold if any(not isinstance(g, str) for g in gold) else []
    if not gold:
        raise ValueError(f"math-verify cannot read the reference answer {ref!r}")
    if "####" in completion:
        completion = completion.rsplit("####", 1)[1]
    pred = math_verify.parse(completion, parsing_timeout=_timeout())
    return float(bool(pred) and math_verify.verify(gold, pred, timeout_seconds=_timeout()))


# Reasoning in <think> ... </think>, then a non-empty answer, and no other think tag.
THINK_ANSWER = r"\s*<think>(?:(?!</?think>).)*</think>(?=.*\S)(?:(?!</?think>).)*"


def format_reward(prompt: str, completion: str, pattern: str = THINK_ANSWER) -> float:
    """1.0 when the whole completion matches `pattern` (re.fullmatch, '.' matching newlines), else 0.0.
    For another pattern: `functools.partial(format_reward, pattern=...)` in a module of your own."""
    return float(re.fullmatch(pattern, completion, flags=re.DOTALL) is not None)


def length_penalty(prompt: str, completion: str, answer=None, solution=None, *, limit: int = 0,
                   ratio: float = 2.0) -> float:
    """A reward <= 0 for length: 0 up to `limit` words, then -(words - limit) / limit, at least -1.
    limit 0: `ratio` times the words of the row's reference (`answer` or `solution`)."""
    if not limit:
        limit = max(int(ratio * len(_reference_text(answer, solution).split())), 1)
    return -min(max(len(completion.split()) - limit, 0) / limit, 1.0)


def import_function(name: str) -> Callable:
    """'package.module:function' -> the function."""
    module, _, attr = name.partition(":")
    if not attr:
        raise ValueError(f"reward.function={name!r}; expected 'module:function'")
    return getattr(importlib.import_module(module), attr)


def make_source(cfg: SourceConfig, mesh):
    """The reward source `cfg` names; models are placed on `mesh`, the mesh of the samples they score.
    model: a reward model's scalar head; function: a Python function of the texts (and the data
    row's fields it names); judge (d-RLAIF):
    the expected 1-10 rating of a language model."""
    if cfg.source == "model":
        return ModelReward(cfg.checkpoint, mesh)
    if cfg.source == "function":
        return FunctionReward(import_function(cfg.function))
    return judge.JudgeReward(judge.Judge(inference.load_policy(cfg.checkpoint, mesh),
                                         principles=cfg.principles, batch_size=cfg.judge_batch_size))
