"""The embedded default, end to end: world -> tokenizer + pre-training -> SFT ->
reward model -> DPO, PPO, GRPO (from SFT) -> best-of-N -> evaluation, and the
RLAIF arm: the pre-trained model tuned on the web's review text is the judge
-> AI labels on pairs of SFT samples -> DPO (`rlaif`). The same pairs, labelled
by the world's simulated humans, join its offline comparisons as the reward
model's and DPO's data (`human_feedback`).

Each stage runs its own config (`config.<stage>`, all overridable) in
`<workdir>/<stage>`; a stage whose final checkpoint exists is not run again,
so an interrupted quickstart resumes. Evaluation writes results.json,
report.md and PNG plots into the workdir and prints the table.

After them, the methods of `config.methods` (each on unless its flag is off): every row of
`ptx.methods` with a quickstart kind, trained from SFT: on the human-feedback comparisons
(KTO, ORPO) or on the RL prompts against the reward model (online DPO, GSPO). They run last
and touch nothing the others read, so the rows above stay as they were.
"""
import json
import os

import jax
import numpy as np
from jax.experimental import multihost_utils

from ptx import checkpoint, evaluate, methods, rewards, sharding, world
from ptx.stages import ai_feedback, common, loops

# The methods beyond the recipe, each a stage and a row of its own, behind `config.methods.<name>`.
EXTRA_METHODS = tuple(m.name for m in methods.METHODS if m.quickstart)
METHODS = ("base", "sft", "best_of_4", "best_of_16", "dpo", "ppo", "grpo", "rlaif") + EXTRA_METHODS
STAGES = ("pretrain", "sft", "judge", "ai_feedback", "reward", "dpo", "ppo", "grpo", "rlaif") + EXTRA_METHODS


def stages_of(config) -> tuple:
    """The stages `config` runs: every stage of the recipe, and the extra methods switched on."""
    return tuple(s for s in STAGES if s not in EXTRA_METHODS or config.methods[s])


def _done(path: str, steps: int) -> bool:
    if steps is None:
        return os.path.exists(os.path.join(path, "stats.json"))
    try:
        return checkpoint.resolve(path)[1] >= steps
    except FileNotFoundError:
        return False


def human_feedback(w: world.World, workdir: str, files: dict, ai_dir: str, seed: int) -> dict:
    """The simulated human labellers on the AI-feedback stage's pairs of SFT samples
    (InstructGPT's labellers compared the policy's own outputs), beside the world's
    offline comparisons. Writes `<workdir>/human_feedback/`: preferences.jsonl (the
    labelled SFT-sample pairs) and train.jsonl (offline + those), the reward model's
    and DPO's training file. Returns the paths."""
    out = os.path.join(workdir, "human_feedback")
    paths = {"on_policy": os.path.join(out, "preferences.jsonl"), "train": os.path.join(out, "train.jsonl")}
    if not os.path.exists(paths["train"]) and jax.process_index() == 0:
        os.makedirs(out, exist_ok=True)
        pairs = [json.loads(line) for line in open(os.path.join(ai_dir, "preferences.jsonl"))]
        labelled = w.human_labels(pairs, seed)
        offline = [json.loads(line) for line in open(files["preference"])]
        common.write_jsonl(paths["on_policy"], labelled)
        common.write_jsonl(paths["train"] + ".tmp", offline + labelled)
        os.replace(paths["train"] + ".tmp", paths["train"])
    if jax.process_count() > 1:
        # The other processes read the files process 0 wrote.
        multihost_utils.sync_global_devices("ptx human_feedback")
    return paths


def run_stages(config, workdir: str, files: dict, train_files: dict | None = None) -> dict:
    """Train every stage in order; returns stage -> workdir. train_files: stage -> the data file
    it trains on instead of its usual one (an experiment's prompt subset, say)."""
    dirs = {name: os.path.join(workdir, name) for name in STAGES}
    w = common.make_world(config)
    human = os.path.join(workdir, "human_feedback", "train.jsonl")
    inputs = {"pretrain": (files["pretrain"], ""), "sft": (files["sft"], ""),
              "judge": (files["reviews"], ""),
              # ai_feedback reads the world's own prompts, so it can also grade its labels.
              "ai_feedback": ("", ""),
              "reward": (human, files["preference_heldout"]), "dpo": (human, files["preference_heldout"]),
              "ppo": (files["sft"], ""), "grpo": (files["sft"], ""),
              "rlaif": (os.path.join(dirs["ai_feedback"], "preferences.jsonl"), files["preference_heldout"])}
    parents = {"sft": "pretrain", "judge": "pretrain", "reward": "sft", "dpo": "sft", "ppo": "sft",
               "grpo": "sft", "rlaif": "sft"}
    # The extra methods learn from DPO's comparisons or sample the RL prompts, from SFT.
    extra = {"comparisons": (human, files["preference_heldout"]), "prompts": (files["sft"], "")}
    for m in methods.METHODS:
        if m.quickstart:
            inputs[m.name], parents[m.name] = extra[m.quickstart], "sft"
    inputs.update({name: (path, inputs[name][1]) for name, path in (train_files or {}).items()})
    for name in stages_of(config):
        c = config[name]
        c.world = config.world  # one world for every stage that reads it
        c.data.train, c.data.eval = inputs[name]
        if name in parents:
            c.init.checkpoint = dirs[parents[name]]
        method = methods.get(c.stage)
        if method is not None and method.reads_reward_source:
            c.reward.checkpoint = dirs["reward"]
        if name == "ai_feedback":
            # The judge learned from review text of the web (right `judge_accuracy` of the
            # time), never from an oracle label or a comparison of the human-style data.
            c.policy_checkpoint, c.judge_checkpoint = dirs["sft"], dirs["judge"]
        if not _done(dirs[name], None if name == "ai_feedback" else c.train.steps):
            print(f"== {name}")
            (ai_feedback.run if name == "ai_feedback" else loops.runner(c.stage))(c, dirs[name])
        if name == "ai_feedback":
            human_feedback(w, workdir, files, dirs[name], config.seed)
    return dirs


