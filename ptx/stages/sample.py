"""The `sample` stage: prompts from a file or the command line -> samples.jsonl.

A model whose tokenizer has a chat template gets each prompt as a user message
(or a file's message lists) rendered with the generation prompt, and stops at
any of its stop ids; others get the configured prompt template.

python -m ptx.main --config=configs/sample.py --workdir=runs/sample \
    --config.checkpoint=runs/sft --config.prompt="What is 2 + 3?"
"""
import json
import os

import jax
import numpy as np

from ptx import data, inference, sampler, sharding
from ptx.stages import common

FINISH_NAMES = {sampler.FINISH_EOS: "eos", sampler.FINISH_STOP: "stop", sampler.FINISH_LENGTH: "length"}


def run(config, workdir: str, devices=None) -> str:
    """Samples every prompt `sampling.num_samples` times; returns the path of samples.jsonl.
    devices: the mesh's (None = all)."""
    mesh = sharding.make_mesh(common.typed(config, "mesh", sharding.MeshConfig), devices)
    sharding.check_batch(mesh, config.batch_size, "batch_size")
    workdir = os.path.abspath(workdir)
    common.write_config(config, workdir)
    policy = inference.load_policy(config.checkpoint, mesh)
    template, chat = common.template(config), common.use_chat(config, policy.tok)
    if config.prompt:
        prompt = [{"role": "user", "content": config.prompt}] if chat else template.format_prompt(config.prompt)
        rows = [{"prompt": prompt}]
    else:
        rows, stats = data.load_rows(config.prompts, "prompt", template=template, chat=chat,
                                     on_bad_row=config.data.on_bad_row)
        common.report_skipped(workdir, stats)
    arrays, _ = data.encode_prompts(rows, policy.tok, max_prompt_len=config.data.max_prompt_len)
    s = common.typed(config, "sampling", sampler.SamplingConfig)
    tokens = np.repeat(arrays["prompt_tokens"], s.num_samples, axis=0)
    lens = np.repeat(arrays["prompt_lens"], s.num_samples, axis=0)
    smp = inference.Sampler(policy, batch_size=config.batch_size, max_new_tokens=s.max_new_tokens,
                            stops=list(s.stop), keep_stop=s.keep_stop, group_size=s.num_samples,
                            engine=s.engine)
    chunks = smp(tokens, lens, config.seed, temperature=s.temperature, top_k=s.top_k, top_p=s.top_p,
                 min_p=s.min_p)
    texts = smp.texts(chunks)
    reasons = np.concatenate([c["finish_reason"] for c in chunks])
    out_path = config.output or os.path.join(workdir, "samples.jsonl")
    if jax.process_index() == 0:
        with open(out_path, "w") as f:
            for i, text in enumerate(texts):
                prompt = data.prompt_text(rows[i // s.num_samples], policy.tok)
                record = {"prompt": prompt, "completion": text, "finish_reason": FINISH_NAMES[int(reasons[i])]}
                f.write(json.dumps(record) + "\n")
                print(f"{prompt}{text}\n[{record['finish_reason']}]")
    return out_path
