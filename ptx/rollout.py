"""Rollouts: prompts -> sampler -> decoded texts -> reward source -> penalties, as host rows and
the device sequence batch that RL (`ptx.rl_training`) and online DPO (`ptx.online`) train on.

Layout: every rollout row is `[left-aligned prompt (P) | completion (N)]`, so
completion token j sits at column P + j and is predicted by the logits at
column P - 1 + j (`build_sequences`).
"""
import dataclasses
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from ptx import data, engine, losses, sampler, sharding
from ptx.model import ModelConfig


@dataclasses.dataclass(frozen=True)
class Sampling:
    """How a rollout samples and scores: one group of completions per prompt, and the penalties."""

    prompts: int  # prompts per draw
    group_size: int  # completions per prompt
    max_new_tokens: int
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    max_retries: int = 0  # extra prompt batches an iteration may draw (`draws`)
    no_eos_penalty: float = 0.0  # added to the score of a completion without EOS
    overlong_buffer: int = 0  # DAPO: penalty over the last N tokens before max_new_tokens; 0 = off
    overlong_penalty: float = 1.0  # the penalty at max_new_tokens
    engine: str = "static"  # the decoder, `sampler.ENGINES` (`engine.generate_fn`)


class Collector:
    """Iteration `it`'s rollout: its prompt batch (attempt 0) or a fresh one (a retry), each prompt
    prefilled once and sampled `group_size` times, decoded and scored. RL and online DPO collect
    through it, so both draw the same prompts and keys.

    Retry a of iteration it reads the prompt batch `steps + it * max_retries + a - 1`, one no
    iteration trains on otherwise; its keys are fold_in(fold_in(PRNGKey(seed), it), a) split
    over the rows (attempt 0: fold_in(PRNGKey(seed), it)).
    """

    def __init__(self, cfg: ModelConfig, tok, mesh, reward: Callable, rows: list, prompts: dict, spec: Sampling, *,
                 seed: int, steps: int):
        """reward: (device seq, prompt texts, completion texts, rows=data rows) -> [n] scores
        (`rewards.make_source`). rows / prompts: the prompt file's rows and `data.encode_prompts`
        arrays. steps: the run's iterations."""
        self.tok, self.mesh, self.reward, self.rows, self.prompts, self.spec = tok, mesh, reward, rows, prompts, spec
        self.seed, self.steps = seed, steps
        self.batches = data.BatchIterator(prompts, spec.prompts, seed=seed)
        self.generate = engine.generate_fn(spec.engine, cfg, mesh, max_new_tokens=spec.max_new_tokens,
                                           eos_id=tok.eos_ids, pad_id=tok.pad_id, n_tokens=tok.vocab_size,
                                           group_size=spec.group_size)
        self.build = jax.jit(lambda p, n, out: build_sequences(p, n, out, pad_id=tok.pad_id))

    def __call__(self, params, it: int, attempt: int = 0) -> tuple[dict, dict]:
        """(device sequence batch (`build_sequences`), host rows: completion / lengths / finish_reason
        [n], prompts and completions (texts) and scores [n] float32 with the penalties)."""
        s = self.spec
        step = it if not attempt else self.steps + it * s.max_retries + attempt - 1
        idx = self.batches.indices(step)
        prompt_tokens = np.repeat(self.prompts["prompt_tokens"][idx], s.group_size, axis=0)
        prompt_lens = np.repeat(self.prompts["prompt_lens"][idx], s.group_size, axis=0)
        step_key = jax.random.fold_in(jax.random.PRNGKey(self.seed), it)
        step_key = jax.random.fold_in(step_key, attempt) if attempt else step_key
        keys = np.asarray(jax.random.split(step_key, len(prompt_lens)))
        placed = sharding.put_global({"tokens": prompt_tokens, "lens": prompt_lens, "keys": keys}, self.mesh)
        out = self.generate(params, placed["tokens"], placed["lens"], placed["keys"], s.temperature, s.top_k,
                            s.top_p)
        seq = self.build(placed["tokens"], placed["lens"], out)
        host = sharding.gather({"completion": seq["completion"], "lengths": out.lengths,
                                "finish_reason": out.finish_reason})
        prompts = [self.tok.decode(p[:n]) for p, n in zip(prompt_tokens, prompt_lens)]
        completions = [self.tok.decode(c[:n]) for c, n in zip(host["completion"], host["lengths"])]
        # The data row of each prompt: a verifier reads its reference answer.
        scores = self.reward(seq, prompts, completions, rows=[self.rows[i] for i in idx for _ in range(s.group_size)])
        scores = scores + s.no_eos_penalty * (host["finish_reason"] != sampler.FINISH_EOS)
        if s.overlong_buffer:
            scores = scores + np.asarray(losses.overlong_penalty(
                host["lengths"], max_len=s.max_new_tokens, buffer=s.overlong_buffer, factor=s.overlong_penalty))
        return seq, dict(host, prompts=prompts, completions=completions, scores=scores.astype(np.float32))

    def draws(self, params, it: int, sampled: list):
        """Attempt 0, 1, ... max_retries of iteration it, lazily, as host rows with the sequence
        batch's fields under 'seq.' (what `fill_groups` takes); each draw's sampled token count
        is appended to `sampled`."""
        for attempt in range(1 + self.spec.max_retries):
            seq, host = self(params, it, attempt)
            sampled.append(float(np.sum(host["lengths"])))
            yield {**{f"seq.{k}": v for k, v in sharding.gather(seq).items()}, **host}


