"""Online DPO from the quickstart SFT against its reward model: the quickstart's row over seeds,
and one field changed at a time to find what lowers its held-out accuracy (facts most).

python -m experiments.online_dpo --quickstart runs/quickstart --out experiments/results/online_dpo [--seeds 0 1 2]
Variants: the quickstart's online_dpo stage as configured, dpo.beta 1.0 (a tighter tie to the
reference), online.temperature 0.7 (fewer degenerate samples in each group). Each is trained in
<runs>/<variant>_seed<S> and graded like the quickstart's table: oracle reward, accuracy per task,
KL to SFT, the reward model's score.
"""
import sys

from experiments import common

VARIANTS = {"quickstart": {}, "beta1": {"dpo.beta": 1.0}, "temperature0.7": {"online.temperature": 0.7}}
TINY_VARIANTS = {"quickstart": {}}
KEYS = ("oracle_reward", "accuracy/arithmetic", "accuracy/reverse", "accuracy/facts", "kl_to_sft", "rm_score",
        "mean_length")


def main(argv=None):
    args = common.parse_args("online_dpo", argv)
    qs = common.load_quickstart(args.quickstart, args.tiny)
    variants = TINY_VARIANTS if args.tiny else VARIANTS
    ev = common.Evaluator(qs)
    sft = ev()
    runs = common.run_grid(qs, ev, args.runs, {name: {"online_dpo": v} for name, v in variants.items()},
                           args.seeds, "online_dpo")
    results = {"seeds": args.seeds, "sft": sft, "variants": {
        name: {"overrides": variants[name], **common.over_seeds(runs[name], KEYS), "runs": runs[name]}
        for name in variants}}
    header = ["run"] + list(KEYS)
    rows = [["sft"] + [f"{sft[k]:.3f}" for k in KEYS]]
    rows += [[name] + [common.pm(r[k]) for k in KEYS] for name, r in results["variants"].items()]
    table = common.markdown_table(header, rows)
    plt = common.pyplot()
    fig, ax = plt.subplots(figsize=(7, 3.5))
    names = list(results["variants"])
    for i, key in enumerate(("oracle_reward", "accuracy/facts")):
        ax.bar([j + 0.4 * i for j in range(len(names))], [results["variants"][n][key]["mean"] for n in names],
               width=0.4, yerr=[results["variants"][n][key]["std"] for n in names], capsize=3, label=key)
        ax.axhline(sft[key], color=f"C{i}", ls="--", lw=1)
    ax.set_xticks([j + 0.2 for j in range(len(names))], names)
    ax.legend(fontsize=8)
    ax.set_title("online DPO from SFT (dashed: SFT)")
    title = common.over_seeds_title("Online DPO: the quickstart row and one change at a time", args.seeds)
    common.write_outputs(args.out, "online_dpo", title, table, results, fig)
    return results


if __name__ == "__main__":
    main(sys.argv[1:])
