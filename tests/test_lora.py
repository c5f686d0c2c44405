"""LoRA: exact start, adapters-only training, merge equals the unmerged adapter model, DPO, sharding,
a bfloat16 base, the RL stages and the merge command."""
import dataclasses
import functools
import json
import re
import warnings

import flax.linen as nn
import flax.traverse_util
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest
from jax.sharding import PartitionSpec as P

from configs import dpo as dpo_config
from configs import grpo as grpo_config
from configs import merge as merge_config
from configs import ppo as ppo_config
from configs import reward as reward_config
from configs import sft as sft_config
from ptx import (
    checkpoint,
    hf,
    inference,
    logprobs,
    lora,
    losses,
    methods,
    rl_training,
    rollout,
    sampler,
    sharding,
    stages,
    steps,
)
from ptx.model import Dense, ModelConfig, Transformer, count_params, init_params
from ptx.stages import common, rl, supervised

CFG = ModelConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=64,
                  tie_embeddings=False)
# Every kernel: the stacked attention / MLP ones and the unstacked 2-D LM head.
LORA = lora.LoraConfig(rank=4, alpha=8.0, targets=lora.DEFAULT_TARGETS + (r"lm_head/kernel",))
MODEL = Transformer(CFG)
DPO = losses.DPOConfig(beta=0.1)
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


def logits(params, batch, model=MODEL):
    return model.apply({"params": params}, batch["inputs"], batch["positions"], batch["segment_ids"]).logits


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
    step = make_step(lora.loss_fn(functools.partial(methods.sft_loss_fn, MODEL), LORA), tx)
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


def unmerged_logits(base, adapters, lora_cfg, batch, model=MODEL):
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
        if not (isinstance(mod, Dense) and context.method_name == "__call__"
                and mod.has_variable("params", "lora_a")):
            return out
        seen.add(mod.name)
        a, b = mod.get_variable("params", "lora_a"), mod.get_variable("params", "lora_b")
        x = args[0].astype(jnp.float32)
        x = x.reshape(x.shape[:x.ndim - mod.in_axes] + (-1,))  # [..tokens.., in]
        hi = jax.lax.Precision.HIGHEST
        low = jnp.matmul(jnp.matmul(x, a, precision=hi), b, precision=hi) * lora_cfg.scale
        return (out.astype(jnp.float32) + low.reshape(out.shape)).astype(out.dtype)

    with nn.intercept_methods(interceptor):
        out = logits(params, batch, model)
    assert seen == adapted_module_names(adapters), seen
    return out


def test_merged_model_equals_the_unmerged_adapter_model_after_training(base, trained):
    adapters = trained["state"].params
    batch = sft_batch(5)
    merged = np.asarray(logits(lora.merge(base, adapters, LORA), batch))
    assert adapted_module_names(adapters) == {"q", "k", "v", "o", "gate", "up", "down", "lm_head"}
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
    pair_logps = jax.jit(lambda p, b: logprobs.pair_logps(MODEL, p, b)[0])
    ref_logps, base_logps = pair_logps(ref, batch), pair_logps(base, batch)
    for r, b in zip(ref_logps, base_logps):
        np.testing.assert_array_equal(np.asarray(r), np.asarray(b))

    loss_fn = lora.loss_fn(functools.partial(methods.dpo_loss_fn, MODEL, dpo_cfg=DPO), LORA)
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
    with pytest.raises(ValueError, match="lora.base_dtype"):
        lora.LoraConfig(rank=4, base_dtype="float16")
    c = ml_collections.ConfigDict(dict(stage="sft", lora=dict(rank=8, alpha=16.0, dropout=0.0, targets=[r"q/kernel"],
                                                              base_dtype="bfloat16")))
    cfg = common.lora_config(c)
    assert cfg.targets == (r"q/kernel",) and cfg.scale == 2.0 and cfg.base_dtype == "bfloat16" and hash(cfg)


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
    mesh = sharding.make_mesh(sharding.MeshConfig(data=2, fsdp=2, tensor=2))
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
    loss_fn = lora.loss_fn(functools.partial(methods.sft_loss_fn, MODEL), LORA)
    fn = steps.compile_step(
        lambda s, b, f: steps.train_step(s, b, f, loss_fn=loss_fn, tx=tx, lr_fn=lambda _: 0.0, accum_steps=1),
        in_shardings=(state_sh, sharding.batch_sharding(mesh), frozen_sh),
        out_shardings=(state_sh, sharding.replicated(mesh)), donate_state=True)
    batch = sft_batch(9)
    new, m = fn(state, sharding.put_global(batch, mesh), frozen)
    _, ref = trained["step"](steps.init_state(trained["state"].params, tx), batch, {"base": base, "ref": None})
    np.testing.assert_allclose(float(m["loss"]), float(ref["loss"]), rtol=1e-5)
    assert new.params["layers"]["gate"]["kernel"]["b"].sharding.spec == P(None, None, "tensor")


