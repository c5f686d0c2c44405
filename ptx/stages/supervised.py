"""The supervised loop for every stage trained on a fixed data set: SFT / pre-training,
reward model, DPO, KTO, ORPO.

init or resume -> iterate -> log -> checkpoint. Resume order: this workdir's
newest checkpoint, then `init.checkpoint` (or `init.hf_dir`), then scratch.
The data order is a pure function of the step, so a resumed run sees exactly
the batches an uninterrupted one would.
"""
import dataclasses
import os

import jax
import numpy as np

from ptx import data, lora, metrics, optim, sharding, steps
from ptx.model import ModelConfig, Transformer, abstract_params, init_params
from ptx.stages import common, scaffold, validate
from ptx.tokenizer import HFTokenizer, Tokenizer


def encode(config, rows, tok: Tokenizer | HFTokenizer):
    d = config.data
    if d.kind == "sft":
        return data.encode_sft(rows, tok, max_len=d.max_len, max_prompt_len=d.max_prompt_len,
                               loss_on_prompt=d.loss_on_prompt, pack=d.pack)
    if d.kind == "text":
        return data.encode_text(rows, tok, max_len=d.max_len, pack=d.pack)
    if d.kind == "preference":
        return data.encode_preference(rows, tok, max_len=d.max_len, max_prompt_len=d.max_prompt_len,
                                      # dpo, reward and orpo each say so in their own section.
                                      shared_prefix=config.stage in ("dpo", "reward", "orpo")
                                      and config[config.stage].shared_prefix)
    if d.kind == "unpaired":
        return data.encode_unpaired(rows, tok, max_len=d.max_len, max_prompt_len=d.max_prompt_len)
    raise ValueError(f"data.kind={d.kind!r} cannot train stage {config.stage!r}")


def model_config(config, tok: Tokenizer | HFTokenizer, source: common.InitSource | None) -> ModelConfig:
    """The init source's architecture when there is one (it wins), else config.model."""
    cfg = source.cfg if source is not None else ModelConfig(**dict(config.model))
    cfg = cfg.replace(scalar_head=config.stage == "reward")
    if tok.vocab_size > cfg.vocab_size:
        raise validate.ConfigError("tokenizer.path" if source is not None else "model.vocab_size",
                                   f"the tokenizer has {tok.vocab_size} pieces but the model only "
                                   f"{cfg.vocab_size} embeddings")
    return cfg


def initial_params(seed: int, cfg: ModelConfig, mesh, param_shardings, source: common.InitSource | None):
    """Random init sharded at creation, or the init source's trunk (and LM head) with a fresh
    head where the source has none."""
    fresh = jax.jit(lambda r: init_params(cfg, r), out_shardings=param_shardings)(jax.random.PRNGKey(seed))
    if source is None:
        return fresh
    loaded = source.load(mesh)
    return {k: loaded.get(k, v) for k, v in fresh.items()}


def precompute_ref_logps(model, params, arrays, mesh, batch_size: int) -> dict:
    """Reference log-probabilities over the whole preference set, once, so DPO steps run the policy only."""
    # Replicated out: every process reads the whole chunk's log-probs back to the host.
    fn = jax.jit(lambda p, b: steps.pair_logps(model, p, b)[0], out_shardings=sharding.replicated(mesh))
    chosen, rejected = [], []
    for placed, _, keep in sharding.chunks(arrays, batch_size, mesh):
        rc, rr = fn(params, placed)
        chosen.append(np.asarray(rc)[:keep])
        rejected.append(np.asarray(rr)[:keep])
    return dict(arrays, ref_chosen_logps=np.concatenate(chosen).astype(np.float32),
                ref_rejected_logps=np.concatenate(rejected).astype(np.float32))


