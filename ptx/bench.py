"""Benchmarks: every training step, prefill, decode and one GRPO iteration, against the peak.

python -m ptx.bench [--size bench] [--only sft_step,decode_b16] [--compare runs/old.json] [--peer torch]

Each number is the median of `--repeats` timed runs after one warm-up run,
each ended by block_until_ready. Steps are jitted once through
`steps.compile_step` on a data-parallel mesh, with the AdamW chain of the
real configs. FLOPs are analytic: forward per token = `model.flops_per_token`
(attention over the whole sequence, no causal saving), training = 3 x
forward, a frozen reference 1 x. MFU = achieved FLOP/s / peak: the published
bf16 dense peak on GPU / TPU; on CPU the fastest dense matmul of probes run
before every benchmark and after the last (other processes may share the
cores, and a disturbed probe would inflate MFU). Writes `--out` as JSON keyed
by benchmark name, next to `device`, `matmul_peak_flops`, `peak_flops` and
`config`.
"""
import argparse
import functools
import json
import math
import os
import resource
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from configs import common
from configs import dpo as dpo_configs
from configs import grpo as grpo_configs
from configs import ppo as ppo_configs
from configs import reward as reward_configs
from configs import sft as sft_configs
from ptx import optim, rollout, sampler, sharding, steps
from ptx.model import ModelConfig, Transformer, flops_per_token, init_params

# (substring of jax's device_kind, dense bf16 FLOP/s per chip); the first match wins.
PUBLISHED_PEAKS = (
    ("H100", 989e12), ("H200", 989e12), ("A100", 312e12), ("TPU v4", 275e12),
    ("TPU v5 lite", 197e12), ("TPU v5e", 197e12), ("TPU v5p", 459e12), ("TPU v5", 459e12),
    ("TPU v6 lite", 918e12), ("TPU v6e", 918e12))
TRAIN = ("sft_step", "reward_step", "dpo_step", "dpo_step_precomputed_ref", "ppo_update")


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m ptx.bench", description=__doc__.splitlines()[0])
    p.add_argument("--size", default="bench", choices=sorted(common.MODEL_PRESETS), help="model preset")
    for name in ("d_model", "n_layers", "n_heads", "n_kv_heads", "d_ff", "vocab"):
        p.add_argument(f"--{name}", type=int, default=0, help="0 = the preset's")
    p.add_argument("--dtype", default="auto", help="compute dtype; auto = float32 on CPU, else bfloat16")
    p.add_argument("--remat", default="", help="none | full | dots; '' = the preset's")
    p.add_argument("--scan_unroll", type=int, default=0, help="layers per scan step; 0 = the preset's")
    p.add_argument("--batch", type=int, default=16, help="rows (DPO / reward: pairs) per step")
    p.add_argument("--seq", type=int, default=128, help="tokens per row")
    p.add_argument("--prompt_len", type=int, default=0, help="decode / RL prompt width; 0 = seq // 2")
    p.add_argument("--new_tokens", type=int, default=0, help="tokens sampled per row; 0 = seq - prompt_len")
    p.add_argument("--decode_batches", default="1,16,64", help="batch sizes of the decode_bN entries")
    p.add_argument("--top_p", type=float, default=0.9, help="nucleus sampling of decode_bN and the torch peer")
    p.add_argument("--only", default="", help="comma-separated benchmark names; '' = all")
    p.add_argument("--repeats", type=int, default=5, help="timed runs per benchmark (median)")
    p.add_argument("--budget_s", type=float, default=60.0,
                   help="fewer repeats (at least 1) where a warm-up run says they would take longer")
    p.add_argument("--matmul_n", type=int, default=0, help="peak matmul size; 0 = 2048 on CPU, else 8192")
    p.add_argument("--devices", type=int, default=1, help="devices on the data axis; 0 = all local")
    p.add_argument("--backend_opt_level", type=int, default=-1,
                   help="XLA backend optimisation level of the benchmarked programs; -1 = XLA's default. "
                        "0 compiles about twice as fast and runs slower: for smoke tests only")
    p.add_argument("--out", default="runs/bench.json")
    p.add_argument("--compare", default="", help="an earlier --out file: print new / old ratios")
    p.add_argument("--peer", default="", choices=("", "torch"), help="also time transformers' Llama")
    p.add_argument("--layers_compile", type=int, default=32, help="SFT step compile time at this depth; 0 = skip")
    return p.parse_args(argv)


