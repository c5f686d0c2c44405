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
import os

import jax
import numpy as np

from ptx import checkpoint, data, lora, losses, metrics, optim, rewards, rollout, sampler, sharding, steps
from ptx.model import ModelConfig, Transformer, abstract_params, init_params
from ptx.stages import common, scaffold


def lora_config(config) -> lora.LoraConfig:
    """The policy's adapters; a value head on the policy trunk trains in full beside them."""
    head = common.rl_config(config).critic_kind == "policy"
    return common.lora_config(config, full=(r"scalar_head/kernel",) if head else ())


def build_models(config, mesh, source: common.InitSource = None):
    """Policy / critic configs and the initial trainable params {'policy', 'critic'?} and reference.

    Full finetuning: 'policy' is a copy of the SFT weights (plus a fresh value
    head with rl.critic='policy') and the reference is the SFT weights. With
    lora.rank > 0: 'policy' holds the adapters (and the fresh value head,
    trained in full) and the reference is the frozen base itself, in
    lora.base_dtype: no second copy of the weights exists. A critic from the
    reward model keeps its own full parameters either way. source: the init source
    (None = read it from the config).
    """
    rl_cfg, lcfg = common.rl_config(config), lora_config(config)
    source = source or common.init_source(config)
    if source is None:
        raise ValueError(f"stage {config.stage!r} needs init.checkpoint (an SFT workdir) or init.hf_dir")
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
        if not path:
            raise ValueError("rl.critic='reward' needs reward.checkpoint or rl.critic_checkpoint")
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


def run(config, workdir: str, devices=None) -> dict:
    """Train the policy (and critic) with RL; returns the final logged metrics."""
    # Everything that can be checked without reading data, before the workdir is written.
    rl_cfg, lcfg, reward_cfg = common.rl_config(config), lora_config(config), common.reward_source(config)
    source = common.init_source(config)
    if source is None:
        raise ValueError(f"stage {config.stage!r} needs init.checkpoint (an SFT workdir) or init.hf_dir")
    mesh = sharding.make_mesh(config.mesh, devices)
    sharding.check_batch(mesh, rl_cfg.rollout_batch * rl_cfg.group_size, "rl.rollout_batch x rl.group_size")
    sharding.check_batch(mesh, rl_cfg.minibatch_size, "rl.minibatch_size")
    # Set as the context, so that the model constrains its activations to it (sharding.constrain).
    with jax.set_mesh(mesh):
        return _run(config, os.path.abspath(workdir), mesh, source, rl_cfg, lcfg, reward_cfg)


