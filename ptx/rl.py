"""The RL loop (PPO with a critic; GRPO / RLOO without): one iteration is
rollout -> prepare -> `num_epochs` passes over shuffled minibatches.

Models: policy (from the SFT checkpoint, `init.checkpoint`), reference (the
same weights, frozen; with lora.rank > 0 the policy is adapters on the
reference itself, see `build_models`), reward source (a reward model, a Python function),
critic (the reward model's weights with their value head, or a value head on
the policy trunk, or none). Each jitted piece (generate, prepare, update) is
compiled once; checkpoints hold policy, critic, optimiser state and the KL
controller's coefficient.
"""
import dataclasses
import json
import os

import jax
import numpy as np

from ptx import checkpoint, data, lora, losses, metrics, optim, rewards, rollout, sampler, sharding, steps, train
from ptx.model import ModelConfig, Transformer, init_params


def _load(path, cfg, mesh):
    params, _ = checkpoint.load_params(path, train.param_shardings_for(cfg, mesh))
    return params


def critic_kind(config) -> str:
    """reward | policy | none: where the value head of this run sits."""
    return config.rl.critic if config.rl.advantage == "gae" else "none"


def lora_config(config) -> lora.LoraConfig:
    """The policy's adapters; a value head on the policy trunk trains in full beside them."""
    lcfg = lora.LoraConfig.from_config(config.lora)
    if lcfg.enabled and critic_kind(config) == "policy":
        lcfg = dataclasses.replace(lcfg, full=(r"scalar_head/kernel",))
    return lcfg


def build_models(config, mesh):
    """Policy / critic configs and the initial trainable params {'policy', 'critic'?} and reference.

    Full finetuning: 'policy' is a copy of the SFT weights (plus a fresh value
    head with rl.critic='policy') and the reference is the SFT weights. With
    lora.rank > 0: 'policy' holds the adapters (and the fresh value head,
    trained in full) and the reference is the frozen base itself, in
    lora.base_dtype: no second copy of the weights exists. A critic from the
    reward model keeps its own full parameters either way.
    """
    if train.source_config(config) is None:
        raise ValueError(f"stage {config.stage!r} needs init.checkpoint (an SFT workdir) or init.hf_dir")
    sft_cfg, ref = train.load_source(config, mesh)
    sft_cfg = sft_cfg.replace(scalar_head=False)
    ref = {k: v for k, v in ref.items() if k != "scalar_head"}
    critic = critic_kind(config)
    policy_cfg = sft_cfg.replace(scalar_head=critic == "policy")
    policy = dict(ref)
    if critic == "policy":
        fresh = jax.jit(lambda r: init_params(policy_cfg, r),
                        out_shardings=train.param_shardings_for(policy_cfg, mesh))(jax.random.PRNGKey(config.seed))
        policy["scalar_head"] = fresh["scalar_head"]
    lcfg = lora_config(config)
    if lcfg.enabled:
        key = jax.random.fold_in(jax.random.PRNGKey(config.seed), 1)
        abstract = jax.eval_shape(lambda p: lora.init(p, lcfg, key), policy)
        rules = lora.sharding_rules(sharding.param_rules(policy_cfg), abstract)
        adapter_sh = sharding.named(mesh, sharding.tree_specs(abstract, rules, mesh, strict=True))
        params = {"policy": jax.jit(lambda p: lora.init(p, lcfg, key), out_shardings=adapter_sh)(policy)}
        del policy
        ref = lora.frozen_base(ref, lcfg)
    else:
        # The trainable copy must not alias the reference: the update donates it.
        params = {"policy": jax.tree_util.tree_map(lambda x: x.copy(), policy)}
    critic_cfg = None
    if critic == "reward":
        path = config.rl.critic_checkpoint or config.reward.checkpoint
        if not path:
            raise ValueError("rl.critic='reward' needs reward.checkpoint or rl.critic_checkpoint")
        critic_cfg = ModelConfig(**checkpoint.read_meta(path)["model"])
        params["critic"] = _load(path, critic_cfg, mesh)
    elif critic not in ("policy", "none"):
        raise ValueError(f"rl.critic={critic!r}; expected reward, policy or none")
    return policy_cfg, critic_cfg, params, ref


