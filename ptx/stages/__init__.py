"""The entry points: one module per stage family, each `run(config, workdir)` reads a
config, builds the library's pieces, runs its loop and writes its workdir.

Imports run one way: `ptx.stages` -> the library (`ptx/*.py`), never back, and
the library never imports `configs`. A new stage is a module here with its
`run`, an entry in `RUNNERS` and a file in `configs/`; a new loss is a pure
function in `ptx/losses.py` with its step in `ptx/steps.py` (see README, Design).
"""
from ptx.stages import (ai_feedback, best_of_n, export, online_dpo, quickstart, rl, sample, scaffold, supervised,
                        validate)

# config.stage -> the function that runs it. Every stage runs in one process or in
# several (`distributed.*`): each process holds every host row and places on the mesh
# only the rows its own devices hold; process 0 writes the files.
RUNNERS = {
    "sft": supervised.run,
    "reward": supervised.run,
    "dpo": supervised.run,
    "kto": supervised.run,
    "orpo": supervised.run,
    "ppo": rl.run,
    "grpo": rl.run,
    "gspo": rl.run,
    "dapo": rl.run,
    "online_dpo": online_dpo.run,
    "sample": sample.run,
    "best_of_n": best_of_n.run,
    "ai_feedback": ai_feedback.run,
    "merge": export.merge,
    "export": export.export,
    "quickstart": quickstart.run,
}


def run(config, workdir: str):
    """Run the stage `config.stage` into `workdir`, once its config passed `validate.check`
    (a ConfigError names the field before anything is read or written), holding the
    workdir's lock (`scaffold.lock_workdir`: one run per workdir, a writable one)."""
    if config.get("stage") not in RUNNERS:
        raise validate.ConfigError("stage", f"unknown stage {config.get('stage')!r}; stages: {sorted(RUNNERS)}")
    validate.check(config)
    with scaffold.lock_workdir(workdir):
        return RUNNERS[config.stage](config, workdir)
