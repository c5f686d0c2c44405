"""Sampling from a checkpoint: the `sample` stage, and the batched helper that
best-of-N and evaluation share.

python -m ptx.main --config=configs/sample.py --workdir=runs/sample \
    --config.checkpoint=runs/sft --config.prompt="What is 2 + 3?"
"""
import dataclasses
import json
import os

import jax
import jax.numpy as jnp
import numpy as np

from ptx import checkpoint, data, rollout, sampler, sharding, train
from ptx.model import ModelConfig
from ptx.tokenizer import Tokenizer, load_tokenizer


@dataclasses.dataclass
class Policy:
    """A model loaded from a checkpoint, ready to sample."""

    cfg: ModelConfig
    params: dict
    tok: Tokenizer
    mesh: jax.sharding.Mesh


def load_policy(path: str, mesh) -> Policy:
    cfg = ModelConfig(**checkpoint.read_meta(path)["model"])
    params, _ = checkpoint.load_params(path, train.param_shardings_for(cfg, mesh))
    return Policy(cfg, params, load_tokenizer(checkpoint.tokenizer_path(path)), mesh)


def stop_ids(tok: Tokenizer, stops) -> tuple:
    """Stop strings -> static tuple of token-id tuples."""
    return tuple(tuple(tok.encode(s)) for s in stops if s)


class Sampler:
    """`generate` compiled once for a policy, a batch size and static settings."""

    def __init__(self, policy: Policy, *, batch_size: int, max_new_tokens: int, stops=(), keep_stop=False):
        self.policy, self.batch_size = policy, batch_size
        shards = policy.mesh.shape["data"] * policy.mesh.shape["fsdp"]
        if batch_size % shards:
            raise ValueError(f"sampling batch_size={batch_size} must be a multiple of the "
                             f"{shards} data-parallel devices of the mesh")
        self.fn = sampler.make_generate_fn(policy.cfg, max_new_tokens=max_new_tokens,
                                           eos_id=policy.tok.eos_id, pad_id=policy.tok.pad_id,
                                           stop_sequences=stop_ids(policy.tok, stops), keep_stop=keep_stop,
                                           n_tokens=policy.tok.vocab_size)
        self.build = jax.jit(lambda t, n, out: rollout.build_sequences(t, n, out, pad_id=policy.tok.pad_id))

    def __call__(self, prompt_tokens, prompt_lens, seed: int, *, params=None, temperature=1.0, top_k=0,
                 top_p=1.0, min_p=0.0):
        """Sample every row (chunks of batch_size; the last is padded by repetition).

        prompt_tokens: [n, P] int32 right-padded; prompt_lens: [n] int32.
        Row i draws with key fold_in(PRNGKey(seed), i), so results do not
        depend on the batch size. Returns a list of dicts per chunk with the
        host arrays (tokens, lengths, finish_reason, logprobs) and the
        device sequence batch `seq` (see rollout.build_sequences).
        """
        n, bs, mesh = len(prompt_lens), self.batch_size, self.policy.mesh
        base = jax.random.PRNGKey(seed)
        chunks = []
        # Set as the context, so that the model constrains its activations and KV cache to it.
        with jax.set_mesh(mesh):
            for start in range(0, n, bs):
                idx = np.arange(start, start + bs) % n
                keys = np.asarray(jax.vmap(lambda i: jax.random.fold_in(base, i))(jnp.asarray(idx)))
                # Every process passes the whole chunk and gets all of it back (multi-process runs).
                placed = sharding.put_global({"t": prompt_tokens[idx], "n": prompt_lens[idx], "k": keys}, mesh)
                out = self.fn(params if params is not None else self.policy.params, placed["t"], placed["n"],
                              placed["k"], temperature, top_k, top_p, min_p)
                host = sharding.gather({"tokens": out.tokens, "lengths": out.lengths,
                                        "finish_reason": out.finish_reason, "logprobs": out.logprobs})
                keep = min(bs, n - start)
                chunks.append({"rows": keep, "seq": self.build(placed["t"], placed["n"], out),
                               **{k: v[:keep] for k, v in host.items()}})
        return chunks

    def texts(self, chunks) -> list[str]:
        return [self.policy.tok.decode(t[:l]) for c in chunks for t, l in zip(c["tokens"], c["lengths"])]


def run(config, workdir: str):
    """The `sample` stage: prompts from a file or the command line -> samples.jsonl."""
    workdir = os.path.abspath(workdir)
    train.write_config(config, workdir)
    if not config.checkpoint:
        raise ValueError("sample needs --config.checkpoint (a ptx workdir)")
    mesh = sharding.make_mesh(config.mesh)
    policy = load_policy(config.checkpoint, mesh)
    template = train.template(config)
    if config.prompt:
        rows = [{"prompt": template.format_prompt(config.prompt)}]
    elif config.prompts:
        rows, _ = data.load_rows(config.prompts, "prompt", template=template, on_bad_row=config.data.on_bad_row)
    else:
        raise ValueError("sample needs --config.prompt or --config.prompts (a jsonl file)")
    arrays, _ = data.encode_prompts(rows, policy.tok, max_prompt_len=config.data.max_prompt_len)
    s = config.sampling
    tokens = np.repeat(arrays["prompt_tokens"], s.num_samples, axis=0)
    lens = np.repeat(arrays["prompt_lens"], s.num_samples, axis=0)
    smp = Sampler(policy, batch_size=config.batch_size, max_new_tokens=s.max_new_tokens,
                  stops=list(s.stop), keep_stop=s.keep_stop)
    chunks = smp(tokens, lens, config.seed, temperature=s.temperature, top_k=s.top_k, top_p=s.top_p,
                 min_p=s.min_p)
    texts = smp.texts(chunks)
    reasons = np.concatenate([c["finish_reason"] for c in chunks])
    names = {sampler.FINISH_EOS: "eos", sampler.FINISH_STOP: "stop", sampler.FINISH_LENGTH: "length"}
    out_path = config.output or os.path.join(workdir, "samples.jsonl")
    if jax.process_index() == 0:
        with open(out_path, "w") as f:
            for i, text in enumerate(texts):
                row = rows[i // s.num_samples]
                record = {"prompt": row["prompt"], "completion": text, "finish_reason": names[int(reasons[i])]}
                f.write(json.dumps(record) + "\n")
                print(f"{row['prompt']}{text}\n[{record['finish_reason']}]")
    return out_path
