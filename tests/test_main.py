"""`python -m ptx.main` as a user meets it: an error the user can fix (flags, config, data, a
path) is exit code 2 and one line on stderr, `ptx: error: <field or file>: <problem>`, and a
config error writes nothing; `--verbose` shows the traceback; stop strings come from flags."""
import json
import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from ptx import checkpoint

# Every test here runs a stage end to end (see pyproject.toml's markers).
pytestmark = pytest.mark.stage

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TIMEOUT_S = 240


def ptx(*args, cwd=ROOT):
    return subprocess.run([sys.executable, "-m", "ptx.main", *args], cwd=cwd, capture_output=True, text=True,
                          env=dict(os.environ, PYTHONPATH=ROOT), timeout=TIMEOUT_S)


def logged(workdir) -> list[dict]:
    """metrics.jsonl without its timings."""
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [{k: v for k, v in json.loads(line).items() if k != "tokens_per_s"} for line in f]


def assert_user_error(out, line: str):
    """Exit code 2 and exactly `line` on stderr (`line` may end in '...': a prefix)."""
    lines = out.stderr.strip().splitlines()
    assert out.returncode == 2 and len(lines) == 1, out.stderr
    if line.endswith("..."):
        assert lines[0].startswith(line[:-3]), lines[0]
    else:
        assert lines[0] == line