def model_config(args) -> ModelConfig:
    """The preset with the flag overrides; d_ff and n_kv_heads keep the preset's ratios."""
    f = dict(common.MODEL_PRESETS[args.size])
    if args.d_model:
        f["d_ff"] = f["d_ff"] * args.d_model // f["d_model"]
        f["d_model"] = args.d_model
    if args.n_heads:
        f["n_kv_heads"] = max(1, f["n_kv_heads"] * args.n_heads // f["n_heads"])
        f["n_heads"] = args.n_heads
    for flag, field in (("n_layers", "n_layers"), ("n_kv_heads", "n_kv_heads"), ("d_ff", "d_ff"),
                        ("vocab", "vocab_size")):
        if getattr(args, flag):
            f[field] = getattr(args, flag)
    if args.remat:
        f["remat"] = args.remat
    if args.scan_unroll:
        f["scan_unroll"] = args.scan_unroll
    cpu = jax.devices()[0].platform == "cpu"
    f["dtype"] = args.dtype if args.dtype != "auto" else ("float32" if cpu else "bfloat16")
    return ModelConfig(**f)


# ---------------------------------------------------------------- measuring

def median_time(run, repeats: int, sync=jax.block_until_ready, budget_s: float = float("inf")) -> float:
    """Median wall seconds of `run()` after one warm-up call; `sync` waits for its result.

    Runs `repeats` times, fewer (at least once) when the warm-up says they would
    take longer than budget_s.
    """
    t0 = time.perf_counter()
    sync(run())
    n = max(1, min(repeats, budget_s // max(time.perf_counter() - t0, 1e-9)))
    times = []
    for _ in range(int(n)):
        t0 = time.perf_counter()
        sync(run())
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def compile_timed(jitted, *args, options=None):
    """(compiled, seconds to lower and compile); options: XLA compiler options."""
    t0 = time.perf_counter()
    compiled = jitted.lower(*args).compile(options or None)
    return compiled, time.perf_counter() - t0


def peak_mem_mb() -> float:
    """Device peak bytes in use where the backend reports it, else this process's max RSS."""
    stats = jax.devices()[0].memory_stats() or {}
    if "peak_bytes_in_use" in stats:
        return stats["peak_bytes_in_use"] / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def xla_mem_mb(compiled) -> float:
    """Arguments + outputs + temporaries of one executable (donated buffers counted once)."""
    m = compiled.memory_analysis()
    if m is None:
        return float("nan")
    return (m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes
            - m.alias_size_in_bytes) / 2**20


def published_peak(device_kind: str):
    return next((peak for key, peak in PUBLISHED_PEAKS if key.lower() in device_kind.lower()), None)


def matmul_peak(n: int, dtype, runs: int = 10) -> float:
    """FLOP/s of one jitted dense n x n @ n x n matmul: the fastest of `runs` (a peak, not a typical time)."""
    kx, ky = jax.random.split(jax.random.PRNGKey(0))
    x, y = jax.random.normal(kx, (n, n), dtype), jax.random.normal(ky, (n, n), dtype)
    f = jax.jit(jnp.matmul)
    return 2.0 * n**3 / min(median_time(lambda: f(x, y), 1) for _ in range(runs))


def entry(seconds, tokens, flops, peak, compile_s, compiled=None, **extra) -> dict:
    fps = flops / seconds
    return dict(tokens_per_s=tokens / seconds, flops_per_s=fps, mfu=fps / peak, compile_s=compile_s,
                peak_mem_mb=peak_mem_mb(), step_s=seconds,
                **({"xla_mem_mb": xla_mem_mb(compiled)} if compiled is not None else {}), **extra)


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


def rl_rows(rng, b, width, n, vocab):
    """What `rollout.prepare` hands the update: prompt width `width`, n completion tokens."""
    tok = rng.integers(1, vocab, (b, width + n)).astype(np.int32)
    f = lambda: rng.normal(size=(b, n)).astype(np.float32)
    return {"tokens": tok, "positions": np.tile(np.arange(width + n, dtype=np.int32), (b, 1)),
            "segment_ids": np.ones((b, width + n), np.int32), "completion": tok[:, width:],
            "mask": np.ones((b, n), np.float32), "old_logps": -np.abs(f()), "ref_logps": -np.abs(f()),
            "old_values": f(), "advantages": f(), "returns": f(), "kl_coef": np.full((b,), 0.05, np.float32)}


# ---------------------------------------------------------------- the suite

class Suite:
    def __init__(self, args, cfg: ModelConfig, peak: float):
        self.args, self.cfg, self.peak = args, cfg, peak
        devices = jax.local_devices()[:args.devices] if args.devices else jax.local_devices()
        self.mesh = sharding.make_mesh({"data": -1, "fsdp": 1, "tensor": 1}, devices)
        self.rng = np.random.default_rng(0)
        self.width = args.prompt_len or args.seq // 2
        self.new = args.new_tokens or max(args.seq - self.width, 2)
        self.fwd = flops_per_token(cfg, args.seq)  # per token, LM head included
        self.head = 2 * cfg.d_model * cfg.vocab_size
        self._params = None
        self._abstract = {}
        level = args.backend_opt_level
        self.compile = functools.partial(compile_timed, options={"xla_backend_optimization_level": level}
                                         if level >= 0 else None)
        self.tx, self.lr_fn = optim.make_optimizer(common.base_config("bench").optim, total_steps=1000)

    def time(self, run, repeats=None) -> float:
        return median_time(run, repeats or self.args.repeats, budget_s=self.args.budget_s)

    def params(self):
        """One policy on the default device (decode, GRPO); training steps make their own, sharded."""
        if self._params is None:
            self._params = jax.device_put(random_params(self.cfg, 0))
        return self._params

    def _shardings(self, tree, cfg):
        rules = sharding.param_rules(cfg.replace(scalar_head=True))  # a superset: unused rules are fine here
        return sharding.named(self.mesh, sharding.tree_specs(tree, rules, self.mesh, strict=False))

    def _state_shardings(self, cfgs: dict):
        """(shardings, abstract TrainState) of a trained tree: cfgs = {'': cfg} for one bare
        parameter tree, else {key: cfg} for a dict of trees."""
        key = tuple(cfgs.items())
        if key not in self._abstract:
            params = (jax.eval_shape(lambda: init_params(cfgs[""], jax.random.PRNGKey(0))) if "" in cfgs else
                      {k: jax.eval_shape(lambda c=c: init_params(c, jax.random.PRNGKey(0))) for k, c in cfgs.items()})
            abstract = jax.eval_shape(lambda p: steps.init_state(p, self.tx), params)
            self._abstract[key] = (self._shardings(abstract, next(iter(cfgs.values()))), abstract)
        return self._abstract[key]

    def _fresh_state(self, cfgs: dict):
        """A new TrainState (the step donates it) and its shardings."""
        state_sh, _ = self._state_shardings(cfgs)
        params = (random_params(cfgs[""], 0) if "" in cfgs else
                  {k: random_params(c, i) for i, (k, c) in enumerate(cfgs.items())})
        params = jax.device_put(params, state_sh.params)
        return jax.device_put(steps.init_state(params, self.tx), state_sh), state_sh

    def _step(self, loss_fn, state_sh, frozen_sh):
        return steps.compile_step(
            lambda s, b, f: steps.train_step(s, b, f, loss_fn=loss_fn, tx=self.tx, lr_fn=self.lr_fn, accum_steps=1),
            in_shardings=(state_sh, sharding.batch_sharding(self.mesh), frozen_sh),
            out_shardings=(state_sh, sharding.replicated(self.mesh)), donate_state=True)

    def train(self, loss_fn, cfgs: dict, batch: dict, flops: float, frozen_cfg=None, tokens=None):
        """Times one `steps.train_step` (cfgs as in `_state_shardings`); frozen_cfg: a frozen reference tree."""
        state, state_sh = self._fresh_state(cfgs)
        frozen, frozen_sh = None, None
        if frozen_cfg is not None:
            frozen_sh = state_sh.params
            frozen = jax.device_put(random_params(frozen_cfg, 1), frozen_sh)
        batch = sharding.put_batch(batch, self.mesh)
        compiled, compile_s = self.compile(self._step(loss_fn, state_sh, frozen_sh), state, batch, frozen)
        box = [state]

        def run():
            box[0], metrics = compiled(box[0], batch, frozen)
            return box[0], metrics

        s = self.time(run)
        tokens = tokens or sum(v.size for k, v in batch.items() if k.endswith("inputs"))
        return entry(s, tokens, flops, self.peak, compile_s, compiled)

    def sft_step(self):
        a, cfg = self.args, self.cfg
        loss_fn = steps.make_loss_fn("sft", Transformer(cfg), sft_configs.get_config())
        return self.train(loss_fn, {"": cfg}, lm_rows(self.rng, a.batch, a.seq, cfg.vocab_size),
                          3 * self.fwd * a.batch * a.seq)

    def reward_step(self):
        a, cfg = self.args, self.cfg.replace(scalar_head=True)
        loss_fn = steps.make_loss_fn("reward", Transformer(cfg), reward_configs.get_config())
        return self.train(loss_fn, {"": cfg}, pair_rows(self.rng, a.batch, a.seq, cfg.vocab_size),
                          3 * (self.fwd - self.head) * 2 * a.batch * a.seq)

    def dpo_step(self):
        a, cfg = self.args, self.cfg
        loss_fn = steps.make_loss_fn("dpo", Transformer(cfg), dpo_configs.get_config())
        return self.train(loss_fn, {"": cfg}, pair_rows(self.rng, a.batch, a.seq, cfg.vocab_size),
                          (3 + 1) * self.fwd * 2 * a.batch * a.seq, frozen_cfg=cfg)

    def dpo_step_precomputed_ref(self):
        a, cfg = self.args, self.cfg
        loss_fn = steps.make_loss_fn("dpo", Transformer(cfg), dpo_configs.get_config())
        return self.train(loss_fn, {"": cfg}, pair_rows(self.rng, a.batch, a.seq, cfg.vocab_size, True),
                          3 * self.fwd * 2 * a.batch * a.seq)

    def ppo_update(self):
        """Clipped surrogate + value loss; the critic is a second trunk with a scalar head."""
        a, cfg = self.args, self.cfg
        critic = cfg.replace(scalar_head=True)
        rl = ppo_configs.get_config().rl
        width = min(self.width, a.seq - 1)
        loss_fn = lambda p, b, f: rollout.rl_loss_fn(p, b, f, policy_model=Transformer(cfg),
                                                     critic_model=Transformer(critic), width=width, rl_cfg=rl)
        batch = rl_rows(self.rng, a.batch, width, a.seq - width, cfg.vocab_size)
        return self.train(loss_fn, {"policy": cfg, "critic": critic}, batch,
                          3 * (2 * self.fwd - self.head) * a.batch * a.seq, tokens=a.batch * a.seq)

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

        def greedy_steps(p, state, tok):
            step_fn = sampler.model_step_fn(p, cfg, width)

            def body(j, carry):
                logits, st = step_fn(carry[0], carry[1], j)
                return st, jnp.argmax(logits, axis=-1).astype(jnp.int32)

            return jax.lax.fori_loop(0, n - 1, body, (state, tok))

        one = jax.jit(lambda p, st, tok, j: sampler.model_step_fn(p, cfg, width)(st, tok, j), donate_argnums=1)
        loop = jax.jit(greedy_steps, donate_argnums=1)
        state = pre(params, tokens, lens)[1]
        one, _ = self.compile(one, params, state, last, i)
        loop, _ = self.compile(loop, params, state, last)
        box = [state]

        def one_forward():
            logits, box[0] = one(params, box[0], last, i)
            return logits

        def loop_forward():
            box[0], out = loop(params, box[0], last)
            return out

        fwd_s = self.time(one_forward, max(self.args.repeats, 10))
        loop_s = self.time(loop_forward) / max(n - 1, 1)
        decode_s = max(gen_s - pre_s, 1e-9)
        step_s = decode_s / max(n - 1, 1)  # the loop calls the model n - 1 times
        flops = flops_per_token(cfg, width + n - 1) * b * (n - 1)
        return entry(decode_s, b * n, flops, self.peak, compile_s, compiled, generate_s=gen_s, prefill_s=pre_s,
                     generate_tokens_per_s=b * n / gen_s, decode_step_ms=1e3 * step_s, forward_ms=1e3 * fwd_s,
                     loop_forward_ms=1e3 * loop_s, decode_per_token_vs_forward=step_s / fwd_s)

    def grpo_iteration(self):
        """Rollout (generate -> build -> prepare with the reference) then one update on the whole batch."""
        a, cfg, width, n = self.args, self.cfg, self.width, self.new
        c = grpo_configs.get_config()
        rl = c.rl
        rl.group_size = math.gcd(a.batch, rl.group_size)  # the batch must hold whole groups
        model = Transformer(cfg)
        ref = self.params()
        policy = {"policy": jax.tree_util.tree_map(jnp.copy, ref)}
        tokens, lens, keys = self._prompts(a.batch)
        settings = (jnp.float32(rl.temperature), jnp.int32(rl.top_k), jnp.float32(rl.top_p))
        scores = jnp.asarray(self.rng.normal(size=a.batch), jnp.float32)
        gen = sampler.make_generate_fn(cfg, max_new_tokens=n, eos_id=-1)
        build = jax.jit(lambda t, l, out: rollout.build_sequences(t, l, out, pad_id=0))
        prep = jax.jit(lambda p, r, seq, s, k: rollout.prepare(
            p, r, seq, s, k, policy_model=model, critic_model=None, width=width, rl_cfg=rl))
        g, gen_compile_s = self.compile(gen, policy["policy"], tokens, lens, keys, *settings)
        seq = build(tokens, lens, g(policy["policy"], tokens, lens, keys, *settings))
        p, prep_compile_s = self.compile(prep, policy, ref, seq, scores, jnp.float32(rl.kl_coef))
        rollout_compile_s = gen_compile_s + prep_compile_s

        def roll():
            out = g(policy["policy"], tokens, lens, keys, *settings)
            return p(policy, ref, build(tokens, lens, out), scores, jnp.float32(rl.kl_coef))[0]

        rollout_s = self.time(roll)
        batch = jax.device_get(roll())
        loss_fn = lambda q, b, f: rollout.rl_loss_fn(q, b, f, policy_model=model, critic_model=None,
                                                     width=width, rl_cfg=rl)
        upd = self.train(loss_fn, {"policy": cfg}, batch, 0.0, tokens=a.batch * (width + n))
        cache_len = width + n - 1
        flops = (flops_per_token(cfg, cache_len) * a.batch * (width + n - 1)  # prefill + decode
                 + 5 * flops_per_token(cfg, width + n) * a.batch * (width + n))  # policy + ref, update
        s = rollout_s + upd["step_s"]
        return entry(s, a.batch * n, flops, self.peak, rollout_compile_s + upd["compile_s"],
                     rollout_tokens_per_s=a.batch * n / rollout_s, rollout_s=rollout_s,
                     update_tokens_per_s=upd["tokens_per_s"], update_s=upd["step_s"])

    def compile_at_depth(self, n_layers: int) -> float:
        """Seconds to lower and compile the SFT step at `n_layers` (abstract inputs: nothing allocated)."""
        a, cfg = self.args, self.cfg.replace(n_layers=n_layers)
        state_sh, abstract = self._state_shardings({"": cfg})
        spec = lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s)
        state = jax.tree_util.tree_map(spec, abstract, state_sh)
        batch_sh = sharding.batch_sharding(self.mesh)
        batch = {k: spec(v, batch_sh) for k, v in lm_rows(self.rng, a.batch, a.seq, cfg.vocab_size).items()}
        loss_fn = steps.make_loss_fn("sft", Transformer(cfg), sft_configs.get_config())
        return self.compile(self._step(loss_fn, state_sh, None), state, batch, None)[1]


def benchmark_names(args) -> list:
    decode = [f"decode_b{int(b)}" for b in args.decode_batches.split(",") if b]
    return [*TRAIN, "prefill", *decode, "grpo_iteration"]


def run_suite(suite: Suite, names, peak_probe) -> dict:
    """Runs the benchmarks; peak_probe() measures the matmul peak before each one."""
    out = {}
    for name in names:
        peak_probe()
        if name.startswith("decode_b"):
            out[name] = suite.decode(int(name[len("decode_b"):]))
        else:
            out[name] = getattr(suite, name)()
        print(f"  {name}: {out[name]['tokens_per_s']:.1f} tokens/s", flush=True)
    return out


# ---------------------------------------------------------------- the torch peer

def torch_peer(args, cfg: ModelConfig, width: int, new: int, peak: float) -> dict:
    """transformers' LlamaForCausalLM on the same config and batch: SFT step (AdamW) and generate (top-p)."""
    try:
        import torch
        import transformers
    except ImportError as e:
        return {"skipped": f"{e.name} is not installed (pip install torch transformers)"}
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if cfg.dtype == "bfloat16" else torch.float32
    sync = (lambda _: torch.cuda.synchronize()) if dev == "cuda" else (lambda _: None)
    hf = transformers.LlamaConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.d_model, intermediate_size=cfg.d_ff,
        num_hidden_layers=cfg.n_layers, num_attention_heads=cfg.n_heads, num_key_value_heads=cfg.n_kv_heads,
        head_dim=cfg.head_size, max_position_embeddings=max(args.seq, width + new), rms_norm_eps=cfg.norm_eps,
        rope_theta=cfg.rope_theta, tie_word_embeddings=cfg.tie_embeddings, attention_bias=cfg.qkv_bias)
    model = transformers.LlamaForCausalLM(hf).to(dev)
    o = common.base_config("bench").optim
    opt = torch.optim.AdamW(model.parameters(), lr=o.lr, betas=(o.b1, o.b2), eps=o.eps, weight_decay=o.weight_decay)
    ids = torch.randint(1, cfg.vocab_size, (args.batch, args.seq + 1), device=dev)

    def sft_step():
        with torch.autocast(dev, dtype=dtype, enabled=dtype != torch.float32):
            logits = model(input_ids=ids[:, :-1]).logits
        loss = torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), ids[:, 1:].flatten())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), o.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    model.train()
    s = median_time(sft_step, args.repeats, sync, args.budget_s)
    tokens = args.batch * args.seq
    out = {"torch_sft_step": entry(s, tokens, 3 * flops_per_token(cfg, args.seq) * tokens, peak, float("nan"))}
    model.eval().to(dtype)
    prompts = torch.randint(1, cfg.vocab_size, (args.batch, width), device=dev)
    gen = lambda: model.generate(prompts, attention_mask=torch.ones_like(prompts), do_sample=True, top_p=args.top_p,
                                 top_k=0, temperature=1.0, max_new_tokens=new, min_new_tokens=new,
                                 pad_token_id=0)
    with torch.no_grad():
        s = median_time(gen, args.repeats, sync, args.budget_s)
    flops = flops_per_token(cfg, width + new - 1) * args.batch * (width + new - 1)
    out[f"torch_generate_b{args.batch}"] = entry(s, args.batch * new, flops, peak, float("nan"))
    for e in out.values():
        e.pop("compile_s")
    out["versions"] = {"torch": torch.__version__, "transformers": transformers.__version__}
    return out


