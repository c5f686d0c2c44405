"""The supervised stage: learning, resume equality, NaN guard, multi-device equality, config and data
errors, KTO / ORPO, host transfers, and starting from a Hugging Face directory."""
import json
import os
import subprocess
import sys

import jax
import numpy as np
import optax
import pytest

from configs import bco as bco_config
from configs import dpo as dpo_config
from configs import kto as kto_config
from configs import orpo as orpo_config
from configs import reward as reward_config
from configs import sft as sft_config
from ptx import checkpoint, data, hf, logprobs, methods, metrics, optim, world
from ptx.losses import sequence_logps, token_logprobs
from ptx.model import ModelConfig, Transformer, init_params
from ptx.stages import common, supervised
from ptx.tokenizer import train_tokenizer

from conftest import assert_same_params, assert_trees_close, host_params, read_metrics

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A small SFT file and a preference file with a learnable preference (correct sums win)."""
    d = tmp_path_factory.mktemp("data")
    rng = np.random.default_rng(0)
    with open(d / "sft.jsonl", "w") as f, open(d / "pref.jsonl", "w") as g:
        for _ in range(64):
            a, b = rng.integers(0, 10, 2)
            f.write(json.dumps({"prompt": f"What is {a} + {b}?", "completion": f"{a} + {b} = {a + b}."}) + "\n")
            wrong = a + b + int(rng.integers(1, 4))
            g.write(json.dumps({"prompt": f"What is {a} + {b}?", "chosen": f"{a} + {b} = {a + b}.",
                                "rejected": f"{a} + {b} = {wrong}. Sorry."}) + "\n")
    return {"sft": str(d / "sft.jsonl"), "pref": str(d / "pref.jsonl")}


def sft(files, **overrides):
    c = sft_config.get_config("tiny")
    c.data.train = files["sft"]
    c.train.log_every = 2
    c.train.eval_every = 0
    c.update_from_flattened_dict(overrides)
    return c


@pytest.mark.stage
def test_sft_loss_goes_down_on_a_memorisable_batch(files, tmp_path):
    c = sft(files, **{"train.steps": 40, "train.batch_size": 8, "optim.lr": 3e-3,
                      "optim.warmup_steps": 0, "optim.schedule": "constant", "train.ckpt_every": 0})
    rows = [r for r in read_and_run(c, tmp_path) if "loss" in r]
    assert rows[-1]["loss"] < 0.6 * rows[0]["loss"]
    assert {"step", "loss", "grad_norm", "update_norm", "lr", "tokens_per_s"} <= set(rows[-1])
    assert os.path.exists(tmp_path / "config.json") and os.path.isdir(tmp_path / "tb")


def read_and_run(c, workdir):
    supervised.run(c, str(workdir))
    return read_metrics(workdir)


@pytest.mark.stage
@pytest.mark.parametrize("stage", ["sft", "dpo", "bco"])
def test_a_killed_run_resumes_to_the_same_parameters_and_logs(files, tmp_path, resumes_like_straight, stage):
    # Checkpoints every 3 steps, logs every 2: a checkpoint in mid-window carries the window
    # (and BCO's running reward shift rides in the train state).
    c = sft(files, **{"train.steps": 12, "train.ckpt_every": 3})
    if stage in ("dpo", "bco"):
        supervised.run(sft(files, **{"train.steps": 2}), str(tmp_path / "sft"))
        c = (dpo_config if stage == "dpo" else bco_config).get_config("tiny")
        c.data.train, c.init.checkpoint = files["pref"], str(tmp_path / "sft")
        c.train.steps, c.train.log_every, c.train.ckpt_every, c.train.eval_every = 12, 2, 3, 0
    # Killed after logging step 10 (newest checkpoint 9, window [9]); killed while writing the
    # checkpoint of step 6 (newest 3; steps 4 and 6 logged); killed writing the first one.
    resumes_like_straight(supervised.run, c, [("log", 10, 9), ("checkpoint", 6, 3), ("checkpoint", 3, None)])


@pytest.mark.stage
def test_gradient_accumulation_equals_one_big_batch(files, tmp_path):
    supervised.run(sft(files, **{"train.steps": 3}), str(tmp_path / "big"))
    supervised.run(sft(files, **{"train.steps": 3, "optim.accum_steps": 4}), str(tmp_path / "accum"))
    assert_trees_close(host_params(tmp_path / "big"), host_params(tmp_path / "accum"), atol=2e-6)


@pytest.mark.stage
def test_nonfinite_loss_stops_the_run_and_keeps_the_last_good_checkpoint(files, tmp_path, monkeypatch):
    c = sft(files, **{"train.steps": 12, "train.ckpt_every": 4})
    supervised.run(c, str(tmp_path))
    good = host_params(tmp_path)
    c.train.steps = 20
    # A NaN learning rate reaches the step (OptimConfig refuses it as a setting): the next loss is NaN.
    monkeypatch.setattr(optim, "schedule", lambda cfg, steps: optax.constant_schedule(float("nan")))
    with pytest.raises(metrics.NonFiniteError, match=r"the last good checkpoint \(step 12\) is intact"):
        supervised.run(c, str(tmp_path))
    assert checkpoint.resolve(str(tmp_path))[1] == 12
    assert_trees_close(host_params(tmp_path), good, rtol=0, atol=0)
    # Before the first checkpoint there is none to keep, and the error says so.
    c = sft(files, **{"train.steps": 4, "train.ckpt_every": 0})
    with pytest.raises(metrics.NonFiniteError, match="no checkpoint of this run was written yet"):
        supervised.run(c, str(tmp_path / "fresh"))


@pytest.mark.stage
@pytest.mark.parametrize("stage", ["sft", "reward", "dpo"])
def test_eight_devices_give_the_same_loss_and_parameters_as_one(files, tmp_path, stage):
    def config(mesh):
        if stage == "sft":
            c = sft(files)
        else:
            c = (reward_config if stage == "reward" else dpo_config).get_config("tiny")
            c.data.train = files["pref"]
            c.tokenizer.path = str(tmp_path / "one" / "tokenizer.model") if mesh != (1, 1, 1) else ""
        c.train.steps, c.train.log_every, c.train.eval_every = 2, 1, 0
        c.mesh.data, c.mesh.fsdp, c.mesh.tensor = mesh
        return c

    supervised.run(config((1, 1, 1)), str(tmp_path / "one"), devices=jax.devices()[:1])
    ref_params, ref_loss = host_params(tmp_path / "one"), read_metrics(tmp_path / "one")[-1]["loss"]
    for mesh in [(8, 1, 1), (1, 8, 1), (2, 2, 2), (1, 2, 4)]:
        name = "x".join(map(str, mesh))
        supervised.run(config(mesh), str(tmp_path / name))
        np.testing.assert_allclose(read_metrics(tmp_path / name)[-1]["loss"], ref_loss, rtol=1e-5)
        assert_trees_close(host_params(tmp_path / name), ref_params, atol=2e-5)


@pytest.mark.stage
def test_reward_model_and_dpo_learn_a_learnable_preference(files, tmp_path):
    c = sft(files, **{"train.steps": 30})
    supervised.run(c, str(tmp_path / "sft"))
    r = reward_config.get_config("tiny")
    r.data.train = r.data.eval = files["pref"]
    r.init.checkpoint = str(tmp_path / "sft")
    r.train.steps, r.train.log_every, r.optim.lr = 30, 10, 3e-3
    last = supervised.run(r, str(tmp_path / "rm"))
    assert last["eval/accuracy"] > 0.9
    d = dpo_config.get_config("tiny")
    d.data.train = d.data.eval = files["pref"]
    d.init.checkpoint = str(tmp_path / "sft")
    d.train.steps, d.train.log_every, d.train.eval_every = 20, 10, 10
    rows = read_and_run(d, tmp_path / "dpo")
    evals = [row for row in rows if "eval/rewards/margins" in row]
    assert evals[-1]["eval/rewards/margins"] > 0.5 and evals[-1]["eval/rewards/accuracies"] > 0.9


@pytest.mark.stage
def test_dpo_first_step_loss_is_log2_with_and_without_precomputed_reference_and_shared_prefix(files, tmp_path):
    """The first step's loss is log 2 in every layout, the second equal with and without shared prefixes."""
    c = sft(files, **{"train.steps": 4})
    supervised.run(c, str(tmp_path / "sft"))
    losses = []
    for pre in (False, True):
        for shared in (False, True):
            d = dpo_config.get_config("tiny")
            d.data.train = files["pref"]
            d.init.checkpoint = str(tmp_path / "sft")
            d.dpo.precompute_ref, d.dpo.shared_prefix = pre, shared
            d.train.steps, d.train.log_every, d.train.eval_every = 2, 1, 0
            losses.append([row["loss"] for row in read_and_run(d, tmp_path / f"dpo{pre}{shared}") if "loss" in row])
    np.testing.assert_allclose([first for first, _ in losses], [np.log(2)] * 4, rtol=1e-6)
    np.testing.assert_allclose(losses[1][1], losses[0][1], rtol=1e-4)
    np.testing.assert_allclose(losses[3][1], losses[2][1], rtol=1e-4)


