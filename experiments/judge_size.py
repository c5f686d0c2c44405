"""RLAIF against the judge's budget of review text: judges tuned on the world's
review text for more or fewer steps (from the quickstart's pre-trained model)
label pairs of the quickstart SFT model's samples; their agreement with the oracle, their position-flip rate, and the
oracle reward of DPO from SFT on their labels, beside RLHF (DPO on the
human-style labels) and SFT.

python -m experiments.judge_size --quickstart runs/quickstart --out experiments/results/judge_size [--seeds 0 1 2]
A judge variant retrains the quickstart's chain judge (train.steps = budget)
-> ai_feedback -> rlaif in <runs>/steps<B>_seed<S>; the policy whose
samples are labelled and the DPO start stay the quickstart's SFT. RLHF is the
quickstart's `dpo` stage per seed (<runs>/rlhf_seed<S>).
"""
import json
import os
import sys

from experiments import common

BUDGETS = (20, 60, 150, 400)  # review-text tuning steps of the judge (the quickstart: 150)
CHAIN = ("judge", "ai_feedback", "rlaif")
LABEL_KEYS = ("agreement_with_oracle", "position_flip_rate", "n_pairs", "mean_prob_chosen")
KEYS = ("oracle_reward", "kl_to_sft", "rm_score")


def main(argv=None):
    args = common.parse_args("judge_size", argv, seeds=(0, 1, 2))
    qs = common.load_quickstart(args.quickstart, args.tiny)
    # Tiny: one new judge and the quickstart's own.
    budgets = (1, qs.config.judge.train.steps) if args.tiny else BUDGETS
    ev = common.Evaluator(qs)
    sft = ev()
    judges = {}
    for b in budgets:
        judges[b] = []
        for seed in args.seeds:
            print(f"== judge tuned {b} steps, seed {seed}")
            chain = {stage: {"seed": seed} for stage in CHAIN}
            chain["judge"]["train.steps"] = b
            workdir = common.train_variant(qs, os.path.join(args.runs, f"steps{b}_seed{seed}"), chain)
            with open(os.path.join(workdir, "ai_feedback", "stats.json")) as f:
                stats = json.load(f)
            # A share of no pairs is None in stats.json; NaN keeps the means honest.
            labels = {k: float("nan") if stats[k] is None else stats[k] for k in LABEL_KEYS}
            judges[b].append({**labels, **ev(os.path.join(workdir, "rlaif"))})
    rlhf = common.run_grid(qs, ev, args.runs, {"rlhf": {"dpo": {}}}, args.seeds, "dpo")["rlhf"]
    results = {"seeds": args.seeds, "quickstart_judge_steps": qs.config.judge.train.steps, "sft": sft,
               "human_label_agreement_with_oracle": qs.results["ai_feedback"]["human_label_agreement_with_oracle"],
               "rlhf": {**common.over_seeds(rlhf, KEYS), "runs": rlhf},
               "judges": {str(b): {"judge_steps": b, **common.over_seeds(runs, LABEL_KEYS + KEYS), "runs": runs}
                          for b, runs in judges.items()}}
    j, human = results["judges"], results["human_label_agreement_with_oracle"]
    rows = [["SFT", "-", "-", "-", f"{sft['oracle_reward']:.3f}", "0"],
            ["RLHF (human-style labels)", "-", "-" if human is None else f"{human:.3f}", "-",
             common.pm(results["rlhf"]["oracle_reward"]),
             common.pm(results["rlhf"]["kl_to_sft"])]]
    rows += [[f"RLAIF, judge tuned {r['judge_steps']} steps", f"{r['n_pairs']['mean']:.0f}",
              common.pm(r["agreement_with_oracle"]), common.pm(r["position_flip_rate"]),
              common.pm(r["oracle_reward"]), common.pm(r["kl_to_sft"])] for r in j.values()]
    table = common.markdown_table(["policy", "pairs", "label agreement with oracle", "position flips",
                                   "oracle reward", "KL to SFT"], rows)

    plt = common.pyplot()
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(10, 3.8))
    steps = [r["judge_steps"] for r in j.values()]
    for key, label, color in (("agreement_with_oracle", "agreement with oracle", "tab:blue"),
                              ("position_flip_rate", "position-flip rate", "tab:orange")):
        ax.errorbar(steps, [r[key]["mean"] for r in j.values()], yerr=[r[key]["std"] for r in j.values()],
                    marker="o", capsize=3, color=color, label=label)
    if human is not None:  # None: no human-labelled pair had unequal oracle scores
        ax.axhline(human, color="tab:green", ls="--", lw=1, label="human-style labels' agreement")
    ax.set_xlabel("judge tuning steps on review text")
    ax.set_ylabel("share of pairs")
    ax.legend(fontsize=8)
    ax.set_title("AI labels")
    bx.errorbar(steps, [r["oracle_reward"]["mean"] for r in j.values()],
                yerr=[r["oracle_reward"]["std"] for r in j.values()], marker="o", capsize=3, label="RLAIF (DPO)")
    m, s = results["rlhf"]["oracle_reward"]["mean"], results["rlhf"]["oracle_reward"]["std"]
    bx.axhline(m, color="tab:green", lw=1, label="RLHF (DPO)")
    bx.axhspan(m - s, m + s, color="tab:green", alpha=0.15)
    bx.axhline(sft["oracle_reward"], color="gray", ls="--", lw=1, label="SFT")
    bx.set_xlabel("judge tuning steps on review text")
    bx.set_ylabel("oracle reward (held-out)")
    bx.legend(fontsize=8)
    bx.set_title("policy trained on the labels")
    for a in (ax, bx):
        a.set_xscale("log")
        a.set_xticks(steps, [str(s) for s in steps])
        a.minorticks_off()
    title = common.over_seeds_title("RLAIF against the judge's review-text budget", args.seeds, "mean ± std")
    common.write_outputs(args.out, "judge_size", title, table, results, fig)
    return results


if __name__ == "__main__":
    main(sys.argv[1:])
