"""The benchmarks of `python -m bench.main`: synthetic inputs (random weights and
token rows of the benchmarked shapes) and `Suite`, one method per benchmark, each
returning a `peer.entry` (tokens/s, FLOP/s, compile time, peak memory), or with
`--memory_only` a `peer.memory_entry` of the training steps: compiled on abstract
inputs (shapes and shardings, nothing allocated) and never run.
"""
import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

from bench import engine as bench_engine
from bench.peer import compile_timed, dpo_lengths, entry, mb, median_time, memory_entry
from configs import common
from configs import grpo as grpo_configs
from configs import ppo as ppo_configs
from ptx import data, lora, methods, optim, rl_training, rollout, sampler, sharding, steps
from ptx.losses import DPOConfig, RewardConfig
from ptx.model import ModelConfig, Transformer, abstract_params, flops_per_token, init_params, unstack_layers


def rl_config(module) -> rl_training.RLConfig:
    """The `rl` section of a stage config module (configs/ppo.py, configs/grpo.py) as the loop builds it."""
    return rl_training.RLConfig(**module.get_config().rl)


# ---------------------------------------------------------------- inputs

def random_params(cfg: ModelConfig, seed: int):
    """Host arrays shaped as `init_params`: N(0, 0.02) weights, unit norm scales, zero biases.

    Drawn with numpy so no init program is compiled per benchmark; values only
    need to be realistic in scale.
    """
    rng = np.random.default_rng(seed)

    def leaf(path, s):
        name = sharding.path_str(path)
        if name.endswith("scale") or name.endswith("bias"):
            return np.full(s.shape, 1.0 if name.endswith("scale") else 0.0, s.dtype)
        return (0.02 * rng.standard_normal(s.shape, np.float32)).astype(s.dtype)

    return jax.tree_util.tree_map_with_path(leaf, jax.eval_shape(lambda: init_params(cfg, jax.random.PRNGKey(0))))


def lm_rows(rng, b, t, vocab, prefix=""):
    """Random full rows: inputs / targets / positions / segment_ids [b, t] int32, loss_mask f32."""
    tok = rng.integers(1, vocab, (b, t + 1)).astype(np.int32)
    return {prefix + "inputs": tok[:, :-1], prefix + "targets": tok[:, 1:],
            prefix + "positions": np.tile(np.arange(t, dtype=np.int32), (b, 1)),
            prefix + "segment_ids": np.ones((b, t), np.int32),
            prefix + "loss_mask": np.ones((b, t), np.float32)}


def pair_rows(rng, b, t, vocab, precomputed_ref=False):
    batch = {**lm_rows(rng, b, t, vocab, "chosen_"), **lm_rows(rng, b, t, vocab, "rejected_"),
             "prob_chosen": np.ones((b,), np.float32)}
    if precomputed_ref:
        batch["ref_chosen_logps"] = -rng.uniform(50, 100, b).astype(np.float32)
        batch["ref_rejected_logps"] = -rng.uniform(50, 100, b).astype(np.float32)
    return batch


def dpo_rows(rng, b, prompt, response, vocab, shared_prefix=False):
    """Pairs of a `prompt`-token prompt and `response`-token responses (the loss on the responses),
    encoded by `data.pair_arrays`: two rows of prompt + response tokens per pair, or one
    shared-prefix row of prompt + 2 x response tokens."""
    # prompt + 1 ids: the last one is the input that predicts the first response token.
    heads = rng.integers(1, vocab, (b, prompt + 1)).tolist()
    docs = {side: [(h + rng.integers(1, vocab, response).tolist(), [0] * (prompt + 1) + [1] * response)
                   for h in heads] for side in ("chosen", "rejected")}
    arrays = data.pair_arrays(docs["chosen"], docs["rejected"], max_len=prompt + response, pad_id=0,
                              shared_prefix=shared_prefix)
    return dict(arrays, prob_chosen=np.ones((b,), np.float32))


def rl_rows(rng, b, width, n, vocab):
    """What `rl_training.prepare` hands the update: prompt width `width`, n completion tokens."""
    tok = rng.integers(1, vocab, (b, width + n)).astype(np.int32)
    f = lambda: rng.normal(size=(b, n)).astype(np.float32)
    return {"tokens": tok, "positions": np.tile(np.arange(width + n, dtype=np.int32), (b, 1)),
            "segment_ids": np.ones((b, width + n), np.int32), "completion": tok[:, width:],
            "mask": np.ones((b, n), np.float32), "old_logps": -np.abs(f()), "ref_logps": -np.abs(f()),
            "old_values": f(), "advantages": f(), "returns": f(), "kl_coef": np.full((b,), 0.05, np.float32)}