def test_bad_data_row_error_names_file_row_and_field(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "hi", "completion": "yo"}\n{"prompt": "hi", "completion": 3}\n')
    c = sft({"sft": str(bad)})
    with pytest.raises(data.DataError, match=r"bad.jsonl: row 1: field 'completion'"):
        supervised.run(c, str(tmp_path / "run"))


@pytest.mark.stage
def test_skipped_rows_are_counted_their_reasons_logged_and_listed_in_the_workdir(files, tmp_path, caplog):
    path = tmp_path / "some_bad.jsonl"
    with open(files["sft"]) as f:
        good = f.read().splitlines()
    path.write_text("\n".join(good[:20] + ['{"prompt": "hi"}', '{"prompt": "hi", oops}'] + good[20:]) + "\n")
    c = sft({"sft": str(path)}, **{"train.steps": 1, "data.on_bad_row": "skip"})
    supervised.run(c, str(tmp_path / "run"))
    with open(tmp_path / "run" / "skipped_rows.jsonl") as f:
        skipped = [json.loads(line) for line in f]
    assert [(r["file"], r["row"], r["field"]) for r in skipped] == [(str(path), 20, "completion"),
                                                                     (str(path), 21, None)]
    assert skipped[0]["problem"] == "missing" and skipped[1]["line"] == 22 and "invalid JSON" in skipped[1]["problem"]
    warning = " ".join(r.getMessage() for r in caplog.records if "skipped" in r.getMessage())
    assert "skipped 2 bad rows" in warning and "row 20: field 'completion': missing" in warning
    assert read_metrics(tmp_path / "run")[0]["data/skipped"] == 2