def evaluate(eval_fn, params, arrays, frozen, mesh, *, batch_size: int, batches: int) -> dict:
    """Mean metrics over the first `batches` batches of the held-out set, in order."""
    n = len(next(iter(arrays.values())))
    out = [eval_fn(params, placed, frozen) for placed, _, _ in
           sharding.chunks(arrays, batch_size, mesh, limit=min(batches, max(n // batch_size, 1)))]
    return {f"eval/{k}": v for k, v in metrics.mean_metrics(out).items()}


def tokens_in(batch: dict) -> int:
    return int(sum(v.size for k, v in batch.items() if k.endswith("inputs") or k in ("prompt_tokens", "completion")))


def run(config, workdir: str, devices=None) -> dict:
    """Train one supervised stage; returns the final logged metrics."""
    # Everything that can be checked without reading data, before the workdir is written.
    dpo = common.dpo_config(config) if config.stage == "dpo" else None
    kto = common.kto_config(config) if config.stage == "kto" else None
    orpo = common.orpo_config(config) if config.stage == "orpo" else None
    source = common.init_source(config)
    # A reward model's fresh scalar head is adapted too (rank 1 is full rank for it).
    lcfg = common.lora_config(config, targets=(r"scalar_head/kernel",) if config.stage == "reward" else ())
    if lcfg.enabled and source is None:
        raise ValueError("lora.rank > 0 needs a base: set init.checkpoint or init.hf_dir")
    mesh = sharding.make_mesh(config.mesh, devices)
    sharding.check_batch(mesh, config.train.batch_size, "train.batch_size")
    # Set as the context, so that the model constrains its activations to it (sharding.constrain).
    with jax.set_mesh(mesh):
        return _run(config, os.path.abspath(workdir), mesh, source, lcfg, dpo, kto, orpo)


def _run(config, workdir: str, mesh, source, lcfg: lora.LoraConfig, dpo: steps.DPOConfig | None,
         kto: steps.KTOConfig | None = None, orpo: steps.ORPOConfig | None = None) -> dict:
    common.write_config(config, workdir)
    train_path, eval_path = common.data_paths(config, workdir)
    template = common.template(config)
    # A known tokenizer (the init source's) first: with a chat template, conversations stay messages.
    tok = common.find_tokenizer(config, workdir, source)
    chat = common.use_chat(config, tok)
    rows, stats = data.load_rows(train_path, config.data.kind, on_bad_row=config.data.on_bad_row,
                                 template=template, chat=chat)
    eval_rows, eval_stats = (data.load_rows(eval_path, config.data.kind, on_bad_row=config.data.on_bad_row,
                                            template=template, chat=chat) if eval_path else (None, {}))
    common.report_skipped(workdir, stats, eval_stats)
    tok = tok or common.train_workdir_tokenizer(config, workdir, rows)
    arrays, enc_stats = encode(config, rows, tok)
    eval_arrays = encode(config, eval_rows, tok)[0] if eval_path else None

    cfg = model_config(config, tok, source)
    model = Transformer(cfg)
    rules = sharding.param_rules(cfg)
    abstract = abstract_params(cfg)
    param_shardings = sharding.named(mesh, sharding.tree_specs(abstract, rules, mesh, strict=True))
    # With LoRA the optimiser sees only the adapters; the base is frozen input.
    trainable, trainable_shardings = abstract, param_shardings
    if lcfg.enabled:
        trainable = jax.eval_shape(lambda: lora.init(abstract, lcfg, jax.random.PRNGKey(0)))
        rules = lora.sharding_rules(rules, trainable)
        trainable_shardings = sharding.named(mesh, sharding.tree_specs(trainable, rules, mesh, strict=True))
    tx, lr_fn = optim.make_optimizer(config.optim, config.train.steps)
    abstract_state = jax.eval_shape(lambda p: steps.init_state(p, tx), trainable)
    state_shardings = sharding.named(mesh, sharding.tree_specs(abstract_state, rules, mesh, strict=False))
    state_shardings = state_shardings.replace(params=trainable_shardings)
    replicated = sharding.replicated(mesh)
    # The frozen reference of DPO and KTO (ORPO and SimPO have none).
    dpo_ref = (dpo is not None and dpo.uses_reference) or kto is not None
    meta = {"lora": {"config": dataclasses.asdict(lcfg), "base": source.as_lora_base()}} if lcfg.enabled else {}
    if source is not None and source.origin:
        meta["origin"] = source.origin
    # Pre-training is the SFT stage on text; its bar says which of the two runs.
    desc = "pretrain" if config.data.kind == "text" else config.stage

    with scaffold.Run(config, workdir, cfg, total_steps=config.train.steps, desc=desc, meta=meta) as run:
        # Read the init source once: it is the LoRA base, the DPO reference and the fresh
        # policy. init_state's jit writes new buffers, so donating the state never frees it.
        init = (initial_params(config.seed, cfg, mesh, param_shardings, source)
                if not run.start or lcfg.enabled or dpo_ref else None)
        if lcfg.enabled:
            init = lora.frozen_base(init, lcfg)  # the DPO reference below is these same arrays
        base = init if lcfg.enabled else None
        frozen, frozen_shardings = (init, param_shardings) if dpo_ref else (None, None)

        def fresh_state():
            params = init
            if lcfg.enabled:
                params = jax.jit(lambda r: lora.init(abstract, lcfg, r), out_shardings=trainable_shardings)(
                    jax.random.fold_in(jax.random.PRNGKey(config.seed), 1))
            return jax.jit(lambda p: steps.init_state(p, tx), out_shardings=state_shardings)(params)

        state, saved = run.restore_or_init(abstract_state, state_shardings, fresh_state)
        if dpo is not None and frozen is not None and dpo.precompute_ref:
            arrays = precompute_ref_logps(model, frozen, arrays, mesh, config.train.batch_size)
            if eval_arrays is not None:
                eval_arrays = precompute_ref_logps(model, frozen, eval_arrays, mesh, config.train.batch_size)
            frozen, frozen_shardings = None, None
        if base is None and frozen is None:
            init = None  # the state holds the trained copy: no second one stays alive (SFT, ORPO)

        loss_fn = steps.make_loss_fn(config.stage, model, dpo=dpo, kto=kto, orpo=orpo,
                                     center_coef=config.reward.center_coef if config.stage == "reward" else 0.0)
        if lcfg.enabled:
            loss_fn = lora.loss_fn(loss_fn, lcfg)
            frozen = {"base": base, "ref": frozen}
            frozen_shardings = {"base": param_shardings, "ref": frozen_shardings}
        batch_sh = sharding.batch_sharding(mesh)
        step_fn = steps.compile_step(
            lambda s, b, f: steps.train_step(s, b, f, loss_fn=loss_fn, tx=tx, lr_fn=lr_fn,
                                             accum_steps=config.optim.accum_steps),
            in_shardings=(state_shardings, batch_sh, frozen_shardings),
            out_shardings=(state_shardings, replicated), donate_state=True)
        eval_fn = steps.compile_step(
            lambda p, b, f: steps.eval_step(p, b, f, loss_fn=loss_fn),
            in_shardings=(trainable_shardings, batch_sh, frozen_shardings), out_shardings=replicated,
            donate_state=False)

        # Every process builds the whole global batch and places the rows its devices hold.
        it = data.BatchIterator(arrays, config.train.batch_size, seed=config.seed)
        start = int(jax.device_get(state.step))
        if not start:  # a resumed run logged its data at step 0
            run.writer.write(0, {"data/rows": stats["rows"], "data/skipped": stats.get("skipped", 0),
                                  **{f"data/{k}": v for k, v in enc_stats.items() if isinstance(v, (int, float))}})
        t = config.train
        # A checkpoint between two logged steps carries its window's metrics, so a run resumed
        # there logs the same mean over the same steps as an uninterrupted one.
        history, tokens, last = metrics.window_from_state(saved.get("window")), 0, {}
        for step in range(start, t.steps):
            batch = it.batch(step)
            tokens += tokens_in(batch)
            state, m = step_fn(state, sharding.put_global(batch, mesh), frozen)
            history.append(m)
            done = step + 1
            is_last = done == t.steps
            logged = done % t.log_every == 0 or is_last
            # Metrics reach the host only to be logged or to guard a checkpoint against NaN.
            if logged or run.due(done):
                scalars = metrics.mean_metrics(history)
                metrics.check_finite(scalars, done, run.saved)
                if logged:
                    if eval_arrays is not None and (is_last or (t.eval_every and done % t.eval_every == 0)):
                        scalars.update(evaluate(eval_fn, state.params, eval_arrays, frozen, mesh,
                                                batch_size=t.batch_size, batches=t.eval_batches))
                    last = run.writer.write(done, scalars, tokens=tokens)
                    history, tokens = [], 0
            run.save(done, state, force=is_last,
                     **({"window": metrics.window_state(history)} if history and run.due(done) else {}))
    return last
