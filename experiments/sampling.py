"""Sampling settings of the quickstart SFT policy: temperature (0 = greedy) x top-p
against oracle accuracy and diversity, K samples per held-out prompt. No training.

python -m experiments.sampling --quickstart runs/quickstart --out experiments/results/sampling

Diversity, per prompt over its K samples, then averaged over prompts:
distinct-2 = distinct word bigrams / all word bigrams of the K samples (1/K
when all K are the same answer without a repeated bigram, 1 when no bigram
repeats), and unique answers = the number of different (whitespace-trimmed)
samples, 1 .. K.
"""
import sys

import numpy as np

from experiments import common
from ptx import evaluate

TEMPERATURES = (0.5, 0.7, 1.0, 1.3)
TOP_PS = (0.5, 0.9, 1.0)
K = 8  # samples per prompt
TINY_TEMPERATURES, TINY_TOP_PS, TINY_K = (1.0,), (0.5, 1.0), 4


def distinct_n(texts: list[str], n: int) -> float:
    """Distinct word n-grams / all word n-grams over texts (0 when they hold none)."""
    grams = [tuple(w[i:i + n]) for w in (t.split() for t in texts) for i in range(len(w) - n + 1)]
    return len(set(grams)) / len(grams) if grams else 0.0


def main(argv=None):
    args = common.parse_args("sampling", argv)
    qs = common.load_quickstart(args.quickstart, args.tiny)
    temps, top_ps, k = (TINY_TEMPERATURES, TINY_TOP_PS, TINY_K) if args.tiny else (TEMPERATURES, TOP_PS, K)
    # Greedy decoding ignores top-p: one setting stands for all.
    grid = [(0.0, 1.0)] + [(t, p) for t in temps for p in top_ps]
    ev = common.Evaluator(qs)
    tokens = np.repeat(ev.arrays["prompt_tokens"], k, axis=0)
    lens = np.repeat(ev.arrays["prompt_lens"], k, axis=0)
    prompts = [p for p in ev.prompts for _ in range(k)]
    settings, rows = {}, []
    for t, p in grid:
        print(f"== temperature {t:g}, top-p {p:g}")
        chunks = ev.sampler(tokens, lens, ev.seed, temperature=t, top_k=0, top_p=p, min_p=0.0)
        texts = ev.sampler.texts(chunks)
        grades = [ev.oracle.grade(q, a) for q, a in zip(prompts, texts)]
        out = evaluate.summarize(grades, np.concatenate([c["lengths"] for c in chunks]))
        groups = [texts[i:i + k] for i in range(0, len(texts), k)]
        out.update(temperature=t, top_p=p, accuracy=float(np.mean([g["correct"] for g in grades])),
                   distinct_2=float(np.mean([distinct_n(g, 2) for g in groups])),
                   unique_answers=float(np.mean([len({a.strip() for a in g}) for g in groups])))
        settings[f"t{t:g}_p{p:g}"] = out
        rows.append(["0 (greedy)" if t == 0 else f"{t:g}", "-" if t == 0 else f"{p:g}", f"{out['accuracy']:.3f}",
                     f"{out['oracle_reward']:.3f}", f"{out['distinct_2']:.3f}", f"{out['unique_answers']:.2f}",
                     f"{out['mean_length']:.1f}"])
    results = {"n_prompts": len(ev.prompts), "samples_per_prompt": k, "seed": ev.seed, "settings": settings}
    table = common.markdown_table(["temperature", "top-p", "accuracy", "oracle reward", "distinct-2",
                                   f"unique answers / {k}", "mean length"], rows)

    plt = common.pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.6))
    greedy = settings["t0_p1"]
    for ax, key, label in ((axes[0], "accuracy", "oracle accuracy"), (axes[1], "distinct_2", "distinct-2"),
                           (axes[2], "unique_answers", f"unique answers per prompt (of {k})")):
        for p in top_ps:
            line = [s for s in settings.values() if s["top_p"] == p and s["temperature"] > 0]
            ax.plot([s["temperature"] for s in line], [s[key] for s in line], "o-", label=f"top-p {p:g}")
        ax.plot([0.0], [greedy[key]], "k*", ms=10, label="greedy")
        ax.set_xlabel("temperature")
        ax.set_ylabel(label)
    axes[0].legend(fontsize=8)
    fig.suptitle(f"SFT policy, {len(ev.prompts)} held-out prompts x {k} samples")
    common.write_outputs(args.out, "sampling", "Sampling temperature x top-p: accuracy and diversity", table,
                         results, fig)
    return results


if __name__ == "__main__":
    main(sys.argv[1:])
