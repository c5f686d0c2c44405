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

Preemption: inside `Run`, SIGTERM or SIGINT no longer kills the process. The loop
finishes its step (an RL loop its iteration); `run.due(step)` is then true, so the
step's metrics are checked and kept, and `run.save` writes the checkpoint and raises
`Stopped` (`ptx.main` prints its line and exits with `Stopped.EXIT_CODE`). With
several processes, SIGTERM goes through JAX's preemption service
(`multihost_utils.reached_preemption_sync_point`), so every host stops at one step.
"""
import contextlib
import fcntl
import json
import os
import signal
import socket
import threading
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


class Stopped(Exception):
    """A run stopped by a signal after writing its checkpoint; rerunning resumes it."""

    EXIT_CODE = 3  # 0 done, 1 non-finite loss, 2 a user error, 3 stopped by a signal

    def __init__(self, signal_name: str, step: int):
        super().__init__(f"stopped by {signal_name} at step {step}; checkpoint written; "
                         f"rerun the same command to resume")
        self.signal_name, self.step = signal_name, step


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
        self.total_steps = total_steps
        self.signal_name = None  # the signal that asked this run to stop
        self._asked = (None, False)  # (step, answer) of the last stop_requested
        self._handlers = {}

    def restore_or_init(self, abstract_state, shardings, init_fn):
        """(state, saved meta): the newest checkpoint laid out as `shardings`, or (init_fn(), {})."""
        if not self.start:
            return init_fn(), {}
        target = jax.tree_util.tree_map(
            lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract_state, shardings)
        return self.ckpt.restore(self.start, target)

    def due(self, step: int) -> bool:
        """Whether `step` is a checkpoint step: a regular one (`train.ckpt_every`), or the step
        at which a signal stops the run (`stop_requested`)."""
        return self.ckpt.due(step) or self.stop_requested(step)

    def stop_requested(self, step: int) -> bool:
        """Whether the run stops after `step` (a signal arrived; with several processes, JAX's
        preemption sync point agrees on this step on every host). Asked once per step on every
        process, in step order; the answer is kept for further calls at the same step."""
        if self._asked[0] != step:
            asked = self.signal_name is not None
            if jax.process_count() > 1 and multihost_utils.reached_preemption_sync_point(step):
                self.signal_name, asked = self.signal_name or "SIGTERM", True
            self._asked = (step, asked and step < self.total_steps)
        return self._asked[1]

    def save(self, step: int, state, *, force: bool = False, **extra) -> bool:
        """Checkpoint `state` at `step` when due (or forced), with this run's meta and `extra`.
        At the step a signal stops the run, it checkpoints and raises `Stopped`."""
        stop = self.stop_requested(step)
        if self.ckpt.save(step, state, dict(self.meta, **extra), force=force or stop):
            self.saved = step
        elif not stop:
            return False
        if stop:
            raise Stopped(self.signal_name, step)
        return True

    def _on_signal(self, signum, frame):
        self.signal_name = signal.Signals(signum).name
        for s, handler in self._handlers.items():  # a second signal acts at once
            signal.signal(s, handler)

    def __enter__(self) -> "Run":
        # Several processes: SIGTERM is JAX's preemption notice (its service catches it), and
        # SIGINT, which reaches one host only, keeps its default.
        if threading.current_thread() is threading.main_thread() and jax.process_count() == 1:
            self._handlers = {s: signal.signal(s, self._on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
        return self

    def __exit__(self, *exc):
        for s, handler in self._handlers.items():
            signal.signal(s, handler)
        self.ckpt.close()
        self.writer.close()
