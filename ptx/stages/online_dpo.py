"""Online (iterative) DPO: each iteration samples `online.group_size` completions per prompt
from the current policy, a reward source (reward model, Python function or judge, as RL
reads it) scores them, the best and the worst of each group form a pair, and DPO steps
(`steps.dpo_loss_fn`, `steps.train_step`) train on those fresh pairs against the fixed
reference (the init checkpoint). Groups whose scores all tie carry no preference: they are
replaced by fresh prompts, up to `online.max_retries` extra batches, as DAPO's dynamic
sampling does; what still ties is dropped.

python -m ptx.main --config=configs/online_dpo.py:tiny --workdir=runs/odpo \
    --config.init.checkpoint=runs/sft --config.reward.checkpoint=runs/rm
Metrics follow TRL's OnlineDPOTrainer: objective/scores, objective/scores_margin,
objective/kl, objective/rlhf_reward, val/contain_eos_token, and DPO's rewards/* and logps/*.
"""
import os

import jax
import numpy as np

from ptx import data, inference, metrics, online, optim, rewards, rollout, sampler, sharding, steps
from ptx.model import Transformer, abstract_params
from ptx.stages import common, scaffold


def run(config, workdir: str, devices=None) -> dict:
    """Train the policy with online DPO; returns the final logged metrics."""
    # Everything that can be checked without reading data, before the workdir is written.
    # (dpo.precompute_ref, dpo.soft_labels, dpo.shared_prefix and lora.rank were refused by validate.check.)
    dpo, o, reward_cfg = common.dpo_config(config), common.online_config(config), common.reward_source(config)
    source = common.init_source(config)
    if source is None:
        raise ValueError("stage 'online_dpo' needs init.checkpoint (an SFT workdir) or init.hf_dir")
    mesh = sharding.make_mesh(config.mesh, devices)
    sharding.check_batch(mesh, o.rollout_batch * o.group_size, "online.rollout_batch x online.group_size")
    sharding.check_batch(mesh, o.minibatch_size, "online.minibatch_size")
    with jax.set_mesh(mesh):
        return _run(config, os.path.abspath(workdir), mesh, source, dpo, o, reward_cfg)