@pytest.mark.stage
def test_lora_stages_train_adapters_only_and_their_checkpoints_load_merged(tmp_path):
    """SFT, reward and DPO stages with lora.rank > 0 end to end through the supervised stage."""
    c = sft_config.get_config("tiny")
    c.train.steps, c.train.eval_every = 4, 0
    supervised.run(c, str(tmp_path / "sft"))
    base, _ = checkpoint.load_params(str(tmp_path / "sft"))

    c.init.checkpoint = str(tmp_path / "sft")
    c.lora.rank = 4
    c.optim.lr = 1e-2
    supervised.run(c, str(tmp_path / "lora_sft"))
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
    supervised.run(r, str(tmp_path / "lora_rm"))
    rm, _ = checkpoint.load_params(str(tmp_path / "lora_rm"))
    assert np.abs(np.asarray(rm["scalar_head"]["kernel"])).max() > 0

    d = dpo_config.get_config("tiny")
    d.init.checkpoint = str(tmp_path / "sft")
    d.lora.rank, d.train.steps, d.train.log_every, d.train.eval_every = 4, 1, 1, 0
    supervised.run(d, str(tmp_path / "lora_dpo"))
    with open(tmp_path / "lora_dpo" / "metrics.jsonl") as f:
        first = [json.loads(line) for line in f if '"loss"' in line][0]
    np.testing.assert_allclose(first["loss"], np.log(2), atol=3e-7)
    assert first["rewards/margins"] == 0.0

    # A bfloat16 base: the reference is that same rounded base, so step 0 is still log 2;
    # the merged checkpoint is the rounded base plus the adapters.
    d.lora.base_dtype, d.train.steps = "bfloat16", 2
    supervised.run(d, str(tmp_path / "lora_dpo_bf16"))
    with open(tmp_path / "lora_dpo_bf16" / "metrics.jsonl") as f:
        logged = [json.loads(line) for line in f if '"loss"' in line]
    np.testing.assert_allclose(logged[0]["loss"], np.log(2), atol=3e-7)
    merged, _ = checkpoint.load_params(str(tmp_path / "lora_dpo_bf16"))
    rounded = np.asarray(base["embed"]["embedding"].astype(jnp.bfloat16).astype(jnp.float32))
    np.testing.assert_array_equal(merged["embed"]["embedding"], rounded)


# ---------------------------------------------------------------- full leaves and a bfloat16 base

def test_full_leaves_train_beside_the_adapters(base):
    cfg = lora.LoraConfig(rank=2, full=(r"lm_head/kernel",))
    adapters = lora.init(base, cfg, jax.random.PRNGKey(1))
    head = adapters["lm_head"]["kernel"]
    assert head.dtype == jnp.float32
    np.testing.assert_array_equal(head, base["lm_head"]["kernel"])  # a copy of the base's leaf
    trained = jax.tree_util.tree_map(lambda x: x, adapters)
    trained["lm_head"]["kernel"] = head + 1.0
    merged = lora.apply(base, trained, cfg)
    np.testing.assert_array_equal(merged["lm_head"]["kernel"], np.asarray(base["lm_head"]["kernel"]) + 1.0)
    # A base without the leaf (a reference without the value head) gets it added.
    headless = {k: v for k, v in base.items() if k != "lm_head"}
    np.testing.assert_array_equal(lora.apply(headless, trained, cfg)["lm_head"]["kernel"], head + 1.0)
    specs = sharding.tree_specs(adapters, lora.sharding_rules(sharding.param_rules(CFG), adapters),
                                sharding.make_mesh(sharding.MeshConfig(data=2, fsdp=2, tensor=2)), strict=True)
    assert specs["lm_head"]["kernel"] == P("fsdp", "tensor")  # the base rule itself
    with pytest.raises(ValueError, match="both adapted and trained in full"):
        lora.init(base, lora.LoraConfig(rank=2, targets=(r"lm_head/kernel",), full=(r"lm_head/kernel",)),
                  jax.random.PRNGKey(0))
    with pytest.raises(ValueError, match="lora.full regex"):
        lora.init(base, lora.LoraConfig(rank=2, full=(r"scalar_head/kernel",)), jax.random.PRNGKey(0))


