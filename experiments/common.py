"""What the experiment scripts share: the finished quickstart workdir they
reuse, stage variants trained beside it, oracle evaluation on its held-out
prompts, and the table / JSON / PNG each script writes.

A variant is a workdir whose stage directories are symlinks to the
quickstart's, except for the stages it changes: `quickstart.run_stages` skips
the linked (finished) stages and trains only the changed ones, wired to the
quickstart's world files and checkpoints exactly as the quickstart wires them.
"""
import argparse
import copy
import dataclasses
import json
import os

import ml_collections
import numpy as np

from configs import quickstart as quickstart_config
from ptx import evaluate, rewards, sharding
from ptx.stages import quickstart


def parse_args(name: str, argv, seeds=(0,), runs: str = None, options: dict = None) -> argparse.Namespace:
    """The flags every script takes. seeds: the script's default list; runs: where its
    workdirs go by default, relative to the quickstart's parent (default experiments/NAME);
    options: the script's own flags, {'--flag': argparse keyword arguments}."""
    p = argparse.ArgumentParser(prog=f"python -m experiments.{name}")
    p.add_argument("--quickstart", default="runs/quickstart", help="a finished quickstart workdir")
    p.add_argument("--out", default=f"experiments/results/{name}", help="table.md, results.json and the PNG")
    runs = runs or os.path.join("experiments", name)
    p.add_argument("--runs", default=None, help=f"workdirs of the trained variants (default: <quickstart>/../{runs})")
    p.add_argument("--seeds", type=int, nargs="+", default=list(seeds))
    p.add_argument("--tiny", action="store_true", help="the quickstart's :tiny config and minimal grids")
    for flag, kwargs in (options or {}).items():
        p.add_argument(flag, **kwargs)
    args = p.parse_args(argv)
    args.quickstart = os.path.abspath(args.quickstart)
    args.runs = os.path.abspath(args.runs or os.path.join(os.path.dirname(args.quickstart), runs))
    # Orbax logs every checkpoint at INFO; a script's own output is its table.
    from absl import logging

    logging.set_verbosity(logging.WARNING)
    return args


@dataclasses.dataclass
class Quickstart:
    """A finished quickstart workdir: `config` is what its stages ran with, `files` its world
    data sets, `results` its results.json."""

    path: str
    config: ml_collections.ConfigDict
    files: dict  # world data set name (pretrain, sft, preference, heldout, ...) -> path
    results: dict

    def stage(self, name: str) -> str:
        return os.path.join(self.path, name)


def _overlay(dst: ml_collections.ConfigDict, src: dict):
    """Set dst's fields from a config.json dict; keys dst lacks (fields removed since) are skipped."""
    for key, value in src.items():
        if key not in dst:
            continue
        if isinstance(dst[key], ml_collections.ConfigDict):
            _overlay(dst[key], value)
        else:
            dst[key] = value  # a JSON list becomes a tuple again where the field is one


def load_quickstart(path: str, tiny: bool) -> Quickstart:
    """configs/quickstart.py (`:tiny` when tiny) overlaid with the workdir's config.json, then each
    stage's own config.json: should the quickstart config have changed since a stage ran, the
    variants still start from what that stage actually ran with."""
    path = os.path.abspath(path)
    if not os.path.exists(os.path.join(path, "results.json")):
        raise FileNotFoundError(f"{path} is not a finished quickstart (no results.json); "
                                f"run ./launch.sh quickstart first")
    with open(os.path.join(path, "results.json")) as f:
        results = json.load(f)
    config = quickstart_config.get_config("tiny" if tiny else None)
    with open(os.path.join(path, "config.json")) as f:
        _overlay(config, json.load(f))
    for stage in quickstart.STAGES:
        own = os.path.join(path, stage, "config.json")
        if os.path.exists(own):
            with open(own) as f:
                _overlay(config[stage], json.load(f))
    world_dir = os.path.join(path, "world")
    files = {os.path.splitext(f)[0]: os.path.join(world_dir, f) for f in sorted(os.listdir(world_dir))
             if f.endswith(".jsonl")}
    return Quickstart(path, config, files, results)


def link_stages(qs: Quickstart, workdir: str, trained=()):
    """Symlink `<workdir>/<stage>` to the quickstart's for every stage not in `trained`
    (a path already there stays); unlink a stage of `trained` that an earlier call linked."""
    os.makedirs(workdir, exist_ok=True)
    for stage in quickstart.stages_of(qs.config):
        link = os.path.join(workdir, stage)
        if stage in trained:
            if os.path.islink(link):
                os.unlink(link)
        elif not os.path.lexists(link):
            if not os.path.isdir(qs.stage(stage)):
                raise FileNotFoundError(f"the quickstart {qs.path} has no {stage!r} stage; rerun it")
            os.symlink(qs.stage(stage), link)