@pytest.mark.stage
def test_unknown_config_override_is_an_error(tmp_path):
    out = subprocess.run(
        [sys.executable, "-m", "ptx.main", "--config=configs/sft.py:tiny", f"--workdir={tmp_path}",
         "--config.optim.lrr=1e-3"], cwd=ROOT, capture_output=True, text=True,
        env=dict(os.environ, PYTHONPATH=ROOT))
    assert out.returncode != 0 and "lrr" in out.stderr


def preference_stage(module, files, init, **overrides):
    c = module.get_config("tiny")
    c.data.train = c.data.eval = files["pref"]
    c.init.checkpoint = init
    c.train.log_every, c.train.eval_every = 1, 10
    c.update_from_flattened_dict(overrides)
    return c


@pytest.mark.stage
def test_kto_starts_at_the_reference_point_and_kto_and_orpo_learn_a_learnable_preference(files, tmp_path):
    supervised.run(sft(files, **{"train.steps": 30}), str(tmp_path / "sft"))
    rows = read_and_run(preference_stage(kto_config, files, str(tmp_path / "sft"), **{"train.steps": 20}),
                        tmp_path / "kto")
    # Policy == reference on the first step: every implicit reward and z0 are 0, each loss 1 - σ(0).
    first = rows[1]
    assert first["step"] == 1 and first["kl"] == 0.0 and first["rewards/margins"] == 0.0
    np.testing.assert_allclose(first["loss"], 0.5, rtol=1e-6)
    assert first["count/chosen"] == first["count/rejected"] == 4  # each pair gives one of each
    evals = [row for row in rows if "eval/rewards/margins" in row]
    assert evals[-1]["eval/rewards/margins"] > 0.5
    assert rows[-1]["kl"] >= 0.0
    rows = read_and_run(preference_stage(orpo_config, files, str(tmp_path / "sft"),
                                         **{"train.steps": 20, "orpo.lam": 1.0}), tmp_path / "orpo")
    evals = [row for row in rows if "eval/log_odds_chosen" in row]
    assert evals[-1]["eval/log_odds_chosen"] > rows[1]["log_odds_chosen"] + 0.3
    assert evals[-1]["eval/rewards/accuracies"] > 0.9
    assert evals[-1]["eval/nll_loss"] < rows[1]["nll_loss"]


