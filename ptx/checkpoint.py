"""Orbax checkpoints that describe themselves.

Each checkpoint holds the train state (params, optimiser state, step) and a
JSON `meta` item with the stage, the model config and the tokenizer, so
sampling or the next stage rebuilds the model from the checkpoint alone.
Layout: `<workdir>/checkpoints/<step>/{state,meta}`; the tokenizer is
copied to `<workdir>/tokenizer.model` (sentencepiece) or `<workdir>/tokenizer/`
(a Hugging Face tokenizer's files, with its chat template).
"""
import contextlib
import dataclasses
import errno
import glob
import json
import logging as pylogging
import os
import shutil

import jax
import orbax.checkpoint as ocp

from ptx import hf, lora, sharding
from ptx.model import ModelConfig, abstract_params
from ptx.sources import DataError


class NoSpaceError(OSError):
    """The disk filled while a checkpoint was written: the incomplete one is gone, the earlier
    ones are intact, and the message says how much the next one needs."""


_DISK_FULL = ("No space left on device", "os_error_code='28'", "Disk quota exceeded", "os_error_code='122'")


def _disk_full(e: BaseException) -> bool:
    while e is not None:
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT) or any(s in str(e) for s in _DISK_FULL):
            return True
        e = e.__cause__ or e.__context__
    return False


class _QuietDiskFull(pylogging.Filter):
    """Orbax logs a disk-full write failure from each of its threads, with tracebacks; the
    Checkpointer reports it once, as one line."""

    def filter(self, record):
        exc = record.exc_info[1] if record.exc_info else None
        return not (_disk_full(Exception(record.getMessage())) or (exc is not None and _disk_full(exc)))


_QUIET = _QuietDiskFull()


def _size(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024:
            return f"{n:.0f} {unit}"
        n /= 1024
    return f"{n:.1f} TB"


def checkpoint_dir(workdir: str) -> str:
    return os.path.join(os.path.abspath(workdir), "checkpoints")


class Checkpointer:
    """Save every `every` steps (and when forced), keep the newest `keep`. The unfinished
    `<step>.orbax-checkpoint-tmp*` folders of a killed run are removed on opening (the
    workdir lock, `scaffold.lock_workdir`, guarantees that no other run is writing them)."""

    def __init__(self, workdir: str, *, every: int, keep: int):
        self.every, self.closed, self.nbytes = every, False, 0
        pylogging.getLogger("absl").addFilter(_QUIET)
        if jax.process_index() == 0:
            for tmp in glob.glob(os.path.join(checkpoint_dir(workdir), "*.orbax-checkpoint-tmp*")):
                shutil.rmtree(tmp, ignore_errors=True)
        self.manager = ocp.CheckpointManager(
            checkpoint_dir(workdir),
            options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True),
            item_names=("state", "meta"))

    def latest_step(self):
        return self.manager.latest_step()

    def due(self, step: int) -> bool:
        """Whether `step` is a regular checkpoint step (every `every` steps; never for every <= 0)."""
        return self.every > 0 and step % self.every == 0

    def save(self, step: int, state, meta: dict, *, force: bool = False) -> bool:
        if not (force or self.due(step)):
            return False
        if step in self.manager.all_steps():
            return False
        self.nbytes = sum(x.nbytes for x in jax.tree_util.tree_leaves(state))  # about what it takes on disk
        try:  # orbax writes in the background: a full disk surfaces here, at the next save or at close
            self.manager.save(step, args=ocp.args.Composite(
                state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)), force=True)
        except Exception as e:
            self._fail(e)
        return True

    def _fail(self, e: Exception):
        """A NoSpaceError, once the incomplete checkpoint is removed, when `e` is a full disk; else `e`."""
        if not _disk_full(e):
            raise e
        directory = str(self.manager.directory)
        self.closed = True
        try:
            self.manager.close()
        except Exception:  # the same failure again, from orbax's other threads
            pass
        partial = sorted(glob.glob(os.path.join(directory, "*.orbax-checkpoint-tmp*")))
        for tmp in partial:
            shutil.rmtree(tmp, ignore_errors=True)
        steps = sorted(int(d) for d in os.listdir(directory) if d.isdigit())
        failed = ", ".join(os.path.basename(t).split(".")[0] for t in partial) or "?"
        free = shutil.disk_usage(directory).free
        raise NoSpaceError(f"{directory}: no space left on the device while writing checkpoint {failed}; removed "
                           f"it, the earlier checkpoints ({', '.join(map(str, steps)) or 'none'}) are intact; a "
                           f"checkpoint needs about {_size(self.nbytes)}, {_size(free)} is free: free space and "
                           f"rerun the same command to resume") from e

    def restore(self, step: int, abstract_state):
        """abstract_state: pytree of jax.ShapeDtypeStruct with shardings (the target layout)."""
        with reading(os.path.join(str(self.manager.directory), str(step))):
            out = self.manager.restore(step, args=ocp.args.Composite(
                state=ocp.args.StandardRestore(abstract_state), meta=ocp.args.JsonRestore()))
        return out["state"], out["meta"]

    def close(self):
        if self.closed:
            return
        try:
            self.manager.wait_until_finished()
        except Exception as e:
            self._fail(e)
        self.closed = True
        self.manager.close()


