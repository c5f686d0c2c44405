"""Test set-up: 8 host CPU devices so mesh code runs as on a pod slice."""
import glob
import json
import os
import struct
import sys

import numpy as np
import pytest

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# All host devices share one thread pool (8 threads on a 2-core machine). A device can
# block two of them at once in collectives (one inside the layer scan, one outside), so 8
# devices could starve each other into XLA's 40 s rendezvous abort (seen about 1 run in 4).
os.environ.setdefault("PJRT_NPROC", "16")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# Many tests build the same tiny models: a persistent compilation cache lets
# identical programs compile once per machine instead of once per test.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(os.path.expanduser("~"), ".cache", "ptx-jax-tests"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")

# Below the environment above: jax reads XLA_FLAGS and JAX_PLATFORMS when it is first imported.
import jax  # noqa: E402
from tensorboardX.proto import event_pb2  # noqa: E402

from configs import dapo as dapo_config  # noqa: E402
from configs import grpo as grpo_config  # noqa: E402
from configs import gspo as gspo_config  # noqa: E402
from configs import ppo as ppo_config  # noqa: E402
from configs import quickstart as quickstart_config  # noqa: E402
from configs import reward as reward_config  # noqa: E402
from configs import sft as sft_config  # noqa: E402
from ptx import checkpoint, hf, metrics  # noqa: E402
from ptx.stages import quickstart as quickstart_stage  # noqa: E402
from ptx.stages import supervised  # noqa: E402

from chat_dirs import FAMILIES, make_bpe_json, write_dir  # noqa: E402


@pytest.fixture(scope="session")
def quickstart(tmp_path_factory):
    """The quickstart shortened to a few steps per stage, run once per session:
    (workdir, results.json as written)."""
    workdir = tmp_path_factory.mktemp("quickstart")
    quickstart_stage.run(quickstart_config.get_config("tiny"), str(workdir))
    with open(workdir / "results.json") as f:
        return str(workdir), json.load(f)


@pytest.fixture(scope="session")
def sft_dir(tmp_path_factory):
    """A tiny SFT run on the embedded world (10 steps): the policy and base of RL and LoRA tests."""
    d = tmp_path_factory.mktemp("sft")
    c = sft_config.get_config("tiny")
    c.train.steps, c.train.eval_every = 10, 0
    supervised.run(c, str(d))
    return str(d)


# Helpers that several test files share: `from conftest import read_metrics` (as chat_dirs.py is imported).

def read_metrics(workdir, key=None):
    """metrics.jsonl's rows; with `key`, only the rows that hold it (an RL run's training rows hold "loss")."""
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    return rows if key is None else [r for r in rows if key in r]


def host_params(workdir):
    """The newest checkpoint's parameters in host memory."""
    return jax.device_get(checkpoint.load_params(str(workdir))[0])


def assert_trees_close(a, b, **tol):
    jax.tree_util.tree_map(lambda x, y: np.testing.assert_allclose(x, y, **tol), a, b)


def write_jsonl(path, rows) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def rl_cfg(kind, sft_dir, seed=0, steps=1):
    """The tiny config of an RL `kind` from the SFT checkpoint, rewarded by reward_fns.letter_share."""
    c = {"ppo": ppo_config, "gspo": gspo_config, "dapo": dapo_config}.get(kind, grpo_config).get_config("tiny")
    c.seed = seed
    c.init.checkpoint = sft_dir
    c.reward.source = "function"
    c.reward.function = "reward_fns:letter_share"
    c.rl.critic = "policy"
    c.train.steps = steps
    c.train.ckpt_every = 0
    if kind == "rloo":
        c.rl.advantage, c.rl.kl_in_loss, c.rl.kl_estimator = "rloo", False, "k1"
    return c


# Resume: a run killed at a chosen point, then resumed, against an uninterrupted one.

TIMINGS = ("tokens_per_s", "completion_tokens_per_s")


def comparable(rows):
    """metrics.jsonl rows without their timings."""
    return [{k: v for k, v in r.items() if k not in TIMINGS} for r in rows]


