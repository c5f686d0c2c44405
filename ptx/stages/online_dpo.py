"""Online (iterative) DPO: each iteration collects `online.group_size` completions per prompt
from the current policy through the RL loop's collector (`rollout.Collector`: the same
prompts, keys, sampler and reward sources), the best and the worst of each group form a
pair, and DPO steps (`methods.dpo_loss_fn`, `steps.train_step`) train on those fresh pairs
against the fixed reference (the init checkpoint). Groups whose scores all tie carry no
preference: they are replaced by fresh prompts, up to `online.max_retries` extra batches,
as DAPO's dynamic sampling does; what still ties is dropped.

python -m ptx.main --config=configs/online_dpo.py:tiny --workdir=runs/odpo \
    --config.init.checkpoint=runs/sft --config.reward.checkpoint=runs/rm
Metrics follow TRL's OnlineDPOTrainer: objective/scores, objective/scores_margin,
objective/kl, objective/rlhf_reward, val/contain_eos_token, and DPO's rewards/* and logps/*.
"""
import functools
import os

import jax
import numpy as np

from ptx import engine, logprobs, methods, metrics, online, optim, rewards, rollout, sampler, sharding, steps
from ptx.model import Transformer, abstract_params
from ptx.stages import common, scaffold


def run(config, workdir: str, devices=None) -> dict:
    """Train the policy with online DPO; returns the final logged metrics."""
    # Everything that can be checked without reading data, before the workdir is written.
    t = common.training(config)
    o = t.sections["online"]
    source = common.init_source(config)
    mesh = sharding.make_mesh(t.mesh, devices)
    sharding.check_batch(mesh, o.rollout_batch * o.group_size, "online.rollout_batch x online.group_size")
    sharding.check_batch(mesh, o.minibatch_size, "online.minibatch_size")
    engine.check_mesh(o.engine, mesh, "online.engine")
    with jax.set_mesh(mesh):
        return _run(config, os.path.abspath(workdir), mesh, source, t)


def _run(config, workdir: str, mesh, source: common.InitSource, t: common.Training) -> dict:
    dpo, o, reward_cfg = t.sections["dpo"], t.sections["online"], t.sections["reward"]
    common.write_config(config, workdir)
    rows, tok, arrays = common.load_prompts(config, workdir, source)
    reward = rewards.make_source(reward_cfg, mesh, rows)  # its function and row fields checked before compiling

    cfg = source.cfg.replace(scalar_head=False)
    model = Transformer(cfg)
    ref = {k: v for k, v in source.load(mesh).items() if k != "scalar_head"}
    frozen = ref if dpo.uses_reference else None
    frozen_sh = jax.tree_util.tree_map(lambda x: x.sharding, frozen)
    tx, lr_fn = optim.make_optimizer(t.optim, t.train.steps * o.num_epochs * (o.rollout_batch // o.minibatch_size))
    loss_fn = functools.partial(methods.dpo_loss_fn, model, dpo_cfg=dpo)
    trainer = steps.setup(loss_fn, tx, lr_fn, abstract_params(cfg), sharding.param_rules(cfg), mesh, frozen_sh)
    spec = rollout.Sampling(prompts=o.rollout_batch, group_size=o.group_size, max_new_tokens=o.max_new_tokens,
                            temperature=o.temperature, top_k=o.top_k, top_p=o.top_p, max_retries=o.max_retries,
                            no_eos_penalty=-o.missing_eos_penalty, engine=o.engine)
    collect = rollout.Collector(cfg, tok, mesh, reward, rows, arrays, spec, seed=config.seed,
                                steps=t.train.steps)
    ref_logps = jax.jit(lambda p, seq: logprobs.completion_logps(model, p, seq),
                        out_shardings=sharding.replicated(mesh))

    last = {}
    with scaffold.Run(config, workdir, cfg, total_steps=t.train.steps) as run:
        # The trainer's init writes new buffers: the donated state never frees the reference.
        state, _ = run.restore_or_init(trainer.abstract_state, trainer.state_shardings, lambda: trainer.init(ref))
        idle = metrics.IdleGuard(o.max_idle_iterations, what="pair", fix="check reward.function / reward.checkpoint, "
                                 "or raise online.group_size, online.temperature or online.max_retries")
        for it in range(run.start, t.train.steps):
            sampled = []
            host, draws = rollout.fill_groups(collect.draws(state.params, it, sampled), o.rollout_batch, o.group_size)
            seq = rollout.sequences(host)
            pairs, tied = online.preference_batch(seq, host["scores"], o.group_size)
            kept = int(np.sum(~tied))  # fill_groups puts the groups with a preference first
            idle.update(kept, it + 1)
            # KL to the reference on the policy's own samples: the sampler's log-probs minus the reference's.
            kl = (np.sum(seq["logprobs"] * seq["mask"], axis=1)
                  - np.asarray(ref_logps(ref, sharding.put_global(seq, mesh))))
            history = []
            for epoch in range(o.num_epochs):
                perm = np.random.default_rng([config.seed, it, epoch]).permutation(kept)
                for i in range(0, kept - o.minibatch_size + 1, o.minibatch_size):
                    mb = {k: v[perm[i:i + o.minibatch_size]] for k, v in pairs.items()}
                    state, m = trainer.train_step(state, sharding.put_global(mb, mesh), frozen)
                    history.append(m)
            scalars = metrics.mean_metrics(history) if history else {}
            metrics.check_finite(scalars, it + 1, run.saved)
            groups = host["scores"].reshape(-1, o.group_size)
            kl = float(np.mean(kl))
            scores = float(np.mean(host["scores"]))
            scalars.update({
                "objective/scores": scores,
                "objective/scores_margin": float(np.mean((groups.max(1) - groups.min(1))[~tied])) if kept else 0.0,
                "objective/kl": kl, "objective/non_score_reward": -dpo.beta * kl,
                "objective/rlhf_reward": scores - dpo.beta * kl,
                "val/contain_eos_token": float(np.mean(host["finish_reason"] == sampler.FINISH_EOS)),
                "beta": dpo.beta, "pairs/kept": kept, "pairs/draws": draws["draws"], "pairs/updates": len(history)})
            last = run.writer.write(it + 1, scalars, tokens=float(sum(sampled)), rate="completion_tokens_per_s")
            run.writer.text(it + 1, "samples", [p + c for p, c in zip(host["prompts"][:3], host["completions"][:3])])
            run.save(it + 1, state, force=it + 1 == t.train.steps)
    return last
