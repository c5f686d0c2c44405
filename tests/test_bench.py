"""bench (./launch.sh bench): a tiny run reports every benchmark with finite numbers, MFU is FLOP/s over the
peak, training entries report the memory of what they train, --compare prints new / old
ratios, and the analytic FLOP count matches XLA's."""
import json
import math

import jax
import jax.numpy as jnp
import pytest

from bench import accelerator
from bench import main as bench
from bench import peer as bench_peer
from bench import suite as bench_suite
from ptx.model import ModelConfig, Transformer, count_params, flops_per_token, init_params

TINY = ["--d_model", "64", "--n_layers", "2", "--vocab", "256", "--batch", "4", "--seq", "32",
        "--repeats", "1", "--decode_batches", "2", "--layers_compile", "0", "--matmul_n", "256",
        "--backend_opt_level", "0"]  # level 0: XLA:CPU compiles ~2x faster; only the numbers' shape is tested
REQUIRED = ("tokens_per_s", "flops_per_s", "mfu", "compile_s", "peak_mem_mb")


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench") / "bench.json"
    returned = bench.main(TINY + ["--out", str(out)])
    return out, json.loads(out.read_text()), returned


def init_params_abstract(cfg):
    return jax.eval_shape(lambda: init_params(cfg, jax.random.PRNGKey(0)))


def positive_finite(x):
    return isinstance(x, (int, float)) and math.isfinite(x) and x > 0


@pytest.mark.stage
def test_tiny_suite_reports_every_benchmark_with_positive_finite_numbers(tiny_run):
    _, data, returned = tiny_run
    names = [*bench.TRAIN, "prefill", "decode_b2", "grpo_iteration", "ppo_iteration"]
    for name in names:
        for key in REQUIRED:
            assert positive_finite(data[name][key]), (name, key, data[name].get(key))
    assert positive_finite(data["decode_b2"]["decode_per_token_vs_forward"])
    assert positive_finite(data["decode_b2"]["generate_tokens_per_s"])
    for name in ("grpo_iteration", "ppo_iteration"):
        assert positive_finite(data[name]["rollout_tokens_per_s"]), name
        assert positive_finite(data[name]["update_tokens_per_s"]), name
    for name in bench.TRAIN:
        assert positive_finite(data[name]["param_mb"]) and positive_finite(data[name]["opt_state_mb"]), name
    assert positive_finite(data["matmul_peak_flops"]) and isinstance(data["device"], str)
    assert data["config"]["d_model"] == 64 and data["config"]["n_layers"] == 2
    assert data["config"]["vocab_size"] == 256 and data["config"]["batch"] == 4
    assert data["config"]["seq"] == 32
    assert set(names) <= set(returned)


@pytest.mark.stage
def test_mfu_is_achieved_flops_over_the_peak_and_flops_are_analytic(tiny_run):
    _, data, _ = tiny_run
    if data["platform"] == "cpu":
        assert data["peak_flops"] == data["matmul_peak_flops"]
    for name, e in data.items():
        if bench_peer.is_benchmark(e):
            assert e["mfu"] == pytest.approx(e["flops_per_s"] / data["peak_flops"], rel=1e-9), name
    cfg = ModelConfig(**{k: v for k, v in data["config"].items() if k in ModelConfig.__dataclass_fields__})
    fwd, head, tokens = flops_per_token(cfg, 32), 2 * 64 * 256, 4 * 32
    # (FLOPs per step, tokens per step): training is 3 x forward, a frozen reference 1 x;
    # pair steps run chosen and rejected; the reward model and the critic skip the LM head.
    expected = {"sft_step": (3 * fwd * tokens, tokens),
                "reward_step": (3 * (fwd - head) * 2 * tokens, 2 * tokens),
                "dpo_step": ((3 + 1) * fwd * 2 * tokens, 2 * tokens),
                # One row per pair, counted as the two rows it stands for.
                "dpo_step_shared_prefix": ((3 + 1) * fwd * 2 * tokens, 2 * tokens),
                "dpo_step_precomputed_ref": (3 * fwd * 2 * tokens, 2 * tokens),
                "ppo_update": (3 * (fwd + fwd - head) * tokens, tokens),
                # LoRA forms the merged weight's gradient: the FLOPs of full finetuning.
                "lora_sft_step": (3 * fwd * tokens, tokens),
                "lora_dpo_step": ((3 + 1) * fwd * 2 * tokens, 2 * tokens)}
    for name, (flops, step_tokens) in expected.items():
        e = data[name]
        assert e["tokens_per_s"] * e["step_s"] == pytest.approx(step_tokens, rel=1e-9), name
        assert e["flops_per_s"] * e["step_s"] == pytest.approx(flops, rel=1e-9), name
    # A PPO iteration (prompt 16 + 16 new tokens, batch 4, 4 epochs of one minibatch of 4): the
    # rollout (prefill + decode, then reference and critic forwards: the old log-probs are the
    # sampler's) and 4 updates of policy + critic; the critic never computes the LM head.
    e, t = data["ppo_iteration"], 32
    fwd_t = flops_per_token(cfg, t)
    rollout = flops_per_token(cfg, t - 1) * 4 * (t - 1) + (2 * fwd_t - head) * 4 * t
    assert e["updates"] == 4
    assert e["flops_per_s"] * e["step_s"] == pytest.approx(rollout + 4 * 3 * (2 * fwd_t - head) * 4 * t, rel=1e-9)
    assert e["step_s"] == pytest.approx(e["rollout_s"] + e["update_s"], rel=1e-9)
    assert e["update_tokens_per_s"] == pytest.approx(4 * 4 * t / e["update_s"], rel=1e-9)


