"""The run scaffold's guards: one run per workdir (an OS lock that names its holder), a workdir
that cannot be written refused before anything runs, and a killed run's unfinished checkpoint
folders removed on resume."""
import os
import socket

import pytest

from ptx import checkpoint
from ptx.stages import scaffold


def test_a_second_lock_on_a_workdir_is_refused_naming_the_holders_host_and_pid(tmp_path):
    workdir = str(tmp_path / "run")
    with scaffold.lock_workdir(workdir):
        with pytest.raises(scaffold.RunError) as e:
            with scaffold.lock_workdir(workdir):
                pass
    assert str(e.value) == (f"{workdir}: in use by another run (host {socket.gethostname()}, pid {os.getpid()}); "
                            f"wait for it to end or choose another --workdir")
    with scaffold.lock_workdir(workdir):  # released with its holder: never stale
        pass


def test_a_workdir_that_cannot_be_written_is_one_line_before_anything_runs():
    workdir = "/sys/fs/ptx-no-such-workdir"  # sysfs: nobody, root included, creates a folder there
    with pytest.raises(scaffold.RunError, match=f"^{workdir}: cannot write there \\(.+\\); choose a writable"):
        with scaffold.lock_workdir(workdir):
            pass


def test_a_killed_runs_unfinished_checkpoint_folders_are_removed_on_resume(tmp_path):
    tmp = tmp_path / "checkpoints" / "100.orbax-checkpoint-tmp-1712"
    os.makedirs(tmp / "state")
    ckpt = checkpoint.Checkpointer(str(tmp_path), every=1, keep=2)
    ckpt.close()
    assert not tmp.exists() and ckpt.latest_step() is None
