"""LoRA: exact start, adapters-only training, merge equals the unmerged adapter model, DPO, sharding."""
import functools
import json
import re

import flax.linen as nn
import flax.traverse_util
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
from jax.sharding import PartitionSpec as P

from ptx import lora, sharding, steps
from ptx.model import ModelConfig, Transformer, count_params, init_params

CFG = ModelConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=64,
                  tie_embeddings=False)
# Every kernel: the stacked attention / MLP ones and the unstacked 2-D LM head.
LORA = lora.LoraConfig(rank=4, alpha=8.0, targets=lora.DEFAULT_TARGETS + (r"lm_head/kernel",))
MODEL = Transformer(CFG)
DPO = ml_collections.ConfigDict(dict(beta=0.1, loss_type="sigmoid", label_smoothing=0.0,
                                     reference_free=False, gamma=0.0, soft_labels=False))
STEPS = 8


def sft_batch(seed, b=8, t=16, prefix=""):
    rng = np.random.default_rng(seed)
    tokens = rng.integers(1, CFG.vocab_size, (b, t + 1)).astype(np.int32)
    mask = np.ones((b, t), np.float32)
    mask[:, : t // 4] = 0.0  # a prompt
    out = {"inputs": tokens[:, :-1], "targets": tokens[:, 1:],
           "positions": np.broadcast_to(np.arange(t, dtype=np.int32), (b, t)).copy(),
           "segment_ids": np.ones((b, t), np.int32), "loss_mask": mask}
    return {prefix + k: v for k, v in out.items()}


def pref_batch(seed, b=4, t=16):
    batch = dict(sft_batch(seed, b, t, "chosen_"), **sft_batch(seed + 1000, b, t, "rejected_"))
    batch["prob_chosen"] = np.ones((b,), np.float32)
    return batch


def logits(params, batch):
    return MODEL.apply({"params": params}, batch["inputs"], batch["positions"], batch["segment_ids"]).logits


def host(tree):
    return jax.tree_util.tree_map(np.array, jax.device_get(tree))


def make_step(loss_fn, tx):
    return jax.jit(functools.partial(steps.train_step, loss_fn=loss_fn, tx=tx, lr_fn=lambda s: 0.0,
                                     accum_steps=1))


@pytest.fixture(scope="module")
def base():
    return jax.jit(lambda r: init_params(CFG, r))(jax.random.PRNGKey(0))


@pytest.fixture(scope="module")
def trained(base):
    """STEPS AdamW steps of SFT on one batch, state over the adapters only, base passed as frozen."""
    base_before = host(base)
    adapters0 = lora.init(base, LORA, jax.random.PRNGKey(1))
    tx = optax.adamw(1e-2)
    step = make_step(lora.loss_fn(functools.partial(steps.sft_loss_fn, MODEL), LORA), tx)
    state = steps.init_state(adapters0, tx)
    frozen = {"base": base, "ref": None}
    batch = sft_batch(0)
    losses = []
    for _ in range(STEPS):
        state, m = step(state, batch, frozen)
        losses.append(float(m["loss"]))
    return dict(base_before=base_before, adapters0=host(adapters0), state=state, losses=losses, step=step, tx=tx)


def test_default_targets_are_the_attention_and_mlp_kernels(base):
    paths = lora.targeted(base, lora.LoraConfig(rank=2))
    assert sorted(paths) == sorted([f"layers/attn/{n}/kernel" for n in "qkvo"]
                                   + [f"layers/{n}/kernel" for n in ("gate", "up", "down")])


def test_adapter_shapes_flatten_input_and_output_axes(base):
    ad = lora.init(base, LORA, jax.random.PRNGKey(1))
    L, d, h, kvh, hd, ff, r = 2, 32, 4, 2, 8, 64, 4
    expect = {"layers/attn/q/kernel": (d, h * hd), "layers/attn/k/kernel": (d, kvh * hd),
              "layers/attn/o/kernel": (h * hd, d), "layers/gate/kernel": (d, ff), "layers/down/kernel": (ff, d)}
    flat = flax.traverse_util.flatten_dict(ad, sep="/")
    for path, (n_in, n_out) in expect.items():
        assert flat[path + "/a"].shape == (L, n_in, r) and flat[path + "/a"].dtype == jnp.float32
        assert flat[path + "/b"].shape == (L, r, n_out)
        assert not np.any(flat[path + "/b"]) and np.std(flat[path + "/a"]) > 0
    assert flat["lm_head/kernel/a"].shape == (d, r) and flat["lm_head/kernel/b"].shape == (r, CFG.vocab_size)


def test_step_zero_logits_equal_the_base_model_exactly(base):
    adapters = lora.init(base, LORA, jax.random.PRNGKey(1))
    merged = jax.jit(lora.apply, static_argnums=2)(base, adapters, LORA)
    assert jax.tree_util.tree_structure(merged) == jax.tree_util.tree_structure(base)
    jax.tree_util.tree_map(np.testing.assert_array_equal, host(merged), host(base))
    batch = sft_batch(3)
    np.testing.assert_array_equal(np.asarray(logits(merged, batch)), np.asarray(logits(base, batch)))


def test_merged_dtypes_follow_the_base_unless_asked(base):
    bf16 = jax.tree_util.tree_map(lambda x: x.astype(jnp.bfloat16), base)
    adapters = lora.init(bf16, LORA, jax.random.PRNGKey(1))
    merged = lora.apply(bf16, adapters, LORA)
    assert all(x.dtype == jnp.bfloat16 for x in jax.tree_util.tree_leaves(merged))
    jax.tree_util.tree_map(np.testing.assert_array_equal, host(merged), host(bf16))
    wide = lora.apply(bf16, adapters, LORA, dtype=jnp.float32)
    assert wide["layers"]["attn"]["q"]["kernel"].dtype == jnp.float32
    assert wide["layers"]["attn_norm"]["scale"].dtype == jnp.bfloat16  # not adapted: untouched


def test_training_changes_only_adapters_and_lowers_the_loss(base, trained):
    state = trained["state"]
    # The base is bit-identical after training.
    jax.tree_util.tree_map(np.testing.assert_array_equal, host(base), trained["base_before"])
    # The trained tree is the adapter tree, and every adapter leaf moved.
    assert jax.tree_util.tree_structure(state.params) == jax.tree_util.tree_structure(trained["adapters0"])
    moved = jax.tree_util.tree_map(lambda new, old: bool(np.any(np.asarray(new) != old)),
                                   state.params, trained["adapters0"])
    assert all(jax.tree_util.tree_leaves(moved)), moved
    assert trained["losses"][-1] < trained["losses"][0] - 0.1, trained["losses"]


def test_optimizer_state_holds_adapter_moments_only(base, trained):
    adapters = trained["state"].params
    adapter_shapes = {x.shape for x in jax.tree_util.tree_leaves(adapters)}
    base_shapes = {x.shape for x in jax.tree_util.tree_leaves(base)}
    opt_leaves = jax.tree_util.tree_leaves(trained["state"].opt_state)
    arrays = [x for x in opt_leaves if x.ndim > 0]
    assert {x.shape for x in arrays} <= adapter_shapes
    assert not {x.shape for x in arrays} & base_shapes
    # AdamW: first and second moments of each adapter leaf, nothing more.
    assert sum(x.size for x in arrays) == 2 * count_params(adapters)


def unmerged_logits(base, adapters, lora_cfg, batch):
    """The adapter model as LoRA defines it: x @ W + scale * (x @ A) @ B at each adapted layer.

    A and B sit beside each adapted kernel as extra parameters (so nn.scan slices
    them per layer) and an interceptor adds the low-rank path to the Dense output;
    W + scale * A @ B is never formed.
    """
    flat = flax.traverse_util.flatten_dict(jax.tree_util.tree_map(lambda x: x, base), sep="/")
    for path, value in flax.traverse_util.flatten_dict(adapters, sep="/").items():
        kernel, _, leaf = path.rpartition("/")  # '.../q/kernel', 'a'
        flat[kernel.removesuffix("/kernel") + "/lora_" + leaf] = value
    params = flax.traverse_util.unflatten_dict(flat, sep="/")
    seen = set()

    def interceptor(next_fun, args, kwargs, context):
        out = next_fun(*args, **kwargs)
        mod = context.module
        if not (isinstance(mod, nn.DenseGeneral) and context.method_name == "__call__"
                and mod.has_variable("params", "lora_a")):
            return out
        seen.add(mod.name)
        a, b = mod.get_variable("params", "lora_a"), mod.get_variable("params", "lora_b")
        x = args[0].astype(jnp.float32)
        x = x.reshape(x.shape[:2] + (-1,))  # [batch, seq, in]
        hi = jax.lax.Precision.HIGHEST
        low = jnp.matmul(jnp.matmul(x, a, precision=hi), b, precision=hi) * lora_cfg.scale
        return (out.astype(jnp.float32) + low.reshape(out.shape)).astype(out.dtype)

    with nn.intercept_methods(interceptor):
        out = logits(params, batch)
    assert seen == {"q", "k", "v", "o", "gate", "up", "down", "lm_head"}, seen
    return out


def test_merged_model_equals_the_unmerged_adapter_model_after_training(base, trained):
    adapters = trained["state"].params
    batch = sft_batch(5)
    merged = np.asarray(logits(lora.merge(base, adapters, LORA), batch))
    unmerged = np.asarray(unmerged_logits(base, adapters, LORA, batch))
    np.testing.assert_allclose(merged, unmerged, rtol=1e-5, atol=1e-5)
    # The adapters are far from zero, so the comparison tests the merge.
    assert np.max(np.abs(merged - np.asarray(logits(base, batch)))) > 1e-1


def test_dpo_reference_is_the_base_and_step_zero_loss_is_log_2(base):
    adapters = lora.init(base, LORA, jax.random.PRNGKey(1))
    batch = pref_batch(7)
    frozen = {"base": base, "ref": base}  # the same arrays: no copy of the base
    # The reference a DPO step reads: the base tree itself, adapters disabled.
    ref = lora.apply(frozen["ref"], None, LORA)
    assert ref is base
    pair_logps = jax.jit(lambda p, b: steps.pair_logps(MODEL, p, b)[0])
    ref_logps, base_logps = pair_logps(ref, batch), pair_logps(base, batch)
    for r, b in zip(ref_logps, base_logps):
        np.testing.assert_array_equal(np.asarray(r), np.asarray(b))

    loss_fn = lora.loss_fn(functools.partial(steps.dpo_loss_fn, MODEL, dpo_cfg=DPO), LORA)
    evaluate = jax.jit(functools.partial(steps.eval_step, loss_fn=loss_fn))
    # Step 0: the merged policy is bit-identical to the reference, so every
    # log-ratio is exactly 0 and the sigmoid loss exactly log 2.
    m = evaluate(adapters, batch, frozen)
    assert m["loss"] == np.float32(np.log(2.0)), float(m["loss"])
    for k in ("rewards/chosen", "rewards/rejected", "rewards/margins"):
        assert m[k] == 0.0, (k, float(m[k]))

    tx = optax.adamw(1e-2)
    step = make_step(loss_fn, tx)
    state = steps.init_state(adapters, tx)
    history = []
    for _ in range(6):
        state, m = step(state, batch, frozen)
        history.append(float(m["loss"]))
    # Inside value_and_grad XLA compiles the policy forward apart from the
    # reference's, so the logged loss may differ from log 2 by float32 rounding
    # (full-parameter DPO from identical weights logs the same value).
    assert abs(history[0] - np.log(2.0)) < 3e-7, history[0]
    assert history[-1] < history[0] - 0.05, history

    # After training, the step's implicit rewards are measured against the base.
    merged = lora.apply(base, state.params, LORA)
    (pc, pr), (rc, rr) = pair_logps(merged, batch), pair_logps(base, batch)
    m = evaluate(state.params, batch, frozen)
    np.testing.assert_allclose(float(m["rewards/chosen"]), 0.1 * float(jnp.mean(pc - rc)), rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(float(m["rewards/rejected"]), 0.1 * float(jnp.mean(pr - rr)), rtol=1e-4, atol=1e-6)
    assert abs(float(m["rewards/margins"])) > 1e-3


@pytest.mark.parametrize("pattern", [r"layers/attn/nope/kernel", r"layers/attn_norm/scale", r"embed/embedding",
                                     r"layers/attn/(q|k)/(kernel|bias)"])
def test_a_bad_target_is_an_error_naming_it(base, pattern):
    if "bias" in pattern:
        base = init_params(CFG.replace(qkv_bias=True), jax.random.PRNGKey(0))
    cfg = lora.LoraConfig(rank=2, targets=(r"layers/up/kernel", pattern))
    with pytest.raises(ValueError, match=re.escape(repr(pattern))):
        lora.init(base, cfg, jax.random.PRNGKey(0))


def test_bad_config_is_an_error():
    with pytest.raises(NotImplementedError, match="lora.dropout"):
        lora.LoraConfig(rank=4, dropout=0.1)
    with pytest.raises(ValueError, match="bad regex"):
        lora.LoraConfig(rank=4, targets=("q/(kernel",))
    with pytest.raises(ValueError, match="lora.rank"):
        lora.LoraConfig(rank=-1)
    with pytest.raises(ValueError, match="off"):
        lora.init({}, lora.LoraConfig(rank=0), jax.random.PRNGKey(0))
    c = ml_collections.ConfigDict(dict(rank=8, alpha=16.0, dropout=0.0, targets=[r"q/kernel"]))
    cfg = lora.LoraConfig.from_config(c)
    assert cfg.targets == (r"q/kernel",) and cfg.scale == 2.0 and hash(cfg)


def test_param_counts(base):
    cfg = lora.LoraConfig(rank=2)
    adapters = lora.init(base, cfg, jax.random.PRNGKey(0))
    counts = lora.param_counts(base, adapters)
    L, d, ff, q, kv, r = 2, 32, 64, 32, 16, 2
    per_layer = r * ((d + q) * 2 + (d + kv) * 2 + (d + ff) * 3)
    assert counts["trainable"] == L * per_layer
    assert counts["frozen"] == count_params(base)
    assert counts["trainable_bytes"] == 4 * counts["trainable"] and counts["frozen_bytes"] == 4 * counts["frozen"]
    assert 0 < counts["trainable_fraction"] < 1


def test_adapters_shard_like_their_weights_on_a_2x2x2_mesh(base, trained):
    mesh = sharding.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    base_rules = sharding.param_rules(CFG)
    abstract = jax.eval_shape(lambda: lora.init(base, LORA, jax.random.PRNGKey(1)))
    rules = lora.sharding_rules(base_rules, abstract)
    specs = sharding.tree_specs(abstract, rules, mesh, strict=True)
    attn, layers = specs["layers"]["attn"], specs["layers"]
    assert attn["q"]["kernel"] == {"a": P(None, "fsdp", None), "b": P(None, None, "tensor")}
    assert attn["o"]["kernel"] == {"a": P(None, "tensor", None), "b": P(None, None, "fsdp")}
    assert layers["down"]["kernel"] == {"a": P(None, "tensor", None), "b": P(None, None, "fsdp")}
    assert specs["lm_head"]["kernel"] == {"a": P("fsdp", None), "b": P(None, "tensor")}

    # Sharded init, then one sharded step equals the unsharded one.
    adapter_sh = sharding.named(mesh, specs)
    base_sh = sharding.named(mesh, sharding.tree_specs(base, base_rules, mesh, strict=True))
    adapters = jax.jit(lambda r: lora.init(base, LORA, r), out_shardings=adapter_sh)(jax.random.PRNGKey(1))
    assert adapters["layers"]["attn"]["q"]["kernel"]["a"].sharding.spec == P(None, "fsdp", None)
    tx = trained["tx"]
    abstract_state = jax.eval_shape(lambda p: steps.init_state(p, tx), abstract)
    state_sh = sharding.named(mesh, sharding.tree_specs(abstract_state, rules, mesh, strict=False))
    state = jax.jit(lambda p: steps.init_state(p, tx), out_shardings=state_sh)(trained["state"].params)
    frozen = {"base": jax.device_put(base, base_sh), "ref": None}
    frozen_sh = {"base": base_sh, "ref": None}
    loss_fn = lora.loss_fn(functools.partial(steps.sft_loss_fn, MODEL), LORA)
    fn = steps.compile_step(
        lambda s, b, f: steps.train_step(s, b, f, loss_fn=loss_fn, tx=tx, lr_fn=lambda _: 0.0, accum_steps=1),
        in_shardings=(state_sh, sharding.batch_sharding(mesh), frozen_sh),
        out_shardings=(state_sh, sharding.replicated(mesh)), donate_state=True)
    batch = sft_batch(9)
    new, m = fn(state, sharding.put_batch(batch, mesh), frozen)
    _, ref = trained["step"](steps.init_state(trained["state"].params, tx), batch, {"base": base, "ref": None})
    np.testing.assert_allclose(float(m["loss"]), float(ref["loss"]), rtol=1e-5)
    assert new.params["layers"]["gate"]["kernel"]["b"].sharding.spec == P(None, None, "tensor")


def test_lora_stages_train_adapters_only_and_their_checkpoints_load_merged(tmp_path):
    """SFT, reward and DPO stages with lora.rank > 0 end to end through ptx.train."""
    from configs import dpo as dpo_config
    from configs import reward as reward_config
    from configs import sft as sft_config
    from ptx import checkpoint, train

    c = sft_config.get_config("tiny")
    c.train.steps, c.train.eval_every = 4, 0
    train.run(c, str(tmp_path / "sft"))
    base, _ = checkpoint.load_params(str(tmp_path / "sft"))

    c.init.checkpoint = str(tmp_path / "sft")
    c.lora.rank = 4
    c.optim.lr = 1e-2
    train.run(c, str(tmp_path / "lora_sft"))
    merged, meta = checkpoint.load_params(str(tmp_path / "lora_sft"))
    assert meta["lora"]["base"]["checkpoint"] == str(tmp_path / "sft")
    q_delta = np.abs(np.asarray(merged["layers"]["attn"]["q"]["kernel"] - base["layers"]["attn"]["q"]["kernel"]))
    assert q_delta.max() > 0  # adapters trained and merged in
    np.testing.assert_array_equal(merged["embed"]["embedding"], base["embed"]["embedding"])  # not targeted
    # The sft checkpoint (the base) is untouched by the LoRA run.
    again, _ = checkpoint.load_params(str(tmp_path / "sft"))
    jax.tree_util.tree_map(np.testing.assert_array_equal, again, base)

    r = reward_config.get_config("tiny")
    r.init.checkpoint = str(tmp_path / "sft")
    r.lora.rank, r.train.steps, r.train.eval_every = 4, 3, 0
    train.run(r, str(tmp_path / "lora_rm"))
    rm, _ = checkpoint.load_params(str(tmp_path / "lora_rm"))
    assert np.abs(np.asarray(rm["scalar_head"]["kernel"])).max() > 0

    d = dpo_config.get_config("tiny")
    d.init.checkpoint = str(tmp_path / "sft")
    d.lora.rank, d.train.steps, d.train.log_every, d.train.eval_every = 4, 1, 1, 0
    train.run(d, str(tmp_path / "lora_dpo"))
    with open(tmp_path / "lora_dpo" / "metrics.jsonl") as f:
        first = [json.loads(line) for line in f if '"loss"' in line][0]
    np.testing.assert_allclose(first["loss"], np.log(2), atol=3e-7)
    assert first["rewards/margins"] == 0.0
