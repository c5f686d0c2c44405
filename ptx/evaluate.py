"""Evaluation against the embedded world's exact oracle on held-out prompts.

For each policy: sample once per prompt, grade with the oracle, and estimate
KL to the SFT policy from the policy's own samples (sum over response tokens
of log pi - log pi_sft). Best-of-N reuses SFT samples and reports the
analytic KL bound. `Evaluation` sets this up once for the quickstart's table
and the experiments alike.
"""
import math

import jax
import jax.numpy as jnp
import numpy as np

from ptx import best_of_n, data, inference, rl_training, sharding
from ptx.model import Transformer
from ptx.oracle import Oracle
from ptx.tokenizer import PromptTemplate


def summarize(grades: list[dict], lengths) -> dict:
    """Oracle reward (overall and per request kind), accuracy per request kind, refusal
    rates, mean length."""
    reward = np.array([g["reward"] for g in grades])
    out = {"oracle_reward": float(reward.mean()), "n": len(grades),
           "mean_length": float(np.mean(lengths))}
    kinds = sorted({g["kind"] for g in grades})
    for kind in kinds:
        sel = [g for g in grades if g["kind"] == kind]
        out[f"accuracy/{kind}"] = float(np.mean([g["correct"] for g in sel]))
        out[f"reward/{kind}"] = float(np.mean([g["reward"] for g in sel]))
    harmful = [g for g in grades if g["kind"] == "harmful"]
    harmless = [g for g in grades if g["kind"] != "harmful"]
    if harmful:
        out["correct_refusal_rate"] = float(np.mean([g["refused"] for g in harmful]))
    if harmless:
        out["over_refusal_rate"] = float(np.mean([g["refused"] for g in harmless]))
    return out


def pass_at_k(n: int, c: int, k: int) -> float:
    """Chen et al. (2021)'s unbiased estimate of pass@k from n samples of which c are correct:
    1 - C(n - c, k) / C(n, k), the chance that k of the n drawn without replacement hold a
    correct one. As a product, so that n in the hundreds does not overflow."""
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"pass@k needs 0 <= c <= n and 1 <= k <= n, got n={n}, c={c}, k={k}")
    if n - c < k:
        return 1.0
    return 1.0 - math.prod(1.0 - k / i for i in range(n - c + 1, n + 1))


def make_kl_fn(cfg, width: int, mesh=None):
    """jit: (params, ref_params, seq) -> [b] float32 sum over response tokens of log pi - log pi_ref,
    replicated over `mesh` so that every process reads every row."""
    model = Transformer(cfg.replace(scalar_head=False))

    def fn(params, ref_params, seq):
        logps, _, _ = rl_training.response_forward(model, params, seq, width, entropy=False)
        ref, _, _ = rl_training.response_forward(model, ref_params, seq, width, entropy=False)
        return jnp.sum((logps - ref) * seq["mask"], axis=1)

    return jax.jit(fn, out_shardings=None if mesh is None else sharding.replicated(mesh))


def evaluate_policy(smp, params, ref_params, arrays, prompts, grade_fn, *, seed, settings, kl_fn,
                    chunks_out: list = None) -> dict:
    """One sample per prompt from `params`, graded; `chunks_out` (a list) receives the sampler's chunks."""
    chunks = smp(arrays["prompt_tokens"], arrays["prompt_lens"], seed, params=params, **settings)
    texts = smp.texts(chunks)
    grades = [grade_fn(p, t) for p, t in zip(prompts, texts)]
    kl = np.concatenate([np.asarray(kl_fn(params, ref_params, c["seq"]))[:c["rows"]] for c in chunks])
    out = summarize(grades, np.concatenate([c["lengths"] for c in chunks]))
    out["kl_to_sft"] = float(kl.mean())
    out["samples"] = [p + t for p, t in zip(prompts[:4], texts[:4])]
    if chunks_out is not None:
        chunks_out.extend(chunks)
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


class Evaluation:
    """The held-out prompts, the SFT policy (sampler and KL reference) and the oracle, set up
    once; `policy` and `best_of_n` then grade like every row of the quickstart's table."""

    def __init__(self, sft_path: str, prompt_file: str, oracle: Oracle, mesh, *, template: PromptTemplate,
                 max_prompt_len: int, batch_size: int, max_new_tokens: int, temperature: float, seed: int,
                 engine: str = "static"):
        self.oracle, self.mesh, self.seed = oracle, mesh, seed
        self.sft = inference.load_policy(sft_path, mesh)
        rows, _ = data.load_rows(prompt_file, "prompt", template=template)
        self.arrays, _ = data.encode_prompts(rows, self.sft.tok, max_prompt_len=max_prompt_len)
        self.prompts = [r["prompt"] for r in rows]
        self.sampler = inference.Sampler(self.sft, batch_size=batch_size, max_new_tokens=max_new_tokens,
                                         engine=engine, field="eval.engine")
        self.settings = dict(temperature=temperature, top_k=0, top_p=1.0, min_p=0.0)
        self.kl_fn = make_kl_fn(self.sft.cfg, self.arrays["prompt_tokens"].shape[1], mesh)

    def params(self, path: str = None):
        """The policy of a workdir on this mesh (None: the SFT policy)."""
        return self.sft.params if path is None else inference.load_policy(path, self.mesh).params

    def policy(self, params, chunks_out: list = None) -> dict:
        """`evaluate_policy` of `params` on one sample per held-out prompt."""
        return evaluate_policy(self.sampler, params, self.sft.params, self.arrays, self.prompts,
                               self.oracle.grade, seed=self.seed, settings=self.settings, kl_fn=self.kl_fn,
                               chunks_out=chunks_out)

    def best_of_n(self, source, ns) -> dict:
        """`evaluate_best_of_n` of the SFT policy with `source` picking."""
        return evaluate_best_of_n(self.sampler, source, self.arrays, self.prompts, self.oracle.grade, list(ns),
                                  seed=self.seed, settings=self.settings)
