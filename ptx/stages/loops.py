"""Which loop trains a method: the one map from `ptx.methods` rows to the stage loops."""
from ptx import methods
from ptx.stages import online_dpo, rl, supervised

LOOPS = {"supervised": supervised.run, "rl": rl.run, "online": online_dpo.run}


def runner(stage: str):
    """The loop that trains method `stage` (a `ptx.methods` row)."""
    return LOOPS[methods.get(stage).loop]
