"""ptx.methods: the method table's rows against the configs, the validation and the dispatch it
feeds; the batch losses on pairs (two rows and shared prefix)."""
import functools
import importlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import quickstart as quickstart_config
from ptx import data, logprobs, losses, methods, rewards, rl_training, stages
from ptx.model import ModelConfig, Transformer, init_params
from ptx.stages import loops, validate

from conftest import assert_trees_close


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
    (got_chosen, got_rejected), lengths = jax.jit(functools.partial(logprobs.pair_logps, m))(params, two)
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
    loss_fn = methods.get("dpo").make_loss(m, losses.DPOConfig(beta=0.5))
    grad = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))
    ((loss_two, metrics_two), grads_two), ((loss, metrics), grads) = (grad(params, b, ref) for b in (two, shared))
    logps = jax.jit(functools.partial(logprobs.pair_logps, m))
    (logps_two, lengths_two), (logps_shared, lengths_shared) = logps(params, two), logps(params, shared)
    np.testing.assert_allclose(logps_shared, logps_two, rtol=1e-5)
    np.testing.assert_array_equal(lengths_shared, lengths_two)
    np.testing.assert_allclose(loss, loss_two, rtol=1e-5)
    assert_trees_close(metrics, metrics_two, rtol=1e-5, atol=1e-6)
    assert_trees_close(grads, grads_two, rtol=1e-4, atol=1e-7)
    orpo = jax.jit(methods.get("orpo").make_loss(m, losses.ORPOConfig()))  # ORPO reads the same log-probs
    np.testing.assert_allclose(orpo(params, shared)[0], orpo(params, two)[0], rtol=1e-5)


def test_shared_prefix_reward_loss_and_gradients_equal_the_two_row_path():
    two, shared = two_row_and_shared_pairs()
    cfg = ModelConfig(vocab_size=256, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=64, scalar_head=True)
    params = init_params(cfg, jax.random.PRNGKey(0))
    # A random head instead of the zero init, so that the trunk has gradients too.
    params["scalar_head"]["kernel"] = jax.random.normal(jax.random.PRNGKey(1), params["scalar_head"]["kernel"].shape)
    loss_fn = methods.get("reward").make_loss(Transformer(cfg), losses.RewardConfig())
    grad = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))
    ((loss_two, metrics_two), grads_two), ((loss, metrics), grads) = (grad(params, b) for b in (two, shared))
    np.testing.assert_allclose(loss, loss_two, rtol=1e-5)
    assert_trees_close(metrics, metrics_two, rtol=1e-5, atol=1e-6)
    assert_trees_close(grads, grads_two, rtol=1e-4, atol=1e-6)  # float32 sums in another order


@pytest.mark.parametrize("method", methods.METHODS, ids=lambda m: m.name)
def test_each_row_matches_its_config_file_its_loop_and_the_validation(method):
    c = importlib.import_module(f"configs.{method.name}").get_config("tiny")
    assert c.stage == method.name and c.data.kind in method.data_kinds
    if method.reads_reward_source:
        c.reward.source = "function"  # the default reads a reward model's checkpoint
    built = method.section_configs(lambda name: c[name].to_dict())
    assert [type(v) for v in built.values()] == [cls for _, cls in method.sections]
    assert stages.RUNNERS[method.name] is loops.LOOPS[method.loop] is loops.runner(method.name)
    assert validate.sections_of(method.name).items() >= dict(method.sections).items()
    if method.needs_init:
        with pytest.raises(validate.ConfigError, match="needs --config.init.checkpoint or --config.init.hf_dir"):
            validate.check(c)
    else:
        validate.check(c)
    if method.quickstart:
        q = quickstart_config.get_config("tiny")
        assert q.methods[method.name] and q[method.name].stage == method.name
    if method.loop == "supervised":
        own = method.own_config(built)
        cfg = ModelConfig(vocab_size=64, d_model=32, n_layers=1, n_heads=2, n_kv_heads=1, d_ff=32,
                          scalar_head=method.scalar_head)
        assert callable(method.make_loss(Transformer(cfg), own)) and isinstance(method.uses_reference(own), bool)


def test_a_row_with_an_unknown_loop_or_a_loss_outside_the_supervised_loop_is_refused():
    with pytest.raises(ValueError, match="loop 'offline'"):
        methods.Method("x", "offline", ("sft",))
    with pytest.raises(ValueError, match="only it, takes a loss builder"):
        methods.Method("x", "rl", ("prompt",), loss=lambda m, c: None)
    with pytest.raises(ValueError, match="only it, takes a loss builder"):
        methods.Method("x", "supervised", ("sft",))


