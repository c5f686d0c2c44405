"""The supervised loop for every method trained on a fixed data set (`ptx.methods` rows with
loop 'supervised': SFT / pre-training, reward model, DPO, KTO, ORPO, ...).

init or resume -> iterate -> log -> checkpoint. Resume order: this workdir's
newest checkpoint, then `init.checkpoint` (or `init.hf_dir`), then scratch.
The data order is a pure function of the step, so a resumed run sees exactly
the batches an uninterrupted one would.
"""
import dataclasses
import os

import jax
import numpy as np

from ptx import data, logprobs, lora, methods, metrics, optim, sharding, steps
from ptx.model import ModelConfig, Transformer, abstract_params, init_params
from ptx.stages import common, scaffold, validate
from ptx.tokenizer import HFTokenizer, Tokenizer


def encode(t: common.Training, rows, tok: Tokenizer | HFTokenizer):
    """Rows -> arrays of the method's data kind (pairs as one row where its section says shared_prefix)."""
    d = t.data
    if d.kind == "sft":
        return data.encode_sft(rows, tok, max_len=d.max_len, max_prompt_len=d.max_prompt_len,
                               loss_on_prompt=d.loss_on_prompt, pack=d.pack)
    if d.kind == "text":
        return data.encode_text(rows, tok, max_len=d.max_len, pack=d.pack)
    if d.kind == "preference":
        return data.encode_preference(rows, tok, max_len=d.max_len, max_prompt_len=d.max_prompt_len,
                                      shared_prefix=bool(getattr(t.own, "shared_prefix", False)))
    if d.kind == "unpaired":
        return data.encode_unpaired(rows, tok, max_len=d.max_len, max_prompt_len=d.max_prompt_len)
    raise ValueError(f"data.kind={d.kind!r} cannot train stage {t.method.name!r}")


def model_config(config, method: methods.Method, tok: Tokenizer | HFTokenizer,
                 source: common.InitSource | None) -> ModelConfig:
    """The init source's architecture when there is one (it wins), else config.model."""
    cfg = source.cfg if source is not None else ModelConfig(**dict(config.model))
    cfg = cfg.replace(scalar_head=method.scalar_head)
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
    fn = jax.jit(lambda p, b: logprobs.pair_logps(model, p, b)[0], out_shardings=sharding.replicated(mesh))
    chosen, rejected = [], []
    for placed, _, keep in sharding.chunks(arrays, batch_size, mesh):
        rc, rr = fn(params, placed)
        chosen.append(np.asarray(rc)[:keep])
        rejected.append(np.asarray(rr)[:keep])
    return dict(arrays, ref_chosen_logps=np.concatenate(chosen).astype(np.float32),
                ref_rejected_logps=np.concatenate(rejected).astype(np.float32))


