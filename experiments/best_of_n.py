"""Best-of-N with the quickstart reward model, N = 1 .. 64, from one set of 64 SFT
samples per held-out prompt (best-of-n picks among the first n): the reward
model's score of the pick and the oracle reward of the same pick, against the
analytic KL bound log N - (N - 1) / N. Over-optimisation shows as the oracle
falling while the RM score still rises; the oracle's own best-of-N (the best
candidate by the oracle) is the ceiling the samples allow. No training.

python -m experiments.best_of_n --quickstart runs/quickstart --out experiments/results/best_of_n
Every candidate with both scores goes to <runs>/candidates.jsonl.
"""
import json
import os
import sys

import numpy as np

from experiments import common
from ptx import best_of_n, evaluate

NS = (1, 2, 4, 8, 16, 32, 64)
TINY_NS = (1, 2, 4, 8)


def main(argv=None):
    args = common.parse_args("best_of_n", argv)
    qs = common.load_quickstart(args.quickstart, args.tiny)
    ns = TINY_NS if args.tiny else NS
    ev = common.Evaluator(qs)
    tok = ev.sft.tok
    texts, scores = best_of_n.sample_and_score(ev.sampler, ev.rm, ev.arrays["prompt_tokens"], ev.arrays["prompt_lens"],
                                               max(ns), ev.seed, ev.settings, ev.prompts)
    oracle = np.array([[ev.world.score(p, t) for t in row] for p, row in zip(ev.prompts, texts)])  # [prompts, N]
    os.makedirs(args.runs, exist_ok=True)
    with open(os.path.join(args.runs, "candidates.jsonl"), "w") as f:
        for i, prompt in enumerate(ev.prompts):
            for j, text in enumerate(texts[i]):
                f.write(json.dumps({"prompt": prompt, "candidate": j, "completion": text,
                                    "rm_score": float(scores[i, j]), "oracle_reward": oracle[i, j]}) + "\n")
    rows, table_rows = {}, []
    for n, r in best_of_n.select(scores, ns).items():
        chosen = [texts[i][j] for i, j in enumerate(r["best_index"])]
        out = evaluate.summarize([ev.world.grade(p, t) for p, t in zip(ev.prompts, chosen)],
                                 [len(tok.encode(t)) for t in chosen])
        out.update(rm_score=r["best"], kl_bound=best_of_n.kl_bound(n),
                   oracle_ceiling=float(oracle[:, :n].max(1).mean()))
        rows[str(n)] = out
        table_rows.append([n, f"{out['kl_bound']:.3f}", f"{out['rm_score']:.3f}", f"{out['oracle_reward']:.3f}",
                           f"{out['oracle_ceiling']:.3f}", f"{out['correct_refusal_rate']:.3f}",
                           f"{out['over_refusal_rate']:.3f}", f"{out['mean_length']:.1f}"])
    results = {"n_prompts": len(ev.prompts), "samples_per_prompt": max(ns), "seed": ev.seed,
               "all_samples": {"rm_score": float(scores.mean()), "oracle_reward": float(oracle.mean())},
               "best_of": rows}
    table = common.markdown_table(["N", "KL bound", "RM score (pick)", "oracle reward (pick)",
                                   "oracle best-of-N (ceiling)", "correct refusals", "over-refusals",
                                   "mean length"], table_rows)

    plt = common.pyplot()
    fig, ax = plt.subplots(figsize=(7, 4))
    kl = [r["kl_bound"] for r in rows.values()]
    ax.plot(kl, [r["oracle_reward"] for r in rows.values()], "o-", color="tab:blue", label="oracle reward of RM pick")
    ax.plot(kl, [r["oracle_ceiling"] for r in rows.values()], "o:", color="tab:blue", alpha=0.5,
            label="oracle's own best-of-N")
    ax.set_xlabel("KL bound log N - (N-1)/N (nats)")
    ax.set_ylabel("oracle reward (held-out)", color="tab:blue")
    for n, x, y in zip(ns, kl, [r["oracle_reward"] for r in rows.values()]):
        ax.annotate(f"N={n}", (x, y), fontsize=7, xytext=(2, -10), textcoords="offset points")
    rx = ax.twinx()
    rx.plot(kl, [r["rm_score"] for r in rows.values()], "s-", color="tab:red", label="RM score of pick")
    rx.set_ylabel("reward-model score", color="tab:red")
    fig.legend(loc="upper center", ncol=3, fontsize=8, bbox_to_anchor=(0.5, 0.93))
    ax.set_title(f"Best-of-N from SFT, {len(ev.prompts)} held-out prompts", pad=28)
    common.write_outputs(args.out, "best_of_n", "Best-of-N against the KL bound: reward model and oracle",
                         table, results, fig)
    return results


if __name__ == "__main__":
    main(sys.argv[1:])