SFT, SAMPLE = "--config=configs/sft.py:tiny", "--config=configs/sample.py:tiny"
CASES = {
    # The cases: sampling lengths, batch sizes and steps, a mistyped field.
    "max_new_tokens_0": ([SAMPLE, "--config.checkpoint=runs/x", "--config.prompt=hi",
                          "--config.sampling.max_new_tokens=0"],
                         "sampling.max_new_tokens: needs a positive integer, got 0"),
    "max_new_tokens_negative": ([SAMPLE, "--config.checkpoint=runs/x", "--config.prompt=hi",
                                 "--config.sampling.max_new_tokens=-3"],
                                "sampling.max_new_tokens: needs a positive integer, got -3"),
    "empty_stop_string": ([SAMPLE, "--config.checkpoint=runs/x", "--config.prompt=hi", "--config.sampling.stop="],
                          "sampling.stop: needs a tuple of non-empty strings..."),
    "batch_size_negative": ([SFT, "--config.train.batch_size=-8"],
                            "train.batch_size: needs a positive integer, got -8"),
    "batch_size_0": ([SFT, "--config.train.batch_size=0"], "train.batch_size: needs a positive integer, got 0"),
    "steps_negative": ([SFT, "--config.train.steps=-5"], "train.steps: needs a positive integer, got -5"),
    "mistyped_field": ([SFT, "--config.train.stepss=3"],
                       "--config.train.stepss: no field 'stepss'; did you mean 'steps'?"),
    "mistyped_section": ([SFT, "--config.trian.steps=3"],
                         "--config.trian.steps: no field 'trian'; did you mean 'train'?"),
    # More: flags, config files, ranges, divisibility, cross-field rules, paths.
    "unknown_flag": ([SFT, "--workdirr=x"], "--workdirr: Unknown command line flag 'workdirr'..."),
    "not_an_int": ([SFT, "--config.train.steps=abc"],
                   "--config.train.steps=abc: invalid literal for int() with base 10: 'abc'"),
    "no_config_file": (["--config=configs/nope.py"],
                       "--config=configs/nope.py: No such file or directory: 'configs/nope.py'"),
    "config_arg": (["--config=configs/sft.py:size=huge"], "--config=configs/sft.py:size=huge: unknown model size..."),
    "lr_negative": ([SFT, "--config.optim.lr=-0.1"], "optim.lr: needs a finite number > 0, got -0.1"),
    "top_p_0": ([SAMPLE, "--config.checkpoint=runs/x", "--config.prompt=hi", "--config.sampling.top_p=0.0"],
                "sampling.top_p: needs a number in (0, 1], got 0.0"),
    "prompt_longer_than_row": ([SFT, "--config.data.max_prompt_len=64"],
                               "data.max_prompt_len: 64 leaves no room for the response in data.max_len=64; "
                               "needs < data.max_len"),
    "accumulation": ([SFT, "--config.optim.accum_steps=3"],
                     "optim.accum_steps: 3 does not divide train.batch_size=8"),
    "batch_vs_devices": ([SFT, "--config.train.batch_size=12"],
                         "train.batch_size: train.batch_size = 12 must be a multiple of the 8 data-parallel devices "
                         "of the mesh (mesh.data x mesh.fsdp)"),
    "rollout_vs_minibatch": (["--config=configs/grpo.py:tiny", "--config.init.checkpoint=runs/x",
                              "--config.rl.minibatch_size=24"],
                             "rl.rollout_batch: rl.rollout_batch x rl.group_size = 16 is not a multiple of "
                             "rl.minibatch_size=24"),
    "dpo_beta": (["--config=configs/dpo.py:tiny", "--config.dpo.beta=0"], "dpo.beta: 0.0 must be positive"),
    "sft_on_preferences": ([SFT, "--config.data.kind=preference"],
                           "data.kind: stage 'sft' trains on sft or text data, not 'preference'"),
    "lora_without_base": ([SFT, "--config.lora.rank=4"],
                          "lora.rank: LoRA trains adapters on a base: set init.checkpoint or init.hf_dir"),
    "required": (["--config=configs/grpo.py:tiny"],
                 "init.checkpoint: stage 'grpo' needs --config.init.checkpoint or --config.init.hf_dir"),
    "quickstart_sub_stage": (["--config=configs/quickstart.py:tiny", "--config.dpo.train.steps=0"],
                             "dpo.train.steps: needs a positive integer, got 0"),
    "mesh": ([SFT, "--config.mesh.data=3"], "mesh: {'data': 3, 'fsdp': 1, 'tensor': 1} needs 3 devices, 8 available"),
    "missing_data_file": ([SFT, "--config.data.train=nope/train.jsonl"],
                          "data.train: nope/train.jsonl: no such file"),
    "missing_checkpoint": ([SAMPLE, "--config.checkpoint=nope", "--config.prompt=hi"],
                           "checkpoint: no ptx checkpoint under nope"),
    "hf_dir_without_config": ([SFT, "--config.init.hf_dir=configs"],
                              "init.hf_dir: configs: no config.json; expected a Hugging Face model directory"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_a_config_error_is_one_line_exit_2_and_writes_nothing(tmp_path, case):
    args, line = CASES[case]
    workdir = tmp_path / "run"
    assert_user_error(ptx(*args, f"--workdir={workdir}"), f"ptx: error: {line}")
    assert not workdir.exists()


def test_a_bad_data_file_is_one_line_naming_file_line_and_field(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "hi", "completion": "yo"}\n{"prompt": "hi", "completion": 3}\n')
    out = ptx(SFT, f"--workdir={tmp_path / 'run'}", f"--config.data.train={bad}")
    assert_user_error(out, f"ptx: error: {bad}: row 1: field 'completion': expected str, got int")
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"prompt": "hi", "completion": "yo"}\n{"prompt": "hi",\n')
    out = ptx(SFT, f"--workdir={tmp_path / 'run2'}", f"--config.data.train={broken}")
    assert_user_error(out, f"ptx: error: {broken}: line 2: invalid JSON...")


@pytest.mark.parametrize("text,problem", [("{\"hidden_size\": 64", "malformed JSON"),
                                          ("{\"architectures\": [\"LlamaForCausalLM\"], \"hidden_size\": 64}",
                                           "field 'vocab_size' missing")])
def test_a_broken_hf_config_json_is_one_line_naming_the_file_and_field(tmp_path, text, problem):
    hf_dir = tmp_path / "hf"
    hf_dir.mkdir()
    (hf_dir / "config.json").write_text(text)
    out = ptx(SFT, f"--workdir={tmp_path / 'run'}", f"--config.init.hf_dir={hf_dir}")
    assert_user_error(out, f"ptx: error: {hf_dir / 'config.json'}...")
    assert problem in out.stderr


def test_verbose_shows_the_traceback_of_a_user_error(tmp_path):
    out = ptx(SFT, f"--workdir={tmp_path}", "--config.train.steps=-5", "--verbose")
    assert out.returncode != 0 and "Traceback" in out.stderr
    assert "ConfigError: train.steps: needs a positive integer, got -5" in out.stderr
    out = ptx(SFT, f"--workdir={tmp_path}", "--config.train.stepss=3", "--verbose")
    assert out.returncode != 0 and "Traceback" in out.stderr and "Did you mean" in out.stderr


def test_stop_strings_come_from_the_command_line(sft_dir, tmp_path):
    # A tuple field: a Python tuple literal (its escapes read as in Python), or one string.
    out = ptx(SAMPLE, f"--workdir={tmp_path / 's'}", f"--config.checkpoint={sft_dir}", "--config.prompt=What is 2 + 3?",
              "--config.sampling.stop=('\\n\\nHuman:', '###')", "--config.sampling.max_new_tokens=4",
              "--config.sampling.temperature=0.0")
    assert out.returncode == 0, out.stderr
    with open(tmp_path / "s" / "config.json") as f:
        assert json.load(f)["sampling"]["stop"] == ["\n\nHuman:", "###"]
    with open(tmp_path / "s" / "samples.jsonl") as f:
        assert [json.loads(line)["finish_reason"] in ("eos", "stop", "length") for line in f] == [True]
    out = ptx(SAMPLE, f"--workdir={tmp_path / 't'}", f"--config.checkpoint={sft_dir}", "--config.prompt=hi",
              "--config.sampling.stop=###", "--config.sampling.max_new_tokens=2")
    assert out.returncode == 0, out.stderr
    with open(tmp_path / "t" / "config.json") as f:
        assert json.load(f)["sampling"]["stop"] == ["###"]


def test_a_non_finite_loss_is_one_line_and_exit_1(tmp_path):
    out = ptx(SFT, f"--workdir={tmp_path}", "--config.optim.lr=1e30", "--config.optim.warmup_steps=0",
              "--config.train.steps=3", "--config.train.log_every=1", "--config.train.ckpt_every=0")
    assert out.returncode == 1 and "Traceback" not in out.stderr, out.stderr
    assert out.stderr.strip().splitlines()[-1] == (
        "ptx: error: non-finite loss or gradient before step 2; the run stopped and no checkpoint of this run "
        "was written yet (lower optim.lr or check the data)")


def test_kill_9_mid_run_then_the_same_command_gives_the_same_parameters_and_metrics(tmp_path):
    args = [SFT, "--config.train.steps=40", "--config.train.log_every=2", "--config.train.ckpt_every=3",
            "--config.train.eval_every=0"]
    assert ptx(*args, f"--workdir={tmp_path / 'straight'}").returncode == 0
    killed = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "-m", "ptx.main", *args, f"--workdir={killed}"], cwd=ROOT,
                            env=dict(os.environ, PYTHONPATH=ROOT), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    # SIGKILL once steps past a checkpoint are logged (10 > 9): those lines must not stay.
    deadline = time.time() + TIMEOUT_S
    while time.time() < deadline and proc.poll() is None:
        try:
            if any(r["step"] >= 10 for r in logged(killed)):
                break
        except (FileNotFoundError, json.JSONDecodeError):  # not written yet, or a line half written
            pass
        time.sleep(0.02)
    assert proc.poll() is None, "the run ended before it could be killed"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert checkpoint.resolve(str(killed))[1] < 40
    out = ptx(*args, f"--workdir={killed}")
    assert out.returncode == 0, out.stderr
    assert logged(killed) == logged(tmp_path / "straight")
    jax.tree_util.tree_map(np.testing.assert_array_equal, *(jax.device_get(checkpoint.load_params(str(d))[0])
                                                            for d in (tmp_path / "straight", killed)))


# The run a preempted or doubly started one must equal: 60 steps, checkpoints every 3.
LONG = [SFT, "--config.train.steps=60", "--config.train.log_every=2", "--config.train.ckpt_every=3",
        "--config.train.eval_every=0"]


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("straight")
    out = ptx(*LONG, f"--workdir={workdir}")
    assert out.returncode == 0, out.stderr
    return workdir


def start(workdir) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "ptx.main", *LONG, f"--workdir={workdir}"], cwd=ROOT,
                            env=dict(os.environ, PYTHONPATH=ROOT), stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)


