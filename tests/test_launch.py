"""launch.sh: the Cloud TPU and SLURM commands it prints or submits, the local commands, and `test`'s ruff
then pytest (--fast: without the stage runs)."""
import os
import shlex
import shutil
import stat
import subprocess

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


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


def stub_root(tmp_path, python_body: str):
    """launch.sh in a scratch root whose venv (up to date, so setup installs nothing) has a python
    stub running `python_body`."""
    shutil.copy(os.path.join(ROOT, "launch.sh"), tmp_path / "launch.sh")
    for name in ("requirements.txt", "requirements-test.txt"):
        (tmp_path / name).write_text("")
        os.utime(tmp_path / name, (0, 0))
    exe = tmp_path / ".venv/bin/python"
    exe.parent.mkdir(parents=True)
    exe.write_text(f"#!/bin/bash\n{python_body}\n")
    exe.chmod(exe.stat().st_mode | stat.S_IEXEC)
    (tmp_path / ".venv/.installed").touch()
    (tmp_path / ".venv/.installed-test").touch()
    return tmp_path


def test_test_runs_ruff_then_pytest_and_fast_leaves_out_the_stage_runs(tmp_path):
    root = stub_root(tmp_path, f'echo "$@" >> {tmp_path}/calls')
    launch("test", "--fast", "-k", "sampler", root=str(root))
    launch("test", "-x", root=str(root))
    assert (tmp_path / "calls").read_text().splitlines() == [
        "-m ruff check ptx configs tests bench experiments", "-m pytest -q tests -m not stage -n 2 -k sampler",
        "-m ruff check ptx configs tests bench experiments", "-m pytest -q tests -x"]


def test_a_ruff_finding_fails_the_test_command_before_pytest(tmp_path):
    root = stub_root(tmp_path, f'echo "$@" >> {tmp_path}/calls; [ "$2" != ruff ]')
    out = subprocess.run(["bash", str(root / "launch.sh"), "test", "--fast"], capture_output=True, text=True,
                         timeout=60)
    assert out.returncode != 0
    assert (tmp_path / "calls").read_text().splitlines() == ["-m ruff check ptx configs tests bench experiments"]