@pytest.mark.stage
def test_training_entries_report_the_memory_of_what_they_train(tiny_run):
    _, data, _ = tiny_run
    cfg = ModelConfig(**{k: v for k, v in data["config"].items() if k in ModelConfig.__dataclass_fields__})
    full_mb = 4 * count_params(init_params_abstract(cfg)) / 2**20  # float32 parameters
    # Full finetuning: the whole tree and its AdamW moments (2 x, plus scalar counters); DPO's
    # reference is a second, frozen copy.
    for name in ("sft_step", "dpo_step"):
        e = data[name]
        assert e["param_mb"] == pytest.approx(full_mb, rel=1e-9), name
        assert e["opt_state_mb"] == pytest.approx(2 * full_mb, rel=1e-3), name
    assert data["sft_step"]["frozen_mb"] == 0 and data["dpo_step"]["frozen_mb"] == pytest.approx(full_mb)
    # LoRA (rank 8 by default): A [in, r] and B [r, out] per adapted kernel and layer; the base
    # (also DPO's reference, no second copy) is frozen.
    d, ff, q, kv, r = cfg.d_model, cfg.d_ff, cfg.n_heads * cfg.head_size, cfg.n_kv_heads * cfg.head_size, 8
    adapter_mb = 4 * cfg.n_layers * r * (2 * (d + q) + 2 * (d + kv) + 3 * (d + ff)) / 2**20
    for name in ("lora_sft_step", "lora_dpo_step"):
        e = data[name]
        assert e["param_mb"] == pytest.approx(adapter_mb, rel=1e-9), name
        assert e["opt_state_mb"] == pytest.approx(2 * adapter_mb, rel=1e-3), name
        assert e["frozen_mb"] == pytest.approx(full_mb, rel=1e-9), name
        full = data["sft_step"]
        assert e["param_mb"] + e["opt_state_mb"] < 0.25 * (full["param_mb"] + full["opt_state_mb"])


@pytest.mark.stage
def test_compare_prints_new_over_old_ratios(tiny_run, tmp_path, capsys):
    old_path, old, _ = tiny_run
    capsys.readouterr()
    new = bench.main(TINY + ["--only", "prefill,decode_b2", "--out", str(tmp_path / "new.json"),
                             "--compare", str(old_path)])
    printed = capsys.readouterr().out.split("compared with")[1]
    for name in ("prefill", "decode_b2"):
        line = next(x for x in printed.splitlines() if x.startswith(name))
        ratio = new[name]["tokens_per_s"] / old[name]["tokens_per_s"]
        assert f"{ratio:.3f}x" in line.split()[1]
    assert "sft_step" not in printed  # only what both runs have


def test_published_peak_is_looked_up_by_device_kind():
    assert bench_peer.published_peak("NVIDIA H100 80GB HBM3") == 989e12
    assert bench_peer.published_peak("NVIDIA H200") == 989e12
    assert bench_peer.published_peak("NVIDIA A100-SXM4-40GB") == 312e12
    assert bench_peer.published_peak("TPU v5 lite") == 197e12
    assert bench_peer.published_peak("TPU v5p") == 459e12
    assert bench_peer.published_peak("TPU v6 lite") == 918e12
    assert bench_peer.published_peak("cpu") is None


def test_flops_per_token_matches_xla_cost_analysis():
    # Unrolled layers: XLA's cost analysis counts a while-loop body once, not per trip.
    cfg = ModelConfig(vocab_size=256, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=192,
                      scan_unroll=2)
    params = bench_suite.random_params(cfg, 0)
    tokens = jnp.zeros((4, 32), jnp.int32)
    fwd = jax.jit(lambda p, t: Transformer(cfg).apply({"params": p}, t).logits)
    cost = fwd.lower(params, tokens).compile().cost_analysis()
    if isinstance(cost, list):
        cost = cost[0] if cost else None
    if not cost or "flops" not in cost:
        pytest.skip("XLA reports no cost analysis on this backend")
    assert flops_per_token(cfg, 32) * 4 * 32 == pytest.approx(cost["flops"], rel=0.1)