def test_a_methods_own_checks_name_the_field():
    c = importlib.import_module("configs.online_dpo").get_config("tiny")
    c.init.checkpoint, c.reward.source, c.dpo.soft_labels = "", "function", True
    c.init.hf_dir = ""
    with pytest.raises(validate.ConfigError, match="init.checkpoint"):
        validate.check(c)
    with pytest.raises(ValueError, match="^dpo.soft_labels: online DPO labels fresh samples"):
        methods.get("online_dpo").check(methods.get("online_dpo").section_configs(lambda n: c[n].to_dict()), 0)
    p = importlib.import_module("configs.ppo").get_config("tiny")
    with pytest.raises(ValueError, match="^rl.critic: 'reward' starts the critic"):
        methods.get("ppo").check({"rl": rl_training.RLConfig(**p.rl),
                                  "reward": rewards.SourceConfig(source="function")}, 0)


def test_cpo_is_its_preference_term_plus_alpha_times_the_chosen_token_nll_on_both_pair_layouts():
    cfg = ModelConfig(vocab_size=256, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=64)
    m, params = Transformer(cfg), init_params(cfg, jax.random.PRNGKey(0))
    two, shared = two_row_and_shared_pairs()
    cpo = losses.CPOConfig(beta=0.2, alpha=0.7)
    fn = jax.jit(jax.value_and_grad(methods.get("cpo").make_loss(m, cpo), has_aux=True))
    (loss, metrics), grads = fn(params, two)
    (pc, pr), (lc, _) = jax.jit(functools.partial(logprobs.pair_logps, m))(params, two)
    nll = -np.asarray(pc, np.float64).sum() / np.asarray(lc).sum()  # TRL: cross-entropy over every chosen token
    pref = -np.log(1 / (1 + np.exp(-0.2 * (np.asarray(pc, np.float64) - pr))))
    np.testing.assert_allclose(loss, pref.mean() + 0.7 * nll, rtol=1e-5)
    np.testing.assert_allclose(metrics["nll_loss"], nll, rtol=1e-5)
    assert methods.get("cpo").uses_reference(cpo) is False  # no reference model is read
    (loss_shared, _), grads_shared = fn(params, shared)
    np.testing.assert_allclose(loss_shared, loss, rtol=1e-5)
    assert_trees_close(grads_shared, grads, rtol=2e-4, atol=2e-6)


def test_bco_shifts_by_the_running_mean_reward_including_this_batch_and_carries_it():
    cfg = ModelConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=64)
    m = Transformer(cfg)
    params, ref = init_params(cfg, jax.random.PRNGKey(0)), init_params(cfg, jax.random.PRNGKey(1))
    rng = np.random.default_rng(0)
    batch = {"prompt_tokens": rng.integers(2, 64, (4, 6)).astype(np.int32),
             "prompt_lens": np.array([6, 3, 5, 1], np.int32),
             "completion": rng.integers(2, 64, (4, 5)).astype(np.int32),
             "completion_lens": np.array([5, 2, 4, 3], np.int32), "label": np.array([True, False, True, False])}
    bco = methods.get("bco")
    cfg_bco = losses.BCOConfig(beta=0.5)
    carry = jax.tree_util.tree_map(jnp.float32, bco.initial_carry(cfg_bco))
    assert carry == {"mean": 0.0, "count": 0.0} and bco.uses_reference(cfg_bco)
    fn = jax.jit(bco.make_loss(m, cfg_bco))
    policy_logps, ref_logps = jax.jit(functools.partial(methods.unpaired_logps, m))(params, ref, batch)
    rewards = 0.5 * (np.asarray(policy_logps, np.float64) - ref_logps)
    shift = 0.0
    for count in (1, 2):
        loss, metrics = fn(params, batch, ref, carry=carry)
        shift += (rewards.mean() - shift) / count  # TRL's RunningMoments over batch means
        z = rewards - shift
        want = -np.log(1 / (1 + np.exp(-np.where(batch["label"], z, -z))))
        np.testing.assert_allclose(loss, want.mean(), rtol=1e-5)
        np.testing.assert_allclose(metrics["delta"], shift, rtol=1e-5)
        carry = metrics.pop("carry")
        np.testing.assert_allclose([carry["mean"], carry["count"]], [shift, count], rtol=1e-5)
