"""The `ai_feedback` stage (RLAIF labels): two samples per prompt from a policy, a judge
model picks the better one (both orders averaged against position bias).

python -m ptx.main --config=configs/ai_feedback.py:tiny --workdir=runs/aif \
    --config.policy_checkpoint=runs/sft --config.judge_checkpoint=runs/pt
Writes preferences.jsonl ({prompt, chosen, rejected, prob_chosen}, an input of the
reward and DPO stages) and stats.json.
"""
import json
import os

import jax
import numpy as np

from ptx import data, inference, judge, sampler, sharding
from ptx.stages import common
from ptx.tokenizer import PromptTemplate


def run(config, workdir: str) -> dict:
    mesh = sharding.make_mesh(common.typed(config, "mesh", sharding.MeshConfig))
    sharding.check_batch(mesh, config.batch_size, "batch_size")
    sharding.check_batch(mesh, config.judge.batch_size, "judge.batch_size")
    workdir = os.path.abspath(workdir)
    common.write_config(config, workdir)
    policy = inference.load_policy(config.policy_checkpoint, mesh)
    same = os.path.abspath(config.judge_checkpoint) == os.path.abspath(config.policy_checkpoint)
    judge_model = judge.Judge(policy if same else inference.load_policy(config.judge_checkpoint, mesh),
                              principles=tuple(config.judge.principles), template=config.judge.template or None,
                              batch_size=config.judge.batch_size)

    prompt_path, _ = common.data_paths(config, workdir)
    # Bare requests (an empty template), as the reward and DPO stages expect them in the output.
    rows, stats = data.load_rows(prompt_path, "prompt", template=PromptTemplate("", ""),
                                 on_bad_row=config.data.on_bad_row)
    common.report_skipped(workdir, stats)
    prompts = list(dict.fromkeys(r["prompt"] for r in rows))
    if config.num_prompts:
        prompts = prompts[:config.num_prompts]
    prompts = [p for p in prompts for _ in range(config.pairs_per_prompt)]
    template = common.template(config)
    arrays, _ = data.encode_prompts([{"prompt": template.format_prompt(p)} for p in prompts], policy.tok,
                                    max_prompt_len=config.data.max_prompt_len)
    s = common.typed(config, "sampling", sampler.SamplingConfig)
    smp = inference.Sampler(policy, batch_size=config.batch_size, max_new_tokens=s.max_new_tokens,
                            stops=list(s.stop), keep_stop=s.keep_stop, group_size=2,
                            engine=s.engine)
    chunks = smp(np.repeat(arrays["prompt_tokens"], 2, axis=0), np.repeat(arrays["prompt_lens"], 2, axis=0),
                 config.seed, temperature=s.temperature, top_k=s.top_k, top_p=s.top_p, min_p=s.min_p)
    texts = [t.strip() for t in smp.texts(chunks)]
    # An empty answer is a bad row for the preference schema, and two equal ones carry no preference.
    keep = [i for i in range(len(prompts)) if texts[2 * i] and texts[2 * i + 1]
            and texts[2 * i] != texts[2 * i + 1]]
    # The world's oracle grades only the world's requests.
    grade = None if config.data.train else common.make_world(config).score
    prefs, stats = judge.label_pairs(judge_model, [prompts[i] for i in keep], [texts[2 * i] for i in keep],
                                     [texts[2 * i + 1] for i in keep], threshold=config.judge.threshold,
                                     grade=grade)
    stats = {"n_prompts": len(prompts) // config.pairs_per_prompt, "n_sampled_pairs": len(prompts),
             "n_degenerate": len(prompts) - len(keep), **stats}
    common.write_jsonl(os.path.join(workdir, "preferences.jsonl"), prefs)
    if jax.process_index() == 0:
        with open(os.path.join(workdir, "stats.json"), "w") as f:
            json.dump(stats, f, indent=2)
        print(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in stats.items()))
    return stats