def test_bfloat16_base_halves_its_memory_trains_and_merges_into_the_model_it_trained(base):
    cfg = dataclasses.replace(LORA, base_dtype="bfloat16")
    assert lora.frozen_base(base, LORA) is base  # float32 wanted: no copy
    stored = lora.frozen_base(base, cfg)
    assert all(x.dtype == jnp.bfloat16 for x in jax.tree_util.tree_leaves(stored))
    assert lora.frozen_base(stored, cfg) is stored
    adapters0 = lora.init(base, cfg, jax.random.PRNGKey(1))
    full_bytes = lora.param_counts(base, adapters0)["frozen_bytes"]
    assert lora.param_counts(stored, adapters0)["frozen_bytes"] * 2 == full_bytes

    tx = optax.adamw(1e-2)
    step = make_step(lora.loss_fn(functools.partial(methods.sft_loss_fn, MODEL), cfg), tx)
    state, batch, history = steps.init_state(adapters0, tx), sft_batch(0), []
    for _ in range(4):
        state, m = step(state, batch, {"base": stored, "ref": None})
        history.append(float(m["loss"]))
    assert history[-1] < history[0] - 0.05, history
    # The step at step 0 sees the bfloat16-rounded base exactly, in float32.
    rounded = jax.tree_util.tree_map(lambda x: x.astype(jnp.float32), stored)
    evaluate = jax.jit(functools.partial(steps.eval_step, loss_fn=lora.loss_fn(
        functools.partial(methods.sft_loss_fn, MODEL), cfg)))
    plain = jax.jit(lambda p, b: methods.sft_loss_fn(MODEL, p, b)[0])
    ref, unrounded = float(plain(rounded, batch)), float(plain(base, batch))
    got = float(evaluate(adapters0, batch, {"base": stored, "ref": None})["loss"])
    assert abs(got - ref) < 1e-6 < 1e-5 < abs(ref - unrounded), (got, ref, unrounded)
    # Merging into the float32 source gives exactly what the step trained: the bfloat16 base plus the update.
    merged = lora.merge(base, state.params, cfg)
    step_view = lora.apply(stored, state.params, cfg, dtype=jnp.float32)
    as_f32 = lambda x: np.asarray(x, np.float32)
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_array_equal(as_f32(a), as_f32(b)), merged, step_view)
    assert merged["layers"]["attn"]["q"]["kernel"].dtype == jnp.float32
    # A float32 base that reaches a bfloat16 step is an error, not a silently different model.
    with pytest.raises(ValueError, match="lora.frozen_base"):
        step(state, batch, {"base": base, "ref": None})


# ---------------------------------------------------------------- RL, merge command (through the stages)

def raw_state(workdir):
    """The newest checkpoint's saved train state as host arrays (no target tree: what is on disk)."""
    directory, step = checkpoint.resolve(str(workdir))
    # Without a target orbax places each array as it was saved, and warns that it does.
    with ocp.PyTreeCheckpointer() as reader, warnings.catch_warnings():
        warnings.filterwarnings("ignore", "Sharding info not provided", UserWarning)
        return host(reader.restore(f"{directory}/{step}/state"))


def adapted_module_names(adapters):
    return {p.split("/")[-3] for p in flax.traverse_util.flatten_dict(adapters, sep="/") if p.endswith("kernel/a")}


def rl_lora_config(kind, sft_dir, base_dtype="float32"):
    c = (ppo_config if kind == "ppo" else grpo_config).get_config("tiny")
    c.init.checkpoint = sft_dir
    c.reward.source, c.reward.function = "function", "reward_fns:letter_share"
    c.rl.critic = "policy"
    c.lora.rank, c.lora.base_dtype = 4, base_dtype
    c.train.steps, c.train.ckpt_every = 1, 0
    return c


