"""Continuous batching over a paged KV cache, with shared prompt pages.

The engine takes a queue of `Request`s and decodes them in a fixed number of
slots. KV lives in a pool of fixed-size pages ([n_pages, kv_heads, page_size,
head] per layer, page 0 a scratch page that padding writes to); each slot holds
a list of pages, so KV memory follows the live tokens, not slots x max length.

Scheduling is on the host, every few steps, not every token: one decode chunk
is a jitted `lax.while_loop` of up to `chunk_steps` steps (each samples one
token for every running slot, then feeds it through the model) that returns
early once enough slots finished: one while requests wait (a free slot is
refilled), else as many as let the batch shrink to the next smaller slot
bucket (the running slots are compacted by permuting page tables, no KV is
copied). Programs compile once per (slot bucket, page bucket) shape. Between
chunks the host admits queued requests (prompts prefilled in chunks of
`prefill_chunk` tokens, several requests per program), grows each slot's pages
to hold the next chunk and, when the pool is short, preempts the youngest
request (its pages freed, the request requeued and recomputed from scratch with
the same keys: the result is unchanged). `run` reports the host's share of the
wall time (`host_s` / `wall_s`).

Shared pages: requests with the same `group` (GRPO's completions of one prompt)
prefill the prompt once; each member references its full pages (refcounted)
and copies only a partially filled last page, which it writes into. A request
with `keep=True` keeps its pages after it finishes under a handle, and a later
request with `parent=handle` (the next turn of a conversation) prefills only its
own tokens on top of them.

Attention over pages gathers a slot's pages into the dense cache layout of
`ptx.model` and runs the model's own cached forward (its XLA attention), so any
backend runs it, CPU included; `cfg.attention` is not consulted (no Pallas
ragged paged attention kernel here: only the CPU path is tested).

Sampling follows `ptx.sampler`: token i of a request draws with
fold_in(key, i) through `sampler.sample_token`, so a request gets the tokens it
gets from the static sampler whichever slot and batch-mates it has, bit for
bit where the model's arithmetic is (logits may differ in the last bits where
a batch or gather width changes XLA's reduction order; on CPU float32 the
tests see equal tokens).
"""
import collections
import dataclasses
import functools
import time

import jax
import jax.numpy as jnp
import numpy as np

from ptx import sampler, sharding
from ptx.model import _DTYPES, ModelConfig, Transformer, unstack_layers
from ptx.sampler import FINISH_EOS, FINISH_LENGTH, FINISH_STOP, SampleOutput

NULL_PAGE = 0  # never allocated: padding tokens and finished slots write here


@dataclasses.dataclass(frozen=True)
class Request:
    """One completion to sample.

    prompt: token ids (a sequence of int), at least one unless `parent` is set.
    key: a PRNG key (raw uint32 or typed); token i draws with fold_in(key, i).
    stop_ids: ids that end this request besides the engine's eos ids (kept, FINISH_EOS).
    group: requests with equal group (and equal prompts) share one prefill of the prompt.
    parent: a handle from an earlier `Completion` with keep=True: the prompt continues it.
    keep: keep the pages after the request ends; the completion carries a handle.
    """

    prompt: tuple
    key: object
    max_new_tokens: int
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    stop_ids: tuple = ()
    group: object = None
    parent: int | None = None
    keep: bool = False


@dataclasses.dataclass
class Completion:
    """tokens [n] int32, logprobs / entropy [n] float32 (as `sampler.SampleOutput`), finish_reason one of
    sampler.FINISH_*; handle: what a later Request's `parent` continues (keep=True), else None."""

    tokens: np.ndarray
    logprobs: np.ndarray
    entropy: np.ndarray
    finish_reason: int
    handle: int | None = None


# ---------------------------------------------------------------- page arithmetic (host)

def kv_bytes_per_token(cfg: ModelConfig) -> int:
    """Bytes of K and V one token holds over all layers, in the compute dtype."""
    return 2 * cfg.n_layers * cfg.n_kv_heads * cfg.head_size * jnp.dtype(_DTYPES[cfg.dtype]).itemsize


