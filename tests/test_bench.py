"""ptx.bench: a tiny run reports every benchmark with finite numbers, MFU is FLOP/s over the
peak, --compare prints new / old ratios, and the analytic FLOP count matches XLA's."""
import json
import math

import jax
import jax.numpy as jnp
import pytest

from ptx import bench
from ptx.model import ModelConfig, Transformer, flops_per_token

TINY = ["--d_model", "64", "--n_layers", "2", "--vocab", "256", "--batch", "4", "--seq", "32",
        "--repeats", "1", "--decode_batches", "2", "--layers_compile", "0", "--matmul_n", "256",
        "--backend_opt_level", "0"]  # level 0: XLA:CPU compiles ~2x faster; only the numbers' shape is tested
REQUIRED = ("tokens_per_s", "flops_per_s", "mfu", "compile_s", "peak_mem_mb")


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench") / "bench.json"
    returned = bench.main(TINY + ["--out", str(out)])
    return out, json.loads(out.read_text()), returned


def positive_finite(x):
    return isinstance(x, (int, float)) and math.isfinite(x) and x > 0


def test_tiny_suite_reports_every_benchmark_with_positive_finite_numbers(tiny_run):
    _, data, returned = tiny_run
    names = [*bench.TRAIN, "prefill", "decode_b2", "grpo_iteration"]
    for name in names:
        for key in REQUIRED:
            assert positive_finite(data[name][key]), (name, key, data[name].get(key))
    assert positive_finite(data["decode_b2"]["decode_per_token_vs_forward"])
    assert positive_finite(data["decode_b2"]["generate_tokens_per_s"])
    assert positive_finite(data["grpo_iteration"]["rollout_tokens_per_s"])
    assert positive_finite(data["grpo_iteration"]["update_tokens_per_s"])
    assert positive_finite(data["matmul_peak_flops"]) and isinstance(data["device"], str)
    assert data["config"]["d_model"] == 64 and data["config"]["n_layers"] == 2
    assert data["config"]["vocab_size"] == 256 and data["config"]["batch"] == 4
    assert data["config"]["seq"] == 32
    assert set(names) <= set(returned)


def test_mfu_is_achieved_flops_over_the_peak_and_flops_are_analytic(tiny_run):
    _, data, _ = tiny_run
    if data["platform"] == "cpu":
        assert data["peak_flops"] == data["matmul_peak_flops"]
    for name, e in data.items():
        if bench.is_benchmark(e):
            assert e["mfu"] == pytest.approx(e["flops_per_s"] / data["peak_flops"], rel=1e-9), name
    cfg = ModelConfig(**{k: v for k, v in data["config"].items() if k in ModelConfig.__dataclass_fields__})
    fwd, head, tokens = flops_per_token(cfg, 32), 2 * 64 * 256, 4 * 32
    # (FLOPs per step, tokens per step): training is 3 x forward, a frozen reference 1 x;
    # pair steps run chosen and rejected; the reward model and the critic skip the LM head.
    expected = {"sft_step": (3 * fwd * tokens, tokens),
                "reward_step": (3 * (fwd - head) * 2 * tokens, 2 * tokens),
                "dpo_step": ((3 + 1) * fwd * 2 * tokens, 2 * tokens),
                "dpo_step_precomputed_ref": (3 * fwd * 2 * tokens, 2 * tokens),
                "ppo_update": (3 * (fwd + fwd - head) * tokens, tokens)}
    for name, (flops, step_tokens) in expected.items():
        e = data[name]
        assert e["tokens_per_s"] * e["step_s"] == pytest.approx(step_tokens, rel=1e-9), name
        assert e["flops_per_s"] * e["step_s"] == pytest.approx(flops, rel=1e-9), name


def test_compare_prints_new_over_old_ratios(tiny_run, tmp_path, capsys):
    old_path, old, _ = tiny_run
    capsys.readouterr()
    new = bench.main(TINY + ["--only", "prefill,decode_b2", "--out", str(tmp_path / "new.json"),
                             "--compare", str(old_path)])
    printed = capsys.readouterr().out.split("compared with")[1]
    for name in ("prefill", "decode_b2"):
        line = next(l for l in printed.splitlines() if l.startswith(name))
        ratio = new[name]["tokens_per_s"] / old[name]["tokens_per_s"]
        assert f"{ratio:.3f}x" in line.split()[1]
    assert "sft_step" not in printed  # only what both runs have


def test_published_peak_is_looked_up_by_device_kind():
    assert bench.published_peak("NVIDIA H100 80GB HBM3") == 989e12
    assert bench.published_peak("NVIDIA H200") == 989e12
    assert bench.published_peak("NVIDIA A100-SXM4-40GB") == 312e12
    assert bench.published_peak("TPU v5 lite") == 197e12
    assert bench.published_peak("TPU v5p") == 459e12
    assert bench.published_peak("TPU v6 lite") == 918e12
    assert bench.published_peak("cpu") is None


def test_flops_per_token_matches_xla_cost_analysis():
    # Unrolled layers: XLA's cost analysis counts a while-loop body once, not per trip.
    cfg = ModelConfig(vocab_size=256, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=192,
                      scan_unroll=2)
    params = bench.random_params(cfg, 0)
    tokens = jnp.zeros((4, 32), jnp.int32)
    fwd = jax.jit(lambda p, t: Transformer(cfg).apply({"params": p}, t).logits)
    cost = fwd.lower(params, tokens).compile().cost_analysis()
    if isinstance(cost, list):
        cost = cost[0] if cost else None
    if not cost or "flops" not in cost:
        pytest.skip("XLA reports no cost analysis on this backend")
    assert flops_per_token(cfg, 32) * 4 * 32 == pytest.approx(cost["flops"], rel=0.1)