@pytest.mark.stage
@pytest.mark.parametrize("kind,base_dtype", [("ppo", "float32"), ("grpo", "float32"), ("ppo", "bfloat16")])
def test_rl_lora_first_minibatch_ratio_is_one_and_kl_is_zero_against_the_base(sft_dir, kind, base_dtype):
    c = rl_lora_config(kind, sft_dir, base_dtype)
    c.rl.old_logprobs = "forward"  # the update's own program, so the ratio is exactly 1
    mesh = sharding.make_mesh(sharding.MeshConfig(**c.mesh))
    t = common.training(c)
    policy_cfg, _, params, ref = rl.build_models(c, mesh, t, common.init_source(c))
    lcfg, rl_cfg = rl.lora_config(t, t.sections["rl"]), t.sections["rl"]
    # The trainable tree: adapters (+ the value head of PPO, in full); the reference: the SFT weights.
    flat = flax.traverse_util.flatten_dict(params["policy"], sep="/")
    assert all(p.endswith(("/a", "/b")) for p in flat if not p.startswith("scalar_head"))
    assert ("scalar_head/kernel" in flat) == (kind == "ppo") and "critic" not in params
    sft, _ = checkpoint.load_params(sft_dir)
    jax.tree_util.tree_map(lambda r, s: np.testing.assert_array_equal(
        np.asarray(r, np.float32), np.asarray(jnp.asarray(s).astype(base_dtype), np.float32)), ref, sft)
    assert {x.dtype for x in jax.tree_util.tree_leaves(ref)} == {jnp.dtype(base_dtype)}

    policy = jax.jit(lambda p, f: rl_training.policy_params(p, f, lcfg))(params, ref)
    model = Transformer(policy_cfg)
    prompts = np.array([[2, 40, 41, 42], [2, 43, 44, 0]], np.int32).repeat(4, axis=0)
    lens = np.array([4, 3], np.int32).repeat(4)
    out = sampler.make_generate_fn(policy_cfg, max_new_tokens=8, eos_id=3)(
        policy, prompts, lens, jax.random.split(jax.random.PRNGKey(0), 8))
    seq = rollout.build_sequences(prompts, lens, out, pad_id=0)
    scores = np.linspace(0, 1, 8).astype(np.float32)
    batch, m = rl_training.prepare(dict(params, policy=policy), ref, seq, scores, 0.1, policy_model=model,
                               critic_model=None, width=4, rl_cfg=rl_cfg)
    assert float(m["objective/kl"]) == 0.0
    np.testing.assert_array_equal(batch["ref_logps"], batch["old_logps"])
    first = jax.tree_util.tree_map(lambda x: x[:4], batch)
    loss_fn = jax.jit(lambda p, b, f: rl_training.rl_loss_fn(p, b, f, policy_model=model, critic_model=None, width=4,
                                                         rl_cfg=rl_cfg, lora_cfg=lcfg))
    _, metrics = loss_fn(params, first, ref)
    np.testing.assert_allclose(metrics["val/ratio"], 1.0, atol=1e-6)
    assert float(metrics["policy/clipfrac"]) == 0.0
    if kind == "grpo":
        np.testing.assert_allclose(metrics["loss/kl"], 0.0, atol=1e-7)


