"""Run output from process 0: metrics.jsonl, TensorBoard events, a progress bar."""
import json
import math
import os
import time

import jax
import numpy as np
from tqdm.auto import tqdm


class NonFiniteError(RuntimeError):
    pass


class MetricWriter:
    """One JSON line per logged step; the same scalars to TensorBoard; tqdm with loss and tokens/s."""

    def __init__(self, workdir: str, *, total_steps: int, start_step: int = 0, desc: str = "train"):
        self.main = jax.process_index() == 0
        self.file = self.tb = self.bar = None
        if self.main:
            os.makedirs(workdir, exist_ok=True)
            self.file = open(os.path.join(workdir, "metrics.jsonl"), "a")
            from tensorboardX import SummaryWriter

            self.tb = SummaryWriter(os.path.join(workdir, "tb"))
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


def _plain(v):
    v = np.asarray(v)
    return v.item() if v.size == 1 else v.tolist()


def mean_metrics(history: list[dict]) -> dict:
    """Average a list of per-step metric dicts (fetched from device in one transfer)."""
    host = jax.device_get(history)
    return {k: float(np.mean([h[k] for h in host])) for k in host[0]}


def check_finite(scalars: dict, step: int):
    """The NaN guard: the step kept the last good state; stop the run with a clear error."""
    if scalars.get("nonfinite", 0.0) > 0 or not math.isfinite(scalars.get("loss", 0.0)):
        raise NonFiniteError(
            f"non-finite loss or gradient before step {step}; the run stopped and the last good "
            f"checkpoint is intact (lower optim.lr or check the data)")
