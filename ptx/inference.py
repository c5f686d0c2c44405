"""Sampling from a checkpoint: a policy loaded onto a mesh and the batched sampler
that the sample, best-of-N and AI-feedback stages and the evaluation share."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from ptx import checkpoint, rollout, sharding
from ptx import engine as engine_lib
from ptx.model import ModelConfig
from ptx.tokenizer import HFTokenizer, Tokenizer, load_tokenizer


@dataclasses.dataclass
class Policy:
    """A model loaded from a checkpoint, ready to sample."""

    cfg: ModelConfig
    params: dict
    tok: Tokenizer | HFTokenizer
    mesh: jax.sharding.Mesh


def load_policy(path: str, mesh) -> Policy:
    params, meta = checkpoint.load_params(path, mesh)
    return Policy(ModelConfig(**meta["model"]), params, load_tokenizer(checkpoint.tokenizer_path(path)), mesh)


def stop_ids(tok: Tokenizer, stops) -> tuple:
    """Stop strings -> static tuple of token-id tuples."""
    return tuple(tuple(tok.encode(s)) for s in stops if s)


class Sampler:
    """`generate` compiled once for a policy, a batch size and static settings.

    group_size: the rows come in groups of that many consecutive copies of one
    prompt (n samples per prompt), each group's prompt prefilled once; the
    samples are those of prefilling every copy. 1 if it does not divide
    batch_size. engine: the decoder, `sampler.ENGINES` (`engine.generate_fn`), set by the config
    field `field`.
    """

    def __init__(self, policy: Policy, *, batch_size: int, max_new_tokens: int, stops=(), keep_stop=False,
                 group_size: int = 1, engine: str = "static", field: str = "sampling.engine"):
        sharding.check_batch(policy.mesh, batch_size, "sampling batch_size")
        self.policy, self.batch_size = policy, batch_size
        self.group_size = group_size if group_size > 0 and batch_size % group_size == 0 else 1
        self.fn = engine_lib.generate_fn(engine, policy.cfg, policy.mesh, field=field, max_new_tokens=max_new_tokens,
                                         eos_id=policy.tok.eos_ids, pad_id=policy.tok.pad_id,
                                         stop_sequences=stop_ids(policy.tok, stops), keep_stop=keep_stop,
                                         n_tokens=policy.tok.vocab_size, group_size=self.group_size)
        self.build = jax.jit(lambda t, n, out: rollout.build_sequences(t, n, out, pad_id=policy.tok.pad_id))

    def __call__(self, prompt_tokens, prompt_lens, seed: int, *, params=None, temperature=1.0, top_k=0,
                 top_p=1.0, min_p=0.0):
        """Sample every row (chunks of batch_size; the last is padded by repetition).

        prompt_tokens: [n, P] int32 right-padded; prompt_lens: [n] int32; with
        group_size, n a multiple of it and each group's rows copies of one prompt.
        Row i draws with key fold_in(PRNGKey(seed), i), so results do not
        depend on the batch size. Returns a list of dicts per chunk with the
        host arrays (tokens, lengths, finish_reason, logprobs) and the
        device sequence batch `seq` (see rollout.build_sequences).
        """
        base = jax.random.PRNGKey(seed)
        rows = {"tokens": prompt_tokens, "lens": prompt_lens,
                "keys": np.asarray(jax.vmap(lambda i: jax.random.fold_in(base, i))(
                    jnp.arange(len(prompt_lens))))}
        chunks = []
        # Set as the context, so that the model constrains its activations and KV cache to it.
        with jax.set_mesh(self.policy.mesh):
            # Every process passes the whole chunk and gets all of it back (multi-process runs).
            for placed, _, keep in sharding.chunks(rows, self.batch_size, self.policy.mesh):
                out = self.fn(params if params is not None else self.policy.params, placed["tokens"],
                              placed["lens"], placed["keys"], temperature, top_k, top_p, min_p)
                host = sharding.gather({"tokens": out.tokens, "lengths": out.lengths,
                                        "finish_reason": out.finish_reason, "logprobs": out.logprobs})
                chunks.append({"rows": keep, "seq": self.build(placed["tokens"], placed["lens"], out),
                               **{k: v[:keep] for k, v in host.items()}})
        return chunks

    def texts(self, chunks) -> list[str]:
        return [self.policy.tok.decode(t[:n]) for c in chunks for t, n in zip(c["tokens"], c["lengths"])]
