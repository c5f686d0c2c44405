"""Multi-process start-up: one process per host joins one global device set.

`initialize` must run before anything touches a device: afterwards
`jax.devices()` lists every process's devices, `jax.process_index()` says
which host this is, and the mesh in `ptx/sharding.py` spans them all.
"""
import dataclasses

import jax

from ptx import fields


@dataclasses.dataclass(frozen=True)
class DistributedConfig:
    """The `distributed` section: several processes (one per host) as one device set."""

    auto: bool = False  # True: coordinator and ids from the environment (Cloud TPU VM, SLURM)
    coordinator: str = ""  # "host:port" of process 0, when not auto
    num_processes: int = 1  # 1 = single process, no jax.distributed
    process_id: int = 0  # this process, 0 .. num_processes - 1
    local_device_ids: str = ""  # e.g. "0,1": this process's devices; '' = all local ones

    def __post_init__(self):
        fields.check(self, "distributed", auto=fields.BOOL, num_processes=fields.POSITIVE,
                     process_id=fields.COUNT)
        if self.process_id >= self.num_processes:
            raise ValueError(f"distributed.process_id: {self.process_id} is not below distributed.num_processes="
                             f"{self.num_processes}")


def initialize(dist_cfg: DistributedConfig) -> None:
    """Join the processes named by `dist_cfg` (a config's `distributed` section).

    auto: the cluster environment (Cloud TPU VM metadata, SLURM variables)
    supplies the coordinator and the process ids. Otherwise `coordinator`
    ("host:port" of process 0), `num_processes` and `process_id` do; with
    num_processes == 1 (the default) nothing happens.
    """
    if not dist_cfg.auto and dist_cfg.num_processes <= 1:
        return
    if not dist_cfg.auto and not dist_cfg.coordinator:
        raise ValueError(f"distributed.num_processes={dist_cfg.num_processes} needs "
                         f"distributed.coordinator='host:port' of process 0 (or distributed.auto=True)")
    # Host-CPU processes (tests, CPU clusters) need a cross-process collective
    # backend for their all-reduces; gloo rides on the coordinator connection
    # alone. Accelerator collectives are not affected.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    if dist_cfg.auto:
        jax.distributed.initialize()
        return
    local = dist_cfg.local_device_ids
    jax.distributed.initialize(
        coordinator_address=dist_cfg.coordinator, num_processes=dist_cfg.num_processes,
        process_id=dist_cfg.process_id,
        local_device_ids=[int(i) for i in local.split(",")] if local else None)
