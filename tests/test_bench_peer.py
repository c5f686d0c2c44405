"""bench --peer trl (bench/peer_trl.py): TRL's DPO and GRPO trainers time one step each at a tiny
shape, the DPO peer's loss is ptx's DPO loss on the same weights and batch (log 2 where the policy
is the reference), and the ptx / TRL ratios pair only rows of the same shape."""
import math

import jax
import numpy as np
import pytest

pytest.importorskip("trl")
import torch  # noqa: E402
import transformers  # noqa: E402

from bench import main as bench  # noqa: E402
from bench import peer_trl  # noqa: E402
from bench.peer import llama_config  # noqa: E402
from configs import dpo as dpo_configs  # noqa: E402
from ptx import hf, methods  # noqa: E402
from ptx.losses import DPOConfig  # noqa: E402
from ptx.model import Transformer  # noqa: E402

TINY = ["--d_model", "32", "--n_layers", "2", "--vocab", "256", "--batch", "4", "--seq", "24", "--repeats", "1"]


def positive_finite(x):
    return isinstance(x, float) and math.isfinite(x) and x > 0


@pytest.mark.stage
def test_trl_peer_times_a_dpo_step_and_a_grpo_iteration_with_positive_finite_tokens_per_s():
    args = bench.parse_args(TINY + ["--dpo_prompt_len", "16", "--dpo_response_len", "8"])
    cfg = bench.model_config(args)
    out = peer_trl.trl_peer(args, cfg, 8, 6, 1e12, ["dpo_step", "grpo_iteration"])
    for name in ("trl_dpo_step", "trl_grpo_iteration"):
        e = out[name]
        assert positive_finite(e["tokens_per_s"]) and positive_finite(e["step_s"]), (name, e)
        assert e["steps_timed"] == 1, name
    # tokens/s counts 2 x (prompt + response) per pair, and the generated tokens of the iteration.
    assert out["trl_dpo_step"]["tokens_per_s"] * out["trl_dpo_step"]["step_s"] == pytest.approx(2 * 4 * (16 + 8))
    assert out["trl_grpo_iteration"]["tokens_per_s"] * out["trl_grpo_iteration"]["step_s"] == pytest.approx(4 * 6)
    assert out["trl_grpo_iteration"]["group_size"] == 4
    assert out["peer_trl"]["trl"] == "1.16.0"


def ptx_pairs(input_ids, completion_mask) -> dict:
    """TRL's collated DPO batch ([chosen; rejected] rows) as ptx pair rows, loss on the completion."""
    ids, mask = input_ids.numpy().astype(np.int32), completion_mask.numpy().astype(np.float32)
    b, t = ids.shape[0] // 2, ids.shape[1] - 1
    batch = {"prob_chosen": np.ones((b,), np.float32)}
    for prefix, rows in (("chosen_", slice(0, b)), ("rejected_", slice(b, 2 * b))):
        batch.update({prefix + "inputs": ids[rows, :-1], prefix + "targets": ids[rows, 1:],
                      prefix + "positions": np.tile(np.arange(t, dtype=np.int32), (b, 1)),
                      prefix + "segment_ids": np.ones((b, t), np.int32), prefix + "loss_mask": mask[rows, 1:]})
    return batch


def test_dpo_peer_loss_equals_ptx_dpo_loss_and_is_log_2_at_the_reference(tmp_path):
    args = bench.parse_args(TINY)
    cfg = bench.model_config(args)
    for seed, name in ((0, "policy"), (1, "ref")):
        torch.manual_seed(seed)
        transformers.LlamaForCausalLM(llama_config(cfg, 32)).save_pretrained(tmp_path / name)
    tok = peer_trl.tokenizer(cfg.vocab_size)
    rows = peer_trl.dpo_rows(np.random.default_rng(0), 4, 12, 8, cfg.vocab_size)
    policy, _ = hf.load_params(str(tmp_path / "policy"), cfg)
    ref, _ = hf.load_params(str(tmp_path / "ref"), cfg)
    loss_fn = jax.jit(methods.get("dpo").make_loss(Transformer(cfg), DPOConfig(**dpo_configs.get_config().dpo)))

    def losses(ref_model, ptx_ref):
        """(TRL's loss, ptx's loss) on TRL's first batch; ref_model None = TRL's copy of the policy."""
        trainer = peer_trl.dpo_trainer(str(tmp_path / "policy"), tok, rows, args, steps=1, bf16=False,
                                       out_dir=str(tmp_path / "out"), ref_model=ref_model)
        batch = next(iter(trainer.get_train_dataloader()))
        assert batch["input_ids"].shape == (8, 20) and int(batch["completion_mask"].sum()) == 8 * 8
        with torch.no_grad():
            theirs = float(trainer.compute_loss(trainer.model, batch))
        return theirs, float(loss_fn(policy, ptx_pairs(batch["input_ids"], batch["completion_mask"]), ptx_ref)[0])

    theirs, ours = losses(None, policy)
    assert theirs == pytest.approx(math.log(2), abs=1e-6) and ours == pytest.approx(math.log(2), abs=1e-6)
    theirs, ours = losses(transformers.LlamaForCausalLM.from_pretrained(tmp_path / "ref"), ref)
    assert abs(theirs - math.log(2)) > 1e-3  # a different reference moves the loss, so the match below is real
    assert ours == pytest.approx(theirs, rel=1e-4)


def test_ratios_pair_ptx_and_trl_rows_of_the_same_shape():
    e = lambda tps, **shape: {"tokens_per_s": tps, **shape}
    results = {"config": {"seq": 128, "dpo_prompt_len": 96, "dpo_response_len": 64}, "dpo_step": e(300.0),
               "dpo_step_shared_prefix": e(450.0), "grpo_iteration": e(90.0),
               "trl_dpo_step": e(100.0, prompt_len=96, response_len=64), "trl_grpo_iteration": e(30.0, prompt_len=64)}
    assert peer_trl.ratios(results) == {"dpo_step / trl_dpo_step": 3.0, "dpo_step_shared_prefix / trl_dpo_step": 4.5,
                                        "grpo_iteration / trl_grpo_iteration": 3.0}
    results["trl_dpo_step"].update(prompt_len=64)  # 64 + 64 tokens: not the bench's DPO rows
    assert set(peer_trl.ratios(results)) == {"grpo_iteration / trl_grpo_iteration"}
