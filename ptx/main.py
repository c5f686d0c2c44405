"""Entry point: python -m ptx.main --config=configs/sft.py[:tiny] --workdir=runs/x [--config.a.b=v].

An error the user can fix (flags, the config, data, a path) ends the run with exit
code 2 and one line on stderr, `ptx: error: <field or file>: <problem>`; `--verbose`
shows its traceback instead. A non-finite loss, or a run that keeps nothing to train on
(`metrics.IdleGuard`), is one line and exit code 1. SIGTERM or
SIGINT (a scheduler's preemption notice, Ctrl-C) stops the run after its current step
with a checkpoint, one line `ptx: stopped by SIGTERM at step N; ...` and exit code 3
(`scaffold.Stopped.EXIT_CODE`); the same command resumes it. Anything else is a bug
in ptx and keeps its traceback.
"""
import errno
import os
import re
import sys

import jax
from absl import app, flags, logging
from ml_collections import config_flags

from ptx import checkpoint, distributed, metrics, rewards, sources, stages
from ptx.stages import scaffold, validate

config_flags.DEFINE_config_file("config", None, "A configs/*.py file, optionally with :arg.",
                                lock_config=True)
flags.DEFINE_string("workdir", None, "Where the run writes config, metrics, checkpoints.")
flags.DEFINE_bool("verbose", False, "Show the traceback of a user error instead of one line.")
flags.mark_flags_as_required(["config", "workdir"])

# Errors a user causes and can fix: a config field, a data file, a path that is not there.
USER_ERRORS = (validate.ConfigError, sources.DataError, FileNotFoundError, FileExistsError, IsADirectoryError,
               NotADirectoryError, PermissionError, scaffold.RunError, rewards.RewardError, checkpoint.NoSpaceError)


def fail(message: str, code: int = 2):
    print(f"ptx: error: {message}", file=sys.stderr)
    sys.exit(code)


def user_message(e: Exception) -> str:
    """One line: '<file or field>: <problem>'."""
    if isinstance(e, OSError) and e.filename:
        return f"{e.filename}: {e.strerror or e}"
    return " ".join(str(e).split("\n"))


def flag_message(e: Exception, argv: list[str]) -> str:
    """One line for an error while reading the flags and the config file they name."""
    chain = [e]
    while (chain[-1].__cause__ or chain[-1].__context__) is not None:
        chain.append(chain[-1].__cause__ or chain[-1].__context__)
    if isinstance(chain[-1], KeyError):  # a mistyped field: ml_collections adds "Did you mean"
        key = str(chain[-1].args[0])
        hint = re.search(r'Did you mean "(\w+)"', " ".join(str(c.args[0]) for c in chain if c.args))
        flag = next((a.split("=")[0] for a in argv[1:] if a.startswith("--config.")
                     and key in a.split("=")[0].split(".")), "--config")
        return f"{flag}: no field {key!r}" + (f"; did you mean {hint[1]!r}?" if hint else "")
    if isinstance(e, flags.UnrecognizedFlagError):
        return f"--{e.flagname}: {e}"
    lines = [line.strip() for line in str(chain[-1]).splitlines() if line.strip()]
    problem = re.sub(r"^\[Errno \d+\] ", "", lines[-1]) if lines else type(chain[-1]).__name__
    named = re.match(r"flag (--\S+): ", str(e))
    if named and not problem.startswith("flag "):
        return f"{named[1]}: {problem}"
    if "Failed loading config file" in str(e):
        return f"{next((a for a in argv[1:] if a.startswith('--config=')), '--config')}: {problem}"
    return problem.removeprefix("flag ")


def parse_flags(argv: list[str]) -> list[str]:
    """absl's parsing, with every failure (a mistyped field, a bad value, a config file that
    does not load) as one line."""
    try:
        rest = flags.FLAGS(argv)
        flags.FLAGS.config.get("stage")  # a config file that failed to load raises when read
        return rest
    except Exception as e:  # flags and config files: the user's to fix
        if "--verbose" in argv:
            raise
        fail(flag_message(e, argv))


def main(argv):
    del argv
    # Orbax and absl log every checkpoint step at INFO; the run's own log is metrics.jsonl.
    logging.set_verbosity(logging.WARNING)
    try:
        # Before any device is touched, so that jax.devices() spans every process.
        distributed.initialize(distributed.DistributedConfig(**flags.FLAGS.config.distributed))
        stages.run(flags.FLAGS.config, flags.FLAGS.workdir)
    except USER_ERRORS as e:
        if flags.FLAGS.verbose:
            raise
        fail(user_message(e))
    except scaffold.Stopped as e:
        if jax.process_index() == 0:
            print(f"ptx: {e}", file=sys.stderr)
        sys.exit(scaffold.Stopped.EXIT_CODE)
    except OSError as e:
        # A full disk or a read-only file system, wherever it strikes: the user's to fix.
        if flags.FLAGS.verbose or e.errno not in (errno.ENOSPC, errno.EDQUOT, errno.EROFS):
            raise
        fail(user_message(e) if e.filename else f"{os.path.abspath(flags.FLAGS.workdir)}: {e.strerror}")
    except (metrics.NonFiniteError, metrics.StalledError) as e:
        if flags.FLAGS.verbose:
            raise
        fail(str(e), code=1)


if __name__ == "__main__":
    app.run(main, flags_parser=parse_flags)
