"""Best-of-N with the quickstart reward model, N = 1 .. 64, from one set of 64 SFT
samples per held-out prompt (best-of-n picks among the first n): the reward
model's score of the pick and the oracle reward of the same pick, against the
analytic KL bound log N - (N - 1) / N. Over-optimisation shows as the oracle
falling while the RM score still rises; the oracle's own best-of-N (the best
candidate by the oracle) is the ceiling the samples allow. No training.
Seed S draws its samples with the evaluation seed + S (seed 0: the quickstart's
evaluation samples); tables give mean ± std over seeds.

python -m experiments.best_of_n --quickstart runs/quickstart --out experiments/results/best_of_n --seeds 0 1 2
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
    os.makedirs(args.runs, exist_ok=True)
    per_seed, all_rm, all_oracle = [], [], []
    with open(os.path.join(args.runs, "candidates.jsonl"), "w") as f:
        for seed in args.seeds:
            texts, scores = best_of_n.sample_and_score(
                ev.sampler, ev.rm, ev.arrays["prompt_tokens"], ev.arrays["prompt_lens"], max(ns), ev.seed + seed,
                ev.settings, ev.prompts)
            oracle = np.array([[ev.oracle.score(p, t) for t in row] for p, row in zip(ev.prompts, texts)])
            for i, prompt in enumerate(ev.prompts):
                for j, text in enumerate(texts[i]):
                    f.write(json.dumps({"seed": seed, "prompt": prompt, "candidate": j, "completion": text,
                                        "rm_score": float(scores[i, j]), "oracle_reward": oracle[i, j]}) + "\n")
            rows = {}
            for n, r in best_of_n.select(scores, ns).items():
                chosen = [texts[i][j] for i, j in enumerate(r["best_index"])]
                out = evaluate.summarize([ev.oracle.grade(p, t) for p, t in zip(ev.prompts, chosen)],
                                         [len(tok.encode(t)) for t in chosen])
                out.update(rm_score=r["best"], kl_bound=best_of_n.kl_bound(n),
                           oracle_ceiling=float(oracle[:, :n].max(1).mean()))
                rows[str(n)] = out
            per_seed.append(rows)
            all_rm.append(scores.mean())
            all_oracle.append(oracle.mean())
    # Every field is the mean over seeds; the two the figure plots also keep their spread.
    rows, table_rows = {}, []
    for n in ns:
        runs = [r[str(n)] for r in per_seed]
        row = {k: float(np.mean([r[k] for r in runs])) for k in runs[0]}
        row["over_seeds"] = common.over_seeds(runs, ("oracle_reward", "rm_score"))
        rows[str(n)] = row
        stat = row["over_seeds"]
        table_rows.append([n, f"{row['kl_bound']:.3f}", common.pm(stat["rm_score"]), common.pm(stat["oracle_reward"]),
                           f"{row['oracle_ceiling']:.3f}", f"{row['correct_refusal_rate']:.3f}",
                           f"{row['over_refusal_rate']:.3f}", f"{row['mean_length']:.1f}"])
    results = {"n_prompts": len(ev.prompts), "samples_per_prompt": max(ns), "seed": ev.seed, "seeds": args.seeds,
               "all_samples": {"rm_score": float(np.mean(all_rm)), "oracle_reward": float(np.mean(all_oracle))},
               "best_of": rows}
    table = common.markdown_table(["N", "KL bound", "RM score (pick)", "oracle reward (pick)",
                                   "oracle best-of-N (ceiling)", "correct refusals", "over-refusals",
                                   "mean length"], table_rows)

    plt = common.pyplot()
    fig, ax = plt.subplots(figsize=(7, 4))
    kl = [r["kl_bound"] for r in rows.values()]
    spread = lambda key: [r["over_seeds"][key]["std"] for r in rows.values()]
    ax.errorbar(kl, [r["oracle_reward"] for r in rows.values()], yerr=spread("oracle_reward"), fmt="o-",
                color="tab:blue", capsize=3, label="oracle reward of RM pick")
    ax.plot(kl, [r["oracle_ceiling"] for r in rows.values()], "o:", color="tab:blue", alpha=0.5,
            label="oracle's own best-of-N")
    ax.set_xlabel("KL bound log N - (N-1)/N (nats)")
    ax.set_ylabel("oracle reward (held-out)", color="tab:blue")
    for n, x, y in zip(ns, kl, [r["oracle_reward"] for r in rows.values()]):
        ax.annotate(f"N={n}", (x, y), fontsize=7, xytext=(2, -10), textcoords="offset points")
    rx = ax.twinx()
    rx.errorbar(kl, [r["rm_score"] for r in rows.values()], yerr=spread("rm_score"), fmt="s-", color="tab:red",
                capsize=3, label="RM score of pick")
    rx.set_ylabel("reward-model score", color="tab:red")
    fig.legend(loc="upper center", ncol=3, fontsize=8, bbox_to_anchor=(0.5, 0.93))
    ax.set_title(common.over_seeds_title(f"Best-of-N from SFT, {len(ev.prompts)} held-out prompts", args.seeds),
                 pad=28)
    common.write_outputs(args.out, "best_of_n", common.over_seeds_title(
        "Best-of-N against the KL bound: reward model and oracle", args.seeds, "mean ± std"), table, results, fig)
    return results


if __name__ == "__main__":
    main(sys.argv[1:])
