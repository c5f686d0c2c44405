"""Test set-up: 8 host CPU devices so mesh code runs as on a pod slice."""
import json
import os
import sys

import pytest

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# All host devices share one thread pool (8 threads on a 2-core machine). A device can
# block two of them at once in collectives (one inside the layer scan, one outside), so 8
# devices could starve each other into XLA's 40 s rendezvous abort (seen about 1 run in 4).
os.environ.setdefault("PJRT_NPROC", "16")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# Many tests build the same tiny models: a persistent compilation cache lets
# identical programs compile once per machine instead of once per test.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(os.path.expanduser("~"), ".cache", "ptx-jax-tests"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")


@pytest.fixture(scope="session")
def quickstart(tmp_path_factory):
    """The quickstart shortened to a few steps per stage, run once per session:
    (workdir, results.json as written)."""
    from configs import quickstart as quickstart_config
    from ptx.stages import quickstart as quickstart_stage

    workdir = tmp_path_factory.mktemp("quickstart")
    quickstart_stage.run(quickstart_config.get_config("tiny"), str(workdir))
    with open(workdir / "results.json") as f:
        return str(workdir), json.load(f)


@pytest.fixture(scope="session")
def sft_dir(tmp_path_factory):
    """A tiny SFT run on the embedded world (10 steps): the policy and base of RL and LoRA tests."""
    from configs import sft as sft_config
    from ptx.stages import supervised

    d = tmp_path_factory.mktemp("sft")
    c = sft_config.get_config("tiny")
    c.train.steps, c.train.eval_every = 10, 0
    supervised.run(c, str(d))
    return str(d)
