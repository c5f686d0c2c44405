"""ptx.checkpoint: a checkpoint saved on one mesh restores and resumes on another."""
import shutil

import jax
import numpy as np
import pytest

from configs import sft as sft_config
from ptx import checkpoint, sharding
from ptx.model import ModelConfig, abstract_params
from ptx.stages import supervised

from conftest import assert_trees_close, host_params, read_metrics

# Every test here runs a stage end to end (see pyproject.toml's markers).
pytestmark = pytest.mark.stage


def sft(sft_file, mesh, steps_):
    c = sft_config.get_config("tiny")
    c.data.train = sft_file
    c.train.steps, c.train.log_every, c.train.eval_every, c.train.ckpt_every = steps_, 1, 0, 2
    # A learning rate that does not depend on train.steps: 2 steps then 1 more equal 3 straight.
    c.optim.schedule, c.optim.warmup_steps = "constant", 0
    c.mesh.data, c.mesh.fsdp, c.mesh.tensor = mesh
    return c


def test_checkpoint_from_a_2x2x2_mesh_restores_and_resumes_on_8x1x1_and_on_one_device(sft_file, tmp_path):
    saved = tmp_path / "2x2x2"
    supervised.run(sft(sft_file, (2, 2, 2), 2), str(saved))
    supervised.run(sft(sft_file, (2, 2, 2), 3), str(tmp_path / "straight"))

    cfg = ModelConfig(**checkpoint.read_meta(str(saved))["model"])
    ref = host_params(saved)  # onto the first device
    for mesh, devices in [((8, 1, 1), None), ((2, 2, 2), None), ((1, 1, 1), jax.devices()[:1])]:
        on = sharding.make_mesh(sharding.MeshConfig(*mesh), devices)
        shardings = sharding.param_shardings(abstract_params(cfg), cfg, on)
        params, _ = checkpoint.load_params(str(saved), on)
        for p, s in zip(jax.tree_util.tree_leaves(params), jax.tree_util.tree_leaves(shardings)):
            assert p.sharding.is_equivalent_to(s, p.ndim), (p.sharding, s)
        assert_trees_close(jax.device_get(params), ref, rtol=0, atol=0)

    # The whole train state (optimiser moments too) resumes on another mesh.
    for mesh, devices in [((8, 1, 1), None), ((1, 1, 1), jax.devices()[:1])]:
        resumed = tmp_path / "x".join(map(str, mesh))
        shutil.copytree(saved, resumed)
        supervised.run(sft(sft_file, mesh, 3), str(resumed), devices=devices)
        # The resumed run's log is the uninterrupted run's, line for line (the data row once, at 0).
        rows, ref = read_metrics(resumed), read_metrics(tmp_path / "straight")
        assert [sorted(r) for r in rows] == [sorted(r) for r in ref]
        assert [r["step"] for r in rows if "data/rows" in r] == [0]
        np.testing.assert_allclose([r.get("loss", 0) for r in rows], [r.get("loss", 0) for r in ref], rtol=1e-5)
        assert_trees_close(host_params(resumed), host_params(tmp_path / "straight"), atol=2e-5)