def evaluation_args(config, files: dict, sft_dir: str, mesh) -> dict:
    """The arguments of the quickstart's `evaluate.Evaluation`: its held-out prompts, SFT policy,
    oracle and sampling settings (the experiments grade with the same)."""
    e = config.eval
    return dict(sft_path=sft_dir, prompt_file=files["heldout"], oracle=common.make_world(config), mesh=mesh,
                template=common.template(config.sft), max_prompt_len=config.sft.data.max_prompt_len,
                batch_size=e.batch_size, max_new_tokens=e.max_new_tokens, temperature=e.temperature, seed=e.seed,
                engine=e.engine)


def evaluate_all(config, workdir: str, files: dict, dirs: dict) -> dict:
    mesh = sharding.make_mesh(common.typed(config, "mesh", sharding.MeshConfig))
    ev = evaluate.Evaluation(**evaluation_args(config, files, dirs["sft"], mesh))
    w = ev.oracle
    table = {}
    extra = [(name, name) for name in EXTRA_METHODS if config.methods[name]]
    for name, stage in [("base", "pretrain"), ("sft", "sft"), ("dpo", "dpo"), ("ppo", "ppo"), ("grpo", "grpo"),
                        ("rlaif", "rlaif")] + extra:
        print(f"== evaluate {name}")
        table[name] = ev.policy(ev.params(None if name == "sft" else dirs[stage]))
    print("== evaluate best-of-N")
    table.update(ev.best_of_n(rewards.ModelReward(dirs["reward"], mesh), config.eval.best_of_n))
    rm_metrics = [json.loads(line) for line in open(os.path.join(dirs["reward"], "metrics.jsonl"))]
    heldout_acc = [m["eval/accuracy"] for m in rm_metrics if "eval/accuracy" in m][-1]
    with open(os.path.join(dirs["ai_feedback"], "stats.json")) as f:
        aif = json.load(f)
    # On the same pairs of SFT samples as the AI labels (ties excluded by both).
    human = [json.loads(line) for line in open(os.path.join(workdir, "human_feedback", "preferences.jsonl"))]
    human_agree = [w.score(r["prompt"], r["chosen"]) > w.score(r["prompt"], r["rejected"]) for r in human]
    return {"methods": {k: table[k] for k in METHODS if k in table} | {
                k: v for k, v in table.items() if k not in METHODS},
            "reward_model": {"heldout_accuracy": heldout_acc},
            "ai_feedback": {k: aif.get(k) for k in ("agreement_with_oracle", "position_flip_rate", "n_pairs",
                                                    "n_dropped")} | {
                "human_label_agreement_with_oracle": float(np.mean(human_agree)) if human else None,
                "human_label_pairs": len(human)}}


def report(results: dict, workdir: str) -> str:
    cols = ["oracle_reward", "accuracy/arithmetic", "accuracy/reverse", "accuracy/facts",
            "correct_refusal_rate", "over_refusal_rate", "kl_to_sft", "mean_length"]
    lines = ["| method | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
    for name, m in results["methods"].items():
        lines.append(f"| {name} | " + " | ".join(f"{m.get(c, float('nan')):.3f}" for c in cols) + " |")
    table = "\n".join(lines)
    text = (f"# ptx quickstart\n\nHeld-out prompts, oracle-graded.\n\n{table}\n\n"
            f"Reward model held-out accuracy: {results['reward_model']['heldout_accuracy']:.3f}\n\n"
            "![oracle reward](oracle_reward.png)\n")
    with open(os.path.join(workdir, "report.md"), "w") as f:
        f.write(text)
    return table


def plot(results: dict, workdir: str):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(results["methods"])
    values = [results["methods"][n]["oracle_reward"] for n in names]
    fig, ax = plt.subplots(figsize=(7, 3.5))
    ax.bar(names, values, color="tab:blue")
    ax.axhline(results["methods"]["sft"]["oracle_reward"], color="gray", ls="--", lw=1, label="SFT")
    ax.set_ylabel("oracle reward (held-out)")
    ax.tick_params(axis="x", rotation=30)
    ax.legend()
    fig.tight_layout()
    fig.savefig(os.path.join(workdir, "oracle_reward.png"), dpi=120)
    plt.close(fig)


def run(config, workdir: str) -> dict:
    workdir = os.path.abspath(workdir)
    common.write_config(config, workdir)
    files = common.make_world(config).write(os.path.join(workdir, "world"))
    dirs = run_stages(config, workdir, files)
    results = evaluate_all(config, workdir, files, dirs)
    results["config"] = {"world_seed": config.world.seed}
    if jax.process_index():
        return results
    with open(os.path.join(workdir, "results.json"), "w") as f:
        json.dump(results, f, indent=2, default=lambda x: float(np.asarray(x)))
    table = report(results, workdir)
    plot(results, workdir)
    print(table)
    print(f"reward model held-out accuracy: {results['reward_model']['heldout_accuracy']:.3f}")
    aif = results["ai_feedback"]
    print(f"on pairs of SFT samples, AI labels agree with the oracle on {aif['agreement_with_oracle']}, "
          f"simulated human labels on {aif['human_label_agreement_with_oracle']} "
          f"(judge position flips {aif['position_flip_rate']})")
    print(f"wrote {workdir}/results.json, report.md, oracle_reward.png")
    return results
