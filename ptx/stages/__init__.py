"""The entry points: one module per stage family, each `run(config, workdir)` reads a
config, builds the library's pieces, runs its loop and writes its workdir.

Imports run one way: `ptx.stages` -> the library (`ptx/*.py`), never back, and
the library never imports `configs`. A training method is a row of `ptx.methods`
(its loop from `loops.LOOPS`) and a file in `configs/`; any other stage is a module
here with its `run`, an entry in `RUNNERS` and a file in `configs/` (see README, Design).
"""
from ptx import methods
from ptx.stages import ai_feedback, best_of_n, export, loops, quickstart, sample, scaffold, validate

# config.stage -> the function that runs it: every training method's loop, then the other
# stages. Every stage runs in one process or in several (`distributed.*`): each process
# holds every host row and places on the mesh only the rows its own devices hold;
# process 0 writes the files.
RUNNERS = {m.name: loops.LOOPS[m.loop] for m in methods.METHODS} | {
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