# ---------------------------------------------------------------- the suite

class Suite:
    rollout_skewed, rollout_uniform, rollout_memory = (bench_engine.rollout_skewed, bench_engine.rollout_uniform,
                                                       bench_engine.rollout_memory)
    def __init__(self, args, cfg: ModelConfig, peak: float):
        self.args, self.cfg, self.peak = args, cfg, peak
        self.memory_only = bool(getattr(args, "memory_only", False))
        devices = jax.local_devices()[:args.devices] if args.devices else jax.local_devices()
        self.mesh = sharding.make_mesh(sharding.MeshConfig(), devices)
        self.rng = np.random.default_rng(0)
        self.width = args.prompt_len or args.seq // 2
        self.new = args.new_tokens or max(args.seq - self.width, 2)
        self.fwd = flops_per_token(cfg, args.seq)  # per token, LM head included
        # The DPO entries' pairs: a prompt and two responses, each sequence prompt + response tokens.
        self.dpo_prompt, self.dpo_response = dpo_lengths(args)
        self.head = 2 * cfg.d_model * cfg.vocab_size
        self._params = None
        options = {"xla_backend_optimization_level": args.backend_opt_level} if args.backend_opt_level >= 0 else {}
        if self.memory_only and jax.devices()[0].platform == "cpu" and getattr(args, "cpu_scheduler", "") == "memory":
            # XLA:CPU's default scheduler trades memory for concurrency between threads (it
            # allocates the backward pass's zero-initialised gradients at the start of the
            # step); an accelerator's scheduler minds its memory, and so does this one.
            options["xla_cpu_scheduler_type"] = "CPU_SCHEDULER_TYPE_MEMORY_OPTIMIZED"
        self.compile = functools.partial(compile_timed, options=options or None)
        self.tx, self.lr_fn = optim.make_optimizer(optim.OptimConfig(**common.base_config("bench").optim),
                                                   total_steps=1000)

    def time(self, run, repeats=None) -> float:
        return median_time(run, repeats or self.args.repeats, budget_s=self.args.budget_s)

    def params(self):
        """One policy on the default device (decode, GRPO); training steps make their own, sharded."""
        if self._params is None:
            self._params = jax.device_put(random_params(self.cfg, 0))
        return self._params

    def _shardings(self, tree, cfg=None):
        """Parameter shardings of any tree of them (adapters, a policy and its critic)."""
        return sharding.named(self.mesh, sharding.tree_specs(tree, self._rules(cfg), self.mesh, strict=False))

    def weights(self, cfg: ModelConfig, seed: int):
        """A parameter tree of `cfg`: random host arrays, or with memory_only its shapes."""
        return abstract_params(cfg) if self.memory_only else random_params(cfg, seed)

    def put(self, params):
        """On the mesh: device arrays, or with memory_only ShapeDtypeStructs carrying the shardings."""
        if self.memory_only:
            return jax.tree_util.tree_map(lambda x, sh: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sh),
                                          params, self._shardings(params))
        return jax.device_put(params, self._shardings(params))

    def derive(self, fn, tree):
        """fn(tree), or with memory_only its shapes on the mesh."""
        return self.put(jax.eval_shape(fn, tree)) if self.memory_only else fn(tree)

    def _rules(self, cfg=None):
        """Parameter rules; on the bench's data-parallel mesh every rule replicates (adapters too)."""
        return sharding.param_rules((cfg or self.cfg).replace(scalar_head=True))  # a superset: unused rules are fine

    def _trainer(self, loss_fn, params, frozen, cfg=None) -> steps.Trainer:
        return steps.setup(loss_fn, self.tx, self.lr_fn, params, self._rules(cfg), self.mesh,
                           jax.tree_util.tree_map(lambda x: x.sharding, frozen), strict_params=False)

    def train(self, loss_fn, params, batch: dict, flops: float, frozen=None, tokens=None):
        """Times one `steps.train_step` from `params` (host arrays, the trained tree); frozen: device
        arrays the step reads but does not train. param_mb / opt_state_mb / frozen_mb: their sizes."""
        trainer = self._trainer(loss_fn, params, frozen)
        abstract, state_sh = trainer.abstract_state, trainer.state_shardings
        sizes = {f"{k}_mb": mb(t) for k, t in (("param", abstract.params), ("opt_state", abstract.opt_state),
                                                  ("frozen", frozen))}
        if self.memory_only:
            spec = lambda x, sh: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sh)
            batch_sh = sharding.batch_sharding(self.mesh)
            compiled, compile_s = self.compile(trainer.train_step, jax.tree_util.tree_map(spec, abstract, state_sh),
                                               {k: spec(v, batch_sh) for k, v in batch.items()}, frozen)
            return memory_entry(compiled, compile_s, **sizes)
        state = trainer.init(jax.device_put(params, state_sh.params))
        batch = sharding.put_global(batch, self.mesh)
        compiled, compile_s = self.compile(trainer.train_step, state, batch, frozen)
        box = [state]

        def run():
            box[0], metrics = compiled(box[0], batch, frozen)
            return box[0], metrics

        s = self.time(run)
        tokens = tokens or sum(v.size for k, v in batch.items() if k.endswith("inputs"))
        return entry(s, tokens, flops, self.peak, compile_s, compiled, **sizes)

    def sft_step(self):
        a, cfg = self.args, self.cfg
        loss_fn = methods.get("sft").make_loss(Transformer(cfg), None)
        return self.train(loss_fn, self.weights(cfg, 0), lm_rows(self.rng, a.batch, a.seq, cfg.vocab_size),
                          3 * self.fwd * a.batch * a.seq)

    def reward_step(self):
        a, cfg = self.args, self.cfg.replace(scalar_head=True)
        loss_fn = methods.get("reward").make_loss(Transformer(cfg), RewardConfig())
        return self.train(loss_fn, self.weights(cfg, 0), pair_rows(self.rng, a.batch, a.seq, cfg.vocab_size),
                          3 * (self.fwd - self.head) * 2 * a.batch * a.seq)

    def dpo_step(self, shared_prefix=False):
        """DPO against a frozen reference on --batch pairs of --dpo_prompt_len + --dpo_response_len
        tokens a sequence. tokens and FLOPs: both sequences in full, 2 x (prompt + response) a pair,
        for the shared-prefix rows too (the same work), so that the two entries compare."""
        a, cfg = self.args, self.cfg
        n = self.dpo_prompt + self.dpo_response
        loss_fn = methods.get("dpo").make_loss(Transformer(cfg), DPOConfig())
        batch = dpo_rows(self.rng, a.batch, self.dpo_prompt, self.dpo_response, cfg.vocab_size, shared_prefix)
        flops = (3 + 1) * flops_per_token(cfg, n) * 2 * a.batch * n
        return self.train(loss_fn, self.weights(cfg, 0), batch, flops, frozen=self.put(self.weights(cfg, 1)),
                          tokens=2 * a.batch * n)

    def dpo_step_shared_prefix(self):
        """`dpo_step` with one row per pair, [prompt | chosen | rejected] (`dpo.shared_prefix`)."""
        return self.dpo_step(shared_prefix=True)

    def dpo_step_precomputed_ref(self):
        a, cfg = self.args, self.cfg
        loss_fn = methods.get("dpo").make_loss(Transformer(cfg), DPOConfig())
        return self.train(loss_fn, self.weights(cfg, 0), pair_rows(self.rng, a.batch, a.seq, cfg.vocab_size, True),
                          3 * self.fwd * 2 * a.batch * a.seq)

    def _lora(self, stage: str, batch: dict, flops: float):
        """`stage`'s step over rank `--lora_rank` adapters on a frozen base in `--lora_base_dtype`; the
        DPO reference is that base, adapters off. The base's weight gradient is still formed (the
        adapters merge into it), so the FLOPs are full finetuning's: LoRA saves memory, not compute."""
        lcfg, base, adapters = self._lora_trees()
        loss_fn = lora.loss_fn(methods.get(stage).make_loss(Transformer(self.cfg), DPOConfig()), lcfg)
        frozen = {"base": base, "ref": base if stage == "dpo" else None}
        return self.train(loss_fn, adapters, batch, flops, frozen=frozen)

    def _lora_trees(self):
        """(LoraConfig, the frozen base on the mesh, fresh adapters on the host) of --lora_rank / --lora_base_dtype."""
        lcfg = lora.LoraConfig(rank=self.args.lora_rank, base_dtype=self.args.lora_base_dtype)
        base = self.derive(lambda p: lora.frozen_base(p, lcfg), self.put(self.weights(self.cfg, 0)))
        adapters = self.derive(lambda b: lora.init(b, lcfg, jax.random.PRNGKey(1)), base)
        return lcfg, base, adapters if self.memory_only else jax.device_get(adapters)

    def lora_sft_step(self):
        a = self.args
        return self._lora("sft", lm_rows(self.rng, a.batch, a.seq, self.cfg.vocab_size), 3 * self.fwd * a.batch * a.seq)

    def lora_dpo_step(self):
        a = self.args
        return self._lora("dpo", pair_rows(self.rng, a.batch, a.seq, self.cfg.vocab_size),
                          (3 + 1) * self.fwd * 2 * a.batch * a.seq)

    def _rl_update(self, rl, critic: bool, lora_cfg=None, adapters=None, base=None):
        """One clipped-surrogate update (+ the value loss of a critic: a second trunk with a scalar
        head) on a rollout of --batch rows of --seq tokens; with lora_cfg over `adapters` on `base`."""
        a, cfg = self.args, self.cfg
        critic_cfg = cfg.replace(scalar_head=True)
        width = min(self.width, a.seq - 1)
        loss_fn = lambda p, b, f: rl_training.rl_loss_fn(
            p, b, f, policy_model=Transformer(cfg), critic_model=Transformer(critic_cfg) if critic else None,
            width=width, rl_cfg=rl, lora_cfg=lora_cfg)
        batch = rl_rows(self.rng, a.batch, width, a.seq - width, cfg.vocab_size)
        params = {"policy": self.weights(cfg, 0) if adapters is None else adapters}
        if critic:
            params["critic"] = self.weights(critic_cfg, 1)
        fwd = 2 * self.fwd - self.head if critic else self.fwd  # the critic reads no LM head
        return self.train(loss_fn, params, batch, 3 * fwd * a.batch * a.seq, frozen=base, tokens=a.batch * a.seq)

    def ppo_update(self):
        """PPO's update as configs/ppo.py runs it: the critic a second trunk."""
        return self._rl_update(rl_config(ppo_configs), critic=True)

    def ppo_update_value_head(self):
        """PPO's update with `rl.critic=policy`: the value head on the policy's trunk, one set of gradients."""
        a, cfg = self.args, self.cfg.replace(scalar_head=True)
        rl = dataclasses.replace(rl_config(ppo_configs), critic="policy")
        width = min(self.width, a.seq - 1)
        loss_fn = lambda p, b, f: rl_training.rl_loss_fn(p, b, f, policy_model=Transformer(cfg), critic_model=None,
                                                     width=width, rl_cfg=rl)
        batch = rl_rows(self.rng, a.batch, width, a.seq - width, cfg.vocab_size)
        return self.train(loss_fn, {"policy": self.weights(cfg, 0)}, batch, 3 * self.fwd * a.batch * a.seq,
                          tokens=a.batch * a.seq)

    def grpo_update(self):
        """GRPO's update as configs/grpo.py runs it: no critic, the KL to the reference in the loss, each
        group of rl.group_size rows one shared-prefix row (FLOPs of the rows: an effective MFU)."""
        return self._rl_update(rl_config(grpo_configs), critic=False)

    def lora_ppo_update(self):
        """`ppo_update` over adapters on a frozen base (the reference); the critic trains in full."""
        lcfg, base, adapters = self._lora_trees()
        return self._rl_update(rl_config(ppo_configs), critic=True, lora_cfg=lcfg,
                               adapters=adapters, base=base)

    # ------------------------------------------------------------ sampling

    def _prompts(self, b):
        tokens = jnp.asarray(self.rng.integers(1, self.cfg.vocab_size, (b, self.width)), jnp.int32)
        return tokens, jnp.full((b,), self.width, jnp.int32), jax.random.split(jax.random.PRNGKey(1), b)

    def _prefill(self, b):
        """(median s, compile s, compiled, args) of one prefill of b prompts into the decode cache."""
        cache_len = self.width + self.new - 1
        fn = jax.jit(lambda p, t, n: sampler.prefill(p, self.cfg, t, n, cache_len))
        tokens, lens, _ = self._prompts(b)
        compiled, compile_s = self.compile(fn, self.params(), tokens, lens)
        return self.time(lambda: compiled(self.params(), tokens, lens)), compile_s, compiled

    def prefill(self):
        b, cache_len = self.args.batch, self.width + self.new - 1
        s, compile_s, compiled = self._prefill(b)
        # Every prompt token attends the whole cache; only the last column reaches the LM head.
        flops = (flops_per_token(self.cfg, cache_len) - self.head) * b * self.width + self.head * b
        return entry(s, b * self.width, flops, self.peak, compile_s, compiled)

    def decode(self, b):
        """`make_generate_fn` with eos off (every row samples new_tokens, --top_p) minus the prefill.

        decode_per_token_vs_forward = decode time per loop step / one jitted
        cached forward of the batch at one position (the model call of a step,
        no sampling, dispatch included). loop_forward_ms: the same forward in a
        fori_loop of new_tokens - 1 greedy steps, so step - loop forward is what
        sampling and the loop's bookkeeping cost.
        """
        params, cfg, n, width = self.params(), self.cfg, self.new, self.width
        tokens, lens, keys = self._prompts(b)
        settings = (jnp.float32(1.0), jnp.int32(0), jnp.float32(self.args.top_p))
        gen = sampler.make_generate_fn(cfg, max_new_tokens=n, eos_id=-1)
        compiled, compile_s = self.compile(gen, params, tokens, lens, keys, *settings)
        gen_s = self.time(lambda: compiled(params, tokens, lens, keys, *settings))
        pre_s, _, pre = self._prefill(b)
        last, i = tokens[:, -1], jnp.int32(0)

        # Split per layer once, outside the timed calls, as generate does before its loop.
        layered = jax.jit(unstack_layers)(params)

        def greedy_steps(p, state, tok):
            step_fn = sampler.layered_step_fn(p, cfg, width)

            def body(j, carry):
                logits, st = step_fn(carry[0], carry[1], j)
                return st, jnp.argmax(logits, axis=-1).astype(jnp.int32)

            return jax.lax.fori_loop(0, n - 1, body, (state, tok))

        one = jax.jit(lambda p, st, tok, j: sampler.layered_step_fn(p, cfg, width)(st, tok, j), donate_argnums=1)
        loop = jax.jit(greedy_steps, donate_argnums=1)
        state = pre(params, tokens, lens)[1]
        one, _ = self.compile(one, layered, state, last, i)
        loop, _ = self.compile(loop, layered, state, last)
        box = [state]

        def one_forward():
            logits, box[0] = one(layered, box[0], last, i)
            return logits

        def loop_forward():
            box[0], out = loop(layered, box[0], last)
            return out

        fwd_s = self.time(one_forward, max(self.args.repeats, 10))
        loop_s = self.time(loop_forward) / max(n - 1, 1)
        decode_s = max(gen_s - pre_s, 1e-9)
        step_s = decode_s / max(n - 1, 1)  # the loop calls the model n - 1 times
        flops = flops_per_token(cfg, width + n - 1) * b * (n - 1)
        return entry(decode_s, b * n, flops, self.peak, compile_s, compiled, generate_s=gen_s, prefill_s=pre_s,
                     generate_tokens_per_s=b * n / gen_s, decode_step_ms=1e3 * step_s, forward_ms=1e3 * fwd_s,
                     loop_forward_ms=1e3 * loop_s, decode_per_token_vs_forward=step_s / fwd_s)

    def _rl_iteration(self, rl, critic: bool, minibatch: int, updates: int):
        """Rollout (generate, each prompt prefilled once for its group -> build -> prepare: the
        policy forward only with rl.old_logprobs=forward, the reference only with a KL term, the
        critic if any), then `updates` minibatch steps of policy (+ critic): one timed, times `updates`.
        FLOPs count a forward per row; with rl.shared_prefix (GRPO) a group's prompt is read once,
        so its MFU is an effective one."""
        a, cfg, width, n = self.args, self.cfg, self.width, self.new
        rl = dataclasses.replace(rl, group_size=math.gcd(a.batch, rl.group_size))  # the batch holds whole groups
        model, critic_cfg = Transformer(cfg), cfg.replace(scalar_head=True)
        critic_model = Transformer(critic_cfg) if critic else None
        ref = self.params()
        params = {"policy": jax.tree_util.tree_map(jnp.copy, ref)}
        if critic:
            params["critic"] = jax.device_put(random_params(critic_cfg, 2))
        tokens, lens, _ = self._prompts(a.batch // rl.group_size)
        tokens, lens = jnp.repeat(tokens, rl.group_size, axis=0), jnp.repeat(lens, rl.group_size, axis=0)
        keys = jax.random.split(jax.random.PRNGKey(1), a.batch)
        settings = (jnp.float32(rl.temperature), jnp.int32(rl.top_k), jnp.float32(rl.top_p))
        scores = jnp.asarray(self.rng.normal(size=a.batch), jnp.float32)
        gen = sampler.make_generate_fn(cfg, max_new_tokens=n, eos_id=-1, group_size=rl.group_size)
        build = jax.jit(lambda t, lens, out: rollout.build_sequences(t, lens, out, pad_id=0))
        prep = jax.jit(lambda p, r, seq, s, k: rl_training.prepare(
            p, r, seq, s, k, policy_model=model, critic_model=critic_model, width=width, rl_cfg=rl))
        g, gen_compile_s = self.compile(gen, params["policy"], tokens, lens, keys, *settings)
        seq = build(tokens, lens, g(params["policy"], tokens, lens, keys, *settings))
        p, prep_compile_s = self.compile(prep, params, ref, seq, scores, jnp.float32(rl.kl_coef))

        def roll():
            out = g(params["policy"], tokens, lens, keys, *settings)
            return p(params, ref, build(tokens, lens, out), scores, jnp.float32(rl.kl_coef))[0]

        rollout_s = self.time(roll)
        batch = jax.device_get(roll())
        loss_fn = lambda q, b, f: rl_training.rl_loss_fn(q, b, f, policy_model=model, critic_model=critic_model,
                                                     width=width, rl_cfg=rl)
        trained = {"policy": random_params(cfg, 0), **({"critic": random_params(critic_cfg, 1)} if critic else {})}
        t = width + n
        upd = self.train(loss_fn, trained, {k: v[:minibatch] for k, v in batch.items()}, 0.0, tokens=minibatch * t)
        fwd, critic_fwd = flops_per_token(cfg, t), critic * (flops_per_token(cfg, t) - self.head)  # no LM head
        prepared = (rl.old_logprobs == "forward") + rl.needs_reference  # policy and reference forwards
        flops = (flops_per_token(cfg, t - 1) * (a.batch // rl.group_size * width + a.batch * (n - 1))  # prefill, decode
                 + (prepared * fwd + critic_fwd) * a.batch * t  # prepare
                 + 3 * (fwd + critic_fwd) * updates * minibatch * t)  # the updates
        update_s = updates * upd["step_s"]
        return entry(rollout_s + update_s, a.batch * n, flops, self.peak, gen_compile_s + prep_compile_s
                     + upd["compile_s"], rollout_tokens_per_s=a.batch * n / rollout_s, rollout_s=rollout_s,
                     update_tokens_per_s=upd["tokens_per_s"], update_s=update_s, updates=updates)

    def grpo_iteration(self):
        """A GRPO iteration: no critic, one update on the whole rollout batch."""
        return self._rl_iteration(rl_config(grpo_configs), False, self.args.batch, 1)

    def ppo_iteration(self):
        """A PPO iteration with a critic (a second trunk with a scalar head): rl.num_epochs passes of
        rl.minibatch_size updates, as configs/ppo.py runs them."""
        rl = rl_config(ppo_configs)
        minibatch = math.gcd(self.args.batch, rl.minibatch_size)
        return self._rl_iteration(rl, True, minibatch, rl.num_epochs * (self.args.batch // minibatch))

    def compile_at_depth(self, n_layers: int) -> float:
        """Seconds to lower and compile the SFT step at `n_layers` (abstract inputs: nothing allocated)."""
        a, cfg = self.args, self.cfg.replace(n_layers=n_layers)
        loss_fn = methods.get("sft").make_loss(Transformer(cfg), None)
        trainer = self._trainer(loss_fn, abstract_params(cfg), None, cfg)
        spec = lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s)
        state = jax.tree_util.tree_map(spec, trainer.abstract_state, trainer.state_shardings)
        batch_sh = sharding.batch_sharding(self.mesh)
        batch = {k: spec(v, batch_sh) for k, v in lm_rows(self.rng, a.batch, a.seq, cfg.vocab_size).items()}
        return self.compile(trainer.train_step, state, batch, None)[1]
