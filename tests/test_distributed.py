"""ptx.distributed: initialize from the config, the environment or not at all; two processes train, run
GRPO and sample, and run best-of-N with a judge and AI feedback like one process."""
import json
import os
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest

from configs import pretrain as pretrain_config
from configs import sample as sample_config
from configs import sft as sft_config
from ptx import checkpoint, distributed
from ptx.stages import sample, supervised

from conftest import assert_rl_metrics_close, assert_trees_close, host_params, read_metrics

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TIMEOUT_S = 240  # per subprocess; a hung coordinator must fail the test, not stall the suite
REWARD_FN = "tests.reward_fns:letter_share"  # dense and known; subprocesses import it too


# Two processes.

def test_distributed_initialize_from_the_config_from_the_environment_or_not_at_all(monkeypatch):
    calls = []
    monkeypatch.setattr(jax.distributed, "initialize", lambda **kw: calls.append(kw))
    monkeypatch.setattr(jax.config, "update", lambda *args: calls.append(args))
    d = sft_config.get_config("tiny").distributed
    distributed.initialize(d)
    assert calls == []  # the default: one process, nothing to join
    d.num_processes, d.process_id = 2, 1
    with pytest.raises(ValueError, match="coordinator"):
        distributed.initialize(d)
    d.coordinator, d.local_device_ids = "10.0.0.1:1234", "0,1"
    distributed.initialize(d)
    assert calls == [("jax_cpu_collectives_implementation", "gloo"),
                     dict(coordinator_address="10.0.0.1:1234", num_processes=2, process_id=1,
                          local_device_ids=[0, 1])]
    calls.clear()
    d = sft_config.get_config("tiny").distributed
    d.auto = True
    distributed.initialize(d)
    assert calls == [("jax_cpu_collectives_implementation", "gloo"), {}]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(args, devices: int, log):
    """`python -m ptx.main ARGS` with `devices` host CPU devices, output to `log`."""
    env = dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS="cpu",
               XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")
    return subprocess.Popen([sys.executable, "-m", "ptx.main", *args], cwd=ROOT, env=env,
                            stdout=log, stderr=subprocess.STDOUT)


def finish(procs, logs):
    """Wait for all; on a failure or timeout kill the rest and show every log's tail."""
    try:
        codes = [p.wait(timeout=TIMEOUT_S) for p in procs]
    except subprocess.TimeoutExpired:
        codes = None
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    if codes is None or any(codes):
        tails = "\n".join(f"--- {log}\n{open(log).read()[-3000:]}" for log in logs)
        pytest.fail(f"exit codes {codes or 'timeout'}\n{tails}")


def run_processes(args, workdir, *, processes: int, devices: int):
    """`python -m ptx.main ARGS --workdir=WORKDIR` as `processes` processes on 127.0.0.1 with
    `devices` host CPU devices each; their logs go to WORKDIR.<i>.log."""
    port = free_port()
    logs = [f"{workdir}.{i}.log" for i in range(processes)]
    procs = []
    for i, log in enumerate(logs):
        joined = [f"--config.distributed.coordinator=127.0.0.1:{port}",
                  f"--config.distributed.num_processes={processes}",
                  f"--config.distributed.process_id={i}"] if processes > 1 else []
        with open(log, "w") as f:
            procs.append(start(args + [f"--workdir={workdir}"] + joined, devices, f))
    finish(procs, logs)


@pytest.mark.stage
def test_two_processes_end_with_the_same_parameters_as_one_process_with_four_devices(sft_file, tmp_path):
    # fsdp spans both processes (each holds half of every sharded parameter, so the
    # checkpoint is complete only if both wrote their part); tensor stays within one.
    args = ["--config=configs/sft.py:tiny", f"--config.data.train={sft_file}",
            f"--config.data.eval={sft_file}", "--config.train.steps=4", "--config.train.log_every=2",
            "--config.train.ckpt_every=2", "--config.train.eval_every=0",
            "--config.mesh.data=1", "--config.mesh.fsdp=2", "--config.mesh.tensor=2"]
    multi, single = tmp_path / "two", tmp_path / "one"
    run_processes(args, multi, processes=2, devices=2)
    run_processes(args, single, processes=1, devices=4)

    assert_trees_close(host_params(multi), host_params(single), rtol=0, atol=1e-6)
    assert checkpoint.resolve(str(multi))[1] == 4
    rows, ref = read_metrics(multi), read_metrics(single)
    # Process 1 writes nothing: one row per logged step, one TensorBoard file.
    assert [r["step"] for r in rows] == [r["step"] for r in ref] == [0, 2, 4]
    assert len(os.listdir(multi / "tb")) == 1
    np.testing.assert_allclose([r["loss"] for r in rows[1:]] + [rows[-1]["eval/loss"]],
                               [r["loss"] for r in ref[1:]] + [ref[-1]["eval/loss"]], rtol=1e-5)
    assert json.load(open(multi / "config.json"))["distributed"]["num_processes"] == 2


