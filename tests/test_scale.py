"""Scale out: two processes train, run GRPO and sample like one, PPO runs alike on every
mesh, checkpoints move between meshes, state shardings follow the rules, activations
are constrained under a mesh, and the launcher's Cloud TPU and SLURM commands."""
import json
import os
import shlex
import shutil
import socket
import stat
import subprocess
import sys

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from configs import ppo as ppo_config
from configs import pretrain as pretrain_config
from configs import reward as reward_config
from configs import sample as sample_config
from configs import sft as sft_config
from ptx import checkpoint, distributed, optim, sharding, steps
from ptx.model import ModelConfig, Transformer, abstract_params, init_cache, init_params
from ptx.stages import rl, sample, supervised

from conftest import assert_trees_close, host_params, read_metrics

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TIMEOUT_S = 240  # per subprocess; a hung coordinator must fail the test, not stall the suite
REWARD_FN = "tests.reward_fns:letter_share"  # dense and known; subprocesses import it too


@pytest.fixture(scope="module")
def sft_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "sft.jsonl"
    rng = np.random.default_rng(0)
    with open(path, "w") as f:
        for _ in range(64):
            a, b = rng.integers(0, 10, 2)
            f.write(json.dumps({"prompt": f"What is {a} + {b}?", "completion": f"{a} + {b} = {a + b}."}) + "\n")
    return str(path)


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


def assert_rl_metrics_close(rows, ref, *, rtol, atol, label=""):
    """The same logged samples (so the same sampled tokens, texts and scores) and close metrics."""
    assert [r["step"] for r in rows] == [r["step"] for r in ref], label
    assert [r for r in rows if "samples" in r] == [r for r in ref if "samples" in r], label
    for row, expected in zip(rows, ref):
        for k in expected.keys() - {"step", "samples", "completion_tokens_per_s"}:
            # A clip fraction counts ties (a value or ratio at its old value) that float
            # rounding breaks either way: a few of the 256 tokens may flip.
            tol = 0.02 if k.endswith("clipfrac") else atol
            np.testing.assert_allclose(row[k], expected[k], rtol=rtol, atol=tol, err_msg=f"{label} {k}")


@pytest.fixture(scope="module")
def rl_models(tmp_path_factory):
    """A tiny SFT policy and a reward model trained on top of it (the PPO critic too)."""
    d = tmp_path_factory.mktemp("rl")
    rng = np.random.default_rng(1)
    with open(d / "pref.jsonl", "w") as f:
        for _ in range(32):
            a, b = rng.integers(0, 10, 2)
            f.write(json.dumps({"prompt": f"What is {a} + {b}?", "chosen": f"{a} + {b} = {a + b}.",
                                "rejected": f"{a} + {b} = {a + b + 1}. Sorry."}) + "\n")
    # On the embedded world: its corpus gives the tokenizer every piece of the model's vocabulary.
    c = sft_config.get_config("tiny")
    c.train.steps, c.train.eval_every = 10, 0
    supervised.run(c, str(d / "sft"))
    r = reward_config.get_config("tiny")
    r.data.train, r.init.checkpoint, r.train.steps, r.train.eval_every = str(d / "pref.jsonl"), str(d / "sft"), 4, 0
    supervised.run(r, str(d / "rm"))
    return {"sft": str(d / "sft"), "rm": str(d / "rm"), "prompts": str(d / "sft" / "world" / "sft.jsonl")}


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


# Every mesh alike.

def ppo(rl_models, mesh, old_logprobs="sampler"):
    c = ppo_config.get_config("tiny")
    c.data.train = rl_models["prompts"]
    # The critic starts from the reward model, so the update trains two parameter trees.
    c.init.checkpoint, c.reward.checkpoint, c.rl.critic = rl_models["sft"], rl_models["rm"], "reward"
    c.train.steps, c.train.ckpt_every = 2, 0
    c.rl.old_logprobs = old_logprobs
    c.mesh.data, c.mesh.fsdp, c.mesh.tensor = mesh
    return c


