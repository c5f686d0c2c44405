"""Benchmarks: every training step (full and LoRA), prefill, decode and one GRPO and PPO
iteration, against the peak.

python -m bench.main [--size bench] [--only sft_step,decode_b16] [--compare runs/old.json] [--peer torch|trl]
python -m bench.main --only dpo_step,dpo_step_shared_prefix --dpo_prompt_len 96 --dpo_response_len 64
python -m bench.main --memory_only --size qwen3_0_6b --seq 4096 --batch 1 [--attention xla --loss_chunk 1000000000]

Each number is the median of `--repeats` timed runs after one warm-up run,
each ended by block_until_ready (bench/suite.py holds the benchmarks,
bench/peer.py measures, tabulates and compares). Steps are jitted once through `steps.compile_step` on a
data-parallel mesh, with the AdamW chain of the real configs. FLOPs are
analytic: forward per token = `model.flops_per_token` (attention over the
whole sequence, no causal saving), training = 3 x forward (LoRA too: the
merged weight's gradient is formed), a frozen reference 1 x. Training entries
add the MiB of the trained parameters, their optimiser state and the frozen
trees (a reference, a LoRA base); the RL iterations split rollout and update
tokens/s. MFU = achieved FLOP/s / peak: the published bf16 dense peak on GPU /
TPU; on CPU the fastest dense matmul of probes run before every benchmark and
after the last (other processes may share the cores, and a disturbed probe
would inflate MFU). Writes `--out` as JSON keyed by benchmark name, next to
`device`, `matmul_peak_flops`, `peak_flops` and `config`.

--memory_only times nothing: it compiles the training steps (MEMORY) on abstract
inputs at the given shape, nothing allocated, and writes per step XLA's memory
analysis (argument_mib, temp_mib, output_mib, alias_mib, host_temp_mib) next to
the config (shape, dtype, remat, attention, loss_chunk). On CPU it compiles with
XLA:CPU's memory-optimised scheduler (--cpu_scheduler default: the concurrency one
that runs), and a bfloat16 model's products and loops run in float32 through
float32 copies of their operands, which the temporaries include.
"""
import argparse
import importlib
import json
import os

import jax
import jax.numpy as jnp

from bench import peer as bench_peer
from bench.peer import is_benchmark, matmul_peak, published_peak
from bench.suite import Suite
from configs import common
from ptx import lora
from ptx.model import ModelConfig

TRAIN = ("sft_step", "reward_step", "dpo_step", "dpo_step_shared_prefix", "dpo_step_precomputed_ref", "ppo_update",
         "lora_sft_step", "lora_dpo_step")
MEMORY = ("sft_step", "dpo_step", "ppo_update", "ppo_update_value_head", "grpo_update", "lora_sft_step",
          "lora_dpo_step", "lora_ppo_update")