@pytest.mark.stage
def test_two_processes_run_grpo_and_sample_like_one_process_with_four_devices(rl_models, sft_file, tmp_path):
    # Every process samples, decodes and scores the whole rollout but puts only its own
    # rows on the mesh; fsdp spans the processes, tensor stays within one.
    args = ["--config=configs/grpo.py:tiny", f"--config.data.train={rl_models['prompts']}",
            f"--config.init.checkpoint={rl_models['sft']}", "--config.reward.source=function",
            f"--config.reward.function={REWARD_FN}", "--config.train.steps=2",
            "--config.mesh.data=1", "--config.mesh.fsdp=2", "--config.mesh.tensor=2"]
    multi, single = tmp_path / "two", tmp_path / "one"
    run_processes(args, multi, processes=2, devices=2)
    run_processes(args, single, processes=1, devices=4)

    params = host_params(multi)
    assert_trees_close(params, host_params(single), rtol=0, atol=1e-6)
    moved = jax.tree_util.tree_map(lambda a, b: np.abs(a - b).max(), params, host_params(rl_models["sft"]))
    assert max(jax.tree_util.tree_leaves(moved)) > 1e-4  # the policy learned something
    rows, ref = read_metrics(multi), read_metrics(single)
    # Process 1 writes nothing: one metrics row and one samples row per iteration.
    assert [r["step"] for r in rows] == [r["step"] for r in ref] == [1, 1, 2, 2]
    assert len(os.listdir(multi / "tb")) == 1
    # RL counts the sampled tokens, under a name apart from the supervised input tokens/s.
    assert "completion_tokens_per_s" in rows[0] and "tokens_per_s" not in rows[0]
    assert_rl_metrics_close(rows, ref, rtol=1e-5, atol=1e-6)

    # The sample stage in two processes writes what one process with all 8 devices writes.
    sample_args = ["--config=configs/sample.py:tiny", f"--config.checkpoint={multi}", f"--config.prompts={sft_file}"]
    run_processes(sample_args, tmp_path / "sample2", processes=2, devices=2)
    c = sample_config.get_config("tiny")
    c.checkpoint, c.prompts = str(multi), sft_file
    sample.run(c, str(tmp_path / "sample8"))
    samples = (tmp_path / "sample2" / "samples.jsonl").read_text()
    assert samples == (tmp_path / "sample8" / "samples.jsonl").read_text()
    assert len(samples.splitlines()) == 64


@pytest.fixture(scope="module")
def judge_dir(tmp_path_factory):
    """A language model whose tokenizer has the judge's verdict tokens: pre-trained (briefly) on the
    world's corpus, whose review lines end in " A" / " B", as the quickstart's judge is."""
    d = tmp_path_factory.mktemp("judge")
    c = pretrain_config.get_config("tiny")
    c.train.steps, c.train.eval_every = 2, 0
    supervised.run(c, str(d))
    return str(d)


@pytest.mark.stage
def test_two_processes_run_best_of_n_with_a_judge_and_ai_feedback_like_one_process(rl_models, judge_dir, sft_file,
                                                                                 tmp_path):
    # The judge (here best-of-N's reward source, then the AI-feedback labeller) places every
    # chunk by the sampler's rule: each process holds all rows and puts its devices' share on
    # the mesh; process 0 writes the files.
    mesh = ["--config.mesh.data=1", "--config.mesh.fsdp=2", "--config.mesh.tensor=2"]
    runs = {
        "bon": (["--config=configs/best_of_n.py:tiny", f"--config.checkpoint={rl_models['sft']}",
                 f"--config.prompts={sft_file}", "--config.reward.source=judge",
                 f"--config.reward.checkpoint={judge_dir}"], ("candidates.jsonl", "results.json")),
        "aif": (["--config=configs/ai_feedback.py:tiny", f"--config.policy_checkpoint={rl_models['sft']}",
                 f"--config.judge_checkpoint={judge_dir}", f"--config.data.train={sft_file}",
                 "--config.judge.threshold=0.5"], ("preferences.jsonl", "stats.json")),
    }
    for name, (args, outputs) in runs.items():
        run_processes(args + mesh, tmp_path / f"{name}2", processes=2, devices=2)
        run_processes(args + mesh, tmp_path / f"{name}1", processes=1, devices=4)
        for out in outputs:
            two, one = (tmp_path / f"{name}2" / out).read_text(), (tmp_path / f"{name}1" / out).read_text()
            assert two == one, (name, out)
    candidates = [json.loads(line) for line in open(tmp_path / "bon2" / "candidates.jsonl")]
    assert len(candidates) == 64 * 4 and len({c["score"] for c in candidates}) > 10
    stats = json.load(open(tmp_path / "aif2" / "stats.json"))
    assert stats["n_pairs"] > 0 and stats["n_kept"] == stats["n_pairs"]