def _rules(policy_cfg, critic_cfg, lcfg, params):
    """Sharding rules of the trainable tree: the policy's (with LoRA: its adapters') and the critic's."""
    policy = sharding.param_rules(policy_cfg)
    if lcfg.enabled:
        policy = lora.sharding_rules(policy, params["policy"])
    out = []
    for rule in policy + (sharding.param_rules(critic_cfg) if critic_cfg else []):
        if rule[0] not in [r[0] for r in out]:
            out.append(rule)
    return out


def run(config, workdir: str, devices=None) -> dict:
    """Train the policy (and critic) with RL; returns the final logged metrics."""
    mesh = sharding.make_mesh(config.mesh, devices)
    # Set as the context, so that the model constrains its activations to it (sharding.constrain).
    with jax.set_mesh(mesh):
        return _run(config, os.path.abspath(workdir), mesh)


def _run(config, workdir: str, mesh) -> dict:
    """The loop on every process: each holds the whole rollout on the host (prompts, decoded
    texts, scores) and puts on the mesh only the rows its own devices hold."""
    train.write_config(config, workdir)
    rl = config.rl
    if (rl.rollout_batch * rl.group_size) % rl.minibatch_size:
        raise ValueError(f"rl.rollout_batch x rl.group_size = {rl.rollout_batch * rl.group_size} is not a multiple of "
                         f"rl.minibatch_size={rl.minibatch_size}")
    prompt_path, _ = train.data_paths(config, workdir)
    rows, stats = data.load_rows(prompt_path, "prompt", on_bad_row=config.data.on_bad_row,
                                 template=train.template(config))
    tok = train.setup_tokenizer(config, workdir, rows)
    arrays, _ = data.encode_prompts(rows, tok, max_prompt_len=config.data.max_prompt_len)
    width = arrays["prompt_tokens"].shape[1]

    policy_cfg, critic_cfg, init, ref = build_models(config, mesh)
    policy_model, critic_model = Transformer(policy_cfg), Transformer(critic_cfg) if critic_cfg else None
    source = rewards.make_source(config.reward, mesh)
    lcfg = lora_config(config)
    rules = _rules(policy_cfg, critic_cfg, lcfg, init)
    # With LoRA the update reads the reference as the base its adapters merge into.
    frozen = ref if lcfg.enabled else None
    frozen_sh = jax.tree_util.tree_map(lambda x: x.sharding, frozen)
    updates_per_iter = rl.num_epochs * (rl.rollout_batch * rl.group_size // rl.minibatch_size)
    tx, lr_fn = optim.make_optimizer(config.optim, config.train.steps * updates_per_iter)
    abstract_state = jax.eval_shape(lambda p: steps.init_state(p, tx), init)
    state_sh = sharding.named(mesh, sharding.tree_specs(abstract_state, rules, mesh, strict=False))
    sharding.tree_specs(init, rules, mesh, strict=True)
    batch_sh, repl = sharding.batch_sharding(mesh), sharding.replicated(mesh)

    ckpt = checkpoint.Checkpointer(workdir, every=config.train.ckpt_every, keep=config.train.keep_ckpts)
    kl_coef = float(rl.kl_coef)
    start = ckpt.latest_step() or 0
    if start:
        abstract = jax.tree_util.tree_map(
            lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract_state, state_sh)
        state, meta = ckpt.restore(start, abstract)
        kl_coef = meta["kl_coef"]
    else:
        state = jax.jit(lambda p: steps.init_state(p, tx), out_shardings=state_sh)(init)
    del init

    generate = sampler.make_generate_fn(policy_cfg, max_new_tokens=rl.max_new_tokens, eos_id=tok.eos_id,
                                        pad_id=tok.pad_id, n_tokens=tok.vocab_size)
    build = jax.jit(lambda p, n, out: rollout.build_sequences(p, n, out, pad_id=tok.pad_id))
    prepare = jax.jit(lambda p, r, seq, s, k: rollout.prepare(
        p, r, seq, s, k, policy_model=policy_model, critic_model=critic_model, width=width, rl_cfg=rl))
    loss_fn = lambda p, b, f: rollout.rl_loss_fn(p, b, f, policy_model=policy_model, critic_model=critic_model,
                                                 width=width, rl_cfg=rl, lora_cfg=lcfg)
    update = steps.compile_step(
        lambda s, b, f: steps.train_step(s, b, f, loss_fn=loss_fn, tx=tx, lr_fn=lr_fn, accum_steps=1),
        in_shardings=(state_sh, batch_sh, frozen_sh), out_shardings=(state_sh, repl), donate_state=True)
    # The rollout samples from merged weights, built once per iteration (LoRA), not per token.
    policy_of = (jax.jit(lambda p, f: rollout.policy_params(p, f, lcfg)) if lcfg.enabled
                 else lambda p, f: p["policy"])

    prompts_it = data.BatchIterator(arrays, rl.rollout_batch, seed=config.seed)
    writer = metrics.MetricWriter(workdir, total_steps=config.train.steps, start_step=start, desc=config.stage)
    meta = {"stage": config.stage, "model": checkpoint.model_meta(policy_cfg), "params_key": "policy",
            "tokenizer": "tokenizer.model", "config": json.loads(config.to_json_best_effort())}
    if lcfg.enabled:
        meta["lora"] = {"config": dataclasses.asdict(lcfg), "base": train.base_source(config)}
    key = jax.random.PRNGKey(config.seed)
    last = {}
    try:
        for it in range(start, config.train.steps):
            batch = prompts_it.batch(it)
            prompt_tokens = np.repeat(batch["prompt_tokens"], rl.group_size, axis=0)
            prompt_lens = np.repeat(batch["prompt_lens"], rl.group_size, axis=0)
            b = len(prompt_lens)
            keys = np.asarray(jax.random.split(jax.random.fold_in(key, it), b))
            on_mesh = sharding.put_global({"t": prompt_tokens, "l": prompt_lens, "k": keys}, mesh)
            pt, pl = on_mesh["t"], on_mesh["l"]
            policy = policy_of(state.params, frozen)
            out = generate(policy, pt, pl, on_mesh["k"], rl.temperature, rl.top_k, rl.top_p)
            seq = build(pt, pl, out)
            host = sharding.gather({"c": seq["completion"], "n": out.lengths, "f": out.finish_reason})
            prompts = [tok.decode(p[:n]) for p, n in zip(prompt_tokens, prompt_lens)]
            completions = [tok.decode(c[:n]) for c, n in zip(host["c"], host["n"])]
            scores = source(seq, prompts, completions)
            scores = scores + rl.no_eos_penalty * (host["f"] != sampler.FINISH_EOS)
            scores = sharding.put_global({"s": scores.astype(np.float32)}, mesh)["s"]
            roll, roll_metrics = prepare(dict(state.params, policy=policy), ref, seq, scores, kl_coef)
            del policy  # the update merges its own; free the rollout's copy first
            roll, roll_metrics = sharding.gather((roll, roll_metrics))
            history = []
            for epoch in range(rl.num_epochs):
                perm = np.random.default_rng([config.seed, it, epoch]).permutation(b)
                for i in range(0, b, rl.minibatch_size):
                    idx = perm[i:i + rl.minibatch_size]
                    state, m = update(state, sharding.put_global({k: v[idx] for k, v in roll.items()}, mesh), frozen)
                    history.append(m)
            scalars = metrics.mean_metrics(history)
            metrics.check_finite(scalars, it + 1)
            scalars.update({k: float(v) for k, v in roll_metrics.items()})
            if rl.adaptive_kl:
                kl_coef = float(losses.adaptive_kl_update(kl_coef, scalars["objective/kl"], target=rl.kl_target,
                                                          horizon=rl.kl_horizon, n_steps=b))
            last = writer.write(it + 1, scalars, tokens=float(host["n"].sum()))
            writer.text(it + 1, "samples", [p + c for p, c in zip(prompts[:3], completions[:3])])
            ckpt.save(it + 1, state, dict(meta, kl_coef=kl_coef), force=it + 1 == config.train.steps)
    finally:
        ckpt.close()
        writer.close()
    return last