@pytest.mark.stage
@pytest.mark.parametrize("stage", ["orpo", "dpo"])
def test_orpo_holds_no_second_copy_of_the_weights(files, tmp_path, monkeypatch, stage):
    supervised.run(sft(files, **{"train.steps": 1}), str(tmp_path / "sft"))
    copies = []
    original = metrics.MetricWriter.write

    def write(self, step, scalars, **kw):
        # Arrays shaped like one weight (the MLP's down projection): parameters, Adam's two moments,
        # and for DPO the frozen reference.
        shape = (2, 192, 64)
        copies.append(sum(a.shape == shape for a in jax.live_arrays()))
        return original(self, step, scalars, **kw)

    monkeypatch.setattr(metrics.MetricWriter, "write", write)
    module = orpo_config if stage == "orpo" else dpo_config
    supervised.run(preference_stage(module, files, str(tmp_path / "sft"), **{"train.steps": 2, "train.eval_every": 0}),
                   str(tmp_path / stage))
    assert copies[1:] == [3 if stage == "orpo" else 4] * 2


def test_kto_rows_score_like_sft_rows_and_its_mismatched_pairs_shift_completions_by_one(files, tmp_path):
    c = kto_config.get_config("tiny")
    rows, _ = data.load_rows(files["pref"], "unpaired")
    tok = common.train_workdir_tokenizer(c, str(tmp_path), rows)
    rows = rows[:4]
    arrays, _ = data.encode_unpaired(rows, tok, max_len=40, max_prompt_len=24)
    model = Transformer(supervised.model_config(c, methods.get("kto"), tok, None))
    params = init_params(model.cfg, jax.random.PRNGKey(1))
    join = jax.jit(logprobs.join_prompt_completion)
    got = logprobs.completion_logps(model, params, join(arrays["prompt_tokens"], arrays["prompt_lens"],
                                                     arrays["completion"], arrays["completion_lens"]))
    shifted = logprobs.completion_logps(model, params, join(
        arrays["prompt_tokens"], arrays["prompt_lens"], np.roll(arrays["completion"], 1, 0),
        np.roll(arrays["completion_lens"], 1, 0)))
    # The same (prompt, completion) texts in SFT's right-padded layout, scored as DPO scores them.
    flat = [(r["prompt"], side) for r in rows for side in (r["chosen"], r["rejected"])]
    for pairs, want in ((flat, got), ([(p, flat[i - 1][1]) for i, (p, _) in enumerate(flat)], shifted)):
        sft_arrays, _ = data.encode_sft([{"prompt": p, "completion": x} for p, x in pairs], tok, max_len=40,
                                        max_prompt_len=24)
        out = model.apply({"params": params}, sft_arrays["inputs"], sft_arrays["positions"],
                          sft_arrays["segment_ids"])
        ref = sequence_logps(token_logprobs(out.logits, sft_arrays["targets"]), sft_arrays["loss_mask"])
        np.testing.assert_allclose(want, ref, rtol=1e-5, atol=1e-4)