# The sampler's old log-probs come from the decode program, whose reductions each mesh splits
# differently (rounding ~1e-6); AdamW's normalised step turns such rounding in a near-zero
# gradient into a visible difference (2.6e-5 seen), still far below one step of lr 3e-4.
@pytest.mark.parametrize("old_logprobs,param_atol", [("forward", 2e-5), ("sampler", 1e-4)])
def test_ppo_gives_the_same_samples_metrics_and_parameters_on_every_mesh_as_on_one_device(
        rl_models, tmp_path, old_logprobs, param_atol):
    rl.run(ppo(rl_models, (1, 1, 1), old_logprobs), str(tmp_path / "one"), devices=jax.devices()[:1])
    ref, ref_params = read_metrics(tmp_path / "one"), host_params(tmp_path / "one")
    assert ref[0]["objective/scores"] != 0 and ref[0]["loss/value"] > 0
    for mesh in [(8, 1, 1), (1, 8, 1), (2, 2, 2), (1, 2, 4)]:
        workdir = tmp_path / "x".join(map(str, mesh))
        rl.run(ppo(rl_models, mesh, old_logprobs), str(workdir))
        assert_rl_metrics_close(read_metrics(workdir), ref, rtol=1e-4, atol=1e-5, label=mesh)
        assert_trees_close(host_params(workdir), ref_params, atol=param_atol)


def constraints(jaxpr) -> list:
    """(operand shape, PartitionSpec) of every sharding constraint, nested jaxprs included."""
    found = []
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "sharding_constraint":
            found.append((eqn.invars[0].aval.shape, eqn.params["sharding"].spec))
        for value in eqn.params.values():
            inner = getattr(value, "jaxpr", value)
            if hasattr(inner, "eqns"):
                found += constraints(inner)
    return found


def test_the_model_constrains_activations_and_kv_cache_under_a_mesh_and_not_without():
    cfg = ModelConfig(**dict(sft_config.get_config("tiny").model))  # d 64, 2 kv heads of 16, 2 layers
    params = jax.eval_shape(lambda: init_params(cfg, jax.random.PRNGKey(0)))
    tokens = jax.ShapeDtypeStruct((8, 4), np.int32)
    cache = jax.eval_shape(lambda: init_cache(cfg, 8, 6))
    forward = lambda p, t, c: Transformer(cfg).apply({"params": p}, t, cache=c)
    found = lambda: sorted(constraints(jax.make_jaxpr(forward)(params, tokens, cache).jaxpr), key=str)
    assert found() == []
    batch = ("data", "fsdp")
    for mesh, kv_heads in [((2, 2, 2), "tensor"), ((1, 2, 4), None)]:  # 2 kv heads do not split 4 ways
        with jax.set_mesh(sharding.make_mesh(dict(zip(sharding.AXES, mesh)))):
            expected = [((512, 64), P("tensor", None)),  # the embedding table, FSDP-gathered for the lookup
                        ((8, 4, 64), P(batch, None, None)),  # the looked-up rows
                        ((8, 4, 64), P(batch, None, None)),  # the residual stream after each (scanned) block
                        ((2, 8, 2, 6, 16), P(None, batch, kv_heads, None, None)),  # keys
                        ((2, 8, 2, 6, 16), P(None, batch, kv_heads, None, None))]  # values
            assert found() == sorted(expected, key=str), mesh


# Checkpoints across meshes.

def sft(sft_file, mesh, steps_):
    c = sft_config.get_config("tiny")
    c.data.train = sft_file
    c.train.steps, c.train.log_every, c.train.eval_every, c.train.ckpt_every = steps_, 1, 0, 2
    # A learning rate that does not depend on train.steps: 2 steps then 1 more equal 3 straight.
    c.optim.schedule, c.optim.warmup_steps = "constant", 0
    c.mesh.data, c.mesh.fsdp, c.mesh.tensor = mesh
    return c


def test_checkpoint_from_a_2x2x2_mesh_restores_and_resumes_on_8x1x1_and_on_one_device(sft_file, tmp_path):
    saved = tmp_path / "2x2x2"
    supervised.run(sft(sft_file, (2, 2, 2), 2), str(saved))
    supervised.run(sft(sft_file, (2, 2, 2), 3), str(tmp_path / "straight"))

    cfg = ModelConfig(**checkpoint.read_meta(str(saved))["model"])
    ref = host_params(saved)  # onto the first device
    for mesh, devices in [((8, 1, 1), None), ((2, 2, 2), None), ((1, 1, 1), jax.devices()[:1])]:
        on = sharding.make_mesh(dict(zip(sharding.AXES, mesh)), devices)
        shardings = sharding.param_shardings(abstract_params(cfg), cfg, on)
        params, _ = checkpoint.load_params(str(saved), on)
        for p, s in zip(jax.tree_util.tree_leaves(params), jax.tree_util.tree_leaves(shardings)):
            assert p.sharding.is_equivalent_to(s, p.ndim), (p.sharding, s)
        assert_trees_close(jax.device_get(params), ref, rtol=0, atol=0)

    # The whole train state (optimiser moments too) resumes on another mesh.
    for mesh, devices in [((8, 1, 1), None), ((1, 1, 1), jax.devices()[:1])]:
        resumed = tmp_path / "x".join(map(str, mesh))
        shutil.copytree(saved, resumed)
        supervised.run(sft(sft_file, mesh, 3), str(resumed), devices=devices)
        # The resumed run's log is the uninterrupted run's, line for line (the data row once, at 0).
        rows, ref = read_metrics(resumed), read_metrics(tmp_path / "straight")
        assert [sorted(r) for r in rows] == [sorted(r) for r in ref]
        assert [r["step"] for r in rows if "data/rows" in r] == [0]
        np.testing.assert_allclose([r.get("loss", 0) for r in rows], [r.get("loss", 0) for r in ref], rtol=1e-5)
        assert_trees_close(host_params(resumed), host_params(tmp_path / "straight"), atol=2e-5)