def default_pages(cfg: ModelConfig, *, slots: int, max_len: int, page_size: int,
                  memory_fraction: float = 0.5) -> int:
    """A pool for `slots` sequences of max_len tokens (what the dense cache holds), capped where the
    backend reports its memory at memory_fraction of what is free; at least one sequence's pages."""
    per_seq = -(-max_len // page_size)
    n = slots * per_seq
    stats = jax.devices()[0].memory_stats() or {}
    if "bytes_limit" in stats:
        free = stats["bytes_limit"] - stats.get("bytes_in_use", 0)
        n = min(n, int(memory_fraction * free) // (kv_bytes_per_token(cfg) * page_size))
    return max(n, per_seq) + 1  # + the null page


class PagePool:
    """Host allocator of page ids 1..n-1 with reference counts (page 0 is the null page)."""

    def __init__(self, n_pages: int):
        self.refs = np.zeros(n_pages, np.int32)
        self.refs[NULL_PAGE] = 1
        self.free = list(range(n_pages - 1, 0, -1))
        self.peak = 0

    def alloc(self, n: int):
        """n fresh pages (refcount 1), or None if fewer are free."""
        if n > len(self.free):
            return None
        pages = [self.free.pop() for _ in range(n)]
        self.refs[pages] = 1
        self.peak = max(self.peak, self.in_use)
        return pages

    def share(self, pages):
        for p in pages:
            self.refs[p] += 1

    def release(self, pages):
        for p in pages:
            self.refs[p] -= 1
            if self.refs[p] == 0:
                self.free.append(p)

    @property
    def in_use(self) -> int:
        return len(self.refs) - 1 - len(self.free)


# ---------------------------------------------------------------- device programs

def _forward(layered, cfg: ModelConfig, pool, tokens, positions, segment_ids, pages, n_context, write_page,
             write_offset):
    """The model over t new tokens per row, attending each row's pages and writing their K / V there.

    layered: `unstack_layers` parameters. pool: {"k", "v"}: tuples of [n_pages, kvh, page, head].
    tokens, positions, segment_ids: [b, t] int32 (segment 0 = padding). pages: [b, P] int32 page
    table; n_context: [b] int32 tokens already in those pages (positions 0..n-1). write_page,
    write_offset: [b, t] int32 where each new token's K / V goes (padding: the null page).
    Returns (logits [b, V] float32 of the last column, pool).
    """
    b, t = tokens.shape
    n_pages = pages.shape[1]
    page_size = pool["k"][0].shape[2]
    width = n_pages * page_size
    j = jnp.arange(width + t, dtype=jnp.int32)[None, :]

    def dense(layer_pool):  # [b, kvh, width + t, head]: the cache layout of ptx.model, t free columns
        g = layer_pool[pages].transpose(0, 2, 1, 3, 4)
        g = g.reshape(b, g.shape[1], width, g.shape[-1])
        return jnp.pad(g, ((0, 0), (0, 0), (0, t), (0, 0)))

    cache = {"k": tuple(map(dense, pool["k"])), "v": tuple(map(dense, pool["v"])),
             "positions": jnp.broadcast_to(j, (b, width + t)),
             "segment_ids": (j < n_context[:, None]).astype(jnp.int32)}
    out = Transformer(cfg, scan_layers=False).apply(
        {"params": layered}, tokens, positions, segment_ids, cache=cache, cache_index=width, logits="last")
    put = lambda layer_pool, c: layer_pool.at[write_page, :, write_offset, :].set(c[:, :, width:].transpose(0, 2, 1, 3))
    pool = {n: tuple(map(put, pool[n], out.cache[n])) for n in ("k", "v")}
    return out.logits[:, -1].astype(jnp.float32), pool


@functools.lru_cache(maxsize=None)
def _prefill_program(cfg: ModelConfig):
    return jax.jit(functools.partial(_forward, cfg=cfg), donate_argnames="pool")


@jax.jit
def _copy_pages(pool, src, dst):
    """pool with pages dst [m] overwritten by pages src [m] (copy-on-write of a shared last page)."""
    return {n: tuple(x.at[dst].set(x[src]) for x in pool[n]) for n in ("k", "v")}


def _init_state(b: int, vocab: int, max_new: int, window: int, pad_id: int) -> dict:
    """Per-slot device state. logits [b, V] f32: the next token's; fed [b]: tokens in the slot's
    pages; step [b]: tokens sampled; recent [b, window]: the last sampled (stop matching); done [b];
    lengths, finish [b]; tokens [b, max_new] int32, logprobs / entropy [b, max_new] f32."""
    z = lambda dt, *s: jnp.zeros((b,) + s, dt)
    return {"logits": z(jnp.float32, vocab), "fed": z(jnp.int32), "step": z(jnp.int32),
            "recent": jnp.full((b, window), -1, jnp.int32), "done": jnp.ones((b,), bool), "lengths": z(jnp.int32),
            "finish": z(jnp.int32), "tokens": jnp.full((b, max_new), pad_id, jnp.int32),
            "logprobs": z(jnp.float32, max_new), "entropy": z(jnp.float32, max_new)}


@functools.partial(jax.jit, donate_argnums=0)
def _install(state, rows, logits, fed):
    """Starts requests in slots rows [m] (out-of-range rows are padding) from logits [m, V], fed [m]."""
    s = dict(state)
    setrow = lambda x, v: x.at[rows].set(v, mode="drop")
    s["logits"], s["fed"] = setrow(s["logits"], logits), setrow(s["fed"], fed)
    s["step"], s["lengths"] = setrow(s["step"], 0), setrow(s["lengths"], 0)
    s["done"], s["finish"] = setrow(s["done"], False), setrow(s["finish"], FINISH_LENGTH)
    s["recent"] = setrow(s["recent"], -1)
    return s


@jax.jit
def _permute(state, perm):
    """The slot state of a new bucket: row i is old row perm[i] (perm [b_new], -1 = an empty slot)."""
    out = {k: v[jnp.maximum(perm, 0)] for k, v in state.items()}
    out["done"] = out["done"] | (perm < 0)
    return out


def stop_window(stops) -> int:
    """Columns of the recent-token window that stop matching reads (at least one)."""
    return max((len(s) for s in stops), default=1)


@functools.lru_cache(maxsize=None)
def _decode_program(cfg: ModelConfig, steps: int, stops: tuple, keep_stop: bool, n_tokens):
    """The decode chunk: up to `steps` steps of (sample every running slot, feed the token)."""
    window = stop_window(stops)
    # As sampler.decode: the top-k / top-p cuts run only when some running slot uses them.
    draws = [jax.vmap(lambda key, logits, t, k, p, m, use_k=use_k, use_p=use_p: sampler.sample_token(
        key, logits, temperature=t, top_k=k, top_p=p, min_p=m, use_top_k=use_k, use_top_p=use_p))
        for use_k in (False, True) for use_p in (False, True)]

    def chunk(layered, pool, state, pages, live, keys, temperature, top_k, top_p, min_p, max_new, eos,
              min_finished):
        """pages [b, P]; live [b] bool: the slot holds a request; keys [b, ...] raw keys; settings,
        max_new [b]; eos [b, E] ids that end a row (-1 pads). Returns (pool, state, steps taken)."""
        b, n_pages = pages.shape
        page_size = pool["k"][0].shape[2]
        settings = (temperature, top_k, top_p, min_p)
        branch = 2 * jnp.any(live & (top_k > 0)).astype(jnp.int32) + jnp.any(live & (top_p < 1)).astype(jnp.int32)
        usable = None if n_tokens is None else jnp.arange(state["logits"].shape[-1]) < n_tokens
        rows = jnp.arange(b)

        def record(s, active):
            """Samples token s.step of every active row (sampler.decode's record, per-row steps)."""
            i, logits = s["step"], s["logits"]
            drawable = logits if usable is None else jnp.where(usable, logits, -jnp.inf)
            tok = jax.lax.switch(branch, draws, jax.vmap(jax.random.fold_in)(keys, i), drawable, *settings)
            log_p = jax.nn.log_softmax(logits, axis=-1)
            logp = jnp.take_along_axis(log_p, tok[:, None], axis=-1)[:, 0]
            ent = -jnp.sum(jnp.where(log_p > -jnp.inf, jnp.exp(log_p) * log_p, 0.0), axis=-1)
            recent = jnp.concatenate([s["recent"][:, 1:], tok[:, None]], axis=1)
            stop_len = jnp.zeros((b,), jnp.int32)
            for seq in stops:
                hit = jnp.all(recent[:, window - len(seq):] == jnp.asarray(seq, jnp.int32), axis=1)
                stop_len = jnp.where(hit, jnp.maximum(stop_len, len(seq)), stop_len)
            is_eos = jnp.any(tok[:, None] == eos, axis=1)
            stopped = is_eos | (stop_len > 0)
            ends = active & (stopped | (i + 1 >= max_new))
            kept = i + 1 - jnp.where(is_eos | keep_stop, 0, stop_len)
            col = jnp.where(active, i, s["tokens"].shape[1])  # out of range: dropped
            put = lambda x, v: x.at[rows, col].set(v, mode="drop")
            s = dict(s, step=i + active, tokens=put(s["tokens"], tok), logprobs=put(s["logprobs"], logp),
                     entropy=put(s["entropy"], ent), recent=jnp.where(active[:, None], recent, s["recent"]),
                     done=s["done"] | ends, lengths=jnp.where(ends, jnp.where(stopped, kept, i + 1), s["lengths"]),
                     finish=jnp.where(ends, jnp.where(is_eos, FINISH_EOS, jnp.where(stopped, FINISH_STOP,
                                                                                    FINISH_LENGTH)), s["finish"]))
            return s, ends, tok

        def body(c):
            j, finished, pool, s = c
            active = live & ~s["done"]
            s, ends, tok = record(s, active)
            feed = active & ~ends
            fed = s["fed"]
            page = pages[rows, jnp.minimum(fed // page_size, n_pages - 1)]
            logits, pool = _forward(layered, cfg, pool, tok[:, None], fed[:, None], jnp.ones((b, 1), jnp.int32),
                                    pages, fed, jnp.where(feed, page, NULL_PAGE)[:, None],
                                    (fed % page_size)[:, None])
            s = dict(s, logits=jnp.where(feed[:, None], logits, s["logits"]), fed=fed + feed)
            return j + 1, finished + jnp.sum(ends), pool, s

        def cond(c):
            j, finished, _, s = c
            return (j < steps) & (finished < min_finished) & jnp.any(live & ~s["done"])

        j, _, pool, state = jax.lax.while_loop(cond, body, (jnp.int32(0), jnp.int32(0), pool, state))
        return pool, state, j

    return jax.jit(chunk, donate_argnums=(1, 2))


class _Device:
    """The device side of one `Engine.run`: the slot state and the programs over the engine's pool."""

    def __init__(self, engine, params, max_new: int):
        self.e, self.max_new = engine, max_new
        self.layered = jax.jit(unstack_layers)(params)
        self.state = None
        self.decode_fn = _decode_program(engine.cfg, engine.chunk_steps, engine.stops, engine.keep_stop,
                                         engine.n_tokens)

    def resize(self, perm):
        if self.state is None:
            e = self.e
            self.state = _init_state(len(perm), e.cfg.vocab_size, self.max_new, stop_window(e.stops), e.pad_id)
        else:
            self.state = _permute(self.state, jnp.asarray(perm, jnp.int32))

    def copy(self, pairs):
        if pairs:
            src, dst = (np.asarray(x, np.int32) for x in zip(*pairs))
            m = _size_up(len(pairs))  # padded with null -> null copies: one compile per bucket
            pad = lambda x: np.pad(x, (0, m - len(x)))
            self.e.pool = _copy_pages(self.e.pool, pad(src), pad(dst))

    def prefill(self, jobs):
        """jobs: [(tokens, start, pages)]: tokens go to positions start.. in pages. Rows end together,
        the first chunk of a long row partial (left-padded), so the last column is every row's last
        token. Returns [(logits [m, V], row)] per job."""
        e, ps = self.e, self.e.page_size
        longest = max(len(t) for t, _, _ in jobs)
        width = min(e.prefill_chunk, _pow2_up(longest, 8))
        nb = _size_up(len(jobs))
        rounds = max(-(-len(t) // width) for t, _, _ in jobs)
        for q in range(rounds):
            tokens, pos, seg = (np.zeros((nb, width), np.int32) for _ in range(3))
            wp, wo = np.full((nb, width), NULL_PAGE, np.int32), np.zeros((nb, width), np.int32)
            n_ctx = np.zeros(nb, np.int32)
            for row, (toks, start, pages) in enumerate(jobs):
                k = -(-len(toks) // width)
                r = q - (rounds - k)
                if r < 0:
                    continue
                hi = len(toks) - (k - 1 - r) * width
                lo = max(0, hi - width)
                p = start + np.arange(lo, hi)
                tokens[row, width - len(p):] = toks[lo:hi]
                pos[row, width - len(p):], seg[row, width - len(p):] = p, 1
                wp[row, width - len(p):] = np.asarray(pages)[p // ps]
                wo[row, width - len(p):] = p % ps
                n_ctx[row] = start + lo
            n_pages = _size_up(-(-int(n_ctx.max()) // ps)) if n_ctx.max() else 0
            table = np.zeros((nb, n_pages), np.int32)
            for row, (_, _, pages) in enumerate(jobs):
                take = min(n_pages, len(pages))
                table[row, :take] = pages[:take]
            logits, e.pool = _prefill_program(e.cfg)(self.layered, pool=e.pool, tokens=tokens, positions=pos,
                                                     segment_ids=seg, pages=table, n_context=n_ctx,
                                                     write_page=wp, write_offset=wo)
        return [(logits, row) for row in range(len(jobs))]

    def install(self, rows, handles, feds):
        m = _size_up(len(rows))
        logits = jnp.stack([x[i] for x, i in handles])
        logits = jnp.pad(logits, ((0, m - len(rows)), (0, 0)))
        pad = lambda x, v: np.pad(np.asarray(x, np.int32), (0, m - len(x)), constant_values=v)
        self.state = _install(self.state, pad(rows, self.state["fed"].shape[0]), logits, pad(feds, 0))

    def decode(self, pages, live, per_slot, min_finished):
        """One chunk; returns (steps taken, host copies of fed, step, done, lengths, finish)."""
        self.e.pool, self.state, steps = self.decode_fn(self.layered, self.e.pool, self.state, pages, live,
                                                        *per_slot, np.int32(min_finished))
        s = jax.device_get({k: self.state[k] for k in ("fed", "step", "done", "lengths", "finish")})
        return int(steps), s

    def harvest(self, rows):
        """[(tokens, logprobs, entropy)] host rows (max_new wide) of the slots `rows`."""
        s = jax.device_get({k: self.state[k] for k in ("tokens", "logprobs", "entropy")})
        return [(s["tokens"][r], s["logprobs"][r], s["entropy"][r]) for r in rows]


def _size_up(n: int) -> int:
    """The bucket of n >= 1: 1, 2, 3, 4, 6, 8, 12, 16, 24, ... (within 1.5x of n)."""
    if n <= 2:
        return max(n, 1)
    p = 1 << (n - 1).bit_length()
    return 3 * p // 4 if n <= 3 * p // 4 else p


def _size_down(n: int) -> int:
    """The largest bucket below n (0 below 1)."""
    m = n - 1
    while m > 0 and _size_up(m) != m:
        m -= 1
    return m


def _pow2_up(n: int, least: int) -> int:
    return max(least, 1 << (max(n, 1) - 1).bit_length())


@dataclasses.dataclass
class _Prefix:
    """Pages holding n_fed tokens' K / V, the next-token logits after them ((array, row), or None
    for a kept sequence) and `pending`: tokens known but not yet in the pages."""

    pages: list
    n_fed: int
    logits: object = None
    pending: tuple = ()


@dataclasses.dataclass
class _Slot:
    req: int
    pages: list
    fed: int
    cap: int  # the most tokens it will hold: the last sampled token is never fed
    order: int  # admission counter: the youngest is preempted first


class Engine:
    """Continuous batching over a paged KV cache (module docstring).

    cfg: the model. eos_id, pad_id, stop_sequences, keep_stop, n_tokens: as `sampler.decode`
    (engine-wide; `Request.stop_ids` adds ids per request). slots: the most requests decoded at
    once. page_size: tokens per page. pages: pool size including the null page; 0 = `default_pages`
    for the first run's longest request. chunk_steps: decode steps per program call at most.
    prefill_chunk: prompt tokens per prefill program row. The pool (and kept sequences) persist
    across runs; `release` frees a kept sequence.
    """

    def __init__(self, cfg: ModelConfig, *, eos_id, pad_id: int = 0, stop_sequences: tuple = (),
                 keep_stop: bool = False, n_tokens: int | None = None, slots: int = 64, page_size: int = 16,
                 pages: int = 0, chunk_steps: int = 16, prefill_chunk: int = 256):
        self.cfg, self.pad_id, self.keep_stop = cfg, pad_id, keep_stop
        self.eos_ids = (eos_id,) if isinstance(eos_id, int) else tuple(eos_id) or (-1,)
        self.stops = tuple(tuple(int(t) for t in s) for s in stop_sequences)
        if any(not s for s in self.stops):
            raise ValueError("stop_sequences must not contain an empty sequence")
        self.n_tokens = n_tokens if n_tokens is not None and n_tokens < cfg.vocab_size else None
        self.slots, self.page_size, self.pages = slots, page_size, pages
        self.chunk_steps, self.prefill_chunk = chunk_steps, prefill_chunk
        self.pool, self.alloc = None, None
        self.kept = {}  # handle -> _Prefix of a finished request with keep=True
        self._handles = 0

    def _new_pool(self, n_pages: int):
        cfg, dt = self.cfg, _DTYPES[self.cfg.dtype]
        shape = (n_pages, cfg.n_kv_heads, self.page_size, cfg.head_size)
        self.pool = {n: tuple(jnp.zeros(shape, dt) for _ in range(cfg.n_layers)) for n in ("k", "v")}
        self.alloc = PagePool(n_pages)

    def release(self, handle: int):
        """Frees the pages of a kept sequence."""
        self.alloc.release(self.kept.pop(handle).pages)

    def _prefill_len(self, r: Request) -> tuple:
        """(tokens to prefill, their first position) of a request."""
        base = self.kept[r.parent] if r.parent is not None else None
        return (base.pending if base else ()) + tuple(int(t) for t in r.prompt), base.n_fed if base else 0

    def run(self, params, requests, device=None):
        """Samples every request. Returns (completions in request order, stats): stats hold
        preemptions, prefill_tokens (prompt tokens run through the model), decode_steps, slot_steps
        (steps x bucket: the decode work done), chunks, pool_pages, peak_pages, wall_s, host_s
        (the host's share: wall time outside device calls and their results' transfer).
        device: stands in for the device programs (a simulated schedule); None = the model's."""
        t_start = time.perf_counter()
        reqs = list(requests)
        if not reqs:
            return [], {}
        ps, eos_ids = self.page_size, self.eos_ids
        spans = [self._prefill_len(r) for r in reqs]
        totals = [s + len(t) + r.max_new_tokens - 1 for (t, s), r in zip(spans, reqs)]
        for (t, _), r in zip(spans, reqs):
            if not t or r.max_new_tokens < 1:
                raise ValueError(f"a request needs a prompt token and max_new_tokens >= 1: {r}")
        if self.pool is None:
            self._new_pool(self.pages or default_pages(self.cfg, slots=self.slots, max_len=max(totals),
                                                        page_size=ps))
        alloc = self.alloc
        usable = len(alloc.free)
        for total in totals:
            if -(-total // ps) + 1 > usable:
                raise ValueError(f"a request of {total} tokens needs {-(-total // ps) + 1} pages; "
                                 f"the pool has {usable} free")
        gkey = [("group", r.group) if r.group is not None else ("request", i) for i, r in enumerate(reqs)]
        first = {}
        for i, g in enumerate(gkey):
            j = first.setdefault(g, i)
            if spans[j] != spans[i]:
                raise ValueError(f"requests {j} and {i} share group {g[1]!r} but not their prompt")
        n_eos = len(eos_ids) + max(len(r.stop_ids) for r in reqs)
        eos_rows = np.array([(eos_ids + tuple(r.stop_ids) + (-1,) * n_eos)[:n_eos] for r in reqs], np.int32)
        raw = lambda k: np.asarray(jax.random.key_data(k) if jnp.issubdtype(jnp.asarray(k).dtype,
                                                                             jax.dtypes.prng_key) else k)
        keys = np.stack([raw(r.key) for r in reqs])
        dev = device or _Device(self, params, max(r.max_new_tokens for r in reqs))
        stats = collections.Counter()
        device_s = [0.0]

        def timed(fn, *a):
            t = time.perf_counter()
            out = fn(*a)
            device_s[0] += time.perf_counter() - t
            return out

        queue = collections.deque(range(len(reqs)))
        queued = collections.Counter(gkey)
        entries = {}  # group key -> _Prefix: its prompt's pages, shared by the members still to start
        slots = []
        results = [None] * len(reqs)
        admitted = iter(range(1 << 62))

        def live():
            return [i for i, s in enumerate(slots) if s is not None]

        def evict_idle_entry() -> bool:
            busy = {gkey[s.req] for s in slots if s is not None}
            for g in list(entries):
                if g not in busy:
                    alloc.release(entries.pop(g).pages)
                    return True
            return False

        def preempt(i):
            s = slots[i]
            alloc.release(s.pages)
            slots[i] = None
            queue.appendleft(s.req)
            queued[gkey[s.req]] += 1
            stats["preemptions"] += 1

        def admit():
            nonlocal slots
            n_live = len(live())
            target = _size_up(min(self.slots, n_live + len(queue)))
            if target != len(slots):
                perm = live() + [-1] * (target - n_live)
                slots = [slots[i] if i >= 0 else None for i in perm]
                timed(dev.resize, perm)
            free = [i for i, s in enumerate(slots) if s is None]
            before, jobs, after, started, made = [], [], [], [], []
            while free and queue:
                r = queue[0]
                g, req = gkey[r], reqs[r]
                entry = entries.get(g)
                if entry is None:
                    tokens, start = spans[r]
                    base = self.kept[req.parent] if req.parent is not None else None
                    shared = base.pages[:start // ps] if base else []
                    new = alloc.alloc(-(-(start + len(tokens)) // ps) - len(shared))
                    if new is None:
                        break
                    alloc.share(shared)
                    if start % ps:  # the base's partial last page: this prefill writes into a copy
                        before.append((base.pages[start // ps], new[0]))
                    entry = entries[g] = _Prefix(shared + new, start + len(tokens), logits=len(jobs))
                    made.append(entry)
                    jobs.append((tokens, start, entry.pages))
                    stats["prefill_tokens"] += len(tokens)
                full = entry.n_fed // ps
                if queued[g] == 1:  # the last member takes the entry's pages over
                    pages = entries.pop(g).pages
                else:
                    copy = alloc.alloc(1) if entry.n_fed % ps else []
                    if copy is None:
                        break
                    alloc.share(entry.pages[:full])
                    if copy:
                        after.append((entry.pages[full], copy[0]))
                    pages = entry.pages[:full] + copy
                queue.popleft()
                queued[g] -= 1
                i = free.pop(0)
                slots[i] = _Slot(r, pages, entry.n_fed, totals[r], next(admitted))
                started.append((i, entry))
            if jobs:  # an entry made for a member that could not start yet is prefilled all the same
                timed(dev.copy, before)
                handles = timed(dev.prefill, jobs)
                for entry in made:
                    entry.logits = handles[entry.logits]
            if not started:
                return
            timed(dev.copy, after)
            timed(dev.install, [i for i, _ in started], [e.logits for _, e in started],
                  [e.n_fed for _, e in started])

        def reserve():
            """Pages for the next chunk in every slot, oldest first; preempts the youngest when short."""
            for i in sorted(live(), key=lambda i: slots[i].order):
                s = slots[i]
                if s is None:
                    continue
                need = -(-min(s.fed + self.chunk_steps, s.cap) // ps) - len(s.pages)
                while need > 0:
                    got = alloc.alloc(need)
                    if got is not None:
                        s.pages += got
                        break
                    if evict_idle_entry():
                        continue
                    victim = max(live(), key=lambda j: slots[j].order)
                    if victim == i and len(live()) == 1:
                        raise RuntimeError("the page pool cannot hold one request (kept sequences hold "
                                           f"{sum(len(k.pages) for k in self.kept.values())} pages)")
                    preempt(victim)
                    if victim == i:
                        break

        while queue or live():
            admit()
            if not live():
                raise RuntimeError("no request fits the free pages (kept sequences hold "
                                   f"{sum(len(k.pages) for k in self.kept.values())} pages)")
            reserve()
            rows = live()
            b = len(slots)
            n_pages = _size_up(max(len(slots[i].pages) for i in rows))
            table = np.zeros((b, n_pages), np.int32)
            on = np.zeros(b, bool)
            req_of = np.zeros(b, np.int64)
            for i in rows:
                table[i, :len(slots[i].pages)] = slots[i].pages
                on[i], req_of[i] = True, slots[i].req
            field = lambda name, dt: np.asarray([getattr(reqs[r], name) for r in req_of], dt)
            per_slot = (keys[req_of], field("temperature", np.float32), field("top_k", np.int32),
                        field("top_p", np.float32), field("min_p", np.float32), field("max_new_tokens", np.int32),
                        eos_rows[req_of])
            min_finished = 1 if queue else max(1, len(rows) - _size_down(b))
            steps, s = timed(dev.decode, table, on, per_slot, min_finished)
            stats["decode_steps"] += steps
            stats["slot_steps"] += steps * b
            stats["chunks"] += 1
            done = [i for i in rows if s["done"][i]]
            for i in rows:
                slots[i].fed = int(s["fed"][i])
            for i, (tok, logp, ent) in zip(done, timed(dev.harvest, done) if done else []):
                slot, n = slots[i], int(s["lengths"][i])
                handle = None
                if reqs[slot.req].keep:
                    used = -(-slot.fed // ps)
                    alloc.release(slot.pages[used:])
                    handle, self._handles = self._handles, self._handles + 1
                    self.kept[handle] = _Prefix(slot.pages[:used], slot.fed,
                                                pending=(int(tok[int(s["step"][i]) - 1]),))
                else:
                    alloc.release(slot.pages)
                results[slot.req] = Completion(tok[:n].copy(), logp[:n].copy(), ent[:n].copy(),
                                               int(s["finish"][i]), handle)
                slots[i] = None
        for g in list(entries):
            alloc.release(entries.pop(g).pages)
        wall = time.perf_counter() - t_start
        stats.update(pool_pages=len(alloc.refs), peak_pages=alloc.peak, wall_s=wall, host_s=wall - device_s[0])
        return results, dict(stats)


def make_generate_fn(cfg: ModelConfig, *, max_new_tokens: int, eos_id, pad_id: int = 0,
                     stop_sequences: tuple = (), keep_stop: bool = False, n_tokens: int | None = None,
                     group_size: int = 1, **engine_kw):
    """The engine behind `sampler.make_generate_fn`'s contract.

    Returns fn(params, prompt_tokens [b, P], prompt_lens [b], keys [b], temperature=1.0, top_k=0,
    top_p=1.0, min_p=0.0) -> SampleOutput, the settings scalars or [b] arrays; rows of a group
    (group_size consecutive copies of a prompt) share its prefill. engine_kw: `Engine`'s (slots,
    page_size, pages, chunk_steps, prefill_chunk). fn.engine is the Engine, fn.stats the last run's.
    Not traceable: the host schedules (single-process; inputs are fetched to the host).
    """
    engine = Engine(cfg, eos_id=eos_id, pad_id=pad_id, stop_sequences=stop_sequences, keep_stop=keep_stop,
                    n_tokens=n_tokens, **engine_kw)

    def fn(params, prompt_tokens, prompt_lens, keys, temperature=1.0, top_k=0, top_p=1.0, min_p=0.0):
        tokens, lens = np.asarray(prompt_tokens), np.asarray(prompt_lens)
        if jnp.issubdtype(keys.dtype, jax.dtypes.prng_key):
            keys = jax.random.key_data(keys)
        keys = np.asarray(keys)
        b = len(lens)
        if b % group_size:
            raise ValueError(f"{b} rows are not whole groups of group_size={group_size}")
        row = lambda x: np.broadcast_to(np.asarray(x), (b,))
        t, k, p, m = row(temperature), row(top_k), row(top_p), row(min_p)
        reqs = [Request(tuple(tokens[i, :lens[i]].tolist()), keys[i], max_new_tokens, float(t[i]), int(k[i]),
                        float(p[i]), float(m[i]), group=i // group_size if group_size > 1 else None)
                for i in range(b)]
        done, fn.stats = engine.run(params, reqs)
        out = np.full((b, max_new_tokens), pad_id, np.int32)
        logprobs, entropy = np.zeros((b, max_new_tokens), np.float32), np.zeros((b, max_new_tokens), np.float32)
        for i, c in enumerate(done):
            out[i, :len(c.tokens)], logprobs[i, :len(c.tokens)], entropy[i, :len(c.tokens)] = (
                c.tokens, c.logprobs, c.entropy)
        return SampleOutput(tokens=jnp.asarray(out), lengths=jnp.asarray([len(c.tokens) for c in done], jnp.int32),
                            finish_reason=jnp.asarray([c.finish_reason for c in done], jnp.int32),
                            logprobs=jnp.asarray(logprobs), entropy=jnp.asarray(entropy))

    fn.engine, fn.stats = engine, {}
    return fn


def check_mesh(kind: str, mesh, field: str = "engine"):
    """ValueError naming `field` unless `kind` (`sampler.ENGINES`) can run on `mesh`: paged runs on
    one device of one process (its slots are not sharded over a mesh yet)."""
    if kind not in sampler.ENGINES:
        raise ValueError(f"{field}={kind!r}; expected one of {sampler.ENGINES}")
    if kind == "paged" and (mesh.size > 1 or jax.process_count() > 1):
        raise ValueError(f"{field}='paged' runs on one device of one process (the engine does not shard its "
                         f"slots yet); this mesh has {mesh.size} devices over {jax.process_count()} processes: "
                         f"set {field}='static', or run on one device")


def generate_fn(kind: str, cfg: ModelConfig, mesh, *, field: str = "engine", **kw):
    """The generate function of `kind`: static = `sampler.make_generate_fn`, paged =
    `make_generate_fn` (this engine), whose SampleOutput is placed on `mesh` batch-sharded as
    the static one's inputs are, so jitted consumers (`rollout.build_sequences`) get device arrays.

    kw: the two makers' keywords (max_new_tokens, eos_id, pad_id, stop_sequences, keep_stop,
    n_tokens, group_size). field: the config field named in errors (`check_mesh`).
    """
    check_mesh(kind, mesh, field)
    if kind == "static":
        return sampler.make_generate_fn(cfg, **kw)
    paged = make_generate_fn(cfg, **kw)

    def fn(*args, **kwargs):
        out = paged(*args, **kwargs)
        fn.stats = paged.stats
        host = {f.name: np.asarray(getattr(out, f.name)) for f in dataclasses.fields(out)}
        return SampleOutput(**sharding.put_global(host, mesh))

    fn.engine, fn.stats = paged.engine, {}
    return fn
