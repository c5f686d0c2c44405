"""Best-of-N: sample N completions per prompt in batched sampler calls, score
all with a reward source, keep the best.

python -m ptx.main --config=configs/best_of_n.py --workdir=runs/bon \
    --config.checkpoint=runs/sft --config.reward.checkpoint=runs/rm
Writes candidates.jsonl (every candidate with its score) and results.json
(mean reward of the best, a random and the worst candidate for each N).
"""
import json
import math
import os

import numpy as np

from ptx import data, inference, rewards, sharding, train


def kl_bound(n: int) -> float:
    """Analytic KL(best-of-n || base) upper bound: log n - (n - 1) / n."""
    return math.log(n) - (n - 1) / n


def select(scores: np.ndarray, ns) -> dict:
    """scores: [prompts, N_max] float. For each n, the first n candidates of each
    prompt compete (so every N reuses the same samples).

    Returns {n: {'best_index' [prompts] int, 'best', 'random', 'worst' (means)}};
    'random' is the first candidate, an unbiased pick since samples are i.i.d.
    """
    out = {}
    for n in ns:
        if n > scores.shape[1]:
            raise ValueError(f"best-of-{n} asked for but only {scores.shape[1]} samples per prompt")
        head = scores[:, :n]
        out[n] = {"best_index": np.argmax(head, axis=1), "best": float(head.max(1).mean()),
                  "random": float(head[:, 0].mean()), "worst": float(head.min(1).mean())}
    return out


def sample_and_score(smp: inference.Sampler, source, prompt_tokens, prompt_lens, n: int, seed: int,
                     settings: dict, prompts_text: list[str]):
    """n samples per prompt, scored. Returns (texts [prompts][n], scores [prompts, n] float32)."""
    tokens = np.repeat(prompt_tokens, n, axis=0)
    lens = np.repeat(prompt_lens, n, axis=0)
    repeated = [p for p in prompts_text for _ in range(n)]
    chunks = smp(tokens, lens, seed, **settings)
    texts, scores, start = [], [], 0
    for c in chunks:
        chunk_texts = smp.texts([c])
        chunk_prompts = repeated[start:start + c["rows"]]
        # A padded last chunk: score the full device batch, keep the real rows.
        full_prompts = chunk_prompts + [chunk_prompts[-1]] * (smp.batch_size - c["rows"])
        full_texts = chunk_texts + [chunk_texts[-1]] * (smp.batch_size - c["rows"])
        scores.append(source(c["seq"], full_prompts, full_texts)[:c["rows"]])
        texts.extend(chunk_texts)
        start += c["rows"]
    scores = np.concatenate(scores).reshape(len(prompt_lens), n)
    return [texts[i * n:(i + 1) * n] for i in range(len(prompt_lens))], scores


def run(config, workdir: str) -> dict:
    workdir = os.path.abspath(workdir)
    train.write_config(config, workdir)
    mesh = sharding.make_mesh(config.mesh)
    policy = inference.load_policy(config.checkpoint, mesh)
    prompt_path = config.prompts or train.world_files(config, workdir)["heldout"]
    rows, _ = data.load_rows(prompt_path, "prompt", template=train.template(config),
                             on_bad_row=config.data.on_bad_row)
    arrays, _ = data.encode_prompts(rows, policy.tok, max_prompt_len=config.data.max_prompt_len)
    source = rewards.make_source(config.reward, mesh)
    s = config.sampling
    n_max = max(config.ns)
    smp = inference.Sampler(policy, batch_size=config.batch_size, max_new_tokens=s.max_new_tokens,
                            stops=list(s.stop), keep_stop=s.keep_stop)
    settings = dict(temperature=s.temperature, top_k=s.top_k, top_p=s.top_p, min_p=s.min_p)
    prompts = [r["prompt"] for r in rows]
    texts, scores = sample_and_score(smp, source, arrays["prompt_tokens"], arrays["prompt_lens"], n_max,
                                     config.seed, settings, prompts)
    picked = select(scores, config.ns)
    with open(os.path.join(workdir, "candidates.jsonl"), "w") as f:
        for i, row in enumerate(rows):
            for j in range(n_max):
                f.write(json.dumps({"prompt": row["prompt"], "candidate": j, "completion": texts[i][j],
                                    "score": float(scores[i, j])}) + "\n")
    results = {f"best_of_{n}": {k: v for k, v in r.items() if k != "best_index"} | {"kl_bound": kl_bound(n)}
               for n, r in picked.items()}
    with open(os.path.join(workdir, "results.json"), "w") as f:
        json.dump(results, f, indent=2)
    print(f"{'N':>4} {'best':>8} {'random':>8} {'worst':>8} {'KL bound':>9}")
    for n, r in picked.items():
        print(f"{n:>4} {r['best']:8.4f} {r['random']:8.4f} {r['worst']:8.4f} {kl_bound(n):9.4f}")
    return results