def _run(config, workdir: str, mesh, source: common.InitSource, rl: rollout.RLConfig, lcfg: lora.LoraConfig,
         reward_cfg: rewards.SourceConfig) -> dict:
    """The loop on every process: each holds the whole rollout on the host (prompts, decoded
    texts, scores) and puts on the mesh only the rows its own devices hold."""
    common.write_config(config, workdir)
    rows, tok, arrays = common.load_prompts(config, workdir, source)
    width = arrays["prompt_tokens"].shape[1]
    reward = rewards.make_source(reward_cfg, mesh, rows)

    policy_cfg, critic_cfg, init, ref = build_models(config, mesh, source)
    policy_model, critic_model = Transformer(policy_cfg), Transformer(critic_cfg) if critic_cfg else None
    rules = _rules(policy_cfg, critic_cfg, lcfg, init)
    # With LoRA the update reads the reference as the base its adapters merge into.
    frozen = ref if lcfg.enabled else None
    frozen_sh = jax.tree_util.tree_map(lambda x: x.sharding, frozen)
    updates_per_iter = rl.num_epochs * (rl.rollout_batch * rl.group_size // rl.minibatch_size)
    tx, lr_fn = optim.make_optimizer(config.optim, config.train.steps * updates_per_iter)
    abstract_state = jax.eval_shape(lambda p: steps.init_state(p, tx), init)
    # Strict for the parameters (each matches exactly one rule), lenient for optimiser leaves.
    state_sh = sharding.named(mesh, sharding.tree_specs(abstract_state, rules, mesh, strict=False))
    state_sh = state_sh.replace(params=sharding.named(mesh, sharding.tree_specs(init, rules, mesh, strict=True)))
    batch_sh, repl = sharding.batch_sharding(mesh), sharding.replicated(mesh)

    # Each prompt is prefilled once and its KV cache repeated over its group_size completions.
    generate = sampler.make_generate_fn(policy_cfg, max_new_tokens=rl.max_new_tokens, eos_id=tok.eos_ids,
                                        pad_id=tok.pad_id, n_tokens=tok.vocab_size, group_size=rl.group_size)
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
    key = jax.random.PRNGKey(config.seed)

    def sample(policy, it: int, attempt: int, sampled: list):
        """Iteration it's prompt batch (attempt 0) or a fresh one (dynamic sampling's retries),
        rl.group_size completions each, scored: (device sequence batch, host rows). Appends the
        sampled token count to `sampled`."""
        step = it if not attempt else config.train.steps + it * rl.dynamic_max_retries + attempt - 1
        idx = prompts_it.indices(step)
        prompt_tokens = np.repeat(arrays["prompt_tokens"][idx], rl.group_size, axis=0)
        prompt_lens = np.repeat(arrays["prompt_lens"][idx], rl.group_size, axis=0)
        step_key = jax.random.fold_in(key, it)
        step_key = jax.random.fold_in(step_key, attempt) if attempt else step_key
        keys = np.asarray(jax.random.split(step_key, len(prompt_lens)))
        placed = sharding.put_global({"tokens": prompt_tokens, "lens": prompt_lens, "keys": keys}, mesh)
        out = generate(policy, placed["tokens"], placed["lens"], placed["keys"], rl.temperature, rl.top_k, rl.top_p)
        seq = build(placed["tokens"], placed["lens"], out)
        host = sharding.gather({"completion": seq["completion"], "lengths": out.lengths,
                                "finish_reason": out.finish_reason})
        prompts = [tok.decode(p[:n]) for p, n in zip(prompt_tokens, prompt_lens)]
        completions = [tok.decode(c[:n]) for c, n in zip(host["completion"], host["lengths"])]
        # The data row of each prompt: a verifier reads its reference answer.
        scores = reward(seq, prompts, completions, rows=[rows[i] for i in idx for _ in range(rl.group_size)])
        scores = scores + rl.no_eos_penalty * (host["finish_reason"] != sampler.FINISH_EOS)
        if rl.overlong_buffer:
            scores = scores + np.asarray(losses.overlong_penalty(
                host["lengths"], max_len=rl.max_new_tokens, buffer=rl.overlong_buffer, factor=rl.overlong_penalty))
        sampled.append(float(host["lengths"].sum()))
        return seq, dict(host, prompts=prompts, completions=completions, scores=scores.astype(np.float32))

    meta = {"params_key": "policy", **({"origin": source.origin} if source.origin else {})}
    if lcfg.enabled:
        meta["lora"] = {"config": dataclasses.asdict(lcfg), "base": source.as_lora_base()}
    last = {}
    with scaffold.Run(config, workdir, policy_cfg, total_steps=config.train.steps, meta=meta) as run:
        state, saved = run.restore_or_init(
            abstract_state, state_sh, lambda: jax.jit(lambda p: steps.init_state(p, tx), out_shardings=state_sh)(init))
        init = None  # the state holds the trainable copy now
        kl_coef = saved.get("kl_coef", float(rl.kl_coef))
        idle = metrics.IdleGuard(rl.dynamic_max_idle_iterations if rl.dynamic_sampling else 0, what="group with "
                                 "a reward spread", fix="check reward.function / reward.checkpoint, or raise "
                                 "rl.group_size, rl.temperature or rl.dynamic_max_retries")
        for it in range(run.start, config.train.steps):
            policy = policy_of(state.params, frozen)
            sampled = []
            if rl.dynamic_sampling:
                # Draws after the first come from prompt batches no iteration trains on otherwise.
                draws = ({**{f"seq.{k}": v for k, v in sharding.gather(seq).items()}, **host}
                         for seq, host in (sample(policy, it, a, sampled) for a in range(1 + rl.dynamic_max_retries)))
                host, dynamic = rollout.fill_groups(draws, rl.rollout_batch, rl.group_size)
                idle.update(rl.rollout_batch - dynamic["filled_groups"], it + 1)
                seq = sharding.put_global({k[4:]: v for k, v in host.items() if k.startswith("seq.")}, mesh)
            else:
                seq, host = sample(policy, it, 0, sampled)
            prompts, completions = host["prompts"], host["completions"]
            b = len(prompts)
            scores = sharding.put_global({"scores": host["scores"]}, mesh)["scores"]
            roll, roll_metrics = prepare(dict(state.params, policy=policy), ref, seq, scores, kl_coef)
            del policy  # the update merges its own; free the rollout's copy first
            roll, roll_metrics = sharding.gather((roll, roll_metrics))
            history = []
            for epoch in range(rl.num_epochs):
                perm = rollout.update_order(b, rl, np.random.default_rng([config.seed, it, epoch]))
                for i in range(0, b, rl.minibatch_size):
                    idx = perm[i:i + rl.minibatch_size]
                    state, m = update(state, sharding.put_global({k: v[idx] for k, v in roll.items()}, mesh), frozen)
                    history.append(m)
            scalars = metrics.mean_metrics(history)
            metrics.check_finite(scalars, it + 1, run.saved)
            scalars.update({k: float(v) for k, v in roll_metrics.items()})
            if rl.adaptive_kl:
                kl_coef = float(losses.adaptive_kl_update(kl_coef, scalars["objective/kl"], target=rl.kl_target,
                                                          horizon=rl.kl_horizon, n_steps=b))
            if rl.dynamic_sampling:
                scalars.update({f"dynamic/{k}": float(v) for k, v in dynamic.items()})
            last = run.writer.write(it + 1, scalars, tokens=float(sum(sampled)),
                                    rate="completion_tokens_per_s")
            run.writer.text(it + 1, "samples", [p + c for p, c in zip(prompts[:3], completions[:3])])
            run.save(it + 1, state, force=it + 1 == config.train.steps, kl_coef=kl_coef)
    return last
