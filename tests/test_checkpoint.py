"""Checkpoints: any error reading one names the file or step folder it read."""
import os

import jax.numpy as jnp
import pytest

from ptx import checkpoint
from ptx.model import ModelConfig, init_params
from ptx.sources import DataError

CFG = ModelConfig(vocab_size=32, d_model=16, n_layers=1, n_heads=2, n_kv_heads=2, d_ff=32)


@pytest.fixture
def saved(tmp_path):
    import jax

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
    import jax

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
