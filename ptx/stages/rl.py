"""The RL loop (PPO with a critic; GRPO / RLOO / GSPO without): one iteration is
rollout -> prepare -> `num_epochs` passes over shuffled minibatches. DAPO's rules:
dynamic sampling (`rl.dynamic_sampling`: groups of equal rewards are replaced by fresh
prompts) and overlong reward shaping (`rl.overlong_buffer`).

Models: policy (from the SFT checkpoint, `init.checkpoint`), reference (the
same weights, frozen; with lora.rank > 0 the policy is adapters on the
reference itself, see `build_models`), reward source (a reward model, a
Python function, a judge), critic (the reward model's weights with their
value head, or a value head on the policy trunk, or none). Each jitted piece
(generate, prepare, update) is compiled once; checkpoints hold policy,
critic, optimiser state and the KL controller's coefficient.
"""
import dataclasses
import functools
import os

import jax
import numpy as np

from ptx import checkpoint, engine, lora, losses, metrics, optim, rewards, rl_training, rollout, sharding, steps
from ptx.model import ModelConfig, Transformer, abstract_params, init_params
from ptx.stages import common, scaffold


def build_models(config, mesh, t: common.Training, source: common.InitSource):
    """Policy / critic configs and the initial trainable params {'policy', 'critic'?} and reference.

    Full finetuning: 'policy' is a copy of the SFT weights (plus a fresh value
    head with rl.critic='policy') and the reference is the SFT weights. With
    lora.rank > 0: 'policy' holds the adapters (and the fresh value head,
    trained in full) and the reference is the frozen base itself, in
    lora.base_dtype: no second copy of the weights exists. A critic from the
    reward model keeps its own full parameters either way. t: the stage's typed
    sections; source: its init source.
    """
    rl_cfg = t.sections["rl"]
    lcfg = lora_config(t, rl_cfg)
    ref = {k: v for k, v in source.load(mesh).items() if k != "scalar_head"}
    critic = rl_cfg.critic_kind
    policy_cfg = source.cfg.replace(scalar_head=critic == "policy")
    policy = dict(ref)
    if critic == "policy":
        shardings = sharding.param_shardings(abstract_params(policy_cfg), policy_cfg, mesh)
        fresh = jax.jit(lambda r: init_params(policy_cfg, r), out_shardings=shardings)(
            jax.random.PRNGKey(config.seed))
        policy["scalar_head"] = fresh["scalar_head"]
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
        path = rl_cfg.critic_checkpoint or config.reward.checkpoint
        params["critic"], meta = checkpoint.load_params(path, mesh)
        critic_cfg = ModelConfig(**meta["model"])
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


def lora_config(t: common.Training, rl_cfg: rl_training.RLConfig) -> lora.LoraConfig:
    """The policy's adapters; a value head on the policy trunk trains in full beside them."""
    return dataclasses.replace(t.lora, full=(r"scalar_head/kernel",) if rl_cfg.critic_kind == "policy" else ())


def run(config, workdir: str, devices=None) -> dict:
    """Train the policy (and critic) with RL; returns the final logged metrics."""
    # Everything that can be checked without reading data, before the workdir is written.
    t = common.training(config)
    rl_cfg = t.sections["rl"]
    source = common.init_source(config)
    mesh = sharding.make_mesh(t.mesh, devices)
    sharding.check_batch(mesh, rl_cfg.rollout_batch * rl_cfg.group_size, "rl.rollout_batch x rl.group_size")
    sharding.check_batch(mesh, rl_cfg.minibatch_size, "rl.minibatch_size")
    engine.check_mesh(rl_cfg.engine, mesh, "rl.engine")
    # Set as the context, so that the model constrains its activations to it (sharding.constrain).
    with jax.set_mesh(mesh):
        return _run(config, os.path.abspath(workdir), mesh, source, t)


