"""The run scaffold the supervised and RL loops share: checkpointer and metric writer
opened and closed together, restore-or-init, and the meta every checkpoint carries.

    with scaffold.Run(config, workdir, model_cfg, total_steps=n) as run:
        state, saved = run.restore_or_init(abstract_state, shardings, init_fn)
        for step in range(run.start, n):
            ...
            run.writer.write(step + 1, scalars)
            run.save(step + 1, state, force=last)

Resume order: this workdir's newest checkpoint, else `init_fn` (which reads
`init.checkpoint` / `init.hf_dir`, or initialises from scratch).

One writer per workdir: `stages.run` holds `lock_workdir` for the whole stage, so a
second run on the same workdir stops before it writes anything.
"""
import contextlib
import fcntl
import json
import os
import socket
import time

import jax
import numpy as np
from jax.experimental import multihost_utils

from ptx import checkpoint, metrics
from ptx.model import ModelConfig

LOCK_FILE = ".ptx.lock"


class RunError(RuntimeError):
    """A fault of the run's surroundings the user can fix (a workdir in use or not writable,
    a full disk), as one line."""


def _acquire(workdir: str):
    """The open, flock-ed lock file of `workdir` (this host and pid written in it)."""
    try:
        os.makedirs(workdir, exist_ok=True)
        f = open(os.path.join(workdir, LOCK_FILE), "a+")
    except OSError as e:
        raise RunError(f"{workdir}: cannot write there ({e.strerror or e}); "
                       f"choose a writable --workdir") from e
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = ""
        for _ in range(20):  # the holder writes its name just after it locks
            f.seek(0)
            holder = f.read().split()
            if len(holder) == 2:
                break
            time.sleep(0.05)
        f.close()
        host, pid = holder if len(holder) == 2 else ("?", "?")
        raise RunError(f"{workdir}: in use by another run (host {host}, pid {pid}); wait for it to end "
                       f"or choose another --workdir") from None
    try:
        f.seek(0)
        f.truncate()
        f.write(f"{socket.gethostname()} {os.getpid()}\n")
        f.flush()
    except OSError as e:
        f.close()
        raise RunError(f"{workdir}: cannot write there ({e.strerror or e}); choose a writable --workdir") from e
    return f


@contextlib.contextmanager
def lock_workdir(workdir: str):
    """Hold an exclusive lock on `workdir` (process 0 holds it for all processes): an OS file
    lock (flock on `<workdir>/.ptx.lock`), released when the process ends however it ends,
    so it is never stale. RunError names the workdir and the holder's host and pid when
    another run holds it, or the workdir when it cannot be written."""
    handle, error = None, None
    if jax.process_index() == 0:
        try:
            handle = _acquire(os.path.abspath(workdir))
        except RunError as e:
            error = e
    if jax.process_count() > 1:  # every process learns whether process 0 holds it
        if not int(multihost_utils.broadcast_one_to_all(np.int32(error is None))) and error is None:
            error = RunError(f"{workdir}: process 0 could not lock it; see its error")
    if error is not None:
        raise error
    try:
        yield
    finally:
        if handle is not None:
            handle.close()


class Run:
    """One training run's workdir: checkpoints every `train.ckpt_every` steps (and when forced),
    metrics.jsonl / TensorBoard / progress bar, and self-describing checkpoint meta."""

    def __init__(self, config, workdir: str, model_cfg: ModelConfig, *, total_steps: int, desc: str = None,
                 meta: dict = None):
        """meta: what this stage adds to every checkpoint's meta (e.g. 'params_key', 'lora')."""
        self.ckpt = checkpoint.Checkpointer(workdir, every=config.train.ckpt_every, keep=config.train.keep_ckpts)
        self.start = self.ckpt.latest_step() or 0
        self.saved = self.start or None  # this workdir's newest checkpoint (its step), None = none yet
        self.meta = {"stage": config.stage, "model": checkpoint.model_meta(model_cfg),
                     "tokenizer": "tokenizer.model", "config": json.loads(config.to_json_best_effort()),
                     **(meta or {})}
        self.writer = metrics.MetricWriter(workdir, total_steps=total_steps, start_step=self.start,
                                           desc=desc or config.stage)

    def restore_or_init(self, abstract_state, shardings, init_fn):
        """(state, saved meta): the newest checkpoint laid out as `shardings`, or (init_fn(), {})."""
        if not self.start:
            return init_fn(), {}
        target = jax.tree_util.tree_map(
            lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract_state, shardings)
        return self.ckpt.restore(self.start, target)

    def due(self, step: int) -> bool:
        """Whether `step` is a regular checkpoint step (`train.ckpt_every`)."""
        return self.ckpt.due(step)

    def save(self, step: int, state, *, force: bool = False, **extra) -> bool:
        """Checkpoint `state` at `step` when due (or forced), with this run's meta and `extra`."""
        if not self.ckpt.save(step, state, dict(self.meta, **extra), force=force):
            return False
        self.saved = step
        return True

    def __enter__(self) -> "Run":
        return self

    def __exit__(self, *exc):
        self.ckpt.close()
        self.writer.close()
