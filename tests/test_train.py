"""The training loop: learning, resume equality, NaN guard, multi-device equality, config errors."""
import functools
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from configs import dpo as dpo_config
from configs import kto as kto_config
from configs import orpo as orpo_config
from configs import reward as reward_config
from configs import sft as sft_config
from ptx import checkpoint, data, metrics, steps
from ptx.losses import sequence_logps, token_logprobs
from ptx.model import ModelConfig, Transformer, init_params
from ptx.stages import common, supervised

from conftest import assert_trees_close, host_params, read_metrics

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


@pytest.mark.parametrize("stage", ["sft", "dpo"])
def test_a_killed_run_resumes_to_the_same_parameters_and_logs(files, tmp_path, resumes_like_straight, stage):
    # Checkpoints every 3 steps, logs every 2: a checkpoint in mid-window carries the window.
    c = sft(files, **{"train.steps": 12, "train.ckpt_every": 3})
    if stage == "dpo":
        supervised.run(sft(files, **{"train.steps": 2}), str(tmp_path / "sft"))
        c = dpo_config.get_config("tiny")
        c.data.train, c.init.checkpoint = files["pref"], str(tmp_path / "sft")
        c.train.steps, c.train.log_every, c.train.ckpt_every, c.train.eval_every = 12, 2, 3, 0
    # Killed after logging step 10 (newest checkpoint 9, window [9]); killed while writing the
    # checkpoint of step 6 (newest 3; steps 4 and 6 logged); killed writing the first one.
    resumes_like_straight(supervised.run, c, [("log", 10, 9), ("checkpoint", 6, 3), ("checkpoint", 3, None)])


def test_gradient_accumulation_equals_one_big_batch(files, tmp_path):
    supervised.run(sft(files, **{"train.steps": 3}), str(tmp_path / "big"))
    supervised.run(sft(files, **{"train.steps": 3, "optim.accum_steps": 4}), str(tmp_path / "accum"))
    assert_trees_close(host_params(tmp_path / "big"), host_params(tmp_path / "accum"), atol=2e-6)


def test_train_step_applies_a_finite_update_and_skips_a_nonfinite_one():
    w = jnp.array([1.0, -2.0, 3.0])
    tx = optax.sgd(0.1)
    step = jax.jit(functools.partial(
        steps.train_step, loss_fn=lambda p, batch, _: (batch["scale"] * jnp.sum(p["w"] ** 2), {}),
        tx=tx, lr_fn=lambda _: 0.1, accum_steps=1))
    good, m = step(steps.init_state({"w": w}, tx), {"scale": jnp.float32(1.0)}, None)
    np.testing.assert_allclose(good.params["w"], w - 0.1 * 2 * w, rtol=1e-6)
    np.testing.assert_allclose([m["grad_norm"], m["update_norm"]],
                               [np.linalg.norm(2 * w), np.linalg.norm(0.2 * w)], rtol=1e-6)
    assert int(good.step) == 1 and float(m["nonfinite"]) == 0
    bad, m = step(good, {"scale": jnp.float32(np.nan)}, None)
    np.testing.assert_array_equal(bad.params["w"], good.params["w"])
    assert int(bad.step) == 1 and float(m["nonfinite"]) == 1 and float(m["update_norm"]) == 0


def test_nonfinite_loss_stops_the_run_and_keeps_the_last_good_checkpoint(files, tmp_path):
    c = sft(files, **{"train.steps": 12, "train.ckpt_every": 4})
    supervised.run(c, str(tmp_path))
    good = host_params(tmp_path)
    c.train.steps = 20
    c.optim.lr = float("nan")
    with pytest.raises(metrics.NonFiniteError, match=r"the last good checkpoint \(step 12\) is intact"):
        supervised.run(c, str(tmp_path))
    assert checkpoint.resolve(str(tmp_path))[1] == 12
    assert_trees_close(host_params(tmp_path), good, rtol=0, atol=0)
    # Before the first checkpoint there is none to keep, and the error says so.
    c = sft(files, **{"train.steps": 4, "train.ckpt_every": 0, "optim.lr": float("nan")})
    with pytest.raises(metrics.NonFiniteError, match="no checkpoint of this run was written yet"):
        supervised.run(c, str(tmp_path / "fresh"))


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


def two_row_and_shared_pairs():
    """Pairs of different prompt and response lengths (a one-id prompt among them), right-padded,
    as two rows each and as one shared-prefix row."""
    rng = np.random.default_rng(0)
    docs = {"chosen": [], "rejected": []}
    for prompt, n_chosen, n_rejected in ((5, 4, 9), (1, 6, 2), (9, 3, 3), (3, 11, 7)):
        head = [int(i) for i in rng.integers(3, 200, prompt)]
        for side, n in (("chosen", n_chosen), ("rejected", n_rejected)):
            docs[side].append((head + [int(i) for i in rng.integers(3, 200, n)], [0] * prompt + [1] * n))
    two, shared = (data.pair_arrays(docs["chosen"], docs["rejected"], max_len=24, pad_id=0, shared_prefix=on)
                   for on in (False, True))
    assert shared["inputs"].shape[1] < 2 * 24  # one row, shorter than the two it stands for
    for batch in (two, shared):
        batch["prob_chosen"] = np.ones(4, np.float32)
    return two, shared