def _run(config, workdir: str, mesh, source: common.InitSource, dpo: steps.DPOConfig, o: online.OnlineConfig,
         reward_cfg: rewards.SourceConfig) -> dict:
    common.write_config(config, workdir)
    rows, tok, arrays = common.load_prompts(config, workdir, source)

    cfg = source.cfg.replace(scalar_head=False)
    model = Transformer(cfg)
    ref = {k: v for k, v in source.load(mesh).items() if k != "scalar_head"}
    rules = sharding.param_rules(cfg)
    param_sh = sharding.named(mesh, sharding.tree_specs(abstract_params(cfg), rules, mesh, strict=True))
    reward = rewards.make_source(reward_cfg, mesh, rows)
    tx, lr_fn = optim.make_optimizer(config.optim,
                                     config.train.steps * o.num_epochs * (o.rollout_batch // o.minibatch_size))
    abstract_state = jax.eval_shape(lambda p: steps.init_state(p, tx), abstract_params(cfg))
    state_sh = sharding.named(mesh, sharding.tree_specs(abstract_state, rules, mesh, strict=False))
    state_sh = state_sh.replace(params=param_sh)
    frozen, frozen_sh = (ref, param_sh) if dpo.uses_reference else (None, None)
    loss_fn = steps.make_loss_fn("dpo", model, dpo=dpo)
    update = steps.compile_step(
        lambda s, b, f: steps.train_step(s, b, f, loss_fn=loss_fn, tx=tx, lr_fn=lr_fn, accum_steps=1),
        in_shardings=(state_sh, sharding.batch_sharding(mesh), frozen_sh),
        out_shardings=(state_sh, sharding.replicated(mesh)), donate_state=True)
    # One sampler call per draw, on whatever parameters it is handed: the current policy's.
    smp = inference.Sampler(inference.Policy(cfg, ref, tok, mesh), batch_size=o.rollout_batch * o.group_size,
                            max_new_tokens=o.max_new_tokens, group_size=o.group_size)
    ref_logps = jax.jit(lambda p, seq: steps.completion_logps(model, p, seq), out_shardings=sharding.replicated(mesh))
    prompts_it = data.BatchIterator(arrays, o.rollout_batch, seed=config.seed)

    def sample(params, it: int, attempt: int, sampled: list) -> dict:
        """Iteration it's prompt batch (attempt 0) or a fresh one (to replace ties), o.group_size
        completions each from `params`, scored: host rows, the sequence fields under 'seq.'."""
        step = it if not attempt else config.train.steps + it * o.max_retries + attempt - 1
        idx = prompts_it.indices(step)
        prompt_tokens = np.repeat(arrays["prompt_tokens"][idx], o.group_size, axis=0)
        prompt_lens = np.repeat(arrays["prompt_lens"][idx], o.group_size, axis=0)
        seed = int(np.random.default_rng([config.seed, it, attempt]).integers(2**31))
        (chunk,) = smp(prompt_tokens, prompt_lens, seed, params=params, temperature=o.temperature,
                       top_k=o.top_k, top_p=o.top_p)
        seq = sharding.gather(chunk["seq"])
        prompts = [tok.decode(p[:n]) for p, n in zip(prompt_tokens, prompt_lens)]
        completions = smp.texts([chunk])
        no_eos = chunk["finish_reason"] != sampler.FINISH_EOS
        scores = reward(chunk["seq"], prompts, completions, rows=[rows[i] for i in idx for _ in range(o.group_size)])
        scores = np.asarray(scores, np.float32) - np.float32(o.missing_eos_penalty) * no_eos
        # KL to the reference on the policy's own samples: the sampler's log-probs minus the reference's.
        kl = np.sum(chunk["logprobs"] * seq["mask"], axis=1) - np.asarray(ref_logps(ref, chunk["seq"]))
        sampled.append(float(chunk["lengths"].sum()))
        return {**{f"seq.{k}": v for k, v in seq.items()}, "prompts": prompts, "completions": completions,
                "scores": scores, "kl": kl, "eos": (~no_eos).astype(np.float32)}

    last = {}
    with scaffold.Run(config, workdir, cfg, total_steps=config.train.steps) as run:
        # init_state's jit writes new buffers: the donated state never frees the reference.
        state, _ = run.restore_or_init(abstract_state, state_sh, lambda: jax.jit(
            lambda p: steps.init_state(p, tx), out_shardings=state_sh)(ref))
        idle = metrics.IdleGuard(o.max_idle_iterations, what="pair", fix="check reward.function / reward.checkpoint, "
                                 "or raise online.group_size, online.temperature or online.max_retries")
        for it in range(run.start, config.train.steps):
            sampled = []
            host, draws = rollout.fill_groups((sample(state.params, it, a, sampled) for a in range(1 + o.max_retries)),
                                              o.rollout_batch, o.group_size)
            seq = {k[4:]: v for k, v in host.items() if k.startswith("seq.")}
            pairs, tied = online.preference_batch(seq, host["scores"], o.group_size)
            kept = int(np.sum(~tied))  # fill_groups puts the groups with a preference first
            idle.update(kept, it + 1)
            history = []
            for epoch in range(o.num_epochs):
                perm = np.random.default_rng([config.seed, it, epoch]).permutation(kept)
                for i in range(0, kept - o.minibatch_size + 1, o.minibatch_size):
                    mb = {k: v[perm[i:i + o.minibatch_size]] for k, v in pairs.items()}
                    state, m = update(state, sharding.put_global(mb, mesh), frozen)
                    history.append(m)
            scalars = metrics.mean_metrics(history) if history else {}
            metrics.check_finite(scalars, it + 1)
            groups = host["scores"].reshape(-1, o.group_size)
            kl = float(np.mean(host["kl"]))
            scalars.update({
                "objective/scores": float(np.mean(host["scores"])),
                "objective/scores_margin": float(np.mean((groups.max(1) - groups.min(1))[~tied])) if kept else 0.0,
                "objective/kl": kl, "objective/non_score_reward": -dpo.beta * kl,
                "objective/rlhf_reward": float(np.mean(host["scores"])) - dpo.beta * kl,
                "val/contain_eos_token": float(np.mean(host["eos"])), "beta": dpo.beta,
                "pairs/kept": kept, "pairs/draws": draws["draws"], "pairs/updates": len(history)})
            last = run.writer.write(it + 1, scalars, tokens=float(sum(sampled)), rate="completion_tokens_per_s")
            run.writer.text(it + 1, "samples", [p + c for p, c in zip(host["prompts"][:3], host["completions"][:3])])
            run.save(it + 1, state, force=it + 1 == config.train.steps)
    return last
