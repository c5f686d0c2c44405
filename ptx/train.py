"""One loop for every supervised stage (SFT / pre-training, reward model, DPO).

init or resume -> iterate -> log -> checkpoint. Resume order: this workdir's
newest checkpoint, then `init.checkpoint` (or `init.hf_dir`), then scratch.
The data order is a pure function of the step, so a resumed run sees exactly
the batches an uninterrupted one would.
"""
import dataclasses
import json
import os
import shutil

import jax
import numpy as np

from ptx import checkpoint, data, lora, metrics, optim, sharding, steps
from ptx.model import ModelConfig, Transformer, init_params
from ptx.tokenizer import PromptTemplate, Tokenizer, load_tokenizer, train_tokenizer

# Which embedded-world file a stage reads when `data.train` is empty.
WORLD_FILES = {"text": ("pretrain", ""), "sft": ("sft", ""),
               "preference": ("preference", "preference_heldout"), "prompt": ("sft", "heldout")}


def write_config(config, workdir: str):
    if jax.process_index() == 0:
        os.makedirs(workdir, exist_ok=True)
        with open(os.path.join(workdir, "config.json"), "w") as f:
            f.write(config.to_json_best_effort(indent=2))


def world_files(config, workdir: str) -> dict:
    """Generate the embedded world's data files into `<workdir>/world` (deterministic, seconds)."""
    from ptx import world

    out = os.path.join(workdir, "world")
    wcfg = world.WorldConfig(seed=config.world.seed)
    return world.World(wcfg).write(out)


def data_paths(config, workdir: str) -> tuple[str, str]:
    if config.data.train:
        return config.data.train, config.data.eval
    train_name, eval_name = WORLD_FILES[config.data.kind]
    files = world_files(config, workdir)
    return files[train_name], config.data.eval or (files[eval_name] if eval_name else "")


def template(config) -> PromptTemplate:
    return PromptTemplate(config.tokenizer.user_prefix, config.tokenizer.assistant_prefix)


def texts_of(rows) -> list[str]:
    return [t for r in rows for t in (r.get("text"), r.get("prompt"), r.get("completion"),
                                      r.get("chosen"), r.get("rejected")) if t]


def setup_tokenizer(config, workdir: str, rows) -> Tokenizer:
    """Explicit path, else the init checkpoint's, else this workdir's (resume), else train one."""
    own = os.path.join(workdir, "tokenizer.model")
    source = config.tokenizer.path
    if not source and config.init.checkpoint:
        source = checkpoint.tokenizer_path(config.init.checkpoint)
    if not source and config.init.hf_dir:
        from ptx import hf

        return hf.load_tokenizer(config.init.hf_dir)
    if not source and os.path.exists(own):
        source = own
    if source:
        if jax.process_index() == 0 and os.path.abspath(source) != os.path.abspath(own):
            shutil.copyfile(source, own)
        return load_tokenizer(source)
    return train_tokenizer(texts_of(rows), vocab_size=config.model.vocab_size, path=own,
                           template=template(config))


def encode(config, rows, tok):
    d = config.data
    if d.kind == "sft":
        return data.encode_sft(rows, tok, max_len=d.max_len, max_prompt_len=d.max_prompt_len,
                               loss_on_prompt=d.loss_on_prompt, pack=d.pack)
    if d.kind == "text":
        return data.encode_text(rows, tok, max_len=d.max_len, pack=d.pack)
    if d.kind == "preference":
        return data.encode_preference(rows, tok, max_len=d.max_len, max_prompt_len=d.max_prompt_len)
    raise ValueError(f"data.kind={d.kind!r} cannot train stage {config.stage!r}")


def source_config(config):
    """The architecture of `init.checkpoint` or `init.hf_dir`, or None for a fresh model."""
    if config.init.checkpoint and config.init.hf_dir:
        raise ValueError("set init.checkpoint or init.hf_dir, not both")
    if config.init.checkpoint:
        return ModelConfig(**checkpoint.read_meta(config.init.checkpoint)["model"])
    if config.init.hf_dir:
        from ptx import hf

        with open(os.path.join(config.init.hf_dir, hf.CONFIG)) as f:
            return hf.config_from_hf(json.load(f))
    return None


def param_shardings_for(cfg: ModelConfig, mesh):
    abstract = jax.eval_shape(lambda: init_params(cfg, jax.random.PRNGKey(0)))
    return sharding.named(mesh, sharding.tree_specs(abstract, sharding.param_rules(cfg), mesh, strict=True))


def load_source(config, mesh):
    """(config, params) of the init source, read straight onto the mesh."""
    cfg = source_config(config)
    if config.init.checkpoint:
        return cfg, checkpoint.load_params(config.init.checkpoint, param_shardings_for(cfg, mesh))[0]
    from ptx import hf

    return cfg, hf.load_params(config.init.hf_dir, cfg, param_shardings_for(cfg, mesh))[0]


