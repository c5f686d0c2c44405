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
import math
import numbers
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
        if self.source == "function":
            import_function(self.function)  # a module or function that is not there fails before anything runs
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


class RewardError(ValueError):
    """A reward function that cannot score: not importable, a row without the fields it reads,
    or an exception / a value that is not a finite number while scoring; one line naming
    `reward.function`, the row (file and line) and the value."""


class FunctionReward:
    """A Python function `fn(prompt, completion, **fields) -> float`, e.g. a verifier or the world's
    oracle. The data row's fields that fn names as parameters after the first two (`answer`,
    `solution`, ...), or every field when it takes **kwargs, are passed as keywords.

    name: its `reward.function` ('module:function'), named in every error. An exception inside fn,
    or a value that is not a finite number (None, NaN, a string), ends the run with a RewardError
    naming the function, the row (`sources.Record.where`) and the value; the exception is its cause.
    """

    def __init__(self, fn: Callable[..., float], name: str = ""):
        self.fn, self.name = fn, name or getattr(fn, "__qualname__", repr(fn))
        params = list(inspect.signature(fn).parameters.values())[2:]
        self.every_field = any(p.kind == p.VAR_KEYWORD for p in params)
        self.fields = {p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
        # Fields it cannot score without: parameters without a default, and one of each of the
        # alternatives it lists in `reward_needs` (math_reward: an answer or a solution).
        self.required = [(p.name,) for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
                         and p.default is p.empty] + [tuple(a) for a in getattr(fn, "reward_needs", ())]

    def check_rows(self, rows):
        """RewardError naming the first row without a field the function needs."""
        for i, row in enumerate(rows):
            for options in self.required:
                if all(row.get(f) is None or (isinstance(row.get(f), str) and not row[f].strip()) for f in options):
                    what = " or ".join(repr(f) for f in options)
                    raise RewardError(f"reward.function={self.name!r} reads field {what} of each row; "
                                      f"{_where(row, i)} has none")

    def _fields(self, row: dict) -> dict:
        return {k: v for k, v in row.items()
                if k not in ("prompt", "completion") and (self.every_field or k in self.fields)}

    def _score(self, prompt: str, completion: str, row: dict, i: int) -> float:
        try:
            value = self.fn(prompt, completion, **self._fields(row))
        except Exception as e:  # the user's function: named, with its row; the traceback under --verbose
            detail = " ".join(str(e).split())
            raise RewardError(f"reward.function={self.name!r} raised {type(e).__name__}"
                              f"{': ' + detail if detail else ''} on {_where(row, i)}") from e
        if not isinstance(value, numbers.Real) or not math.isfinite(value):
            raise RewardError(f"reward.function={self.name!r} returned {value!r} on {_where(row, i)}; "
                              f"a reward must be a finite number")
        return float(value)

    def __call__(self, seq, prompts, completions, rows=None) -> np.ndarray:
        rows = [{}] * len(prompts) if rows is None else rows
        return np.asarray([self._score(p, c, r, i) for i, (p, c, r) in enumerate(zip(prompts, completions, rows))],
                          np.float32)


def _where(row: dict, i: int) -> str:
    """Where a row came from ('<file>: line <n>'), else its place in the batch scored."""
    return getattr(row, "where", "") or f"row {i} of the batch"


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


# The row fields a reward cannot score without, one of each tuple (`FunctionReward.check_rows`).
math_reward.reward_needs = (("answer", "solution"),)


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
    """'package.module:function' -> the function; RewardError (a ValueError) naming `reward.function`
    and the module or attribute that is missing."""
    module, _, attr = name.partition(":")
    if not module or not attr:
        raise RewardError(f"reward.function={name!r}: expected 'module:function'")
    try:
        mod = importlib.import_module(module)
    except ImportError as e:
        raise RewardError(f"reward.function={name!r}: cannot import module {module!r} ({e})") from e
    fn = getattr(mod, attr, None)
    if fn is None:
        raise RewardError(f"reward.function={name!r}: module {module!r} has no attribute {attr!r}")
    if not callable(fn):
        raise RewardError(f"reward.function={name!r}: {attr!r} is a {type(fn).__name__}, not a function")
    return fn


def make_source(cfg: SourceConfig, mesh, rows=None):
    """The reward source `cfg` names; models are placed on `mesh`, the mesh of the samples they score.
    rows: the prompt rows it will score, checked up front for the fields a function reads.
    model: a reward model's scalar head; function: a Python function of the texts (and the data
    row's fields it names); judge (d-RLAIF):
    the expected 1-10 rating of a language model."""
    if cfg.source == "model":
        return ModelReward(cfg.checkpoint, mesh)
    if cfg.source == "function":
        source = FunctionReward(import_function(cfg.function), cfg.function)
        source.check_rows(rows or [])
        return source
    return judge.JudgeReward(judge.Judge(inference.load_policy(cfg.checkpoint, mesh),
                                         principles=cfg.principles, batch_size=cfg.judge_batch_size))