@pytest.mark.stage
def test_with_ckpt_every_0_metrics_reach_the_host_only_at_log_steps(tmp_path, monkeypatch):
    calls = []
    original = metrics.mean_metrics
    monkeypatch.setattr(metrics, "mean_metrics", lambda h: calls.append(len(h)) or original(h))
    c = sft_config.get_config("tiny")
    c.train.steps, c.train.log_every, c.train.ckpt_every, c.train.eval_every = 6, 3, 0, 0
    supervised.run(c, str(tmp_path))
    # One transfer of each 3-step window; before, one per step (ckpt_every 0 counted as 1).
    assert calls == [3, 3]
    with open(os.path.join(tmp_path, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    assert [r["step"] for r in rows] == [0, 3, 6] and "tokens_per_s" in rows[-1]


def world_and_hf_base(tmp_path):
    """The embedded world's files and a small model saved as a Hugging Face directory
    (tmp_path / 'hf', with a tokenizer trained on the world): (files, params)."""
    files = world.World(world.WorldConfig(n_pretrain=50, n_sft=40, n_pref=40, n_heldout=8)).write(
        str(tmp_path / "world"))
    tok = train_tokenizer([json.loads(line)["text"] for line in open(files["pretrain"])],
                          vocab_size=512, path=str(tmp_path / "tok.model"))
    cfg = ModelConfig(vocab_size=512, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=64,
                      tie_embeddings=False)
    params = init_params(cfg, jax.random.PRNGKey(3))
    hf.save_params(params, cfg, str(tmp_path / "hf"), tokenizer=tok)
    return files, params


@pytest.mark.stage
def test_sft_stage_starts_from_an_hf_dir(tmp_path, monkeypatch):
    """init.hf_dir: the stage reads architecture, weights and tokenizer from the directory."""
    files, params = world_and_hf_base(tmp_path)
    c = sft_config.get_config("tiny")
    c.data.train = files["sft"]
    c.init.hf_dir = str(tmp_path / "hf")
    # A learning rate of 0 reaches the step (OptimConfig refuses it as a setting): the weights stay.
    monkeypatch.setattr(optim, "schedule", lambda cfg, steps: optax.constant_schedule(0.0))
    c.train.steps, c.train.eval_every = 1, 0
    supervised.run(c, str(tmp_path / "run"))
    loaded, meta = checkpoint.load_params(str(tmp_path / "run"))
    assert meta["model"]["d_model"] == 32 and meta["model"]["tie_embeddings"] is False
    assert_same_params(jax.device_get(loaded), jax.device_get(params))


@pytest.mark.stage
def test_lora_reward_stage_on_an_hf_base_trains_and_its_checkpoint_loads_merged(tmp_path):
    """Adapters on an HF trunk with a fresh full scalar head; loading merges into that HF base."""
    files, params = world_and_hf_base(tmp_path)
    c = reward_config.get_config("tiny")
    c.data.train = files["preference"]
    c.init.hf_dir = str(tmp_path / "hf")
    c.lora.rank = 4
    # The head starts at zero, so the trunk's adapters get gradient from the second step on.
    c.train.steps, c.train.eval_every, c.optim.lr = 3, 0, 1e-2
    c.optim.warmup_steps, c.optim.schedule = 0, "constant"
    supervised.run(c, str(tmp_path / "rm"))
    loaded, meta = checkpoint.load_params(str(tmp_path / "rm"))
    assert meta["model"]["scalar_head"] is True and meta["lora"]["base"]["hf_dir"] == str(tmp_path / "hf")
    loaded = jax.device_get(loaded)
    assert np.abs(loaded["scalar_head"]["kernel"]).max() > 0  # the head trained in full
    np.testing.assert_array_equal(loaded["embed"]["embedding"], params["embed"]["embedding"])  # not adapted
    assert np.abs(loaded["layers"]["attn"]["q"]["kernel"] - params["layers"]["attn"]["q"]["kernel"]).max() > 0