def test_parameter_and_optimizer_state_shardings_follow_the_rules_on_a_2x2x2_mesh():
    # The lines of supervised.run that build the sharded state.
    c = sft_config.get_config("tiny")
    c.mesh.data, c.mesh.fsdp, c.mesh.tensor = 2, 2, 2
    cfg = ModelConfig(**dict(c.model))
    mesh = sharding.make_mesh(c.mesh)
    rules = sharding.param_rules(cfg)
    abstract_params = jax.eval_shape(lambda: init_params(cfg, jax.random.PRNGKey(0)))
    param_shardings = sharding.named(mesh, sharding.tree_specs(abstract_params, rules, mesh, strict=True))
    tx, _ = optim.make_optimizer(c.optim, c.train.steps)
    abstract_state = jax.eval_shape(lambda p: steps.init_state(p, tx), abstract_params)
    state_shardings = sharding.named(mesh, sharding.tree_specs(abstract_state, rules, mesh, strict=False))
    state_shardings = state_shardings.replace(params=param_shardings)
    params = jax.jit(lambda r: init_params(cfg, r), out_shardings=param_shardings)(jax.random.PRNGKey(0))
    state = jax.jit(lambda p: steps.init_state(p, tx), out_shardings=state_shardings)(params)
    leaves = {sharding.path_str(path): leaf for path, leaf in jax.tree_util.tree_leaves_with_path(state)}

    # name -> (spec, shape of one device's shard); tiny: vocab 512, d 64, 4 heads (2 kv) of 16, ff 192, 2 layers.
    expected = {
        "embed/embedding": (P("tensor", "fsdp"), (256, 32)),
        "layers/attn/q/kernel": (P(None, "fsdp", "tensor", None), (2, 32, 2, 16)),
        "layers/attn/k/kernel": (P(None, "fsdp", "tensor", None), (2, 32, 1, 16)),
        "layers/attn/o/kernel": (P(None, "tensor", None, "fsdp"), (2, 2, 16, 32)),
        "layers/gate/kernel": (P(None, "fsdp", "tensor"), (2, 32, 96)),
        "layers/down/kernel": (P(None, "tensor", "fsdp"), (2, 96, 32)),
        "layers/attn_norm/scale": (P(None, None), (2, 64)),
        "final_norm/scale": (P(None), (64,)),
    }
    for name, (spec, shard) in expected.items():
        # The Adam moments of a parameter are laid out like the parameter.
        for owner in ("params", "mu", "nu"):
            [path] = [n for n in leaves if n.endswith(f"{owner}/{name}")]
            assert leaves[path].sharding.spec == spec, (path, leaves[path].sharding.spec)
            assert leaves[path].addressable_shards[0].data.shape == shard, path
    counters = [n for n in leaves if n == "step" or n.endswith("/count")]
    assert len(counters) >= 2  # the step and Adam's count at least
    for name in counters:
        assert leaves[name].sharding.spec == P() and leaves[name].sharding.is_fully_replicated, name


# The launcher.

def launch(*args, root=ROOT, env=None):
    out = subprocess.run(["bash", os.path.join(root, "launch.sh"), *args], capture_output=True,
                         text=True, timeout=60, env=dict(os.environ, **(env or {})))
    assert out.returncode == 0, out.stderr
    return out.stdout


