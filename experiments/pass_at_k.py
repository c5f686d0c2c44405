"""pass@k per task of the quickstart SFT policy and of GRPO trained on the world's oracle as a
verifiable reward: does RL raise pass@1 toward SFT's pass@k, and does it shrink pass@k at
large k (Yue et al. 2025, "Does reinforcement learning really incentivize reasoning
capacity in LLMs beyond the base model?")?

python -m experiments.pass_at_k --quickstart runs/quickstart --out experiments/results/pass_at_k \
    [--seeds 0 1 2] [--n 256] [--steps 200] [--tasks arithmetic] [--set rl.group_size=16 ...]
Each policy draws n samples per held-out prompt (the evaluation's temperature 1); pass@k
for k = 1, 2, 4, ..., n is Chen et al.'s unbiased estimate from those n, averaged over the
prompts of each task. GRPO is the quickstart's `grpo` stage with reward.source=function
(ptx.world:oracle_reward) trained for --steps iterations with the --set overrides, on the SFT
prompts of the --tasks kinds (default all), one run per seed, in
<runs>/grpo_oracle[_<tasks>][_<overrides>]_seed<S>.
"""
import json
import os
import sys

import numpy as np

from experiments import common
from ptx import evaluate, world

ORACLE = {"reward.source": "function", "reward.function": "ptx.world:oracle_reward"}


def ks_up_to(n: int) -> list[int]:
    """1, 2, 4, ... up to n, and n itself."""
    return sorted({2 ** i for i in range(int(np.log2(n)) + 1)} | {n})


def task_prompts(qs: common.Quickstart, oracle, kinds: list[str], out: str) -> str:
    """Writes the quickstart's SFT prompts of `kinds` (an RL stage's usual prompts, one kind's
    subset) to `out`; returns it. ValueError for a kind the world does not have."""
    unknown = set(kinds) - set(world.KINDS)
    if unknown:
        raise ValueError(f"--tasks {sorted(unknown)}: the world's tasks are {list(world.KINDS)}")
    with open(qs.files["sft"]) as f:
        rows = [json.loads(line) for line in f]
    os.makedirs(os.path.dirname(out), exist_ok=True)
    with open(out, "w") as f:
        f.writelines(json.dumps({"prompt": r["prompt"]}) + "\n" for r in rows if oracle.kind_of(r["prompt"]) in kinds)
    return out


