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
"""
import json

import jax

from ptx import checkpoint, metrics
from ptx.model import ModelConfig


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