def evaluate(eval_fn, state, arrays, frozen, mesh, *, batch_size: int, batches: int) -> dict:
    """Mean metrics over the first `batches` batches of the held-out set, in order."""
    n = len(next(iter(arrays.values())))
    out = [eval_fn(state, placed, frozen) for placed, _, _ in
           sharding.chunks(arrays, batch_size, mesh, limit=min(batches, max(n // batch_size, 1)))]
    return {f"eval/{k}": v for k, v in metrics.mean_metrics(out).items()}


def tokens_in(batch: dict) -> int:
    return int(sum(v.size for k, v in batch.items() if k.endswith("inputs") or k in ("prompt_tokens", "completion")))


def run(config, workdir: str, devices=None) -> dict:
    """Train one supervised stage; returns the final logged metrics."""
    # Everything that can be checked without reading data, before the workdir is written.
    t = common.training(config)
    source = common.init_source(config)
    mesh = sharding.make_mesh(t.mesh, devices)
    sharding.check_batch(mesh, t.train.batch_size, "train.batch_size")
    # Set as the context, so that the model constrains its activations to it (sharding.constrain).
    with jax.set_mesh(mesh):
        return _run(config, os.path.abspath(workdir), mesh, source, t)


def _run(config, workdir: str, mesh, source, t: common.Training) -> dict:
    common.write_config(config, workdir)
    method, lcfg, train = t.method, t.lora, t.train
    train_path, eval_path = common.data_paths(config, workdir)
    template = common.template(config)
    # A known tokenizer (the init source's) first: with a chat template, conversations stay messages.
    tok = common.find_tokenizer(config, workdir, source)
    chat = common.use_chat(config, tok)
    rows, stats = data.load_rows(train_path, t.data.kind, on_bad_row=t.data.on_bad_row, template=template, chat=chat)
    eval_rows, eval_stats = (data.load_rows(eval_path, t.data.kind, on_bad_row=t.data.on_bad_row,
                                            template=template, chat=chat) if eval_path else (None, {}))
    common.report_skipped(workdir, stats, eval_stats)
    tok = tok or common.train_workdir_tokenizer(config, workdir, rows)
    arrays, enc_stats = encode(t, rows, tok)
    eval_arrays = encode(t, eval_rows, tok)[0] if eval_path else None

    cfg = model_config(config, method, tok, source)
    model = Transformer(cfg)
    rules = sharding.param_rules(cfg)
    abstract = abstract_params(cfg)
    param_shardings = sharding.named(mesh, sharding.tree_specs(abstract, rules, mesh, strict=True))
    # With LoRA the optimiser sees only the adapters; the base is frozen input.
    trainable = abstract
    if lcfg.enabled:
        trainable = jax.eval_shape(lambda: lora.init(abstract, lcfg, jax.random.PRNGKey(0)))
        rules = lora.sharding_rules(rules, trainable)
    # The frozen reference of DPO, KTO, BCO (ORPO, CPO and SimPO have none).
    uses_ref = method.uses_reference(t.own)
    precompute = uses_ref and bool(getattr(t.own, "precompute_ref", False))
    meta = {"lora": {"config": dataclasses.asdict(lcfg), "base": source.as_lora_base()}} if lcfg.enabled else {}
    if source is not None and source.origin:
        meta["origin"] = source.origin
    # Pre-training is the SFT stage on text; its bar says which of the two runs.
    desc = "pretrain" if t.data.kind == "text" else method.name
    loss_fn = method.make_loss(model, t.own)
    if lcfg.enabled:
        loss_fn = lora.loss_fn(loss_fn, lcfg)
    ref_sh = param_shardings if uses_ref and not precompute else None
    frozen_sh = {"base": param_shardings, "ref": ref_sh} if lcfg.enabled else ref_sh
    tx, lr_fn = optim.make_optimizer(t.optim, train.steps)
    trainer = steps.setup(loss_fn, tx, lr_fn, trainable, rules, mesh, frozen_sh, accum_steps=t.optim.accum_steps,
                          carry=method.initial_carry(t.own))

    with scaffold.Run(config, workdir, cfg, total_steps=train.steps, desc=desc, meta=meta) as run:
        # Read the init source once: it is the LoRA base, the reference and the fresh policy.
        # The trainer's init writes new buffers, so donating the state never frees it.
        init = (initial_params(config.seed, cfg, mesh, param_shardings, source)
                if not run.start or lcfg.enabled or uses_ref else None)
        if lcfg.enabled:
            init = lora.frozen_base(init, lcfg)  # the reference below is these same arrays
        base = init if lcfg.enabled else None
        frozen = init if uses_ref else None

        def fresh_state():
            params = init
            if lcfg.enabled:
                params = jax.jit(lambda r: lora.init(abstract, lcfg, r),
                                 out_shardings=trainer.state_shardings.params)(
                    jax.random.fold_in(jax.random.PRNGKey(config.seed), 1))
            return trainer.init(params)

        state, saved = run.restore_or_init(trainer.abstract_state, trainer.state_shardings, fresh_state)
        if precompute:
            arrays = precompute_ref_logps(model, frozen, arrays, mesh, train.batch_size)
            if eval_arrays is not None:
                eval_arrays = precompute_ref_logps(model, frozen, eval_arrays, mesh, train.batch_size)
            frozen = None
        if base is None and frozen is None:
            init = None  # the state holds the trained copy: no second one stays alive (SFT, ORPO)
        if lcfg.enabled:
            frozen = {"base": base, "ref": frozen}

        # Every process builds the whole global batch and places the rows its devices hold.
        it = data.BatchIterator(arrays, train.batch_size, seed=config.seed)
        start = int(jax.device_get(state.step))
        if not start:  # a resumed run logged its data at step 0
            run.writer.write(0, {"data/rows": stats["rows"], "data/skipped": stats.get("skipped", 0),
                                  **{f"data/{k}": v for k, v in enc_stats.items() if isinstance(v, (int, float))}})
        # A checkpoint between two logged steps carries its window's metrics, so a run resumed
        # there logs the same mean over the same steps as an uninterrupted one.
        history, tokens, last = metrics.window_from_state(saved.get("window")), 0, {}
        for step in range(start, train.steps):
            batch = it.batch(step)
            tokens += tokens_in(batch)
            state, m = trainer.train_step(state, sharding.put_global(batch, mesh), frozen)
            history.append(m)
            done = step + 1
            is_last = done == train.steps
            logged = done % train.log_every == 0 or is_last
            # Metrics reach the host only to be logged or to guard a checkpoint against NaN.
            if logged or run.due(done):
                scalars = metrics.mean_metrics(history)
                metrics.check_finite(scalars, done, run.saved)
                if logged:
                    if eval_arrays is not None and (is_last or (train.eval_every and done % train.eval_every == 0)):
                        scalars.update(evaluate(trainer.eval_step, state, eval_arrays, frozen, mesh,
                                                batch_size=train.batch_size, batches=train.eval_batches))
                    last = run.writer.write(done, scalars, tokens=tokens)
                    history, tokens = [], 0
            run.save(done, state, force=is_last,
                     **({"window": metrics.window_state(history)} if history and run.due(done) else {}))
    return last
