"""ptx.checkpoint: a checkpoint saved on one mesh restores and resumes on another; any error reading one
names the file or step folder it read."""
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import sft as sft_config
from ptx import checkpoint, sharding
from ptx.model import ModelConfig, abstract_params, init_params
from ptx.sources import DataError
from ptx.stages import supervised

from conftest import assert_trees_close, host_params, read_metrics


def sft(sft_file, mesh, steps_):
    c = sft_config.get_config("tiny")
    c.data.train = sft_file
    c.train.steps, c.train.log_every, c.train.eval_every, c.train.ckpt_every = steps_, 1, 0, 2
    # A learning rate that does not depend on train.steps: 2 steps then 1 more equal 3 straight.
    c.optim.schedule, c.optim.warmup_steps = "constant", 0
    c.mesh.data, c.mesh.fsdp, c.mesh.tensor = mesh
    return c


@pytest.mark.stage
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


CFG = ModelConfig(vocab_size=32, d_model=16, n_layers=1, n_heads=2, n_kv_heads=2, d_ff=32)


@pytest.fixture
def saved(tmp_path):
    ckpt = checkpoint.Checkpointer(str(tmp_path), every=1, keep=1)
    ckpt.save(1, {"params": init_params(CFG, jax.random.PRNGKey(0)), "step": jnp.int32(1)},
              {"stage": "sft", "model": checkpoint.model_meta(CFG)})
    ckpt.close()
    return tmp_path


def test_a_damaged_meta_names_its_file(saved):
    file = saved / "checkpoints" / "1" / "meta" / "metadata"
    file.write_text(file.read_text()[:20])
    with pytest.raises(DataError, match=f"^{file}: cannot read this checkpoint \\(JSONDecodeError: "):
        checkpoint.read_meta(str(saved))


def test_a_damaged_state_names_its_folder(saved):
    state = saved / "checkpoints" / "1" / "state"
    for root, _, files in os.walk(state):
        for name in files:  # every array file cut short
            path = os.path.join(root, name)
            with open(path, "r+b") as f:
                f.truncate(os.path.getsize(path) // 2)
    with pytest.raises(DataError, match=f"^{state}: cannot read this checkpoint \\("):
        checkpoint.load_params(str(saved))


def test_a_disk_that_fills_during_a_checkpoint_removes_it_keeps_the_earlier_ones_and_says_what_it_needs(saved,
                                                                                                   monkeypatch):
    ckpt = checkpoint.Checkpointer(str(saved), every=1, keep=3)
    state = {"params": init_params(CFG, jax.random.PRNGKey(1)), "step": jnp.int32(2)}
    ckpt.save(2, state, {"stage": "sft", "model": checkpoint.model_meta(CFG)})
    ckpt.manager.wait_until_finished()
    partial = saved / "checkpoints" / "3.orbax-checkpoint-tmp"

    def full(step, **kwargs):  # what orbax raises when the disk fills (tensorstore's words)
        os.makedirs(partial / "state")
        raise ValueError("RESOURCE_EXHAUSTED: Error writing \"params/x\": Failed to write 4096 bytes to file 7: "
                         "No space left on device [os_error_code='28']")

    monkeypatch.setattr(ckpt.manager, "save", full)
    with pytest.raises(checkpoint.NoSpaceError) as e:
        ckpt.save(3, state, {"stage": "sft", "model": checkpoint.model_meta(CFG)})
    directory = saved / "checkpoints"
    assert str(e.value).startswith(f"{directory}: no space left on the device while writing checkpoint 3; removed "
                                   f"it, the earlier checkpoints (1, 2) are intact; a checkpoint needs about ")
    assert "\n" not in str(e.value) and not partial.exists()
    assert sorted(os.listdir(directory)) == ["1", "2"]
    ckpt.close()  # closed already: nothing more to raise
    assert checkpoint.read_meta(str(saved))["stage"] == "sft"
