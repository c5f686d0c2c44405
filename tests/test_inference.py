"""ptx.inference: the batched Sampler over a loaded policy (chunks, group prefill)."""
import types

import jax
import numpy as np
import pytest

from ptx import inference, sharding

import test_sampler

# test_sampler's model, prompts and module fixtures (pytest finds fixtures by name here).
CFG, EOS, MAX_NEW, PAD, PROMPT_LENS = (test_sampler.CFG, test_sampler.EOS, test_sampler.MAX_NEW, test_sampler.PAD,
                                       test_sampler.PROMPT_LENS)
params, prompts = test_sampler.params, test_sampler.prompts


@pytest.mark.parametrize("group_size", [3, 4])
def test_sampler_chunks_with_group_prefill_are_those_of_prefilling_every_copy(params, prompts, group_size):
    """inference.Sampler over 4 prompts x 3 samples in chunks of 6 rows (the last padded): with
    group_size 3 each chunk prefills 2 prompts; 4 does not divide the chunk, so it prefills all."""
    tok = types.SimpleNamespace(eos_ids=(EOS,), pad_id=PAD, vocab_size=CFG.vocab_size)
    policy = inference.Policy(CFG, params, tok, sharding.make_mesh(sharding.MeshConfig(), jax.devices()[:1]))
    rows = np.repeat(np.arange(len(PROMPT_LENS)), 3)
    each, grouped = (inference.Sampler(policy, batch_size=6, max_new_tokens=MAX_NEW, group_size=g)
                     for g in (1, group_size))
    assert grouped.group_size == (3 if group_size == 3 else 1)
    a, b = (smp(prompts[rows], PROMPT_LENS[rows], 7, temperature=1.0) for smp in (each, grouped))
    assert [c["rows"] for c in a] == [c["rows"] for c in b] == [6, 6]
    for x, y in zip(a, b):
        for k in ("tokens", "lengths", "finish_reason"):
            np.testing.assert_array_equal(x[k], y[k])
        np.testing.assert_allclose(x["logprobs"], y["logprobs"], rtol=1e-5, atol=1e-5)
