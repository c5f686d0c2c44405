"""The rollout engine's benchmarks (`Suite` methods, registered in bench/suite.py).

rollout_skewed / rollout_uniform: 64 prompts of 64 tokens sampled by the paged engine and by the
static sampler (`sampler.make_generate_fn` at the longest request's max_new_tokens) with the same
keys, eos off so every request samples exactly its max_new_tokens. tokens_per_s counts useful
tokens (each request's own, no padding) over the engine's median time, static_tokens_per_s the
same tokens over the static sampler's; same_tokens is the fraction of requests whose tokens agree.
rollout_memory (--memory_only): the engine's scheduler on a simulated device (no model runs: eos
off, so every length is known) at the model's shape: the pool it needs against the dense cache.
"""
import numpy as np

from bench.peer import entry
from ptx import engine, sampler
from ptx.model import flops_per_token

REQUESTS, PROMPT = 64, 64


def geometric_lengths(seed: int, mean: float, cap: int, n: int = REQUESTS) -> np.ndarray:
    """n lengths >= 1 drawn geometric with the given mean, capped."""
    return np.minimum(np.random.default_rng(seed).geometric(1.0 / mean, n), cap).astype(np.int32)


def rollout(suite, lengths: np.ndarray) -> dict:
    import jax
    import jax.numpy as jnp

    cfg, params, n = suite.cfg, suite.params(), len(lengths)
    rng = np.random.default_rng(1)
    prompts = rng.integers(1, cfg.vocab_size, (n, PROMPT)).astype(np.int32)
    keys = np.asarray(jax.random.key_data(jax.random.split(jax.random.key(1), n)))
    top_p = suite.args.top_p
    reqs = [engine.Request(tuple(p.tolist()), k, int(m), 1.0, 0, top_p) for p, k, m in zip(prompts, keys, lengths)]
    eng = engine.Engine(cfg, eos_id=-1, slots=n)
    box = {}

    def paged():
        box["out"], box["stats"] = eng.run(params, reqs)
        return jnp.zeros(())

    static_fn = sampler.make_generate_fn(cfg, max_new_tokens=int(lengths.max()), eos_id=-1)
    args = (params, jnp.asarray(prompts), jnp.full((n,), PROMPT, jnp.int32), jnp.asarray(keys), jnp.float32(1.0),
            jnp.int32(0), jnp.float32(top_p))
    compiled, compile_s = suite.compile(static_fn, *args)
    static_s = suite.time(lambda: compiled(*args))
    paged_s = suite.time(paged)
    static = np.asarray(compiled(*args).tokens)
    same = np.mean([np.array_equal(c.tokens, static[i, :lengths[i]]) for i, c in enumerate(box["out"])])
    useful = int(lengths.sum())
    flops = sum(flops_per_token(cfg, PROMPT + int(m) // 2) * (PROMPT + int(m)) for m in lengths)
    st = box["stats"]
    return entry(paged_s, useful, flops, suite.peak, compile_s, static_tokens_per_s=useful / static_s,
                 speedup=static_s / paged_s, same_tokens=float(same), static_s=static_s, mean_new=float(lengths.mean()),
                 max_new=int(lengths.max()), host_share=st["host_s"] / st["wall_s"],
                 preemptions=st.get("preemptions", 0), decode_steps=st["decode_steps"], slot_steps=st["slot_steps"],
                 static_slot_steps=n * int(lengths.max()), chunks=st["chunks"], peak_pages=st["peak_pages"],
                 pool_pages=st["pool_pages"])


def rollout_skewed(suite) -> dict:
    """Geometric lengths, mean 48, capped at 512 (reasoning RL's: most short, a few long)."""
    return rollout(suite, geometric_lengths(0, 48, 512))


def rollout_uniform(suite) -> dict:
    """Every request 128 tokens: no skew, nothing for continuous batching to win."""
    return rollout(suite, np.full(REQUESTS, 128, np.int32))


class Simulated:
    """The engine's device side on the host, for a schedule without a model: every request runs to
    its max_new_tokens (eos off), a chunk stops where the real one would."""

    def __init__(self, steps: int):
        self.steps = steps
        self.fed = self.step = self.done = None

    def resize(self, perm):
        perm = np.asarray(perm)
        if self.fed is None:
            b = len(perm)
            self.fed, self.step, self.done = np.zeros(b, int), np.zeros(b, int), np.ones(b, bool)
        else:
            rows = np.maximum(perm, 0)
            self.fed, self.step, self.done = self.fed[rows], self.step[rows], self.done[rows] | (perm < 0)

    def copy(self, pairs):
        pass

    def prefill(self, jobs):
        return [None] * len(jobs)

    def install(self, rows, handles, feds):
        self.fed[rows], self.step[rows], self.done[rows] = feds, 0, False

    def decode(self, pages, live, per_slot, min_finished):
        max_new, finished = per_slot[5], 0
        for j in range(self.steps):
            active = live & ~self.done
            if not active.any() or finished >= min_finished:
                return j, self._out()
            self.step += active
            ends = active & (self.step >= max_new)
            self.done |= ends
            self.fed += active & ~ends
            finished += ends.sum()
        return self.steps, self._out()

    def _out(self):
        return {"fed": self.fed, "step": self.step, "done": self.done, "lengths": self.step,
                "finish": np.full(len(self.fed), sampler.FINISH_LENGTH)}

    def harvest(self, rows):
        return [(np.zeros(4096, np.int32), np.zeros(4096, np.float32), np.zeros(4096, np.float32))] * len(rows)


def rollout_memory(suite, context: int = 4096, fraction: float = 0.3) -> dict:
    """64 requests of a 64-token prompt and geometric lengths (mean 512, capped so prompt + completion
    <= context) in a pool of `fraction` of the dense REQUESTS x context cache, on a simulated device."""
    cfg, ps = suite.cfg, 16
    lengths = geometric_lengths(0, 512, context - PROMPT)
    per_token = engine.kv_bytes_per_token(cfg)
    dense = REQUESTS * context * per_token
    pages = int(fraction * dense) // (ps * per_token)  # the null page included
    reqs = [engine.Request(tuple(range(1, PROMPT + 1)), np.zeros(2, np.uint32), int(m)) for m in lengths]
    eng = engine.Engine(cfg, eos_id=-1, slots=REQUESTS, page_size=ps, pages=pages)
    out, st = eng.run(None, reqs, device=Simulated(eng.chunk_steps))
    assert [len(c.tokens) for c in out] == lengths.tolist()
    mib = lambda n_pages: n_pages * ps * per_token / 2**20
    return dict(dense_mib=dense / 2**20, pool_mib=mib(pages), pool_fraction=pages * ps * per_token / dense,
                peak_mib=mib(st["peak_pages"]), preemptions=st.get("preemptions", 0), pool_pages=pages,
                peak_pages=st["peak_pages"], mean_new=float(lengths.mean()), max_new=int(lengths.max()),
                live_tokens_max=int(max(PROMPT + m for m in lengths)), page_size=ps, kv_bytes_per_token=per_token)