# Bench-only shapes beside configs/common.MODEL_PRESETS. qwen3_0_6b: Qwen3-0.6B's sizes (tied
# embeddings, 151,936 words) on the ptx architecture (no q / k norms), bfloat16 compute, full remat.
BENCH_PRESETS = {
    "qwen3_0_6b": dict(vocab_size=151936, d_model=1024, n_layers=28, n_heads=16, n_kv_heads=8, head_dim=128,
                       d_ff=3072, rope_theta=1000000.0, norm_eps=1e-6, tie_embeddings=True, dtype="bfloat16",
                       remat="full", attention="auto"),
    # Llama 3.2 1B (tied embeddings, llama3 rope scaling): bench.accelerator's second shape.
    "llama3_2_1b": dict(vocab_size=128256, d_model=2048, n_layers=16, n_heads=32, n_kv_heads=8, head_dim=64,
                        d_ff=8192, rope_theta=500000.0, rope_type="llama3", rope_factor=32.0,
                        rope_low_freq_factor=1.0, rope_high_freq_factor=4.0, rope_original_max_len=8192,
                        norm_eps=1e-5, tie_embeddings=True, dtype="bfloat16", remat="full", attention="auto"),
}
PRESETS = {**common.MODEL_PRESETS, **BENCH_PRESETS}


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m bench.main", description=__doc__.splitlines()[0])
    p.add_argument("--size", default="bench", choices=sorted(PRESETS), help="model preset")
    for name in ("d_model", "n_layers", "n_heads", "n_kv_heads", "head_dim", "d_ff", "vocab"):
        p.add_argument(f"--{name}", type=int, default=0, help="0 = the preset's")
    p.add_argument("--dtype", default="auto",
                   help="compute dtype; auto = the preset's, else float32 on CPU and bfloat16 elsewhere")
    p.add_argument("--remat", default="", help="none | full | dots | offload; '' = the preset's")
    p.add_argument("--attention", default="", help="xla | blockwise | cudnn | splash | auto; '' = the preset's")
    p.add_argument("--loss_chunk", type=int, default=-1,
                   help="model.loss_chunk: tokens per chunk of the LM head under a loss, 0 = auto; "
                        "-1 = the preset's; a number above batch x seq = unchunked")
    p.add_argument("--memory_only", action="store_true",
                   help="compile the training steps at this shape without running them; report XLA's memory analysis")
    p.add_argument("--cpu_scheduler", default="memory", choices=("memory", "default"),
                   help="--memory_only on CPU: XLA:CPU's memory-optimised scheduler, or its default (concurrency)")
    p.add_argument("--scan_unroll", type=int, default=0, help="layers per scan step; 0 = the preset's")
    p.add_argument("--batch", type=int, default=16, help="rows (DPO / reward: pairs) per step")
    p.add_argument("--seq", type=int, default=128, help="tokens per row")
    p.add_argument("--prompt_len", type=int, default=0, help="decode / RL prompt width; 0 = seq // 2")
    p.add_argument("--new_tokens", type=int, default=0, help="tokens sampled per row; 0 = seq - prompt_len")
    p.add_argument("--dpo_prompt_len", type=int, default=0,
                   help="dpo_step / dpo_step_shared_prefix: prompt tokens of a pair; 0 = seq // 2")
    p.add_argument("--dpo_response_len", type=int, default=0,
                   help="dpo_step / dpo_step_shared_prefix: tokens of each response; 0 = seq - dpo_prompt_len")
    p.add_argument("--decode_batches", default="1,16,64", help="batch sizes of the decode_bN entries")
    p.add_argument("--top_p", type=float, default=0.9, help="nucleus sampling of decode_bN and the torch peer")
    p.add_argument("--lora_rank", type=int, default=8, help="adapter rank of the lora_* entries")
    p.add_argument("--lora_base_dtype", default="float32", choices=lora.BASE_DTYPES,
                   help="the frozen base of the lora_* entries")
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
    p.add_argument("--peer", default="", choices=("", "torch", "trl"),
                   help="also time transformers' Llama (torch) or TRL's DPO and GRPO trainers (trl, bench/peer_trl.py)")
    p.add_argument("--layers_compile", type=int, default=32, help="SFT step compile time at this depth; 0 = skip")
    return p.parse_args(argv)