def _run(config, workdir: str, mesh, source: common.InitSource, t: common.Training) -> dict:
    """The loop on every process: each holds the whole rollout on the host (prompts, decoded
    texts, scores) and puts on the mesh only the rows its own devices hold."""
    rl, reward_cfg = t.sections["rl"], t.sections["reward"]
    lcfg, steps_total = lora_config(t, rl), t.train.steps
    common.write_config(config, workdir)
    rows, tok, arrays = common.load_prompts(config, workdir, source)
    width = arrays["prompt_tokens"].shape[1]
    reward = rewards.make_source(reward_cfg, mesh, rows)

    policy_cfg, critic_cfg, init, ref = build_models(config, mesh, t, source)
    policy_model, critic_model = Transformer(policy_cfg), Transformer(critic_cfg) if critic_cfg else None
    rules = _rules(policy_cfg, critic_cfg, lcfg, init)
    # With LoRA the update reads the reference as the base its adapters merge into.
    frozen = ref if lcfg.enabled else None
    frozen_sh = jax.tree_util.tree_map(lambda x: x.sharding, frozen)
    updates_per_iter = rl.num_epochs * (rl.rollout_batch * rl.group_size // rl.minibatch_size)
    tx, lr_fn = optim.make_optimizer(t.optim, steps_total * updates_per_iter)
    loss_fn = functools.partial(rl_training.rl_loss_fn, policy_model=policy_model, critic_model=critic_model,
                                width=width, rl_cfg=rl, lora_cfg=lcfg)
    trainer = steps.setup(loss_fn, tx, lr_fn, init, rules, mesh, frozen_sh)
    prepare = steps.no_implicit_transfers(jax.jit(lambda p, r, seq, s, k: rl_training.prepare(
        p, r, seq, s, k, policy_model=policy_model, critic_model=critic_model, width=width, rl_cfg=rl)))
    # The rollout samples from merged weights, built once per iteration (LoRA), not per token.
    policy_of = (jax.jit(lambda p, f: rl_training.policy_params(p, f, lcfg)) if lcfg.enabled
                 else lambda p, f: p["policy"])
    spec = rollout.Sampling(
        prompts=rl.rollout_batch, group_size=rl.group_size, max_new_tokens=rl.max_new_tokens,
        temperature=rl.temperature, top_k=rl.top_k, top_p=rl.top_p,
        max_retries=rl.dynamic_max_retries if rl.dynamic_sampling else 0, no_eos_penalty=rl.no_eos_penalty,
        overlong_buffer=rl.overlong_buffer, overlong_penalty=rl.overlong_penalty, engine=rl.engine)
    collect = rollout.Collector(policy_cfg, tok, mesh, reward, rows, arrays, spec, seed=config.seed, steps=steps_total)

    meta = {"params_key": "policy", **({"origin": source.origin} if source.origin else {})}
    if lcfg.enabled:
        meta["lora"] = {"config": dataclasses.asdict(lcfg), "base": source.as_lora_base()}
    last = {}
    with scaffold.Run(config, workdir, policy_cfg, total_steps=steps_total, meta=meta) as run:
        state, saved = run.restore_or_init(trainer.abstract_state, trainer.state_shardings,
                                           lambda: trainer.init(init))
        init = None  # the state holds the trainable copy now
        kl_coef = saved.get("kl_coef", float(rl.kl_coef))
        idle = metrics.IdleGuard(rl.dynamic_max_idle_iterations if rl.dynamic_sampling else 0, what="group with "
                                 "a reward spread", fix="check reward.function / reward.checkpoint, or raise "
                                 "rl.group_size, rl.temperature or rl.dynamic_max_retries")
        for it in range(run.start, steps_total):
            policy = policy_of(state.params, frozen)
            if rl.dynamic_sampling:
                # Draws after the first come from prompt batches no iteration trains on otherwise.
                sampled = []
                host, dynamic = rollout.fill_groups(collect.draws(policy, it, sampled), rl.rollout_batch,
                                                    rl.group_size)
                idle.update(rl.rollout_batch - dynamic["filled_groups"], it + 1)
                seq = sharding.put_global(rollout.sequences(host), mesh)
            else:
                seq, host = collect(policy, it)
                sampled = [float(np.sum(host["lengths"]))]
            prompts, completions = host["prompts"], host["completions"]
            b = len(prompts)
            scores = sharding.put_global({"scores": host["scores"]}, mesh)["scores"]
            roll, roll_metrics = prepare(dict(state.params, policy=policy), ref, seq, scores,
                                         sharding.put_replicated(np.float32(kl_coef), mesh))
            del policy  # the update merges its own; free the rollout's copy first
            roll, roll_metrics = sharding.gather((roll, roll_metrics))
            history = []
            for epoch in range(rl.num_epochs):
                perm = rl_training.update_order(b, rl, np.random.default_rng([config.seed, it, epoch]))
                for i in range(0, b, rl.minibatch_size):
                    idx = perm[i:i + rl.minibatch_size]
                    state, m = trainer.train_step(state, sharding.put_global({k: v[idx] for k, v in roll.items()},
                                                                             mesh), frozen)
                    history.append(m)
            scalars = metrics.mean_metrics(history)
            metrics.check_finite(scalars, it + 1, run.saved)
            scalars.update({k: float(v) for k, v in roll_metrics.items()})
            if rl.adaptive_kl:
                kl_coef = float(losses.adaptive_kl_update(kl_coef, scalars["objective/kl"], target=rl.kl_target,
                                                          horizon=rl.kl_horizon, n_steps=b))
            if rl.dynamic_sampling:
                scalars.update({f"dynamic/{k}": float(v) for k, v in dynamic.items()})
            last = run.writer.write(it + 1, scalars, tokens=float(sum(sampled)), rate="completion_tokens_per_s")
            run.writer.text(it + 1, "samples", [p + c for p, c in zip(prompts[:3], completions[:3])])
            run.save(it + 1, state, force=it + 1 == steps_total, kl_coef=kl_coef)
    return last