MEMORY_TINY = ["--memory_only", "--d_model", "64", "--n_layers", "2", "--vocab", "512", "--batch", "2", "--seq", "64",
               "--backend_opt_level", "0"]


@pytest.mark.stage
def test_memory_only_compiles_every_training_step_and_reports_xla_memory_analysis(tmp_path):
    out = tmp_path / "mem.json"
    returned = bench.main(MEMORY_TINY + ["--out", str(out)])
    data = json.loads(out.read_text())
    assert data["memory_only"] and set(bench.MEMORY) <= set(data) and set(bench.MEMORY) <= set(returned)
    for name in bench.MEMORY:
        e = data[name]
        for key in ("argument_mib", "temp_mib", "output_mib", "compile_s", "param_mb", "opt_state_mb"):
            assert positive_finite(e[key]), (name, key, e[key])
        assert "tokens_per_s" not in e  # nothing ran
    # The arguments are the train state (and a frozen reference or base): parameters, AdamW moments, batch.
    e = data["sft_step"]
    assert e["argument_mib"] >= e["param_mb"] + e["opt_state_mb"]
    assert data["dpo_step"]["frozen_mb"] == pytest.approx(e["param_mb"])
    # A value head on the policy trains one trunk; PPO's critic trunk is a second one.
    assert data["ppo_update_value_head"]["param_mb"] < 0.6 * data["ppo_update"]["param_mb"]
    assert data["config"]["seq"] == 64 and data["config"]["batch"] == 2 and data["config"]["remat"] == "none"


def test_memory_only_sees_the_chunked_head_and_blockwise_attention(tmp_path):
    """At 2 x 1,024 tokens over 8,192 words the float32 logits are 64 MiB and one layer's dense
    scores 32 MiB: chunks of 256 tokens and blockwise attention keep neither."""
    shape = ["--memory_only", "--d_model", "64", "--n_layers", "2", "--vocab", "8192", "--batch", "2",
             "--seq", "1024", "--only", "sft_step", "--backend_opt_level", "0", "--out", ""]
    before = bench.main(shape + ["--attention", "xla", "--loss_chunk", str(10**9)])["sft_step"]["temp_mib"]
    after = bench.main(shape + ["--attention", "blockwise", "--loss_chunk", "256"])["sft_step"]["temp_mib"]
    assert before > 64 + 32 and before > 5 * after


def test_qwen3_0_6b_preset_and_shape_flags():
    args = bench.parse_args(["--size", "qwen3_0_6b", "--memory_only", "--seq", "4096", "--batch", "1"])
    cfg = bench.model_config(args)
    assert (cfg.vocab_size, cfg.d_model, cfg.n_layers, cfg.n_heads, cfg.n_kv_heads, cfg.head_size, cfg.d_ff) == \
        (151936, 1024, 28, 16, 8, 128, 3072)
    assert cfg.tie_embeddings and cfg.dtype == "bfloat16" and cfg.remat == "full" and cfg.param_dtype == "float32"
    assert bench.benchmark_names(args) == list(bench.MEMORY)
    args = bench.parse_args(["--size", "qwen3_0_6b", "--head_dim", "64", "--remat", "dots", "--attention", "xla",
                             "--loss_chunk", "512", "--dtype", "float32"])
    cfg = bench.model_config(args)
    assert (cfg.head_size, cfg.remat, cfg.attention, cfg.loss_chunk, cfg.dtype) == (64, "dots", "xla", 512, "float32")


@pytest.mark.stage
def test_accelerator_run_refuses_the_cpu_and_tiny_checks_its_three_runs(tmp_path):
    with pytest.raises(SystemExit, match="no GPU or TPU"):
        accelerator.main(["--out_dir", str(tmp_path)])
    s = accelerator.main(["--tiny", "--out_dir", str(tmp_path)])
    assert json.loads((tmp_path / "summary.json").read_text()) == s
    assert set(s["rows"]) == {"bench/sft_step", "bench/decode_b1", "1b/sft_step", "1b/decode_b1", "1b_memory/sft_step"}
    assert all(positive_finite(r["tokens_per_s"]) for r in s["rows"].values() if "tokens_per_s" in r)
    assert all(r["temp_mib"] > 0 for r in s["rows"].values() if "temp_mib" in r)
    # The real runs: bfloat16 with fused attention, the 1B shape's every entry and its memory.
    real = accelerator.runs(accelerator.parse_args(["--out_dir", str(tmp_path)]))
    assert real["bench"][real["bench"].index("--attention") + 1] == "auto"
    assert bench.parse_args(real["1b"]).only.split(",") == accelerator.ENTRIES_1B.split(",")
    cfg = bench.model_config(bench.parse_args(real["1b_memory"]))
    assert (cfg.d_model, cfg.n_layers, cfg.vocab_size, cfg.dtype, cfg.remat) == (2048, 16, 128256, "bfloat16", "full")
