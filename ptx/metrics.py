"""Run output from process 0: metrics.jsonl, TensorBoard events, a progress bar.

A resumed run continues the files of the run it resumes: `MetricWriter` drops the
lines (and hides the TensorBoard events) past the restored step, so its logs equal
an uninterrupted run's line for line.
"""
import json
import math
import os
import time

import jax
import numpy as np
from tqdm.auto import tqdm


class NonFiniteError(RuntimeError):
    pass


class StalledError(RuntimeError):
    """A run that has trained on nothing for too long; the message says why and what to change."""


class IdleGuard:
    """Stops a run whose iterations keep nothing to train on (online DPO: no pair; dynamic
    sampling: no group with a reward spread) `limit` times in a row; 0 = never."""

    def __init__(self, limit: int, *, what: str, fix: str):
        self.limit, self.what, self.fix, self.idle = limit, what, fix, 0

    def update(self, kept: int, step: int):
        """Count iteration `step`, which kept `kept` pairs or groups; StalledError at the limit."""
        self.idle = 0 if kept else self.idle + 1
        if self.limit and self.idle >= self.limit:
            raise StalledError(f"no {self.what} kept for {self.idle} iterations in a row (steps {step - self.idle + 1}"
                               f"-{step}): every group's rewards tie, so nothing trains; {self.fix}")


class MetricWriter:
    """One JSON line per logged step; the same scalars to TensorBoard; tqdm with loss and tokens/s.

    start_step: the step the run restored (0 = a fresh run). Lines of an earlier, killed
    attempt past it are dropped (all of them for a fresh run) and TensorBoard is told to
    purge their events, since the run logs those steps again.
    """

    def __init__(self, workdir: str, *, total_steps: int, start_step: int = 0, desc: str = "train"):
        self.main = jax.process_index() == 0
        self.file = self.tb = self.bar = None
        if self.main:
            os.makedirs(workdir, exist_ok=True)
            path, tb_dir = os.path.join(workdir, "metrics.jsonl"), os.path.join(workdir, "tb")
            truncate(path, start_step)
            self.file = open(path, "a")
            from tensorboardX import SummaryWriter

            # Events at steps >= purge_step, from the attempt this run replaces, are hidden.
            purge = (start_step + 1 if start_step else 0) if os.path.isdir(tb_dir) and os.listdir(tb_dir) else None
            self.tb = SummaryWriter(tb_dir, purge_step=purge)
            self.bar = tqdm(total=total_steps, initial=start_step, desc=desc, dynamic_ncols=True)
        self.last_time, self.last_step = time.time(), start_step

    def write(self, step: int, scalars: dict, *, tokens: float = 0.0, rate: str = "tokens_per_s"):
        """Log `scalars` at `step`; `tokens` processed since the last call give the rate logged
        as `rate`: 'tokens_per_s' for every input token of a supervised step,
        'completion_tokens_per_s' for the sampled tokens of an RL iteration."""
        now = time.time()
        row = {"step": int(step)}
        row.update({k: _plain(v) for k, v in scalars.items()})
        if tokens:
            row[rate] = tokens / max(now - self.last_time, 1e-9)
        if not self.main:
            return row
        self.file.write(json.dumps(row) + "\n")
        self.file.flush()
        for k, v in row.items():
            if k != "step" and isinstance(v, (int, float)):
                self.tb.add_scalar(k, v, step)
        self.bar.update(step - self.last_step)
        post = {k: f"{row[k]:.4g}" for k in ("loss", rate) if k in row}
        self.bar.set_postfix(post)
        self.last_time, self.last_step = now, step
        return row

    def text(self, step: int, name: str, lines):
        if self.main:
            self.tb.add_text(name, "\n\n".join(lines), step)
            self.file.write(json.dumps({"step": int(step), name: list(lines)}) + "\n")
            self.file.flush()

    def close(self):
        if self.main:
            self.bar.close()
            self.tb.close()
            self.file.close()


def truncate(path: str, step: int):
    """Keep the lines of the JSON-lines log `path` up to `step` (none for step 0); a torn last
    line, from a process killed while writing it, goes too."""
    if not os.path.exists(path):
        return
    kept = []
    with open(path) as f:
        for line in f:
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue
            if step and row.get("step", 0) <= step:
                kept.append(line if line.endswith("\n") else line + "\n")
    with open(path + ".tmp", "w") as f:
        f.writelines(kept)
    os.replace(path + ".tmp", path)


def _plain(v):
    v = np.asarray(v)
    return v.item() if v.size == 1 else v.tolist()


def mean_metrics(history: list[dict]) -> dict:
    """Average a list of per-step metric dicts (fetched from device in one transfer)."""
    host = jax.device_get(history)
    return {k: float(np.mean([h[k] for h in host])) for k in host[0]}


def window_state(history: list[dict]) -> dict:
    """The per-step metrics of a window not yet logged, as JSON (a checkpoint's meta carries
    it, so a run resumed mid-window logs the same mean as an uninterrupted one)."""
    host = jax.device_get(history)
    return {"values": [{k: float(v) for k, v in h.items()} for h in host],
            "dtypes": {k: str(np.asarray(v).dtype) for k, v in host[0].items()} if host else {}}


def window_from_state(state: dict) -> list[dict]:
    """`window_state` read back: the same per-step values, in their dtypes."""
    dtypes = state.get("dtypes", {}) if state else {}
    return [{k: np.asarray(v, dtypes[k]) for k, v in h.items()} for h in (state or {}).get("values", [])]


def check_finite(scalars: dict, step: int, last_checkpoint: int | None = None):
    """The NaN guard: the step kept the last good state; stop the run with a clear error that
    says which checkpoint, if any, holds the last good state (`last_checkpoint`: its step)."""
    if scalars.get("nonfinite", 0.0) > 0 or not math.isfinite(scalars.get("loss", 0.0)):
        kept = (f"the last good checkpoint (step {last_checkpoint}) is intact" if last_checkpoint else
                "no checkpoint of this run was written yet")
        raise NonFiniteError(f"non-finite loss or gradient before step {step}; the run stopped and {kept} "
                             f"(lower optim.lr or check the data)")