def test_two_row_pairs_drop_the_prompt_columns_of_every_row_and_keep_the_log_probs():
    """Targets and loss masks start at the first column any row trains on (a 3-id prompt: column
    2); the summed log-probs equal the plain forward's log-softmax at each side's trained targets."""
    rng = np.random.default_rng(1)
    docs = {"chosen": [], "rejected": []}
    for prompt, n_chosen, n_rejected in ((5, 4, 9), (3, 6, 2), (9, 3, 3)):
        head = [int(i) for i in rng.integers(3, 200, prompt)]
        for side, n in (("chosen", n_chosen), ("rejected", n_rejected)):
            docs[side].append((head + [int(i) for i in rng.integers(3, 200, n)], [0] * prompt + [1] * n))
    two = data.pair_arrays(docs["chosen"], docs["rejected"], max_len=24, pad_id=0)
    assert two["chosen_inputs"].shape == (3, 24)
    for key in ("chosen_targets", "chosen_loss_mask", "rejected_targets", "rejected_loss_mask"):
        assert two[key].shape == (3, 22), key
    cfg = ModelConfig(vocab_size=256, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=64)
    m = Transformer(cfg)
    params = init_params(cfg, jax.random.PRNGKey(0))
    (got_chosen, got_rejected), lengths = jax.jit(functools.partial(steps.pair_logps, m))(params, two)
    for side, got, n in (("chosen", got_chosen, lengths[0]), ("rejected", got_rejected, lengths[1])):
        for r, (seq, trained) in enumerate(docs[side]):
            logp = np.asarray(jax.nn.log_softmax(m.apply({"params": params}, np.asarray([seq[:-1]])).logits[0]))
            want = sum(logp[j, seq[j + 1]] for j in range(len(seq) - 1) if trained[j + 1])
            np.testing.assert_allclose(got[r], want, rtol=1e-5)
            assert n[r] == sum(trained[1:])


@pytest.mark.parametrize("model", [dict(attention="xla"), dict(attention="blockwise", attention_block_q=8,
                                                                 attention_block_k=16, remat="full"),
                                   dict(sliding_window=4)], ids=["xla", "blockwise", "window"])
def test_shared_prefix_dpo_loss_and_gradients_equal_the_two_row_path(model):
    """Equal log-probs, loss and gradients (float32) of `two_row_and_shared_pairs`."""
    two, shared = two_row_and_shared_pairs()
    cfg = ModelConfig(vocab_size=256, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=64, **model)
    m = Transformer(cfg)
    params, ref = init_params(cfg, jax.random.PRNGKey(0)), init_params(cfg, jax.random.PRNGKey(1))
    loss_fn = steps.make_loss_fn("dpo", m, dpo=steps.DPOConfig(beta=0.5))
    grad = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))
    ((loss_two, metrics_two), grads_two), ((loss, metrics), grads) = (grad(params, b, ref) for b in (two, shared))
    logps = jax.jit(functools.partial(steps.pair_logps, m))
    (logps_two, lengths_two), (logps_shared, lengths_shared) = logps(params, two), logps(params, shared)
    np.testing.assert_allclose(logps_shared, logps_two, rtol=1e-5)
    np.testing.assert_array_equal(lengths_shared, lengths_two)
    np.testing.assert_allclose(loss, loss_two, rtol=1e-5)
    assert_trees_close(metrics, metrics_two, rtol=1e-5, atol=1e-6)
    assert_trees_close(grads, grads_two, rtol=1e-4, atol=1e-7)
    orpo = jax.jit(steps.make_loss_fn("orpo", m, orpo=steps.ORPOConfig()))  # ORPO reads the same log-probs
    np.testing.assert_allclose(orpo(params, shared)[0], orpo(params, two)[0], rtol=1e-5)


def test_shared_prefix_reward_loss_and_gradients_equal_the_two_row_path():
    two, shared = two_row_and_shared_pairs()
    cfg = ModelConfig(vocab_size=256, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=64, scalar_head=True)
    params = init_params(cfg, jax.random.PRNGKey(0))
    # A random head instead of the zero init, so that the trunk has gradients too.
    params["scalar_head"]["kernel"] = jax.random.normal(jax.random.PRNGKey(1), params["scalar_head"]["kernel"].shape)
    grad = jax.jit(jax.value_and_grad(steps.make_loss_fn("reward", Transformer(cfg)), has_aux=True))
    ((loss_two, metrics_two), grads_two), ((loss, metrics), grads) = (grad(params, b) for b in (two, shared))
    np.testing.assert_allclose(loss, loss_two, rtol=1e-5)
    assert_trees_close(metrics, metrics_two, rtol=1e-5, atol=1e-6)
    assert_trees_close(grads, grads_two, rtol=1e-4, atol=1e-6)  # float32 sums in another order


def test_bad_data_row_error_names_file_row_and_field(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "hi", "completion": "yo"}\n{"prompt": "hi", "completion": 3}\n')
    c = sft({"sft": str(bad)})
    with pytest.raises(data.DataError, match=r"bad.jsonl: row 1: field 'completion'"):
        supervised.run(c, str(tmp_path / "run"))


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
    model = Transformer(supervised.model_config(c, tok, None))
    params = init_params(model.cfg, jax.random.PRNGKey(1))
    join = jax.jit(steps.join_prompt_completion)
    got = steps.completion_logps(model, params, join(arrays["prompt_tokens"], arrays["prompt_lens"],
                                                     arrays["completion"], arrays["completion_lens"]))
    shifted = steps.completion_logps(model, params, join(
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