def tb_scalars(workdir):
    """(tag, step, value) as TensorBoard shows them: event files in name order, where a session
    START at step s (SummaryWriter's purge_step) hides the events before it at steps >= s."""
    shown = []
    for path in sorted(glob.glob(os.path.join(workdir, "tb", "events.out.tfevents.*"))):
        with open(path, "rb") as f:
            raw = f.read()
        i = 0
        while i + 12 <= len(raw):
            (n,) = struct.unpack("<Q", raw[i:i + 8])
            event = event_pb2.Event.FromString(raw[i + 12:i + 12 + n])
            i += 12 + n + 4
            if event.HasField("session_log") and event.session_log.status == event_pb2.SessionLog.START:
                shown = [s for s in shown if s[1] < event.step]
            shown += [(v.tag, event.step, v.simple_value) for v in event.summary.value
                      if v.HasField("simple_value") and v.tag not in TIMINGS]
    return sorted(shown)


def kill_at(monkeypatch, where: str, step: int):
    """Stop the next run like a kill -9: 'log' right after the metrics line of `step`, 'checkpoint'
    while its checkpoint is written (a torn write leaves orbax's temporary directory behind)."""
    if where == "log":
        real = metrics.MetricWriter.write

        def write(self, s, scalars, **kw):
            row = real(self, s, scalars, **kw)
            if s == step:
                raise KeyboardInterrupt("killed")
            return row

        monkeypatch.setattr(metrics.MetricWriter, "write", write)
    else:
        real = checkpoint.Checkpointer.save

        def save(self, s, state, meta, **kw):
            if s == step:
                os.makedirs(os.path.join(self.manager.directory, f"{s}.orbax-checkpoint-tmp-1"))
                raise KeyboardInterrupt("killed")
            return real(self, s, state, meta, **kw)

        monkeypatch.setattr(checkpoint.Checkpointer, "save", save)


def read_jsonl(path):
    with open(path) as f:
        return [json.loads(line) for line in f]


@pytest.fixture
def resumes_like_straight(tmp_path, monkeypatch):
    """check(run, config, kills): `run(config, workdir)` straight, and killed at each of `kills`
    ((where, step, newest checkpoint left), see `kill_at`) then resumed: bit-identical
    parameters, metrics.jsonl line for line (timings aside) and the same TensorBoard scalars."""
    def params(workdir):
        return jax.device_get(checkpoint.load_params(str(workdir))[0])

    def check(run, config, kills):
        straight = tmp_path / "straight"
        run(config, str(straight))
        for where, step, left in kills:
            workdir = tmp_path / f"{where}{step}"
            with monkeypatch.context() as m:
                kill_at(m, where, step)
                with pytest.raises(KeyboardInterrupt):
                    run(config, str(workdir))
            saved = [int(d) for d in os.listdir(checkpoint.checkpoint_dir(str(workdir))) if d.isdigit()]
            assert max(saved, default=None) == left
            run(config, str(workdir))
            jax.tree_util.tree_map(np.testing.assert_array_equal, params(straight), params(workdir))
            assert (comparable(read_jsonl(workdir / "metrics.jsonl"))
                    == comparable(read_jsonl(straight / "metrics.jsonl"))), (where, step)
            assert tb_scalars(workdir) == tb_scalars(straight), (where, step)

    return check


# Hugging Face tokenizer directories (tests/chat_dirs.py), built once for every test file that reads them.
@pytest.fixture(scope="session")
def bpe_json() -> str:
    return make_bpe_json()


@pytest.fixture(scope="session")
def dirs(bpe_json, tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("hf_tok")
    return {f: write_dir(root / f, bpe_json, f) for f in FAMILIES}


@pytest.fixture(scope="session")
def toks(dirs) -> dict:
    return {f: hf.load_tokenizer(d) for f, d in dirs.items()}


@pytest.fixture(scope="session")
def hf_toks(dirs) -> dict:
    transformers = pytest.importorskip("transformers")
    return {f: transformers.AutoTokenizer.from_pretrained(d) for f, d in dirs.items()}


@pytest.fixture(scope="session")
def sft_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "sft.jsonl"
    rng = np.random.default_rng(0)
    with open(path, "w") as f:
        for _ in range(64):
            a, b = rng.integers(0, 10, 2)
            f.write(json.dumps({"prompt": f"What is {a} + {b}?", "completion": f"{a} + {b} = {a + b}."}) + "\n")
    return str(path)


@pytest.fixture(scope="session")
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


def assert_same_params(a, b):
    flat_a, flat_b = jax.tree_util.tree_leaves_with_path(a), jax.tree_util.tree_leaves_with_path(b)
    assert [p for p, _ in flat_a] == [p for p, _ in flat_b]
    for (path, x), (_, y) in zip(flat_a, flat_b):
        assert x.dtype == y.dtype, path
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y), err_msg=str(path))
