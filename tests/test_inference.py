"""ptx.inference: the batched Sampler over a loaded policy (chunks, group prefill)."""
import types

import jax
import numpy as np
import pytest

from ptx import inference, sampler, sharding

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


@pytest.mark.parametrize("temperature,group_size,stops", [(0.0, 1, ()), (1.0, 3, ()), (1.0, 1, ("stop",))])
def test_the_paged_engine_samples_the_chunks_of_the_static_sampler_on_one_device(params, prompts, temperature,
                                                                                 group_size, stops):
    """engine=paged against static over 4 prompts x 3 samples in chunks of 6 rows: greedy, sampled with
    the same keys (a group's prompt prefilled once) and with a stop sequence: the same tokens, lengths
    and finish reasons, log-probs within 1e-5; the sequence batch on the mesh."""
    tok = types.SimpleNamespace(eos_ids=(EOS,), pad_id=PAD, vocab_size=CFG.vocab_size,
                                encode=lambda s: [10, 28])  # the stop string's ids: one sampled row has them
    mesh = sharding.make_mesh(sharding.MeshConfig(), jax.devices()[:1])
    policy = inference.Policy(CFG, params, tok, mesh)
    rows = np.repeat(np.arange(len(PROMPT_LENS)), 3)
    static, paged = (inference.Sampler(policy, batch_size=6, max_new_tokens=MAX_NEW, stops=stops,
                                       group_size=group_size, engine=kind) for kind in ("static", "paged"))
    a, b = (smp(prompts[rows], PROMPT_LENS[rows], 7, temperature=temperature) for smp in (static, paged))
    assert [c["rows"] for c in a] == [c["rows"] for c in b] == [6, 6]
    for x, y in zip(a, b):
        for k in ("tokens", "lengths", "finish_reason"):
            np.testing.assert_array_equal(x[k], y[k])
        np.testing.assert_allclose(x["logprobs"], y["logprobs"], rtol=1e-5, atol=1e-5)
        assert y["seq"]["tokens"].sharding.mesh == mesh
        np.testing.assert_array_equal(np.asarray(x["seq"]["tokens"]), np.asarray(y["seq"]["tokens"]))
    reasons = set(np.concatenate([c["finish_reason"] for c in a]).tolist())
    assert reasons == {sampler.FINISH_EOS, sampler.FINISH_LENGTH} | ({sampler.FINISH_STOP} if stops else set())


def test_the_paged_engine_on_the_8_device_mesh_is_an_error_naming_the_field(params):
    tok = types.SimpleNamespace(eos_ids=(EOS,), pad_id=PAD, vocab_size=CFG.vocab_size)
    policy = inference.Policy(CFG, params, tok, sharding.make_mesh(sharding.MeshConfig()))
    with pytest.raises(ValueError, match=r"sampling\.engine='paged' runs on one device .* 8 devices"):
        inference.Sampler(policy, batch_size=8, max_new_tokens=MAX_NEW, engine="paged")
    with pytest.raises(ValueError, match=r"eval\.engine='beam'; expected one of"):
        inference.Sampler(policy, batch_size=8, max_new_tokens=MAX_NEW, engine="beam", field="eval.engine")
