"""Entry point: python -m ptx.main --config=configs/sft.py[:tiny] --workdir=runs/x [--config.a.b=v]."""
from absl import app, flags, logging
from ml_collections import config_flags

from ptx import distributed, stages

config_flags.DEFINE_config_file("config", None, "A configs/*.py file, optionally with :arg.",
                                lock_config=True)
flags.DEFINE_string("workdir", None, "Where the run writes config, metrics, checkpoints.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
    del argv
    # Orbax and absl log every checkpoint step at INFO; the run's own log is metrics.jsonl.
    logging.set_verbosity(logging.WARNING)
    # Before any device is touched, so that jax.devices() spans every process.
    distributed.initialize(flags.FLAGS.config.distributed)
    stages.run(flags.FLAGS.config, flags.FLAGS.workdir)


if __name__ == "__main__":
    app.run(main)
