"""PPO from the quickstart SFT against the quickstart reward model for several KL
coefficients: oracle reward against KL to SFT (the reward / KL frontier), and the
reward model's own score beside it (where the two part, the policy exploits the RM).

python -m experiments.ppo_kl --quickstart runs/quickstart --out experiments/results/ppo_kl [--seeds 0 1 2]
Each coefficient is the quickstart's `ppo` stage with rl.kl_coef changed, trained in
<runs>/kl<C>_seed<S>; the quickstart's own coefficient reuses its PPO run.
"""
import sys

from experiments import common

KL_COEFS = (0.0, 0.03, 0.1, 0.3, 1.0)
KEYS = ("oracle_reward", "kl_to_sft", "rm_score", "mean_length")


def main(argv=None):
    args = common.parse_args("ppo_kl", argv)
    qs = common.load_quickstart(args.quickstart, args.tiny)
    # Tiny: one new run and the quickstart's own.
    coefs = (0.0, qs.config.ppo.rl.kl_coef) if args.tiny else KL_COEFS
    ev = common.Evaluator(qs)
    sft = ev()
    runs = common.run_grid(qs, ev, args.runs, {f"kl{c:g}": {"ppo": {"rl.kl_coef": c}} for c in coefs},
                           args.seeds, "ppo")
    results = {"seeds": args.seeds, "quickstart_kl_coef": qs.config.ppo.rl.kl_coef, "sft": sft, "variants": {
        f"kl{c:g}": {"kl_coef": c, **common.over_seeds(runs[f"kl{c:g}"], KEYS), "runs": runs[f"kl{c:g}"]}
        for c in coefs}}
    v = results["variants"]
    rows = [["sft", "-", f"{sft['oracle_reward']:.3f}", "0", f"{sft['rm_score']:.3f}", f"{sft['mean_length']:.1f}"]]
    rows += [[name, f"{r['kl_coef']:g}", common.pm(r["oracle_reward"]), common.pm(r["kl_to_sft"]),
              common.pm(r["rm_score"]), common.pm(r["mean_length"], 1)] for name, r in v.items()]
    table = common.markdown_table(["run", "rl.kl_coef", "oracle reward", "KL to SFT", "RM score", "mean length"],
                                  rows)

    plt = common.pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    for ax, key, label in ((axes[0], "oracle_reward", "oracle reward (held-out)"),
                           (axes[1], "rm_score", "reward-model score (held-out)")):
        points = [(0.0, sft[key], 0.0, 0.0, "SFT")] + [
            (r["kl_to_sft"]["mean"], r[key]["mean"], r["kl_to_sft"]["std"], r[key]["std"], f"{r['kl_coef']:g}")
            for r in v.values()]
        for x, y, xe, ye, name in points:
            ax.errorbar(x, y, xerr=xe, yerr=ye, marker="o", color="gray" if name == "SFT" else "tab:blue",
                        capsize=3)
            ax.annotate(name, (x, y), fontsize=8, xytext=(4, 4), textcoords="offset points")
        ax.set_xlabel("KL to SFT (nats, policy samples)")
        ax.set_ylabel(label)
    axes[0].set_title("PPO: oracle reward / KL frontier (labels: rl.kl_coef)")
    axes[1].set_title("PPO: what the reward model sees")
    title = common.over_seeds_title("PPO KL-coefficient sweep", args.seeds)
    common.write_outputs(args.out, "ppo_kl", title, table, results, fig)
    return results


if __name__ == "__main__":
    main(sys.argv[1:])