def model_config(args) -> ModelConfig:
    """The preset with the flag overrides; d_ff and n_kv_heads keep the preset's ratios."""
    f = dict(PRESETS[args.size])
    if args.d_model:
        f["d_ff"] = f["d_ff"] * args.d_model // f["d_model"]
        f["d_model"] = args.d_model
    if args.n_heads:
        f["n_kv_heads"] = max(1, f["n_kv_heads"] * args.n_heads // f["n_heads"])
        f["n_heads"] = args.n_heads
    for flag, field in (("n_layers", "n_layers"), ("n_kv_heads", "n_kv_heads"), ("head_dim", "head_dim"),
                        ("d_ff", "d_ff"), ("vocab", "vocab_size"), ("remat", "remat"), ("attention", "attention"),
                        ("scan_unroll", "scan_unroll")):
        if getattr(args, flag):
            f[field] = getattr(args, flag)
    if args.loss_chunk >= 0:
        f["loss_chunk"] = args.loss_chunk
    cpu = jax.devices()[0].platform == "cpu"
    if args.dtype != "auto" or "dtype" not in f:
        f["dtype"] = args.dtype if args.dtype != "auto" else ("float32" if cpu else "bfloat16")
    return ModelConfig(**f)


def benchmark_names(args) -> list:
    if args.memory_only:
        return list(MEMORY)
    decode = [f"decode_b{int(b)}" for b in args.decode_batches.split(",") if b]
    return [*TRAIN, "prefill", *decode, "grpo_iteration", "ppo_iteration", "rollout_skewed", "rollout_uniform"]


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


def main(argv=None) -> dict:
    args = parse_args(argv)
    # Imported before the suite runs so that a missing trl fails fast; torch, transformers and trl are test-only.
    peer_trl = importlib.import_module("bench.peer_trl") if args.peer == "trl" else None
    cfg = model_config(args)
    names = benchmark_names(args)
    if args.only:
        unknown = sorted(set(args.only.split(",")) - set(names))
        if unknown:
            raise SystemExit(f"--only: unknown benchmarks {unknown}; known: {names}")
        names = [n for n in names if n in args.only.split(",")]
    dev = jax.devices()[0]
    if args.memory_only:
        return memory_only(args, cfg, names, dev)
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
                       new_tokens=suite.new, dpo_prompt_len=suite.dpo_prompt, dpo_response_len=suite.dpo_response,
                       repeats=args.repeats, devices=suite.mesh.size, backend_opt_level=args.backend_opt_level),
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
        peer = bench_peer.torch_peer(args, cfg, suite.width, suite.new, peak)
        results["peer_torch"] = peer.pop("skipped", None) or peer.pop("versions")
        results.update(peer)
    if peer_trl:
        results.update(peer_trl.trl_peer(args, cfg, suite.width, suite.new, peak, names))
        results["ratios_trl"] = peer_trl.ratios(results)
    print(bench_peer.table(results))
    print(f"{n}x{n} {cfg.dtype} matmul: best {measured / 1e12:.3f} TFLOP/s of {len(probes)} probes "
          f"(worst {min(probes) / 1e12:.3f}); MFU against {peak / 1e12:.3f} TFLOP/s")
    if "sft_compile_s_by_layers" in results:
        print("SFT step compile s by depth:", {k: round(v, 2) for k, v in results["sft_compile_s_by_layers"].items()})
    if args.peer == "torch":
        print(bench_peer.ratios(results, args.batch))
    if peer_trl:
        print(peer_trl.table(results))
    if args.out:
        write_json(args.out, results)
    if args.compare:
        with open(args.compare) as f:
            print(f"compared with {args.compare}:\n" + bench_peer.compare(results, json.load(f)))
    return results


def write_json(path: str, results: dict):
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(results, f, indent=2)
    print(f"wrote {path}")


def memory_only(args, cfg: ModelConfig, names, dev) -> dict:
    """--memory_only: each training step compiled at the shape, never run; XLA's memory analysis."""
    suite = Suite(args, cfg, float("nan"))
    print(f"ptx bench --memory_only on {dev.device_kind} ({dev.platform}, {suite.mesh.size} device(s)): "
          f"batch {args.batch} x seq {args.seq}, {cfg.dtype} compute, remat {cfg.remat}, attention "
          f"{cfg.attention}, loss_chunk {cfg.loss_chunk}, CPU scheduler {args.cpu_scheduler}", flush=True)
    results = {"device": dev.device_kind, "platform": dev.platform, "n_devices": suite.mesh.size,
               "jax_version": jax.__version__, "memory_only": True,
               "config": dict(cfg.__dict__, batch=args.batch, seq=args.seq, prompt_len=suite.width,
                              devices=suite.mesh.size, lora_rank=args.lora_rank,
                              cpu_scheduler=args.cpu_scheduler if dev.platform == "cpu" else None)}
    for name in names:
        results[name] = getattr(suite, name)()
        print(f"  {name}: temps {results[name]['temp_mib']:.0f} MiB", flush=True)
    results["rollout_memory"] = suite.rollout_memory()  # the engine's page pool: a simulated schedule
    print(bench_peer.memory_table(results))
    if args.out:
        write_json(args.out, results)
    return results


if __name__ == "__main__":
    main()
