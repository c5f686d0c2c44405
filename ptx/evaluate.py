"""Evaluation against the embedded world's exact oracle on held-out prompts.

For each policy: sample once per prompt, grade with the oracle, and estimate
KL to the SFT policy from the policy's own samples (sum over response tokens
of log pi - log pi_sft). Best-of-N reuses SFT samples and reports the
analytic KL bound.
"""
import jax
import jax.numpy as jnp
import numpy as np

from ptx import best_of_n, rollout
from ptx.model import Transformer


def summarize(grades: list[dict], lengths) -> dict:
    """Oracle reward, accuracy per request kind, refusal rates, mean length."""
    reward = np.array([g["reward"] for g in grades])
    out = {"oracle_reward": float(reward.mean()), "n": len(grades),
           "mean_length": float(np.mean(lengths))}
    kinds = sorted({g["kind"] for g in grades})
    for kind in kinds:
        sel = [g for g in grades if g["kind"] == kind]
        out[f"accuracy/{kind}"] = float(np.mean([g["correct"] for g in sel]))
    harmful = [g for g in grades if g["kind"] == "harmful"]
    harmless = [g for g in grades if g["kind"] != "harmful"]
    if harmful:
        out["correct_refusal_rate"] = float(np.mean([g["refused"] for g in harmful]))
    if harmless:
        out["over_refusal_rate"] = float(np.mean([g["refused"] for g in harmless]))
    return out


def make_kl_fn(cfg, width: int):
    """jit: (params, ref_params, seq) -> [b] float32 sum over response tokens of log pi - log pi_ref."""
    model = Transformer(cfg.replace(scalar_head=False))

    def fn(params, ref_params, seq):
        logps, _, _ = rollout.response_forward(model, params, seq, width)
        ref, _, _ = rollout.response_forward(model, ref_params, seq, width)
        return jnp.sum((logps - ref) * seq["mask"], axis=1)

    return jax.jit(fn)


def evaluate_policy(smp, params, ref_params, arrays, prompts, grade_fn, *, seed, settings, kl_fn) -> dict:
    chunks = smp(arrays["prompt_tokens"], arrays["prompt_lens"], seed, params=params, **settings)
    texts = smp.texts(chunks)
    grades = [grade_fn(p, t) for p, t in zip(prompts, texts)]
    kl = np.concatenate([np.asarray(kl_fn(params, ref_params, c["seq"]))[:c["rows"]] for c in chunks])
    out = summarize(grades, np.concatenate([c["lengths"] for c in chunks]))
    out["kl_to_sft"] = float(kl.mean())
    out["samples"] = [p + t for p, t in zip(prompts[:4], texts[:4])]
    return out


def evaluate_best_of_n(smp, source, arrays, prompts, grade_fn, ns, *, seed, settings) -> dict:
    """Best-of-n for each n from one set of max(ns) samples per prompt; reward-model
    score and oracle side by side (over-optimisation shows as a gap)."""
    texts, scores = best_of_n.sample_and_score(smp, source, arrays["prompt_tokens"], arrays["prompt_lens"],
                                               max(ns), seed, settings, prompts)
    picked = best_of_n.select(scores, ns)
    out = {}
    for n, r in picked.items():
        chosen = [texts[i][j] for i, j in enumerate(r["best_index"])]
        grades = [grade_fn(p, t) for p, t in zip(prompts, chosen)]
        res = summarize(grades, [len(smp.policy.tok.encode(t)) for t in chosen])
        res.update(rm_score=r["best"], kl_to_sft=best_of_n.kl_bound(n))
        out[f"best_of_{n}"] = res
    return out