def test_tpu_dry_run_copies_the_repo_to_every_worker_and_starts_the_config_there():
    lines = launch("--dry-run", "--tpu", "mytpu", "--zone", "us-central2-b",
                   "configs/sft.py", "--config.train.steps=5").splitlines()
    where = ["--zone=us-central2-b", "--worker=all"]
    mkdir, scp, ssh = [shlex.split(line) for line in lines]
    assert mkdir == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "mytpu", *where, "--command=mkdir -p ~/ptx"]
    assert scp[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "scp", "--recurse"]
    assert scp[-3:] == ["mytpu:~/ptx/", *where]
    sources = set(scp[6:-3])
    assert {"launch.sh", "requirements.txt", "configs", "ptx"} <= sources
    assert not sources & {".venv", "runs", ".git"}
    assert ssh == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "mytpu", *where,
                   "--command=cd ~/ptx && export PTX_JAX_EXTRA=tpu && ./launch.sh setup && "
                   "./launch.sh configs/sft.py --config.train.steps=5 --config.distributed.auto=True"]
    with_project = launch("--dry-run", "--tpu", "mytpu", "--zone", "z", "--project", "p", "configs/sft.py")
    assert all("--project=p" in shlex.split(line) for line in with_project.splitlines())


def test_slurm_dry_run_builds_the_venv_and_prints_the_sbatch_script_that_sruns_on_every_node():
    out = launch("--dry-run", "--slurm", "--nodes", "2", "--gpus-per-node", "8", "configs/sft.py:tiny",
                 "--config.train.steps=5", "--config.prompt=What is 2 + 3?")
    setup, header, *script, submit = out.splitlines()
    # The shared venv is built once, at submission, before any task starts.
    assert shlex.split(setup) == ["env", "PTX_JAX_EXTRA=cuda12", "./launch.sh", "setup"]
    assert header == "# runs/slurm/sft.sbatch"
    assert shlex.split(submit) == ["sbatch", "runs/slurm/sft.sbatch"]
    assert script[0] == "#!/bin/bash"
    directives = [line for line in script if line.startswith("#SBATCH")]
    assert {"#SBATCH --nodes=2", "#SBATCH --ntasks-per-node=8", "#SBATCH --gpus-per-node=8"} <= set(directives)
    # sbatch reads directives only up to the first command.
    first_command = next(i for i, line in enumerate(script) if line and not line.startswith("#"))
    assert script.index(directives[-1]) < first_command
    assert f"cd {ROOT}" in script and "export PTX_JAX_EXTRA=cuda12" in script
    assert shlex.split(script[-1]) == ["srun", "./launch.sh", "configs/sft.py:tiny", "--config.train.steps=5",
                                       "--config.prompt=What is 2 + 3?", "--config.distributed.auto=True"]


def test_slurm_writes_the_script_and_submits_it(tmp_path):
    # The launcher in a scratch root with an up-to-date venv stub (so setup is a no-op),
    # and an sbatch that records what it got.
    shutil.copy(os.path.join(ROOT, "launch.sh"), tmp_path / "launch.sh")
    (tmp_path / "requirements.txt").write_text("")
    os.utime(tmp_path / "requirements.txt", (0, 0))
    stubs = {".venv/bin/python": "exit 1", "bin/sbatch": f'echo "$@" > {tmp_path}/submitted'}
    for name, body in stubs.items():
        exe = tmp_path / name
        exe.parent.mkdir(parents=True, exist_ok=True)
        exe.write_text(f"#!/bin/bash\n{body}\n")
        exe.chmod(exe.stat().st_mode | stat.S_IEXEC)
    (tmp_path / ".venv/.installed").touch()
    out = launch("--slurm", "configs/sft.py", root=str(tmp_path),
                 env={"PATH": f"{tmp_path / 'bin'}:{os.environ['PATH']}"})
    assert out == ""
    assert (tmp_path / "submitted").read_text().split() == ["runs/slurm/sft.sbatch"]
    script = (tmp_path / "runs/slurm/sft.sbatch").read_text().splitlines()
    assert "#SBATCH --nodes=1" in script and "#SBATCH --ntasks-per-node=1" in script
    assert not any("--gpus-per-node" in line for line in script)
    assert shlex.split(script[-1]) == ["srun", "./launch.sh", "configs/sft.py", "--config.distributed.auto=True"]


def test_local_commands_are_unchanged_and_dry_run_needs_a_cluster():
    assert "./launch.sh CONFIG [flags]" in launch("--help")
    out = subprocess.run(["bash", os.path.join(ROOT, "launch.sh"), "--dry-run", "configs/sft.py"],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode != 0 and "--tpu or --slurm" in out.stderr
