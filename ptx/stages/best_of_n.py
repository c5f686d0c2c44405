"""The `best_of_n` stage: N samples per prompt from a policy, a reward source picks.

python -m ptx.main --config=configs/best_of_n.py --workdir=runs/bon \
    --config.checkpoint=runs/sft --config.reward.checkpoint=runs/rm
Writes candidates.jsonl (every candidate with its score) and results.json
(mean reward of the best, a random and the worst candidate for each N).
"""
import json
import os

import jax

from ptx import best_of_n, data, inference, rewards, sampler, sharding
from ptx.stages import common


def run(config, workdir: str) -> dict:
    reward_cfg = common.typed(config, "reward", rewards.SourceConfig)
    mesh = sharding.make_mesh(common.typed(config, "mesh", sharding.MeshConfig))
    sharding.check_batch(mesh, config.batch_size, "batch_size")
    workdir = os.path.abspath(workdir)
    common.write_config(config, workdir)
    policy = inference.load_policy(config.checkpoint, mesh)
    prompt_path = config.prompts or common.make_world(config).write(os.path.join(workdir, "world"))["heldout"]
    rows, stats = data.load_rows(prompt_path, "prompt", template=common.template(config),
                                 chat=common.use_chat(config, policy.tok), on_bad_row=config.data.on_bad_row)
    common.report_skipped(workdir, stats)
    arrays, _ = data.encode_prompts(rows, policy.tok, max_prompt_len=config.data.max_prompt_len)
    source = rewards.make_source(reward_cfg, mesh)
    s = common.typed(config, "sampling", sampler.SamplingConfig)
    n_max = max(config.ns)
    smp = inference.Sampler(policy, batch_size=config.batch_size, max_new_tokens=s.max_new_tokens,
                            stops=list(s.stop), keep_stop=s.keep_stop, group_size=n_max,
                            engine=s.engine)
    settings = dict(temperature=s.temperature, top_k=s.top_k, top_p=s.top_p, min_p=s.min_p)
    prompts = [data.prompt_text(r, policy.tok) for r in rows]
    texts, scores = best_of_n.sample_and_score(smp, source, arrays["prompt_tokens"], arrays["prompt_lens"], n_max,
                                               config.seed, settings, prompts, rows=rows)
    picked = best_of_n.select(scores, config.ns)
    results = {f"best_of_{n}": {k: v for k, v in r.items() if k != "best_index"} | {"kl_bound": best_of_n.kl_bound(n)}
               for n, r in picked.items()}
    if jax.process_index() == 0:
        common.write_jsonl(os.path.join(workdir, "candidates.jsonl"), [
            {"prompt": prompts[i], "candidate": j, "completion": texts[i][j], "score": float(scores[i, j])}
            for i in range(len(rows)) for j in range(n_max)])
        with open(os.path.join(workdir, "results.json"), "w") as f:
            json.dump(results, f, indent=2)
        print(f"{'N':>4} {'best':>8} {'random':>8} {'worst':>8} {'KL bound':>9}")
        for n, r in picked.items():
            print(f"{n:>4} {r['best']:8.4f} {r['random']:8.4f} {r['worst']:8.4f} {best_of_n.kl_bound(n):9.4f}")
    return results
