"""DPO from the quickstart SFT: beta sweep (sigmoid loss), and sigmoid / IPO / hinge
losses at the quickstart's beta; oracle reward, KL to SFT and reward-model score
on the held-out prompts.

python -m experiments.dpo_sweep --quickstart runs/quickstart --out experiments/results/dpo_sweep [--seeds 0 1 2]
Each variant is the quickstart's `dpo` stage with one field changed, trained in
<runs>/<variant>_seed<S>; the one equal to the quickstart's DPO is reused.
"""
import sys

import numpy as np

from experiments import common

BETAS = (0.03, 0.1, 0.3, 1.0)
LOSS_TYPES = ("sigmoid", "ipo", "hinge")
TINY_BETAS = ()  # the loss types' runs at the quickstart's beta still give its sigmoid point
TINY_LOSS_TYPES = ("sigmoid", "ipo")
KEYS = ("oracle_reward", "kl_to_sft", "rm_score", "mean_length")


def variants(beta0: float, betas, loss_types) -> dict:
    """name -> (loss_type, beta): the sigmoid beta sweep, then each loss at beta0 (shared points once)."""
    points = [("sigmoid", b) for b in betas] + [(lt, beta0) for lt in loss_types]
    return {f"{lt}_beta{b:g}": (lt, b) for lt, b in dict.fromkeys(points)}


def main(argv=None):
    args = common.parse_args("dpo_sweep", argv)
    qs = common.load_quickstart(args.quickstart, args.tiny)
    beta0 = qs.config.dpo.dpo.beta
    grid = variants(beta0, TINY_BETAS if args.tiny else BETAS, TINY_LOSS_TYPES if args.tiny else LOSS_TYPES)
    ev = common.Evaluator(qs)
    sft = ev()
    runs = common.run_grid(qs, ev, args.runs, {name: {"dpo": {"dpo.loss_type": lt, "dpo.beta": b}}
                                               for name, (lt, b) in grid.items()}, args.seeds, "dpo")
    results = {"seeds": args.seeds, "quickstart_beta": beta0, "sft": sft, "variants": {
        name: {"loss_type": lt, "beta": b, **common.over_seeds(runs[name], KEYS), "runs": runs[name]}
        for name, (lt, b) in grid.items()}}
    v = results["variants"]
    rows = [["sft", "-", "-", f"{sft['oracle_reward']:.3f}", "0", f"{sft['rm_score']:.3f}",
             f"{sft['mean_length']:.1f}"]]
    rows += [[name, r["loss_type"], f"{r['beta']:g}", common.pm(r["oracle_reward"]), common.pm(r["kl_to_sft"]),
              common.pm(r["rm_score"]), common.pm(r["mean_length"], 1)] for name, r in v.items()]
    table = common.markdown_table(["run", "loss", "beta", "oracle reward", "KL to SFT", "RM score",
                                   "mean length"], rows)

    plt = common.pyplot()
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(10, 3.8))
    sweep = sorted((r["beta"], r) for r in v.values() if r["loss_type"] == "sigmoid")
    betas = [b for b, _ in sweep]
    ax.errorbar(betas, [r["oracle_reward"]["mean"] for _, r in sweep],
                yerr=[r["oracle_reward"]["std"] for _, r in sweep], marker="o", color="tab:blue", capsize=3,
                label="oracle reward")
    ax.axhline(sft["oracle_reward"], color="gray", ls="--", lw=1, label="SFT")
    ax.set_xscale("log")
    ax.set_xticks(betas, [f"{b:g}" for b in betas])
    ax.minorticks_off()
    ax.set_xlabel("beta (sigmoid loss)")
    ax.set_ylabel("oracle reward (held-out)")
    kx = ax.twinx()
    kx.errorbar(betas, [r["kl_to_sft"]["mean"] for _, r in sweep], yerr=[r["kl_to_sft"]["std"] for _, r in sweep],
                marker="s", color="tab:red", capsize=3, label="KL to SFT")
    kx.set_ylabel("KL to SFT (nats)", color="tab:red")
    ax.legend(loc="lower left", fontsize=8)
    ax.set_title("DPO beta sweep")
    losses = [(name, r) for name, r in v.items() if r["beta"] == beta0]
    x = np.arange(len(losses))
    bx.bar(x, [r["oracle_reward"]["mean"] for _, r in losses], yerr=[r["oracle_reward"]["std"] for _, r in losses],
           color="tab:blue", capsize=3)
    for i, (_, r) in enumerate(losses):
        bx.annotate(f"KL {r['kl_to_sft']['mean']:.2f}", (i, r["oracle_reward"]["mean"]), ha="center",
                    va="bottom", fontsize=8, xytext=(0, 4), textcoords="offset points")
    bx.axhline(sft["oracle_reward"], color="gray", ls="--", lw=1)
    bx.set_xticks(x, [r["loss_type"] for _, r in losses])
    bx.set_ylabel("oracle reward (held-out)")
    bx.set_title(f"DPO loss at beta={beta0:g}")
    title = common.over_seeds_title("DPO: beta sweep and loss types", args.seeds)
    common.write_outputs(args.out, "dpo_sweep", title, table, results, fig)
    return results


if __name__ == "__main__":
    main(sys.argv[1:])