def lora_config(config) -> lora.LoraConfig:
    """The stage's adapters; the reward stage also adapts its fresh scalar head (rank 1 is full rank for it)."""
    lcfg = lora.LoraConfig.from_config(config.lora)
    if lcfg.enabled and config.stage == "reward":
        lcfg = dataclasses.replace(lcfg, targets=tuple(lcfg.targets) + (r"scalar_head/kernel",))
    return lcfg


def base_source(config) -> dict:
    """Where a LoRA checkpoint's frozen base comes from, so the next stage can merge it."""
    if not (config.init.checkpoint or config.init.hf_dir):
        raise ValueError("lora.rank > 0 needs a base: set init.checkpoint or init.hf_dir")
    return {"checkpoint": os.path.abspath(config.init.checkpoint) if config.init.checkpoint else "",
            "hf_dir": os.path.abspath(config.init.hf_dir) if config.init.hf_dir else ""}


def model_config(config, tok: Tokenizer) -> ModelConfig:
    """From the init source when there is one (its architecture wins), else from config.model."""
    cfg = source_config(config) or ModelConfig(**dict(config.model))
    cfg = cfg.replace(scalar_head=config.stage == "reward")
    if tok.vocab_size > cfg.vocab_size:
        raise ValueError(f"tokenizer has {tok.vocab_size} pieces but model.vocab_size={cfg.vocab_size}")
    return cfg


def initial_params(config, cfg: ModelConfig, mesh, param_shardings):
    """Random init sharded at creation, or the init source's trunk (fresh scalar head)."""
    fresh = jax.jit(lambda r: init_params(cfg, r), out_shardings=param_shardings)(jax.random.PRNGKey(config.seed))
    if source_config(config) is None:
        return fresh
    _, loaded = load_source(config, mesh)
    # Keep the trunk (and LM head); a head the source lacks stays freshly initialised.
    return {k: loaded.get(k, v) for k, v in fresh.items()}


def precompute_ref_logps(model, params, arrays, mesh, batch_size: int) -> dict:
    """Reference log-probabilities over the whole preference set, once, so DPO steps run the policy only."""
    # Replicated out: every process reads the whole global batch's log-probs back to the host.
    fn = jax.jit(lambda p, b: steps.pair_logps(model, p, b)[0], out_shardings=sharding.replicated(mesh))
    n = len(arrays["prob_chosen"])
    pad = (-n) % batch_size
    chosen, rejected = [], []
    for start in range(0, n + pad, batch_size):
        idx = np.arange(start, start + batch_size) % n
        local = np.array_split(idx, jax.process_count())[jax.process_index()]
        rc, rr = fn(params, sharding.put_batch({k: v[local] for k, v in arrays.items()}, mesh))
        chosen.append(np.asarray(rc))
        rejected.append(np.asarray(rr))
    return dict(arrays, ref_chosen_logps=np.concatenate(chosen)[:n].astype(np.float32),
                ref_rejected_logps=np.concatenate(rejected)[:n].astype(np.float32))


def tokens_in(batch: dict) -> int:
    return int(sum(v.size for k, v in batch.items() if k.endswith("inputs")))


def run(config, workdir: str, devices=None) -> dict:
    """Train one supervised stage; returns the final logged metrics."""
    mesh = sharding.make_mesh(config.mesh, devices)
    # Set as the context, so that the model constrains its activations to it (sharding.constrain).
    with jax.set_mesh(mesh):
        return _run(config, os.path.abspath(workdir), mesh)