def sequences(host: dict) -> dict:
    """The sequence batch's fields of `draws` rows (their 'seq.' keys, unprefixed)."""
    return {k[4:]: v for k, v in host.items() if k.startswith("seq.")}


def build_sequences(prompt_tokens, prompt_lens, out: sampler.SampleOutput, *, pad_id: int) -> dict:
    """Prompt + sampled completion as one batch for teacher-forced forwards.

    prompt_tokens: [b, P] int32 right-padded; prompt_lens: [b] int32.
    Returns tokens / positions / segment_ids [b, P + N] int32, completion
    [b, N] int32, mask [b, N] float32, score_index [b] int32: the column
    of the last response token before any EOS (the reward model's read-out;
    the last prompt token when the response is empty), finish_reason [b]
    int32, and the sampler's logprobs / entropy [b, N] float32 (0 on padding).
    """
    tokens_p, pos_p, seg_p = sampler.left_align(prompt_tokens, prompt_lens)
    width, n = prompt_tokens.shape[1], out.tokens.shape[1]
    j = jnp.arange(n, dtype=jnp.int32)[None, :]
    live = j < out.lengths[:, None]
    completion = jnp.where(live, out.tokens, pad_id)
    content = out.lengths - (out.finish_reason == sampler.FINISH_EOS).astype(jnp.int32)
    return {
        "tokens": jnp.concatenate([tokens_p, completion], axis=1),
        "positions": jnp.concatenate([pos_p, prompt_lens[:, None].astype(jnp.int32) + j], axis=1),
        "segment_ids": jnp.concatenate([seg_p, live.astype(jnp.int32)], axis=1),
        "completion": completion,
        "mask": live.astype(jnp.float32),
        "score_index": (width - 1 + content).astype(jnp.int32),
        "finish_reason": out.finish_reason,
        "logprobs": out.logprobs,
        "entropy": out.entropy,
    }


def fill_groups(draws, groups: int, group_size: int) -> tuple[dict, dict]:
    """DAPO's dynamic sampling: groups whose scores are all equal (no advantage to learn from)
    are dropped and replaced by groups of later draws until `groups` are collected.

    draws: an iterable (drawn lazily; its length is the cap on retries) of dicts of
    host rows, `group_size` consecutive rows per prompt: numpy arrays or lists with
    a leading dimension, 'scores' [rows] among them. When the draws run out first,
    dropped groups fill the rest, in draw order.
    Returns (the rows of `groups` groups, {'draws', 'filled_groups'}: draws taken,
    groups without signal in the result).
    """
    kept, dropped, n = [], [], 0
    for draw in draws:
        n += 1
        scores = np.asarray(draw["scores"]).reshape(-1, group_size)
        signal = scores.max(axis=1) > scores.min(axis=1)
        for g in range(len(scores)):
            (kept if signal[g] else dropped).append((draw, g))
        if len(kept) >= groups:
            break
    chosen = (kept + dropped)[:groups]
    if len(chosen) < groups:
        raise ValueError(f"{len(chosen)} groups drawn, fewer than the {groups} a batch needs")

    def rows(value, draw_groups):
        idx = [g * group_size + j for g in draw_groups for j in range(group_size)]
        return value[np.asarray(idx)] if isinstance(value, np.ndarray) else [value[i] for i in idx]

    out = {}
    for k in chosen[0][0]:
        parts = [rows(d[k], [g]) for d, g in chosen]
        out[k] = (np.concatenate(parts) if isinstance(parts[0], np.ndarray) else [x for p in parts for x in p])
    return out, {"draws": n, "filled_groups": max(groups - len(kept), 0)}
