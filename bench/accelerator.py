"""The accelerator run: the bench at its own size and at a 1B shape, in bfloat16 with the fused
attention of `model.attention=auto` (cuDNN on GPU, splash on TPU), MFU against the chip's
published peak, decode tokens/s and memory, in one command.

PTX_JAX_EXTRA=cuda12 ./launch.sh bench-accelerator      (a GPU; tpu on a TPU VM)

Three runs of bench/main.py, each writing its JSON into `--out_dir`: `bench.json` (every
benchmark at the bench size), `1b.json` (SFT, DPO, prefill, decode b1 / b16 / b64 and a GRPO
iteration at the llama3_2_1b shape, `--seq_1b` tokens a row), `1b_memory.json` (XLA's memory
analysis of the training steps at that shape, one row of `--memory_seq` tokens), then
`summary.json` and a printed table: benchmark, tokens/s, MFU, peak memory (MiB) and the
device's name. On CPU it refuses (the 1B shape would take hours) unless `--tiny`, which runs
the same three at a test size in float32 to check the plumbing.
"""
import argparse
import os

import jax

from bench import main as bench_main
from bench.peer import is_benchmark, is_memory_entry

SHAPE_1B = "llama3_2_1b"
ENTRIES_1B = "sft_step,dpo_step,prefill,decode_b1,decode_b16,decode_b64,grpo_iteration"
TINY = ["--d_model", "64", "--n_layers", "2", "--vocab", "256", "--repeats", "1", "--matmul_n", "256",
        "--backend_opt_level", "0", "--dtype", "float32"]


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m bench.accelerator", description=__doc__.splitlines()[0])
    p.add_argument("--out_dir", default="runs/accelerator")
    p.add_argument("--batch_1b", type=int, default=8, help="rows (DPO: pairs) per step at the 1B shape")
    p.add_argument("--seq_1b", type=int, default=2048, help="tokens per row at the 1B shape")
    p.add_argument("--memory_seq", type=int, default=8192, help="tokens of the one row of the memory analysis")
    p.add_argument("--tiny", action="store_true", help="a test size in float32, allowed on CPU")
    return p.parse_args(argv)


def runs(args) -> dict:
    """bench/main.py argument lists by output name."""
    out = lambda name: ["--out", os.path.join(args.out_dir, name + ".json")]
    if args.tiny:
        return {"bench": TINY + ["--size", "tiny", "--batch", "2", "--seq", "32", "--only", "sft_step,decode_b1",
                                 "--layers_compile", "0"] + out("bench"),
                "1b": TINY + ["--size", "tiny", "--batch", "2", "--seq", "64", "--decode_batches", "1",
                              "--only", "sft_step,decode_b1", "--layers_compile", "0"] + out("1b"),
                "1b_memory": ["--memory_only", "--size", "tiny", "--d_model", "64", "--n_layers", "2", "--batch", "1",
                              "--seq", "128", "--dtype", "float32", "--only", "sft_step"] + out("1b_memory")}
    return {"bench": ["--size", "bench", "--dtype", "bfloat16", "--attention", "auto"] + out("bench"),
            "1b": ["--size", SHAPE_1B, "--batch", str(args.batch_1b), "--seq", str(args.seq_1b), "--only", ENTRIES_1B,
                   "--layers_compile", "0"] + out("1b"),
            "1b_memory": ["--memory_only", "--size", SHAPE_1B, "--batch", "1", "--seq", str(args.memory_seq)]
            + out("1b_memory")}


def summary(results: dict) -> dict:
    """One row per timed benchmark and per memory entry, keyed '<run>/<benchmark>'."""
    rows = {}
    for run, res in results.items():
        for name, e in res.items():
            if is_benchmark(e):
                rows[f"{run}/{name}"] = {k: e.get(k) for k in ("tokens_per_s", "mfu", "peak_mem_mb", "compile_s")}
            elif is_memory_entry(e):
                rows[f"{run}/{name}"] = {k: e[k] for k in ("argument_mib", "temp_mib")}
    first = next(iter(results.values()))
    return {"device": first["device"], "platform": first["platform"], "jax_version": jax.__version__,
            "published_peak_flops": first.get("published_peak_flops"), "rows": rows}


def table(s: dict) -> str:
    lines = [f"device: {s['device']} ({s['platform']}); MFU against "
             f"{s['published_peak_flops'] or 'the measured matmul peak'} FLOP/s",
             "| benchmark | tokens/s | MFU | peak MiB | XLA args / temps MiB |", "|---|---|---|---|---|"]
    for name, r in s["rows"].items():
        if "tokens_per_s" in r:
            lines.append(f"| {name} | {r['tokens_per_s']:.0f} | {r['mfu'] or 0:.3f} | {r['peak_mem_mb']:.0f} | |")
        else:
            lines.append(f"| {name} | | | | {r['argument_mib']:.0f} / {r['temp_mib']:.0f} |")
    return "\n".join(lines)


def main(argv=None) -> dict:
    args = parse_args(argv)
    if jax.default_backend() == "cpu" and not args.tiny:
        raise SystemExit("bench.accelerator: no GPU or TPU here (jax sees only the CPU); install the accelerator "
                         "build (PTX_JAX_EXTRA=cuda12 or tpu ./launch.sh setup) or pass --tiny to check the plumbing")
    results = {name: bench_main.main(argv_) for name, argv_ in runs(args).items()}
    s = summary(results)
    bench_main.write_json(os.path.join(args.out_dir, "summary.json"), s)
    print(table(s))
    return s


if __name__ == "__main__":
    main()
