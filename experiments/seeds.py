"""The whole quickstart for several seeds: the mean and standard deviation of every
method's oracle reward on the held-out prompts, and whether each method beats SFT
by more than the seed-to-seed spread.

python -m experiments.seeds --quickstart runs/quickstart --out experiments/results/seeds [--seeds 0 1 2]
Seed S runs the quickstart config with seed=S in every stage (the world stays the
same) into <runs>/seed_S (default runs/seeds/seed_S); a seed whose results.json
exists there is read, not rerun (delete it to re-evaluate). The quickstart's own
seed links the quickstart's stages instead of training them again.

Spread: the largest standard deviation (ddof=1) across seeds of any method's
oracle reward. A method beats SFT when its mean exceeds SFT's mean by more
than the spread.
"""
import copy
import json
import os
import sys

import numpy as np

from experiments import common
from ptx.stages import quickstart


def with_seed(config, seed: int):
    """A copy of the quickstart config with seed=S at the top and in every stage."""
    c = copy.deepcopy(config)
    c.seed = seed
    # Each stage too: a stage config need not refer to the top-level seed.
    for stage in quickstart.STAGES:
        c[stage].seed = seed
    c.eval.seed = seed + 1234  # as configs/quickstart.py:seed=S sets it
    return c


def summarize(per_seed: dict) -> dict:
    """per_seed: seed -> quickstart results.json. Returns methods (mean, std, values of oracle
    reward; difference to SFT; beats_sft), spread, the seeds, and per_task: method -> the
    mean, std and values over seeds of each task's oracle reward and accuracy
    ('reward/<kind>', 'accuracy/<kind>'), so that a reader sees where a gain comes from."""
    methods = list(dict.fromkeys(m for r in per_seed.values() for m in r["methods"]))
    runs = {m: [r["methods"][m] for r in per_seed.values()] for m in methods}
    stats = {m: common.over_seeds(runs[m], ["oracle_reward"])["oracle_reward"] for m in methods}
    spread = max(s["std"] for s in stats.values())
    sft = stats["sft"]["mean"]
    task_keys = {m: sorted(k for k in runs[m][0] if k.startswith(("reward/", "accuracy/"))
                           and all(k in r for r in runs[m])) for m in methods}
    return {"seeds": list(per_seed), "spread": spread,
            "methods": {m: dict(s, diff_to_sft=s["mean"] - sft, beats_sft=s["mean"] - sft > spread)
                        for m, s in stats.items()},
            "per_task": {m: common.over_seeds(runs[m], task_keys[m]) for m in methods}}


def task_table(results: dict, what: str) -> str:
    """Methods x tasks: `what` ('accuracy' or 'reward') per task, mean ± std over seeds."""
    kinds = sorted({k.split("/", 1)[1] for t in results["per_task"].values() for k in t if k.startswith(what + "/")})
    rows = [[m] + [common.pm(t[f"{what}/{kind}"]) if f"{what}/{kind}" in t else "" for kind in kinds]
            for m, t in results["per_task"].items()]
    return common.markdown_table(["method"] + kinds, rows)


def main(argv=None):
    args = common.parse_args("seeds", argv, seeds=(0, 1, 2), runs="seeds")
    qs = common.load_quickstart(args.quickstart, args.tiny)
    per_seed = {}
    for seed in args.seeds:
        workdir = os.path.join(args.runs, f"seed_{seed}")
        path = os.path.join(workdir, "results.json")
        if not os.path.exists(path):
            print(f"== quickstart, seed {seed}")
            config = with_seed(qs.config, seed)
            if config.to_json_best_effort() == qs.config.to_json_best_effort():
                common.link_stages(qs, workdir)
            quickstart.run(config, workdir)
        with open(path) as f:
            per_seed[seed] = json.load(f)
    results = summarize(per_seed)
    rows = [[m, common.pm(s), ", ".join(f"{v:.3f}" for v in s["values"]), f"{s['diff_to_sft']:+.3f}",
             "yes" if s["beats_sft"] else "no"] for m, s in results["methods"].items() if m != "sft"]
    sft = results["methods"]["sft"]
    rows.insert(0, ["sft", common.pm(sft), ", ".join(f"{v:.3f}" for v in sft["values"]), "", ""])
    table = common.markdown_table(["method", "oracle reward", "per seed", "minus SFT",
                                   f"beats SFT by > spread ({results['spread']:.3f})"], rows)
    table += ("\n\nAccuracy per task (mean ± std over seeds):\n\n" + task_table(results, "accuracy")
              + "\n\nOracle reward per task:\n\n" + task_table(results, "reward"))

    plt = common.pyplot()
    fig, ax = plt.subplots(figsize=(8, 3.8))
    names = list(results["methods"])
    x = np.arange(len(names))
    ax.bar(x, [results["methods"][m]["mean"] for m in names], yerr=[results["methods"][m]["std"] for m in names],
           capsize=3, color=["tab:green" if results["methods"][m]["beats_sft"] else "tab:blue" for m in names])
    for i, m in enumerate(names):
        ax.plot(np.full(len(results["methods"][m]["values"]), i), results["methods"][m]["values"], "k.", ms=4)
    ax.axhline(sft["mean"], color="gray", ls="--", lw=1, label="SFT")
    ax.axhline(sft["mean"] + results["spread"], color="gray", ls=":", lw=1, label="SFT + spread")
    ax.set_xticks(x, names, rotation=30)
    ax.set_ylabel("oracle reward (held-out)")
    ax.legend(fontsize=8)
    ax.set_title(f"Quickstart over seeds {', '.join(map(str, args.seeds))} (green: beats SFT by > spread)")
    common.write_outputs(args.out, "seeds", f"Every method over {len(args.seeds)} seeds", table, results, fig)
    return results


if __name__ == "__main__":
    main(sys.argv[1:])
