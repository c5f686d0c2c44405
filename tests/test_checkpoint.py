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