# ---------------------------------------------------------------- reporting

def is_benchmark(v) -> bool:
    return isinstance(v, dict) and "tokens_per_s" in v


def table(results: dict) -> str:
    rows = [f"{'benchmark':<26} {'tokens/s':>11} {'TFLOP/s':>8} {'MFU':>6} {'compile s':>9} "
            f"{'peak MB':>8}  notes"]
    for name, e in results.items():
        if not is_benchmark(e):
            continue
        note = ""
        if "decode_per_token_vs_forward" in e:
            note = (f"step {e['decode_step_ms']:.2f} ms = {e['decode_per_token_vs_forward']:.2f} x forward "
                    f"{e['forward_ms']:.2f} ms (in a loop {e['loop_forward_ms']:.2f}); "
                    f"with prefill {e['generate_tokens_per_s']:.0f} tok/s")
        elif "rollout_tokens_per_s" in e:
            note = f"rollout {e['rollout_tokens_per_s']:.0f} tok/s, update {e['update_tokens_per_s']:.0f} tok/s"
        rows.append(f"{name:<26} {e['tokens_per_s']:>11.1f} {e['flops_per_s'] / 1e12:>8.3f} {e['mfu']:>6.3f} "
                    f"{e.get('compile_s', float('nan')):>9.2f} {e['peak_mem_mb']:>8.0f}  {note}")
    return "\n".join(rows)