@contextlib.contextmanager
def reading(path: str):
    """Any error while reading the checkpoint at `path` (a step folder, or a file in it) as one
    DataError naming it, with the reader's first line."""
    try:
        yield
    except DataError:
        raise
    except Exception as e:  # orbax, tensorstore, JSON, OS errors: a damaged or partial checkpoint
        lines = [line.strip() for line in str(e).splitlines() if line.strip()]
        raise DataError(f"{path}: cannot read this checkpoint ({type(e).__name__}: "
                        f"{lines[0] if lines else 'no detail'})") from e


def model_meta(cfg: ModelConfig) -> dict:
    return dataclasses.asdict(cfg)


def resolve(path: str) -> tuple[str, int]:
    """A workdir, its checkpoints dir, or one step dir -> (checkpoints dir, step)."""
    path = os.path.abspath(path)
    for candidate in (os.path.join(path, "checkpoints"), path):
        if os.path.isdir(candidate):
            steps = [int(d) for d in os.listdir(candidate) if d.isdigit()]
            if steps:
                return candidate, max(steps)
    parent, leaf = os.path.split(path)
    if leaf.isdigit() and os.path.isdir(path):
        return parent, int(leaf)
    raise FileNotFoundError(f"no ptx checkpoint under {path}")


def read_meta(path: str) -> dict:
    directory, step = resolve(path)
    file = os.path.join(directory, str(step), "meta", "metadata")
    with reading(file), open(file) as f:
        return json.load(f)


def load_params(path: str, mesh: jax.sharding.Mesh = None):
    """(params, meta) of the newest checkpoint under `path`, read straight onto `mesh` as
    `sharding.param_rules` lay them out (None = this process's first device). The optimiser
    state is not read. A LoRA checkpoint's adapters come back merged into their base."""
    directory, step = resolve(path)
    meta = read_meta(path)
    cfg = ModelConfig(**meta["model"])
    if meta.get("lora"):
        return _load_lora(directory, step, meta, cfg, mesh), meta
    abstract = abstract_params(cfg)
    shardings = _shardings(abstract, cfg, mesh)
    restore_args = jax.tree_util.tree_map(
        lambda a, s: ocp.ArrayRestoreArgs(sharding=s, dtype=a.dtype), abstract, shardings)
    target = jax.tree_util.tree_map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)
    return _restore_params(directory, step, meta, target, restore_args), meta


def _shardings(abstract, cfg: ModelConfig, mesh):
    if mesh is None:
        # This process's first device: jax.devices()[0] belongs to process 0 only.
        device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
        return jax.tree_util.tree_map(lambda _: device, abstract)
    return sharding.param_shardings(abstract, cfg, mesh)


def _restore_params(directory, step, meta, target, restore_args):
    """The params (RL checkpoints: the policy's) of the state saved at `step`, as `target` lays them out."""
    # RL checkpoints hold {'policy': ..., 'critic': ...}; meta names the policy's key.
    key = meta.get("params_key")
    if key:
        target, restore_args = {key: target}, {key: restore_args}
    with reading(os.path.join(directory, str(step), "state")), ocp.PyTreeCheckpointer() as reader:
        restored = reader.restore(os.path.join(directory, str(step), "state"), args=ocp.args.PyTreeRestore(
            item={"params": target}, restore_args={"params": restore_args}, partial_restore=True))
    params = restored["params"]
    return params[key] if key else params


def _load_lora(directory, step, meta, cfg, mesh):
    """A LoRA checkpoint holds adapters only: read its base from where the run started, then merge."""
    lcfg = lora.LoraConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in meta["lora"]["config"].items()})
    source = meta["lora"]["base"]
    if source["checkpoint"]:
        base, _ = load_params(source["checkpoint"], mesh)
    else:
        # A Hugging Face base is a language model: no scalar head.
        base_cfg = cfg.replace(scalar_head=False)
        base, _ = hf.load_params(source["hf_dir"], base_cfg,
                                 _shardings(abstract_params(base_cfg), base_cfg, mesh))
    abstract = abstract_params(cfg)
    # The base of a reward-stage run lacks the head it trained: start it from zeros as init did.
    base = {k: base.get(k, v) for k, v in jax.tree_util.tree_map(
        lambda a: jax.numpy.zeros(a.shape, a.dtype), abstract).items()}
    adapters_abstract = jax.eval_shape(lambda: lora.init(abstract, lcfg, jax.random.PRNGKey(0)))
    # Adapters are small: replicated over the devices the base sits on.
    place = (sharding.replicated(mesh) if mesh is not None
             else jax.sharding.SingleDeviceSharding(jax.local_devices()[0]))
    restore_args = jax.tree_util.tree_map(lambda a: ocp.ArrayRestoreArgs(sharding=place, dtype=a.dtype),
                                          adapters_abstract)
    adapters = _restore_params(directory, step, meta, adapters_abstract, restore_args)
    return lora.merge(base, adapters, lcfg)


def tokenizer_path(path: str) -> str:
    """The tokenizer that belongs to a checkpoint's workdir: its `tokenizer/` directory (a Hugging
    Face tokenizer's files) when it has one, else its sentencepiece `tokenizer.model`."""
    directory, _ = resolve(path)
    workdir = os.path.dirname(directory)
    hf_dir = os.path.join(workdir, "tokenizer")
    return hf_dir if os.path.isdir(hf_dir) else os.path.join(workdir, "tokenizer.model")