def wait_for(proc, ready, what: str):
    deadline = time.time() + TIMEOUT_S
    while time.time() < deadline and proc.poll() is None:
        try:
            if ready():
                return
        except (FileNotFoundError, json.JSONDecodeError):  # not written yet, or a line half written
            pass
        time.sleep(0.02)
    raise AssertionError(f"the run ended before {what}")


def same_params(a, b):
    jax.tree_util.tree_map(np.testing.assert_array_equal, *(jax.device_get(checkpoint.load_params(str(d))[0])
                                                            for d in (a, b)))


def test_a_second_run_on_a_busy_workdir_is_refused_and_the_first_loses_nothing(straight, tmp_path):
    first = start(tmp_path)
    lock = tmp_path / ".ptx.lock"
    wait_for(first, lambda: len(lock.read_text().split()) == 2, "it took the workdir's lock")
    second = ptx(*LONG, f"--workdir={tmp_path}")
    assert first.poll() is None, "the first run ended before the second one started"
    host = lock.read_text().split()[0]
    assert_user_error(second, f"ptx: error: {tmp_path}: in use by another run (host {host}, pid {first.pid}); "
                              f"wait for it to end or choose another --workdir")
    assert first.wait() == 0, first.stderr.read()
    assert logged(tmp_path) == logged(straight)
    assert sorted(os.listdir(tmp_path / "checkpoints")) == sorted(os.listdir(straight / "checkpoints"))
    same_params(straight, tmp_path)


def test_sigterm_mid_run_checkpoints_the_step_and_the_same_command_resumes_it(straight, tmp_path):
    proc = start(tmp_path)
    wait_for(proc, lambda: any(r["step"] >= 10 for r in logged(tmp_path)), "it could be stopped")
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(TIMEOUT_S) == 3
    step = checkpoint.resolve(str(tmp_path))[1]
    assert proc.stderr.read().strip().splitlines()[-1] == (
        f"ptx: stopped by SIGTERM at step {step}; checkpoint written; rerun the same command to resume")
    assert 10 <= step < 60
    assert logged(tmp_path)[-1]["step"] <= step
    out = ptx(*LONG, f"--workdir={tmp_path}")
    assert out.returncode == 0, out.stderr
    assert logged(tmp_path) == logged(straight)
    same_params(straight, tmp_path)