@pytest.mark.stage
def test_rl_lora_iteration_trains_adapters_and_value_head_only_and_loads_merged(sft_dir, tmp_path):
    c = rl_lora_config("ppo", sft_dir)
    c.optim.lr = 1e-2
    rl.run(c, str(tmp_path))
    saved = raw_state(tmp_path)
    trained = saved["params"]["policy"]
    assert set(saved["params"]) == {"policy"}
    flat = flax.traverse_util.flatten_dict(trained, sep="/")
    kernels = lora.targeted(checkpoint.load_params(sft_dir)[0], common.lora_config(c))
    assert set(flat) == {f"{k}/{ab}" for k in kernels for ab in "ab"} | {"scalar_head/kernel"}
    # B and the value head start at zero; both moved. AdamW moments of these leaves only.
    assert all(np.any(v) for p, v in flat.items() if p.endswith("/b") or p.startswith("scalar_head"))
    moments = [x for x in jax.tree_util.tree_leaves(saved["opt_state"]) if np.ndim(x) > 0]
    assert sum(x.size for x in moments) == 2 * sum(x.size for x in flat.values())
    assert {x.shape for x in moments} == {x.shape for x in flat.values()}

    meta = checkpoint.read_meta(str(tmp_path))
    assert meta["lora"]["base"]["checkpoint"] == sft_dir and meta["params_key"] == "policy"
    loaded, _ = checkpoint.load_params(str(tmp_path))
    base, _ = checkpoint.load_params(sft_dir)
    scale = c.lora.alpha / c.lora.rank
    for path, w in flax.traverse_util.flatten_dict(base, sep="/").items():
        got = np.asarray(flax.traverse_util.flatten_dict(loaded, sep="/")[path])
        if path + "/a" in flat:  # W + alpha / r * A @ B, by hand
            a, b = flat[path + "/a"].astype(np.float64), flat[path + "/b"].astype(np.float64)
            want = np.asarray(w, np.float64) + scale * np.matmul(a, b).reshape(w.shape)
            np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
            assert np.abs(got - np.asarray(w)).max() > 0
        else:
            np.testing.assert_array_equal(got, np.asarray(w))  # not adapted: the base's, unchanged
    np.testing.assert_array_equal(loaded["scalar_head"]["kernel"], flat["scalar_head/kernel"])
    # Sampling and evaluation load the same merged weights.
    policy = inference.load_policy(str(tmp_path), sharding.make_mesh(sharding.MeshConfig(**c.mesh)))
    jax.tree_util.tree_map(lambda x, y: np.testing.assert_array_equal(np.asarray(x), np.asarray(y)),
                           policy.params, loaded)


@pytest.mark.stage
def test_merge_command_writes_a_full_checkpoint_whose_logits_equal_the_adapter_model(sft_dir, tmp_path):
    c = sft_config.get_config("tiny")
    c.init.checkpoint, c.lora.rank, c.optim.lr = sft_dir, 4, 1e-2
    c.train.steps, c.train.eval_every = 4, 0
    supervised.run(c, str(tmp_path / "lora"))

    m = merge_config.get_config()
    m.checkpoint, m.out, m.hf_out = str(tmp_path / "lora"), str(tmp_path / "full"), str(tmp_path / "hf")
    out = stages.run(m, str(tmp_path / "merge"))  # what `python -m ptx.main --config=configs/merge.py` runs
    assert out == str(tmp_path / "full")
    meta = checkpoint.read_meta(out)
    assert "lora" not in meta and meta["merged_from"]["checkpoint"] == str(tmp_path / "lora")
    merged, _ = checkpoint.load_params(out)

    cfg = ModelConfig(**meta["model"])
    base, _ = checkpoint.load_params(sft_dir)
    adapters = raw_state(tmp_path / "lora")["params"]
    batch = sft_batch(11, t=24)
    model = Transformer(cfg)
    got = np.asarray(logits(merged, batch, model))
    want = np.asarray(unmerged_logits(base, adapters, common.lora_config(c), batch, model))
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    assert np.abs(want - np.asarray(logits(base, batch, model))).max() > 1e-2  # the adapters matter

    # Any stage reads it as init.checkpoint; the Hugging Face export holds the same weights.
    c2 = sft_config.get_config("tiny")
    c2.init.checkpoint = out
    again = common.init_source(c2).load(sharding.make_mesh(sharding.MeshConfig(**c2.mesh)))
    jax.tree_util.tree_map(lambda x, y: np.testing.assert_array_equal(np.asarray(x), np.asarray(y)), again, merged)
    exported, hf_cfg = hf.load_params(str(tmp_path / "hf"))
    assert hf_cfg.n_layers == cfg.n_layers and not hf_cfg.scalar_head
    jax.tree_util.tree_map(lambda x, y: np.testing.assert_array_equal(np.asarray(x), np.asarray(y)), exported, merged)
    assert (tmp_path / "full" / "tokenizer.model").exists()
    m.out = str(tmp_path / "lora")  # the LoRA workdir itself already holds that step: an error, not a no-op
    with pytest.raises(FileExistsError, match="already holds step"):
        stages.run(m, str(tmp_path / "merge"))
