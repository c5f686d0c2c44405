"""Export writes a whole Hugging Face directory (weights, config, tokenizer, chat template,
generation config) or refuses: the run's tokenizer, else the source model's named in the
checkpoint meta's origin, else one error naming what is missing."""
import os
import shutil

import jax
import pytest

from ptx import checkpoint, hf
from ptx.model import ModelConfig, init_params
from ptx.sources import DataError
from ptx.stages import export

FILES = ("tokenizer.json", "tokenizer_config.json", "generation_config.json")


def run_without_tokenizer(tmp_path, tok_dir: str, origin: bool) -> tuple[str, dict, dict]:
    """A workdir whose checkpoint came from a Hugging Face directory holding `tok_dir`'s tokenizer,
    and whose own tokenizer copy is gone: (workdir, params, meta)."""
    source = tmp_path / "source_model"
    shutil.copytree(tok_dir, source)
    vocab = hf.load_tokenizer(str(source)).vocab_size
    cfg = ModelConfig(vocab_size=vocab, d_model=16, n_layers=1, n_heads=2, n_kv_heads=2, d_ff=32)
    params = init_params(cfg, jax.random.PRNGKey(0))
    meta = {"stage": "sft", "model": checkpoint.model_meta(cfg)}
    if origin:
        meta["origin"] = {"hf_dir": str(source), "max_position_embeddings": 64}
    workdir = str(tmp_path / "run")
    ckpt = checkpoint.Checkpointer(workdir, every=1, keep=1)
    ckpt.save(1, {"params": params}, meta)
    ckpt.close()
    return workdir, params, meta


def test_a_run_without_its_tokenizer_exports_the_source_models(dirs, tmp_path):
    workdir, params, meta = run_without_tokenizer(tmp_path, dirs["llama3"], origin=True)
    out = tmp_path / "hf"
    export.write_hf(params, meta, workdir, str(out))
    for name in FILES:
        assert (out / name).read_bytes() == (tmp_path / "source_model" / name).read_bytes(), name
    assert hf.load_tokenizer(str(out)).has_chat_template


@pytest.mark.parametrize("origin", [True, False])
def test_an_export_with_no_tokenizer_anywhere_is_refused_naming_what_is_missing(dirs, tmp_path, origin):
    workdir, params, meta = run_without_tokenizer(tmp_path, dirs["llama3"], origin=origin)
    shutil.rmtree(tmp_path / "source_model")
    why = (f"the source model directory {tmp_path / 'source_model'} (the checkpoint meta's origin) is gone or "
           f"has none" if origin else "the checkpoint meta names no source model directory (origin)")
    with pytest.raises(DataError) as e:
        export.write_hf(params, meta, workdir, str(tmp_path / "hf"))
    assert str(e.value) == (f"{workdir}: no tokenizer to export: the run's copy ({workdir}/tokenizer/ or "
                            f"tokenizer.model) is missing and {why}; restore one of them")
    assert not os.path.exists(tmp_path / "hf")