def correct_counts(ev: common.Evaluator, params, n: int, seed: int) -> np.ndarray:
    """[prompts] int: how many of n samples per held-out prompt the oracle grades correct."""
    tokens = np.repeat(ev.arrays["prompt_tokens"], n, axis=0)
    lens = np.repeat(ev.arrays["prompt_lens"], n, axis=0)
    texts = ev.sampler.texts(ev.sampler(tokens, lens, seed, params=params, **ev.settings))
    correct = [ev.oracle.grade(ev.prompts[i // n], t)["correct"] for i, t in enumerate(texts)]
    return np.asarray(correct).reshape(len(ev.prompts), n).sum(axis=1)


def curves(counts: np.ndarray, kinds: list[str], n: int) -> dict:
    """{task: {k: mean pass@k over the task's prompts}} for k in ks_up_to(n)."""
    out = {}
    for kind in sorted(set(kinds)):
        sel = [c for c, kd in zip(counts, kinds) if kd == kind]
        out[kind] = {k: float(np.mean([evaluate.pass_at_k(n, int(c), k) for c in sel])) for k in ks_up_to(n)}
    return out


def main(argv=None):
    args = common.parse_args("pass_at_k", argv, seeds=(0, 1, 2), options={
        "--n": dict(type=int, default=None, help="samples per prompt (default 256; 4 with --tiny)"),
        "--steps": dict(type=int, default=None, help="GRPO iterations (default 200; the quickstart's with --tiny)"),
        "--tasks": dict(nargs="+", default=None, metavar="KIND",
                        help="GRPO samples only the SFT prompts of these kinds (default all)"),
        "--set": dict(action="append", default=[], metavar="FIELD=VALUE",
                      help="a further override of the grpo stage, e.g. rl.group_size=16 (JSON values)")})
    n = args.n or (4 if args.tiny else 256)
    qs = common.load_quickstart(args.quickstart, args.tiny)
    if qs.config.world.seed != world.WorldConfig().seed:
        raise ValueError(f"the quickstart's world.seed={qs.config.world.seed}, but the oracle reward "
                         f"is that of world seed {world.WorldConfig().seed}")
    steps = args.steps or (qs.config.grpo.train.steps if args.tiny else 200)
    ev = common.Evaluator(qs)
    kinds = ev.kinds
    name = "grpo_oracle" + "".join(f"_{a}" for a in (args.tasks or []) + args.set)
    train_files = {"grpo": task_prompts(qs, ev.oracle, args.tasks, f"{args.runs}/{name}_prompts.jsonl")
                   } if args.tasks else {}
    print(f"== SFT, {n} samples per prompt")
    counts = {"sft": correct_counts(ev, ev.params(), n, ev.seed).tolist(), "grpo": []}
    sft = curves(np.asarray(counts["sft"]), kinds, n)
    overrides = dict(ORACLE, **{"train.steps": steps},
                     **{k: json.loads(v) for k, v in (a.split("=", 1) for a in args.set)})
    grpo = []
    for seed in args.seeds:
        workdir = common.train_variant(qs, f"{args.runs}/{name}_seed{seed}", {"grpo": dict(overrides, seed=seed)},
                                       train_files)
        print(f"== GRPO (oracle reward), seed {seed}, {n} samples per prompt")
        counts["grpo"].append(correct_counts(ev, ev.params(f"{workdir}/grpo"), n, ev.seed).tolist())
        grpo.append(curves(np.asarray(counts["grpo"][-1]), kinds, n))
    ks = ks_up_to(n)
    results = {"n_samples": n, "grpo_steps": steps, "grpo_overrides": overrides,
               "grpo_tasks": args.tasks or list(world.KINDS), "seeds": args.seeds, "ks": ks, "kinds": kinds,
               "counts": counts, "sft": sft,
               "grpo": {kind: {str(k): common.over_seeds([{"v": g[kind][k]} for g in grpo], ["v"])["v"] for k in ks}
                        for kind in sft}}
    shown = [k for k in (1, 16, n) if k in ks]
    rows = []
    for kind in sft:
        g = results["grpo"][kind]
        spread = g[str(1)]["std"]
        rows.append([kind] + [f"{sft[kind][k]:.3f} / {common.pm(g[str(k)])}" for k in shown]
                    + [f"{(g['1']['mean'] - sft[kind][1]) / spread:.1f}" if spread > 1e-9 else "no spread"])
    table = common.markdown_table(["task"] + [f"pass@{k}: SFT / GRPO" for k in shown]
                                  + ["pass@1 gain / GRPO spread"], rows)

    plt = common.pyplot()
    fig, axes = plt.subplots(1, len(sft), figsize=(3.2 * len(sft), 3.2), sharey=True)
    for ax, kind in zip(np.atleast_1d(axes), sft):
        mean = np.array([results["grpo"][kind][str(k)]["mean"] for k in ks])
        std = np.array([results["grpo"][kind][str(k)]["std"] for k in ks])
        ax.plot(ks, [sft[kind][k] for k in ks], "o-", color="gray", ms=3, label="SFT")
        ax.plot(ks, mean, "o-", color="tab:green", ms=3, label="GRPO (oracle)")
        ax.fill_between(ks, mean - std, mean + std, color="tab:green", alpha=0.2)
        ax.set_xscale("log", base=2)
        ax.set_title(kind)
        ax.set_xlabel("k")
    np.atleast_1d(axes)[0].set_ylabel("pass@k (held-out)")
    np.atleast_1d(axes)[0].legend(fontsize=8)
    on = f" on {', '.join(args.tasks)}" if args.tasks else ""
    title = common.over_seeds_title(f"pass@k per task, {n} samples per prompt, GRPO {steps} iterations{on}",
                                    args.seeds, "GRPO mean ± std")
    common.write_outputs(args.out, "pass_at_k", title, table, results, fig)
    return results


if __name__ == "__main__":
    main(sys.argv[1:])
