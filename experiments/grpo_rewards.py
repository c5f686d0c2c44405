"""Critic-free RL from the quickstart SFT: the group baseline (GRPO against RLOO)
crossed with the reward (the quickstart's reward model against the world's oracle
as a verifiable reward), every policy judged by the oracle on held-out prompts.
The reward model's score of the RM-trained policies beside their oracle reward
shows reward hacking, if any.

python -m experiments.grpo_rewards --quickstart runs/quickstart --out experiments/results/grpo_rewards \
    [--seeds 0 1 2] [--steps 100] [--arms grpo_rm grpo_oracle]
Each arm is the quickstart's `grpo` stage with rl.advantage and / or reward.source
changed (RLOO keeps GRPO's KL-in-loss and aggregation, so only the baseline
differs), and --steps iterations (default the quickstart's), trained in
<runs>/<arm>[_<steps>]_seed<S>. Per task, the reward model's score next to the
oracle's accuracy shows where it is exploited: its score up, the accuracy flat or down.
"""
import sys

import numpy as np

from experiments import common
from ptx import world
from ptx.oracle import KINDS

ORACLE = {"reward.source": "function", "reward.function": "ptx.world:oracle_reward"}
ARMS = {"grpo_rm": {}, "grpo_oracle": ORACLE,
        "rloo_rm": {"rl.advantage": "rloo"}, "rloo_oracle": {"rl.advantage": "rloo", **ORACLE}}
TINY_ARMS = ("grpo_rm", "rloo_oracle")
KEYS = ("oracle_reward", "kl_to_sft", "rm_score", "mean_length", "correct_refusal_rate", "over_refusal_rate",
        *(f"accuracy/{kind}" for kind in KINDS), *(f"reward/{kind}" for kind in KINDS),
        *(f"rm_score/{kind}" for kind in KINDS))


def main(argv=None):
    args = common.parse_args("grpo_rewards", argv, seeds=(0, 1, 2), options={
        "--steps": dict(type=int, default=None, help="GRPO / RLOO iterations (default: the quickstart's)"),
        "--arms": dict(nargs="+", default=None, choices=sorted(ARMS), help="default: all (two with --tiny)")})
    qs = common.load_quickstart(args.quickstart, args.tiny)
    if qs.config.world.seed != world.WorldConfig().seed:
        # ptx.world:oracle_reward grades in the default world.
        raise ValueError(f"the quickstart's world.seed={qs.config.world.seed}, but the oracle reward "
                         f"is that of world seed {world.WorldConfig().seed}")
    ev = common.Evaluator(qs)
    sft = ev()
    chosen = args.arms or (TINY_ARMS if args.tiny else list(ARMS))
    steps = {"train.steps": args.steps} if args.steps else {}
    arms = {name + (f"_{args.steps}" if args.steps else ""): dict(ARMS[name], **steps) for name in chosen}
    runs = common.run_grid(qs, ev, args.runs, {name: {"grpo": o} for name, o in arms.items()}, args.seeds, "grpo")
    results = {"seeds": args.seeds, "steps": args.steps or qs.config.grpo.train.steps, "sft": sft, "variants": {
        name: {"overrides": o, **common.over_seeds(runs[name], KEYS), "runs": runs[name]} for name, o in arms.items()}}
    v = results["variants"]
    rows = [["sft", f"{sft['oracle_reward']:.3f}", f"{sft['rm_score']:.3f}", "0",
             f"{sft['correct_refusal_rate']:.3f}", f"{sft['over_refusal_rate']:.3f}"]]
    rows += [[name, common.pm(r["oracle_reward"]), common.pm(r["rm_score"]), common.pm(r["kl_to_sft"]),
              common.pm(r["correct_refusal_rate"]), common.pm(r["over_refusal_rate"])] for name, r in v.items()]
    table = common.markdown_table(["arm", "oracle reward", "RM score", "KL to SFT", "correct refusals",
                                   "over-refusals"], rows)
    # Where the reward model is exploited: its score up while the oracle's accuracy of a task
    # stays flat or falls.
    tasks = [["sft"] + [f"{sft[f'rm_score/{k}']:.3f} / {sft[f'accuracy/{k}']:.3f}" for k in KINDS]]
    tasks += [[name] + [f"{common.pm(r[f'rm_score/{k}'])} / {common.pm(r[f'accuracy/{k}'])}" for k in KINDS]
              for name, r in v.items()]
    table += ("\n\nPer task, the reward model's score / the oracle's accuracy:\n\n"
              + common.markdown_table(["arm", *KINDS], tasks))

    plt = common.pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    x = np.arange(len(v))
    for ax, key, label in ((axes[0], "oracle_reward", "oracle reward (held-out)"),
                           (axes[1], "rm_score", "reward-model score (held-out)")):
        ax.bar(x, [r[key]["mean"] for r in v.values()], yerr=[r[key]["std"] for r in v.values()], capsize=3,
               color=["tab:blue" if n.endswith("_rm") else "tab:green" for n in v])
        for i, r in enumerate(v.values()):
            ax.plot(np.full(len(r[key]["values"]), i), r[key]["values"], "k.", ms=4)
        ax.axhline(sft[key], color="gray", ls="--", lw=1, label="SFT")
        ax.set_xticks(x, list(v), rotation=20)
        ax.set_ylabel(label)
        ax.legend(fontsize=8)
    axes[0].set_title("judged by the oracle (blue: RM reward, green: oracle reward)")
    axes[1].set_title("judged by the reward model")
    title = common.over_seeds_title("GRPO / RLOO with a learned or a verifiable reward", args.seeds, "mean ± std")
    common.write_outputs(args.out, "grpo_rewards", title, table, results, fig)
    return results


if __name__ == "__main__":
    main(sys.argv[1:])
