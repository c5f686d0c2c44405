"""How the benchmarks (bench/main.py) measure and compares, and the peer it is compared with.

Timing (`median_time`: the median of repeated runs after a warm-up, each
ended by a sync), memory, the chip's peak (`PUBLISHED_PEAKS`, or the fastest
of repeated matmul probes), the results table, new / old ratios (`--compare`)
and the peer of `--peer torch`: transformers' LlamaForCausalLM + PyTorch on
the same model config and batch (test-only dependencies:
requirements-test.txt), an SFT step (AdamW with the bench config's
optimiser settings, autocast to the compute dtype) and `generate` with top-p
sampling, timed by the same `median_time` and reported by the same `entry`.
"""
import resource
import statistics
import time

import jax
import jax.numpy as jnp

from configs import common
from ptx.model import ModelConfig, flops_per_token

# (substring of jax's device_kind, dense bf16 FLOP/s per chip); the first match wins.
PUBLISHED_PEAKS = (
    ("H100", 989e12), ("H200", 989e12), ("A100", 312e12), ("TPU v4", 275e12),
    ("TPU v5 lite", 197e12), ("TPU v5e", 197e12), ("TPU v5p", 459e12), ("TPU v5", 459e12),
    ("TPU v6 lite", 918e12), ("TPU v6e", 918e12))


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


def memory_entry(compiled, compile_s: float, **extra) -> dict:
    """What XLA's memory analysis of one compiled executable says, in MiB: arguments, outputs,
    temporaries (the working set), the outputs that alias donated arguments, and host memory
    (remat='offload')."""
    m = compiled.memory_analysis()
    mib = lambda name: getattr(m, name, 0) / 2**20
    return dict(argument_mib=mib("argument_size_in_bytes"), temp_mib=mib("temp_size_in_bytes"),
                output_mib=mib("output_size_in_bytes"), alias_mib=mib("alias_size_in_bytes"),
                host_temp_mib=mib("host_temp_size_in_bytes"), compile_s=compile_s, **extra)


def dpo_lengths(args) -> tuple:
    """(prompt, response) tokens per DPO row: --dpo_prompt_len (0 = seq // 2), --dpo_response_len
    (0 = seq - prompt)."""
    prompt = args.dpo_prompt_len or args.seq // 2
    return prompt, args.dpo_response_len or max(args.seq - prompt, 1)


def is_memory_entry(v) -> bool:
    return isinstance(v, dict) and "temp_mib" in v


def memory_table(results: dict) -> str:
    rows = [f"{'benchmark':<20} {'args MiB':>9} {'temps MiB':>10} {'out MiB':>9} {'host MiB':>9} "
            f"{'compile s':>9}  trained + opt state / frozen MiB"]
    for name, e in results.items():
        if is_memory_entry(e):
            rows.append(f"{name:<20} {e['argument_mib']:>9.0f} {e['temp_mib']:>10.0f} {e['output_mib']:>9.0f} "
                        f"{e['host_temp_mib']:>9.0f} {e['compile_s']:>9.1f}  "
                        f"{e['param_mb'] + e['opt_state_mb']:.0f} / {e['frozen_mb']:.0f}")
    return "\n".join(rows)


def published_peak(device_kind: str):
    return next((peak for key, peak in PUBLISHED_PEAKS if key.lower() in device_kind.lower()), None)


def matmul_peak(n: int, dtype, runs: int = 10) -> float:
    """FLOP/s of one jitted dense n x n @ n x n matmul: the fastest of `runs` (a peak, not a typical time)."""
    kx, ky = jax.random.split(jax.random.PRNGKey(0))
    x, y = jax.random.normal(kx, (n, n), dtype), jax.random.normal(ky, (n, n), dtype)
    f = jax.jit(jnp.matmul)
    return 2.0 * n**3 / min(median_time(lambda: f(x, y), 1) for _ in range(runs))


def mb(tree) -> float:
    """MiB of the arrays in `tree`, each array once (a LoRA base that is also the reference); 0 for None."""
    arrays = {id(x): x for x in jax.tree_util.tree_leaves(tree)}
    return sum(x.size * x.dtype.itemsize for x in arrays.values()) / 2**20


def entry(seconds, tokens, flops, peak, compile_s, compiled=None, **extra) -> dict:
    fps = flops / seconds
    return dict(tokens_per_s=tokens / seconds, flops_per_s=fps, mfu=fps / peak, compile_s=compile_s,
                peak_mem_mb=peak_mem_mb(), step_s=seconds,
                **({"xla_mem_mb": xla_mem_mb(compiled)} if compiled is not None else {}), **extra)


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
            note = (f"rollout {e['rollout_tokens_per_s']:.0f} tok/s, {e['updates']} update(s) "
                    f"{e['update_tokens_per_s']:.0f} tok/s")
        elif "param_mb" in e:
            note = (f"trained {e['param_mb']:.1f} MB + opt state {e['opt_state_mb']:.1f} MB, "
                    f"frozen {e['frozen_mb']:.1f} MB")
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


def llama_config(cfg: ModelConfig, max_positions: int):
    """transformers' LlamaConfig of the bench model `cfg` (the peers' model), positions up to max_positions."""
    import transformers

    return transformers.LlamaConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.d_model, intermediate_size=cfg.d_ff,
        num_hidden_layers=cfg.n_layers, num_attention_heads=cfg.n_heads, num_key_value_heads=cfg.n_kv_heads,
        head_dim=cfg.head_size, max_position_embeddings=max_positions, rms_norm_eps=cfg.norm_eps,
        rope_theta=cfg.rope_theta, tie_word_embeddings=cfg.tie_embeddings, attention_bias=cfg.qkv_bias)


def torch_peer(args, cfg: ModelConfig, width: int, new: int, peak: float) -> dict:
    """{'torch_sft_step', f'torch_generate_b{batch}': entries, 'versions'}, or {'skipped': why}."""
    try:
        import torch
        import transformers
    except ImportError as e:
        return {"skipped": f"{e.name} is not installed (pip install torch transformers)"}
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if cfg.dtype == "bfloat16" else torch.float32
    sync = (lambda _: torch.cuda.synchronize()) if dev == "cuda" else (lambda _: None)
    model = transformers.LlamaForCausalLM(llama_config(cfg, max(args.seq, width + new))).to(dev)
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


def ratios(results: dict, batch: int) -> str:
    """ptx / torch tokens/s of the SFT step and of generation (decode with prefill) at `batch`."""
    rows = [f"peer torch: {results['peer_torch']}"]
    pairs = (("sft_step", "torch_sft_step"), (f"decode_b{batch}", f"torch_generate_b{batch}"))
    for ours, theirs in pairs:
        if ours in results and theirs in results:
            key = "generate_tokens_per_s" if ours.startswith("decode") else "tokens_per_s"
            rows.append(f"  {ours} / {theirs}: {results[ours][key] / results[theirs]['tokens_per_s']:.2f}x")
    return "\n".join(rows)