def train_variant(qs: Quickstart, workdir: str, chain: dict, train_files: dict | None = None) -> str:
    """Train the quickstart with some stages changed, in `workdir`; returns workdir.

    chain: stage -> {dotted field: value} overrides of config.<stage>, e.g.
    {'dpo': {'dpo.beta': 1.0, 'seed': 1}}. The chain's stages are taken in
    pipeline order and each depends on the ones before it (as pretrain ->
    ai_feedback -> rlaif do): up to the first stage whose overrides change
    something, stages are the quickstart's own runs; from it on, every stage
    of the chain trains in workdir. Stages outside the chain are the
    quickstart's. train_files: stage -> the data file it trains on instead of
    the quickstart's (`quickstart.run_stages`); such a stage counts as changed.
    `<workdir>/<stage>` holds each stage either way, a quickstart one as a
    symlink. A finished variant is not trained again.
    """
    train_files = train_files or {}
    unknown = (set(chain) | set(train_files)) - set(quickstart.STAGES)
    if unknown:
        raise ValueError(f"no quickstart stage {sorted(unknown)}; stages: {quickstart.STAGES}")
    config = copy.deepcopy(qs.config)
    trained = set()
    for stage in [s for s in quickstart.STAGES if s in chain or s in train_files]:
        before = config[stage].to_json_best_effort()
        config[stage].update_from_flattened_dict(chain.get(stage, {}))
        if trained or stage in train_files or config[stage].to_json_best_effort() != before:
            trained.add(stage)
    link_stages(qs, workdir, trained)
    quickstart.run_stages(config, workdir, qs.files, train_files)
    return workdir


def run_grid(qs: Quickstart, evaluator, runs_dir: str, variants: dict, seeds, stage: str) -> dict:
    """Train every variant for every seed and evaluate its `stage`.

    variants: name -> chain (see train_variant); each stage of a chain also
    gets seed=S, in the workdir `<runs_dir>/<name>_seed<S>`. Returns name ->
    [Evaluator result, one per seed].
    """
    out = {}
    for name, chain in variants.items():
        out[name] = []
        for seed in seeds:
            print(f"== {name}, seed {seed}")
            chain_s = {s: dict(overrides, seed=seed) for s, overrides in chain.items()}
            workdir = train_variant(qs, os.path.join(runs_dir, f"{name}_seed{seed}"), chain_s)
            out[name].append(evaluator(os.path.join(workdir, stage)))
    return out


class Evaluator(evaluate.Evaluation):
    """The quickstart's evaluation (`quickstart.evaluation`: held-out prompts, SFT policy, oracle)
    with its reward model; `__call__` grades a policy like every method of the quickstart table.
    kinds: the task of each held-out prompt."""

    def __init__(self, qs: Quickstart):
        mesh = sharding.make_mesh(sharding.MeshConfig(**qs.config.mesh))
        super().__init__(**quickstart.evaluation_args(qs.config, qs.files, qs.stage("sft"), mesh))
        self.rm = rewards.ModelReward(qs.stage("reward"), mesh)
        self.kinds = [self.oracle.kind_of(p) for p in self.prompts]

    def __call__(self, stage_dir: str = None) -> dict:
        """`Evaluation.policy` of the policy in stage_dir (None: SFT) on one sample per held-out
        prompt, plus 'rm_score': the reward model's mean score of those very samples, and
        'rm_score/<kind>' per task."""
        chunks = []
        out = self.policy(self.params(stage_dir), chunks_out=chunks)
        # A reward model reads the token batch `seq`, not the texts.
        scores = np.concatenate([self.rm(c["seq"], None, None)[:c["rows"]] for c in chunks])
        out["rm_score"] = float(scores.mean())
        kinds = np.asarray(self.kinds)
        out.update({f"rm_score/{kind}": float(scores[kinds == kind].mean()) for kind in sorted(set(self.kinds))})
        return out


def mean_std(values) -> tuple[float, float]:
    """Mean and sample standard deviation (ddof=1; 0 for a single value) of floats."""
    v = np.asarray(values, np.float64)
    return float(v.mean()), float(v.std(ddof=1)) if len(v) > 1 else 0.0


def over_seeds(runs: list[dict], keys) -> dict:
    """runs: one result dict per seed -> {key: {'mean', 'std', 'values'}} for each key."""
    out = {}
    for key in keys:
        values = [r[key] for r in runs]
        m, s = mean_std(values)
        out[key] = {"mean": m, "std": s, "values": values}
    return out


def pm(stat: dict, digits: int = 3) -> str:
    """{'mean', 'std', 'values'} -> '0.412 ± 0.013' ('0.412' from one seed)."""
    if len(stat["values"]) == 1:
        return f"{stat['mean']:.{digits}f}"
    return f"{stat['mean']:.{digits}f} ± {stat['std']:.{digits}f}"


def markdown_table(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|---" * len(header) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def over_seeds_title(what: str, seeds, detail: str = "") -> str:
    """'what (3 seeds, mean ± std)': the figure title with its seed count."""
    n = len(seeds)
    return f"{what} ({n} seed{'s' * (n > 1)}{', ' + detail if detail else ''})"


def write_outputs(out: str, name: str, title: str, table: str, results: dict, fig):
    """<out>/table.md (title, table, figure link), results.json and <name>.png."""
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "table.md"), "w") as f:
        f.write(f"# {title}\n\n{table}\n\n![{name}]({name}.png)\n")
    with open(os.path.join(out, "results.json"), "w") as f:
        json.dump(results, f, indent=2, default=lambda x: float(np.asarray(x)))
    fig.tight_layout()
    fig.savefig(os.path.join(out, f"{name}.png"), dpi=120)
    pyplot().close(fig)
    print(f"{table}\nwrote {out}/table.md, results.json, {name}.png")