def _run(config, workdir: str, mesh) -> dict:
    write_config(config, workdir)
    train_path, eval_path = data_paths(config, workdir)
    rows, stats = data.load_rows(train_path, config.data.kind, on_bad_row=config.data.on_bad_row,
                                 template=template(config))
    tok = setup_tokenizer(config, workdir, rows)
    arrays, enc_stats = encode(config, rows, tok)
    eval_arrays = None
    if eval_path:
        eval_rows, _ = data.load_rows(eval_path, config.data.kind, on_bad_row=config.data.on_bad_row,
                                      template=template(config))
        eval_arrays, _ = encode(config, eval_rows, tok)

    cfg = model_config(config, tok)
    model = Transformer(cfg)
    rules = sharding.param_rules(cfg)
    abstract_params = jax.eval_shape(lambda: init_params(cfg, jax.random.PRNGKey(0)))
    param_shardings = sharding.named(mesh, sharding.tree_specs(abstract_params, rules, mesh, strict=True))
    lcfg = lora_config(config)
    # With LoRA the optimiser sees only the adapters; the base is frozen input.
    trainable, trainable_shardings = abstract_params, param_shardings
    if lcfg.enabled:
        trainable = jax.eval_shape(lambda: lora.init(abstract_params, lcfg, jax.random.PRNGKey(0)))
        rules = lora.sharding_rules(rules, trainable)
        trainable_shardings = sharding.named(mesh, sharding.tree_specs(trainable, rules, mesh, strict=True))
    tx, lr_fn = optim.make_optimizer(config.optim, config.train.steps)
    abstract_state = jax.eval_shape(lambda p: steps.init_state(p, tx), trainable)
    state_shardings = sharding.named(mesh, sharding.tree_specs(abstract_state, rules, mesh, strict=False))
    state_shardings = state_shardings.replace(params=trainable_shardings)
    replicated = sharding.replicated(mesh)

    ckpt = checkpoint.Checkpointer(workdir, every=config.train.ckpt_every, keep=config.train.keep_ckpts)
    meta = {"stage": config.stage, "model": checkpoint.model_meta(cfg),
            "tokenizer": "tokenizer.model", "config": json.loads(config.to_json_best_effort())}
    latest = ckpt.latest_step()
    frozen = None
    frozen_shardings = None
    dpo_ref = config.stage == "dpo" and config.dpo.reference_free is False
    # Read the init source once: it is the LoRA base, the DPO reference and the fresh
    # policy. init_state's jit writes new buffers, so donating the state never frees it.
    init = (initial_params(config, cfg, mesh, param_shardings)
            if latest is None or lcfg.enabled or dpo_ref else None)
    if lcfg.enabled:
        init = lora.frozen_base(init, lcfg)  # the DPO reference below is these same arrays
    base = init if lcfg.enabled else None
    if dpo_ref:
        frozen, frozen_shardings = init, param_shardings
    if latest is not None:
        abstract = jax.tree_util.tree_map(
            lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract_state, state_shardings)
        state, _ = ckpt.restore(latest, abstract)
    elif lcfg.enabled:
        adapters = jax.jit(lambda r: lora.init(abstract_params, lcfg, r), out_shardings=trainable_shardings)(
            jax.random.fold_in(jax.random.PRNGKey(config.seed), 1))
        state = jax.jit(lambda p: steps.init_state(p, tx), out_shardings=state_shardings)(adapters)
    else:
        state = jax.jit(lambda p: steps.init_state(p, tx), out_shardings=state_shardings)(init)
    if frozen is not None and config.dpo.precompute_ref:
        arrays = precompute_ref_logps(model, frozen, arrays, mesh, config.train.batch_size)
        if eval_arrays is not None:
            eval_arrays = precompute_ref_logps(model, frozen, eval_arrays, mesh, config.train.batch_size)
        frozen, frozen_shardings = None, None

    loss_fn = steps.make_loss_fn(config.stage, model, config)
    if lcfg.enabled:
        loss_fn = lora.loss_fn(loss_fn, lcfg)
        frozen, frozen_shardings = {"base": base, "ref": frozen}, {"base": param_shardings, "ref": frozen_shardings}
        meta["lora"] = {"config": dataclasses.asdict(lcfg), "base": base_source(config)}
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

    it = data.BatchIterator(arrays, config.train.batch_size, seed=config.seed,
                            process_index=jax.process_index(), process_count=jax.process_count())
    start = int(jax.device_get(state.step))
    # Pre-training is the SFT stage on text; its bar says which of the two runs.
    writer = metrics.MetricWriter(workdir, total_steps=config.train.steps, start_step=start,
                                  desc="pretrain" if config.data.kind == "text" else config.stage)
    writer.write(start, {"data/rows": stats["rows"], "data/skipped": stats.get("skipped", 0),
                         **{f"data/{k}": v for k, v in enc_stats.items() if isinstance(v, (int, float))}})
    history, tokens, last = [], 0, {}
    try:
        for step in range(start, config.train.steps):
            batch = it.batch(step)
            tokens += tokens_in(batch) * jax.process_count()
            state, m = step_fn(state, sharding.put_batch(batch, mesh), frozen)
            history.append(m)
            done = step + 1
            is_last = done == config.train.steps
            if done % config.train.log_every == 0 or is_last or done % max(config.train.ckpt_every, 1) == 0:
                scalars = metrics.mean_metrics(history)
                metrics.check_finite(scalars, done)
                if done % config.train.log_every == 0 or is_last:
                    if eval_arrays is not None and (is_last or (config.train.eval_every and
                                                                done % config.train.eval_every == 0)):
                        scalars.update(evaluate(eval_fn, state.params, eval_arrays, frozen, mesh, config))
                    last = writer.write(done, scalars, tokens=tokens)
                    history, tokens = [], 0
            ckpt.save(done, state, meta, force=is_last)
    finally:
        ckpt.close()
        writer.close()
    return last


def evaluate(eval_fn, params, arrays, frozen, mesh, config) -> dict:
    """Mean metrics over the first `eval_batches` batches of the held-out set, in order."""
    n = len(next(iter(arrays.values())))
    bs = config.train.batch_size
    out = []
    for i in range(min(config.train.eval_batches, max(n // bs, 1))):
        idx = np.arange(i * bs, (i + 1) * bs) % n
        local = np.array_split(idx, jax.process_count())[jax.process_index()]
        out.append(eval_fn(params, sharding.put_batch({k: v[local] for k, v in arrays.items()}, mesh),
                           frozen))
    return {f"eval/{k}": v for k, v in metrics.mean_metrics(out).items()}