def compare(new: dict, old: dict) -> str:
    """new / old ratios of tokens/s and MFU for the benchmarks both runs have."""
    rows = [f"{'benchmark':<26} {'tokens/s new/old':>16} {'MFU new/old':>12}"]
    for name, e in new.items():
        if is_benchmark(e) and is_benchmark(old.get(name)):
            o = old[name]
            ratio = lambda k: f"{e[k] / o[k]:.3f}x" if o.get(k) and k in e else "-"
            rows.append(f"{name:<26} {ratio('tokens_per_s'):>16} {ratio('mfu'):>12}")
    return "\n".join(rows)


def main(argv=None) -> dict:
    args = parse_args(argv)
    cfg = model_config(args)
    names = benchmark_names(args)
    if args.only:
        unknown = sorted(set(args.only.split(",")) - set(names))
        if unknown:
            raise SystemExit(f"--only: unknown benchmarks {unknown}; known: {names}")
        names = [n for n in names if n in args.only.split(",")]
    dev = jax.devices()[0]
    cpu = dev.platform == "cpu"
    n = args.matmul_n or (2048 if cpu else 8192)
    measured = matmul_peak(n, jnp.dtype(cfg.dtype))
    published = None if cpu else published_peak(dev.device_kind)
    peak = published or measured
    suite = Suite(args, cfg, peak)
    print(f"ptx bench on {dev.device_kind} ({dev.platform}, {suite.mesh.size} device(s)); MFU against "
          f"{'the published peak' if published else 'the best measured matmul'}", flush=True)
    results = {
        "device": dev.device_kind, "platform": dev.platform, "n_devices": suite.mesh.size,
        "jax_version": jax.__version__, "matmul_peak_flops": measured, "matmul_n": n,
        "published_peak_flops": published, "peak_flops": peak,
        "config": dict(cfg.__dict__, batch=args.batch, seq=args.seq, prompt_len=suite.width,
                       new_tokens=suite.new, repeats=args.repeats, devices=suite.mesh.size,
                       backend_opt_level=args.backend_opt_level),
        "compilation_cache_dir": jax.config.jax_compilation_cache_dir,
    }
    # Other processes may share a CPU: the peak is the best matmul of several
    # measurements, before every benchmark and after the last.
    probes = [measured]
    probe = lambda: probes.append(matmul_peak(n, jnp.dtype(cfg.dtype), runs=3))
    results.update(run_suite(suite, names, probe))
    probe()
    results["matmul_peak_flops"] = measured = max(probes)
    results["matmul_peak_flops_probes"] = probes
    if cpu:
        results["peak_flops"] = peak = measured
        for e in filter(is_benchmark, results.values()):
            e["mfu"] = e["flops_per_s"] / peak
    if args.layers_compile:
        results["sft_compile_s_by_layers"] = {
            str(n_layers): suite.compile_at_depth(n_layers) for n_layers in sorted({cfg.n_layers, args.layers_compile})}
    if args.peer == "torch":
        peer = torch_peer(args, cfg, suite.width, suite.new, peak)
        results["peer_torch"] = peer.pop("skipped", None) or peer.pop("versions")
        results.update(peer)
    print(table(results))
    print(f"{n}x{n} {cfg.dtype} matmul: best {measured / 1e12:.3f} TFLOP/s of {len(probes)} probes "
          f"(worst {min(probes) / 1e12:.3f}); MFU against {peak / 1e12:.3f} TFLOP/s")
    if "sft_compile_s_by_layers" in results:
        print("SFT step compile s by depth:", {k: round(v, 2) for k, v in results["sft_compile_s_by_layers"].items()})
    if args.peer:
        print("peer torch:", results["peer_torch"])
        pairs = (("sft_step", "torch_sft_step"), (f"decode_b{args.batch}", f"torch_generate_b{args.batch}"))
        for ours, theirs in pairs:
            if ours in results and theirs in results:
                key = "generate_tokens_per_s" if ours.startswith("decode") else "tokens_per_s"
                print(f"  {ours} / {theirs}: {results[ours][key] / results[theirs]['tokens_per_s']:.2f}x")
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            json.dump(results, f, indent=2)
        print(f"wrote {args.out}")
    if args.compare:
        with open(args.compare) as f:
            print(f"compared with {args.compare}:\n" + compare(results, json.load(f)))
    return results


if __name__ == "__main__":
    main()
